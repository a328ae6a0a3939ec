//! NBD server input: the fixed-newstyle handshake (client flags, option headers,
//! `Opt::parse`, `policy::negotiate`) and then transmission requests (`Request::parse`,
//! `policy::check`), read from one byte stream the way `nbd/session.rs` reads a socket.
//!
//! Invariants: every option answer is a run of well-formed option replies for the option
//! asked, ending in ACK or an error (or the EXPORT_NAME reply, whose length the no-zeroes
//! flag fixes); request headers re-encode to their bytes; an accepted command stays inside
//! the export, within the payload ceiling, and never writes a read-only export.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vdd::nbd::codec::{self, Opt, Request, OPTION_HEADER_LEN, REQUEST_LEN};
use vdd::nbd::policy::{self, Catalog, Command, ExportInfo, Negotiation, Next, MAX_PAYLOAD};

/// As `nbd/session.rs`: longer option data ends the connection.
const MAX_OPTION_DATA: u32 = 64 << 10;

struct Exports;
impl Catalog for Exports {
    fn list(&self) -> Vec<(String, String)> {
        vec![
            ("base".into(), "read-only base".into()),
            ("seat".into(), String::new()),
        ]
    }
    fn info(&self, name: &str) -> Option<ExportInfo> {
        let (size, read_only) = match name {
            "base" => (1 << 20, true),
            "seat" => ((1 << 20) + 7, false),
            "" => (0, false),
            _ => return None,
        };
        Some(ExportInfo {
            name: name.into(),
            description: if read_only {
                "read-only base".into()
            } else {
                String::new()
            },
            size,
            read_only,
        })
    }
}

struct Stream<'a>(&'a [u8]);
impl<'a> Stream<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (a, b) = self.0.split_at_checked(n)?;
        self.0 = b;
        Some(a)
    }
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

/// Walks option replies: each is magic, option, type, length, data; the last ends it.
fn check_replies(mut r: &[u8], opt: u32) -> u32 {
    let mut last = None;
    while !r.is_empty() {
        assert!(r.len() >= 20, "short option reply");
        assert_eq!(&r[..8], &codec::REPLY_MAGIC.to_be_bytes());
        assert_eq!(be32(&r[8..]), opt, "reply names another option");
        let kind = be32(&r[12..]);
        let len = be32(&r[16..]) as usize;
        assert!(r.len() >= 20 + len, "reply data runs past the reply");
        assert!(last.is_none(), "reply after the final one");
        if kind == codec::REP_ACK || kind & (1 << 31) != 0 {
            last = Some(kind);
        }
        r = &r[20 + len..];
    }
    last.expect("answer ends in ACK or an error")
}

fuzz_target!(|data: &[u8]| {
    let mut s = Stream(data);
    let Some(flags) = s.take(4).map(be32) else {
        return;
    };
    if flags & !(codec::FLAG_C_FIXED_NEWSTYLE | codec::FLAG_C_NO_ZEROES) != 0
        || flags & codec::FLAG_C_FIXED_NEWSTYLE == 0
    {
        return;
    }
    let mut st = Negotiation {
        no_zeroes: flags & codec::FLAG_C_NO_ZEROES != 0,
        ..Default::default()
    };
    let export = loop {
        let Some(h) = s.take(OPTION_HEADER_LEN) else {
            return;
        };
        let Ok((opt, len)) = codec::parse_option_header(h.try_into().unwrap()) else {
            return;
        };
        if len > MAX_OPTION_DATA {
            return;
        }
        let Some(d) = s.take(len as usize) else {
            return;
        };
        let parsed = Opt::parse(opt, d);
        if let Ok(Opt::Info { name, requests, .. }) = &parsed {
            assert!(name.len() + 6 + requests.len() * 2 == d.len());
        }
        let export_name = matches!(parsed, Ok(Opt::ExportName(_)));
        let was_structured = st.structured;
        let a = policy::negotiate(&mut st, opt, parsed, &Exports);
        assert!(
            st.structured || !was_structured,
            "structured replies are never undone"
        );
        if export_name {
            match &a.next {
                Next::Transmit(_) => {
                    let want = if st.no_zeroes { 10 } else { 134 };
                    assert_eq!(a.reply.len(), want, "EXPORT_NAME reply length");
                }
                Next::Close => assert!(a.reply.is_empty()),
                Next::Options => panic!("EXPORT_NAME cannot stay in negotiation"),
            }
        } else {
            let last = check_replies(&a.reply, opt);
            if matches!(a.next, Next::Transmit(_)) {
                assert_eq!(last, codec::REP_ACK, "GO into transmission ends with ACK");
            }
        }
        match a.next {
            Next::Options => {}
            Next::Close => return,
            Next::Transmit(info) => break info,
        }
    };
    while let Some(h) = s.take(REQUEST_LEN) {
        let h: &[u8; REQUEST_LEN] = h.try_into().unwrap();
        let Ok(req) = Request::parse(h) else {
            return;
        };
        assert_eq!(&req.encode(), h, "request header round trip");
        let within = |offset: u64, len: u32| {
            assert!(offset
                .checked_add(u64::from(len))
                .is_some_and(|e| e <= export.size));
        };
        match policy::check(&req, &export, st.structured) {
            Ok(Command::Read { offset, len }) => {
                assert!(len <= MAX_PAYLOAD);
                within(offset, len);
            }
            Ok(
                Command::Write { offset, len, .. }
                | Command::Trim { offset, len, .. }
                | Command::WriteZeroes { offset, len, .. },
            ) => {
                assert!(!export.read_only, "a write command on a read-only export");
                within(offset, len);
                if req.kind == codec::CMD_WRITE {
                    assert!(len <= MAX_PAYLOAD);
                }
            }
            Ok(Command::Cache { offset, len }) => within(offset, len),
            Ok(Command::Disconnect) => return,
            Ok(Command::Flush) => {}
            Err(errno) => assert!(
                [codec::EINVAL, codec::EPERM, codec::ENOSPC, codec::ENOTSUP].contains(&errno),
                "errno {errno}"
            ),
        }
        if req.kind == codec::CMD_WRITE && s.take(req.len as usize).is_none() {
            return;
        }
    }
});
