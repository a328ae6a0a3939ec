//! TFTP server input: `Packet::parse` of every datagram, RFC 2347 option negotiation of
//! the first RRQ, and the read session's state machine fed the ACKs, ERRORs, strays and
//! timeouts that follow, as `tftp/driver/mod.rs` feeds it; the file name goes through
//! `paths::clean`.
//!
//! Input: three bytes of file size, then datagrams separated by `SEP`; the first that
//! parses as an RRQ starts the transfer, an empty one stands for the deadline passing.
//! Invariants: requests, OACKs and ERRORs re-encode to what parses back the same; the
//! negotiated values are in their RFC ranges and each option is answered once; windows
//! start right after the last ACK, hold at most `windowsize` blocks and never pass the
//! last block; ACKs only move forward; Done means the last block was acknowledged; a
//! finished transfer sends nothing more.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use vdd::tftp::codec::{self, Mode, Packet};
use vdd::tftp::paths;
use vdd::tftp::session::{self, Next, Send, Session, Step};

const SEP: &[u8] = b"\n--vdd--\n";

fn split(mut b: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while let Some(at) = b.windows(SEP.len()).position(|w| w == SEP) {
        out.push(&b[..at]);
        b = &b[at + SEP.len()..];
    }
    out.push(b);
    out
}

/// What each packet kind promises about re-encoding.
fn round_trip(p: &Packet) {
    let mut out = Vec::new();
    match p {
        Packet::Rrq(r) | Packet::Wrq(r) => {
            let op = if matches!(p, Packet::Rrq(_)) { 1 } else { 2 };
            let opts: Vec<(&str, &str)> = r
                .options
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            codec::encode_request(&mut out, op, r.filename, &r.mode_text, &opts);
            assert_eq!(&Packet::parse(&out).expect("re-encoded request parses"), p);
        }
        Packet::Oack(o) => {
            codec::encode_oack(&mut out, o);
            assert_eq!(&Packet::parse(&out).expect("re-encoded OACK parses"), p);
        }
        Packet::Error { code, message } => {
            codec::encode_error(&mut out, *code, message);
            assert_eq!(&Packet::parse(&out).expect("re-encoded ERROR parses"), p);
        }
        Packet::Ack(b) => {
            codec::encode_ack(&mut out, *b);
            assert_eq!(&Packet::parse(&out).unwrap(), p);
        }
        Packet::Data { .. } => {}
    }
}

struct Check {
    windowsize: u64,
    /// The block count, once the "driver" knows it.
    total: Option<u64>,
    /// Index of the final block for a netascii transfer, revealed when it is sent.
    hidden_last: u64,
    acked: u64,
    over: bool,
    limit: Instant,
}

impl Check {
    fn step(&mut self, s: &mut Session, step: &Step) {
        if self.over {
            assert_eq!(
                step.send,
                Send::Nothing,
                "a finished transfer sends nothing"
            );
        }
        assert!(s.acked() >= self.acked, "ACKs only move forward");
        self.acked = s.acked();
        if let Some(t) = self.total {
            assert!(self.acked <= t);
        }
        match step.send {
            Send::Blocks { first, last } => {
                assert_eq!(first, self.acked + 1, "window starts after the last ACK");
                assert!(first <= last && last - first < self.windowsize, "{step:?}");
                if let Some(t) = self.total {
                    assert!(last <= t, "block {last} past the last {t}");
                } else if last >= self.hidden_last {
                    // What the driver does when it reads the short block.
                    s.set_last(self.hidden_last);
                    self.total = Some(self.hidden_last);
                }
            }
            Send::Oack => assert_eq!(self.acked, 0),
            Send::Nothing => {}
        }
        match step.next {
            Next::Wait(d) => {
                assert!(!self.over);
                assert!(d <= self.limit, "deadline past MAX_TRANSFER");
                assert_eq!(d, s.deadline());
            }
            Next::Done => {
                if !self.over {
                    assert_eq!(Some(self.acked), self.total, "Done before the last ACK");
                }
                self.over = true;
            }
            Next::ClientError { .. } | Next::GaveUp | Next::TooLong => self.over = true,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let size = u64::from(u32::from_be_bytes([0, data[0], data[1], data[2]]));
    let mut dgrams = split(&data[3..]).into_iter();
    let mut req = None;
    for d in dgrams.by_ref() {
        if let Ok(p) = Packet::parse(d) {
            round_trip(&p);
            if let Packet::Rrq(r) = p {
                req = Some(r);
                break;
            }
        }
    }
    let Some(req) = req else {
        return;
    };
    // The name checks: what passes is a plain relative path.
    if let Ok(rel) = paths::clean(req.filename) {
        assert!(rel
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_))));
        assert!(!rel.as_os_str().is_empty());
    }
    let known = session::wire_size_known(req.mode);
    assert_eq!(known, req.mode == Mode::Octet);
    let n = session::negotiate(&req.options, known.then_some(size));
    assert!(session::BLKSIZE_RANGE.contains(&u64::from(n.blksize)));
    assert!(session::WINDOWSIZE_RANGE.contains(&u64::from(n.windowsize)));
    assert!(
        session::TIMEOUT_RANGE.contains(&n.timeout.as_secs())
            || n.timeout == session::DEFAULT_TIMEOUT
    );
    for (i, (k, _)) in n.oack.iter().enumerate() {
        assert!(["blksize", "windowsize", "timeout", "tsize"].contains(&k.as_str()));
        assert!(
            n.oack[..i].iter().all(|(k2, _)| k2 != k),
            "{k} answered twice"
        );
    }
    let total = session::block_count(size, n.blksize);
    assert!(total >= 1);
    let start = Instant::now();
    let (mut s, step) = Session::new(&n, known.then_some(total), start);
    let mut c = Check {
        windowsize: u64::from(n.windowsize),
        total: known.then_some(total),
        hidden_last: total,
        acked: 0,
        over: false,
        limit: start + session::MAX_TRANSFER,
    };
    c.step(&mut s, &step);
    let mut now = start;
    for d in dgrams.take(64) {
        now += Duration::from_millis(3);
        let step = if d.is_empty() {
            now = now.max(s.deadline());
            s.on_timeout(now)
        } else {
            match Packet::parse(d) {
                Ok(p) => {
                    round_trip(&p);
                    match p {
                        Packet::Ack(b) => s.on_ack(b, now),
                        Packet::Error { code, .. } => s.on_error(code),
                        _ => s.waiting(),
                    }
                }
                Err(_) => s.waiting(),
            }
        };
        c.step(&mut s, &step);
    }
});
