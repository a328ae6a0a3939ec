//! NBD policy, pure: which answer each handshake option gets, and whether a transmission
//! request is served or refused with which error. No sockets, no files, no logging.
//!
//! Spec: NetworkBlockDevice/nbd `doc/proto.md`, "Option types" (NBD_OPT_EXPORT_NAME, INFO,
//! GO, LIST, ABORT, STARTTLS, STRUCTURED_REPLY), "Request types" and "Error values".

use super::codec::{self, Opt, Request};

/// The largest READ or WRITE payload served: 32 MiB, the spec's suggested ceiling, which
/// is also what we announce as the maximum block size.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// The block size we suggest: page-sized requests are served straight from the page cache.
pub const PREFERRED_BLOCK: u32 = 4096;

/// What the handshake needs to know about one export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub description: String,
    pub size: u64,
    pub read_only: bool,
}

impl ExportInfo {
    /// Transmission flags. CAN_MULTI_CONN holds for both modes: every connection of one
    /// client to one export shares one backend in this process, and FLUSH covers it all.
    pub fn flags(&self) -> u16 {
        let mut f = codec::TFLAG_HAS_FLAGS
            | codec::TFLAG_SEND_FLUSH
            | codec::TFLAG_SEND_FUA
            | codec::TFLAG_SEND_DF
            | codec::TFLAG_CAN_MULTI_CONN
            | codec::TFLAG_SEND_CACHE;
        if self.read_only {
            f |= codec::TFLAG_READ_ONLY;
        } else {
            f |= codec::TFLAG_SEND_TRIM | codec::TFLAG_SEND_WRITE_ZEROES;
        }
        f
    }
}

/// The exports as the handshake sees them.
pub trait Catalog {
    /// (name, description) of every export, in config order.
    fn list(&self) -> Vec<(String, String)>;
    /// An export that can be served now (`None`: unknown, or its file cannot be opened).
    fn info(&self, name: &str) -> Option<ExportInfo>;
}

/// Negotiation state carried between options.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Negotiation {
    pub structured: bool,
    pub no_zeroes: bool,
}

/// What happens after an option is answered.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Stay in negotiation.
    Options,
    /// Close the connection after sending the answer (ABORT, or EXPORT_NAME of an unknown
    /// export, which the spec gives no way to refuse).
    Close,
    /// Enter transmission on this export.
    Transmit(ExportInfo),
}

/// The bytes to send and what comes next.
#[derive(Debug, PartialEq, Eq)]
pub struct Answer {
    pub reply: Vec<u8>,
    pub next: Next,
    /// Set when the client misbehaved (worth a rate-limited warning).
    pub violation: Option<&'static str>,
}

fn answer(reply: Vec<u8>, next: Next) -> Answer {
    Answer {
        reply,
        next,
        violation: None,
    }
}

fn error(opt: u32, code: u32, why: &'static str) -> Answer {
    let mut reply = Vec::new();
    codec::put_option_reply(&mut reply, opt, code, &[]);
    Answer {
        reply,
        next: Next::Options,
        violation: Some(why),
    }
}

