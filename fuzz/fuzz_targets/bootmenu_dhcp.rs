//! boot-menu's DHCP client (the thin client's PID 1): the bytes of each reply as its
//! receive loop decodes them (`dhcp::decode`), then the RFC 2131 4.4 client state machine, with timeouts
//! in between.
//!
//! Input: datagrams separated by `SEP`; an empty one stands for the deadline passing.
//! Invariants: what the client sends is a BOOTREQUEST from our MAC with our current xid
//! that encodes; a lease it binds has a usable address and a prefix of at most 32; a
//! deadline never lies in the past of the event that set it; nothing panics PID 1.
#![no_main]

use std::time::{Duration, Instant};

use boot_menu::dhcp::{self, Client, Output};
use dhcproto::v4::Opcode;
use dhcproto::Encodable;
use libfuzzer_sys::fuzz_target;

const SEP: &[u8] = b"\n--vdd--\n";
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const XID: u32 = 0x1234_5678;

fn split(mut b: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while let Some(at) = b.windows(SEP.len()).position(|w| w == SEP) {
        out.push(&b[..at]);
        b = &b[at + SEP.len()..];
    }
    out.push(b);
    out
}

fn check(c: &Client, out: &[Output]) {
    for o in out {
        match o {
            Output::Send(m) | Output::SendTo(m, _) => {
                assert_eq!(m.opcode(), Opcode::BootRequest);
                assert_eq!(m.chaddr(), &MAC[..]);
                assert_eq!(m.xid(), c.xid());
                assert!(m.to_vec().is_ok_and(|v| !v.is_empty()));
            }
            Output::Bound(l) | Output::Renewed(l) => {
                assert!(!l.ip.is_unspecified() && !l.ip.is_broadcast());
                assert!(l.prefix <= 32);
                assert!(matches!(c.state, dhcp::State::Bound(_)));
            }
            _ => {}
        }
    }
}

/// A deadline the client set in answer to an event is not in that event's past. (A
/// packet it ignores leaves an older deadline standing, which the driver then meets at
/// once: not checked.)
fn check_deadline(c: &Client, now: Instant) {
    if let Some(d) = c.deadline() {
        assert!(d >= now, "deadline in the past: {:?}", c.state);
    }
}

fuzz_target!(|data: &[u8]| {
    let start = Instant::now();
    let mut now = start;
    let mut c = Client::new(MAC, XID);
    let out = c.start(now);
    check(&c, &out);
    check_deadline(&c, now);
    for d in split(data).into_iter().take(16) {
        now += Duration::from_millis(250);
        let before = c.state.clone();
        let out = if d.is_empty() {
            now = c.deadline().unwrap_or(now).max(now);
            c.timeout(now)
        } else {
            match dhcp::decode(d) {
                Ok(m) => {
                    assert_eq!((m.opcode(), m.hlen()), (Opcode::BootReply, 6));
                    c.packet(&m, now)
                }
                Err(_) => continue,
            }
        };
        check(&c, &out);
        if d.is_empty() || c.state != before {
            check_deadline(&c, now);
        }
    }
});