/// Answers one option. `raw_opt` is the option number as sent (for the reply header), and
/// `parsed` its decoded data (`Err` when malformed).
pub fn negotiate(
    state: &mut Negotiation,
    raw_opt: u32,
    parsed: Result<Opt, codec::CodecError>,
    catalog: &dyn Catalog,
) -> Answer {
    let opt = match parsed {
        Ok(o) => o,
        Err(_) => return error(raw_opt, codec::REP_ERR_INVALID, "malformed option data"),
    };
    let mut reply = Vec::new();
    match opt {
        Opt::Abort => {
            codec::put_option_reply(&mut reply, raw_opt, codec::REP_ACK, &[]);
            answer(reply, Next::Close)
        }
        Opt::List => {
            for (name, desc) in catalog.list() {
                codec::put_option_reply(
                    &mut reply,
                    raw_opt,
                    codec::REP_SERVER,
                    &codec::server_entry(&name, &desc),
                );
            }
            codec::put_option_reply(&mut reply, raw_opt, codec::REP_ACK, &[]);
            answer(reply, Next::Options)
        }
        // TLS is not offered (yet); the spec's answer for a server without it is UNSUP, and
        // the connection stays in negotiation so the client may go on in the clear.
        Opt::StartTls => error(
            raw_opt,
            codec::REP_ERR_UNSUP,
            "STARTTLS asked; TLS is not offered",
        ),
        Opt::StructuredReply => {
            state.structured = true;
            codec::put_option_reply(&mut reply, raw_opt, codec::REP_ACK, &[]);
            answer(reply, Next::Options)
        }
        Opt::Unknown(_) => {
            codec::put_option_reply(&mut reply, raw_opt, codec::REP_ERR_UNSUP, &[]);
            answer(reply, Next::Options)
        }
        Opt::ExportName(name) => {
            let found = std::str::from_utf8(&name)
                .ok()
                .and_then(|n| catalog.info(n));
            match found {
                Some(info) => {
                    let reply = codec::export_name_reply(info.size, info.flags(), state.no_zeroes);
                    answer(reply, Next::Transmit(info))
                }
                None => Answer {
                    reply: Vec::new(),
                    next: Next::Close,
                    violation: Some("EXPORT_NAME of an unknown export"),
                },
            }
        }
        Opt::Info { go, name, requests } => {
            let Some(info) = std::str::from_utf8(&name)
                .ok()
                .and_then(|n| catalog.info(n))
            else {
                return error(raw_opt, codec::REP_ERR_UNKNOWN, "unknown export asked");
            };
            let mut put =
                |d: Vec<u8>| codec::put_option_reply(&mut reply, raw_opt, codec::REP_INFO, &d);
            put(codec::info_export(info.size, info.flags()));
            if requests.contains(&codec::INFO_NAME) {
                put(codec::info_text(codec::INFO_NAME, &info.name));
            }
            if requests.contains(&codec::INFO_DESCRIPTION) && !info.description.is_empty() {
                put(codec::info_text(codec::INFO_DESCRIPTION, &info.description));
            }
            // Sent even when not asked (the spec allows it): clients that honour it split
            // large requests instead of earning EINVAL.
            put(codec::info_block_size(1, PREFERRED_BLOCK, MAX_PAYLOAD));
            codec::put_option_reply(&mut reply, raw_opt, codec::REP_ACK, &[]);
            let next = if go {
                Next::Transmit(info)
            } else {
                Next::Options
            };
            answer(reply, next)
        }
    }
}

/// A request that passed the checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Read { offset: u64, len: u32 },
    Write { offset: u64, len: u32, fua: bool },
    Flush,
    Trim { offset: u64, len: u32, fua: bool },
    WriteZeroes { offset: u64, len: u32, fua: bool },
    Cache { offset: u64, len: u32 },
    Disconnect,
}

/// Checks a request against the export. `Err` is the NBD error to answer with; the
/// connection goes on either way (a WRITE's payload is consumed by the driver first).
pub fn check(req: &Request, export: &ExportInfo, structured: bool) -> Result<Command, u32> {
    if req.flags & !codec::CMD_FLAGS_KNOWN != 0 {
        return Err(codec::EINVAL);
    }
    if req.flags & codec::CMD_FLAG_DF != 0 && (!structured || req.kind != codec::CMD_READ) {
        return Err(codec::EINVAL);
    }
    let fua = req.flags & codec::CMD_FLAG_FUA != 0;
    let in_range = || {
        req.offset
            .checked_add(u64::from(req.len))
            .is_some_and(|end| end <= export.size)
    };
    let writable = || {
        if export.read_only {
            Err(codec::EPERM)
        } else {
            Ok(())
        }
    };
    let (offset, len) = (req.offset, req.len);
    match req.kind {
        codec::CMD_READ | codec::CMD_WRITE => {
            if req.kind == codec::CMD_WRITE {
                writable()?;
            }
            if len > MAX_PAYLOAD {
                return Err(codec::EINVAL);
            }
            // The spec's choice: past the end is EINVAL for reads, ENOSPC for writes.
            if !in_range() {
                return Err(if req.kind == codec::CMD_READ {
                    codec::EINVAL
                } else {
                    codec::ENOSPC
                });
            }
            Ok(if req.kind == codec::CMD_READ {
                Command::Read { offset, len }
            } else {
                Command::Write { offset, len, fua }
            })
        }
        codec::CMD_TRIM | codec::CMD_WRITE_ZEROES => {
            writable()?;
            if !in_range() {
                return Err(if req.kind == codec::CMD_TRIM {
                    codec::EINVAL
                } else {
                    codec::ENOSPC
                });
            }
            Ok(if req.kind == codec::CMD_TRIM {
                Command::Trim { offset, len, fua }
            } else {
                Command::WriteZeroes { offset, len, fua }
            })
        }
        codec::CMD_CACHE => {
            if !in_range() {
                return Err(codec::EINVAL);
            }
            Ok(Command::Cache { offset, len })
        }
        codec::CMD_FLUSH => Ok(Command::Flush),
        codec::CMD_DISC => Ok(Command::Disconnect),
        // BLOCK_STATUS needs a negotiated meta context, which we never agree to; anything
        // else is unknown.
        _ => Err(codec::EINVAL),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use codec::*;

    struct Two;
    impl Catalog for Two {
        fn list(&self) -> Vec<(String, String)> {
            vec![("ro".into(), "base".into()), ("rw".into(), String::new())]
        }
        fn info(&self, name: &str) -> Option<ExportInfo> {
            let read_only = match name {
                "ro" => true,
                "rw" => false,
                _ => return None,
            };
            Some(ExportInfo {
                name: name.into(),
                description: if read_only {
                    "base".into()
                } else {
                    String::new()
                },
                size: 1 << 20,
                read_only,
            })
        }
    }

    fn go(name: &str, reqs: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
        for r in reqs {
            d.extend_from_slice(&r.to_be_bytes());
        }
        d
    }

    fn neg(st: &mut Negotiation, opt: u32, data: &[u8]) -> Answer {
        negotiate(st, opt, Opt::parse(opt, data), &Two)
    }

    /// Splits option replies into (reply type, data).
    fn replies(mut b: &[u8]) -> Vec<(u32, Vec<u8>)> {
        let mut v = Vec::new();
        while !b.is_empty() {
            assert_eq!(&b[..8], &REPLY_MAGIC.to_be_bytes());
            let t = u32::from_be_bytes(b[12..16].try_into().unwrap());
            let n = u32::from_be_bytes(b[16..20].try_into().unwrap()) as usize;
            v.push((t, b[20..20 + n].to_vec()));
            b = &b[20 + n..];
        }
        v
    }

    #[test]
    fn list_names_every_export_then_acks() {
        let a = neg(&mut Negotiation::default(), OPT_LIST, b"");
        let r = replies(&a.reply);
        assert_eq!(r.len(), 3);
        assert_eq!(r[0], (REP_SERVER, b"\x00\x00\x00\x02robase".to_vec()));
        assert_eq!(r[1], (REP_SERVER, b"\x00\x00\x00\x02rw".to_vec()));
        assert_eq!(r[2].0, REP_ACK);
        assert_eq!(a.next, Next::Options);
    }

    #[test]
    fn go_known_export_enters_transmission() {
        let a = neg(
            &mut Negotiation::default(),
            OPT_GO,
            &go("ro", &[INFO_NAME, INFO_DESCRIPTION]),
        );
        let r = replies(&a.reply);
        let kinds: Vec<u16> = r[..r.len() - 1]
            .iter()
            .map(|(t, d)| {
                assert_eq!(*t, REP_INFO);
                u16::from_be_bytes([d[0], d[1]])
            })
            .collect();
        assert_eq!(
            kinds,
            [INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]
        );
        let flags = u16::from_be_bytes([r[0].1[10], r[0].1[11]]);
        assert_ne!(flags & TFLAG_READ_ONLY, 0);
        assert_eq!(flags & TFLAG_SEND_TRIM, 0);
        assert_eq!(r.last().unwrap().0, REP_ACK);
        assert!(matches!(a.next, Next::Transmit(ref i) if i.name == "ro"));
    }

    #[test]
    fn info_stays_in_negotiation_and_unknown_is_refused() {
        let a = neg(&mut Negotiation::default(), OPT_INFO, &go("rw", &[]));
        assert_eq!(a.next, Next::Options);
        let a = neg(&mut Negotiation::default(), OPT_GO, &go("nope", &[]));
        assert_eq!(replies(&a.reply), [(REP_ERR_UNKNOWN, vec![])]);
        assert_eq!(a.next, Next::Options);
    }

    #[test]
    fn refusals() {
        let mut st = Negotiation::default();
        let a = neg(&mut st, OPT_STARTTLS, b"");
        assert_eq!(replies(&a.reply), [(REP_ERR_UNSUP, vec![])]);
        assert_eq!(a.next, Next::Options);
        let a = neg(&mut st, 99, b"abc");
        assert_eq!(replies(&a.reply), [(REP_ERR_UNSUP, vec![])]);
        let a = neg(&mut st, OPT_GO, b"\x00\x00\x00\x09ro");
        assert_eq!(replies(&a.reply), [(REP_ERR_INVALID, vec![])]);
        let a = neg(&mut st, OPT_EXPORT_NAME, b"nope");
        assert_eq!((a.reply.len(), a.next), (0, Next::Close));
        let a = neg(&mut st, OPT_ABORT, b"");
        assert_eq!(replies(&a.reply), [(REP_ACK, vec![])]);
        assert_eq!(a.next, Next::Close);
    }

    #[test]
    fn structured_reply_and_export_name() {
        let mut st = Negotiation {
            no_zeroes: true,
            ..Default::default()
        };
        neg(&mut st, OPT_STRUCTURED_REPLY, b"");
        assert!(st.structured);
        let a = neg(&mut st, OPT_EXPORT_NAME, b"rw");
        assert_eq!(a.reply.len(), 10);
        assert_eq!(&a.reply[..8], &(1u64 << 20).to_be_bytes());
        assert!(matches!(a.next, Next::Transmit(_)));
    }

    fn req(kind: u16, flags: u16, offset: u64, len: u32) -> Request {
        Request {
            flags,
            kind,
            cookie: 1,
            offset,
            len,
        }
    }

    #[test]
    fn request_checks() {
        let ro = Two.info("ro").unwrap();
        let rw = Two.info("rw").unwrap();
        let size = ro.size;
        assert_eq!(
            check(&req(CMD_READ, 0, size - 512, 512), &ro, false),
            Ok(Command::Read {
                offset: size - 512,
                len: 512
            })
        );
        assert_eq!(
            check(&req(CMD_READ, 0, size - 511, 512), &ro, false),
            Err(EINVAL)
        );
        assert_eq!(
            check(&req(CMD_READ, 0, u64::MAX, 2), &ro, false),
            Err(EINVAL)
        );
        assert_eq!(check(&req(CMD_WRITE, 0, 0, 512), &ro, false), Err(EPERM));
        assert_eq!(check(&req(CMD_WRITE, 0, size, 1), &rw, false), Err(ENOSPC));
        assert_eq!(
            check(&req(CMD_WRITE_ZEROES, 0, size, 1), &rw, false),
            Err(ENOSPC)
        );
        assert_eq!(check(&req(CMD_TRIM, 0, size, 1), &rw, false), Err(EINVAL));
        assert_eq!(check(&req(CMD_CACHE, 0, size, 1), &rw, false), Err(EINVAL));
        assert_eq!(check(&req(CMD_TRIM, 0, 0, 512), &ro, false), Err(EPERM));
        assert_eq!(
            check(&req(CMD_WRITE_ZEROES, 0, 0, 512), &ro, false),
            Err(EPERM)
        );
        assert_eq!(
            check(&req(CMD_WRITE, CMD_FLAG_FUA, 0, 512), &rw, false),
            Ok(Command::Write {
                offset: 0,
                len: 512,
                fua: true
            })
        );
        let big = Two
            .info("rw")
            .map(|i| ExportInfo { size: 1 << 30, ..i })
            .unwrap();
        assert_eq!(
            check(&req(CMD_READ, 0, 0, MAX_PAYLOAD + 1), &big, false),
            Err(EINVAL)
        );
        assert!(check(&req(CMD_READ, 0, 0, MAX_PAYLOAD), &big, false).is_ok());
        assert_eq!(
            check(&req(CMD_READ, CMD_FLAG_DF, 0, 1), &ro, false),
            Err(EINVAL)
        );
        assert!(check(&req(CMD_READ, CMD_FLAG_DF, 0, 1), &ro, true).is_ok());
        assert_eq!(check(&req(CMD_READ, 1 << 9, 0, 1), &ro, false), Err(EINVAL));
        assert_eq!(check(&req(7, 0, 0, 1), &ro, false), Err(EINVAL));
        assert_eq!(
            check(&req(CMD_FLUSH, 0, 0, 0), &ro, false),
            Ok(Command::Flush)
        );
        assert_eq!(
            check(&req(CMD_DISC, 0, 0, 0), &ro, false),
            Ok(Command::Disconnect)
        );
    }
}
