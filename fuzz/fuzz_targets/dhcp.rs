//! DHCP server input: `codec::decode` (the raw pre-check, then dhcproto) and the RFC 2131
//! policy on what passed, against a real `Config` and a lease table that carries over
//! between the packets of one input.
//!
//! Input: one flag byte (bits 0-1: full / proxy / off mode, bit 2: arrived on port 4011),
//! then datagrams separated by `SEP`, so one input can walk DISCOVER -> REQUEST -> RELEASE.
//! Invariants: the MAC is chaddr; every reply is a BOOTREPLY to the request's xid and
//! chaddr that encodes to at least 300 bytes and decodes again; every address offered or
//! bound is in the pool or the client's own reservation.
#![no_main]

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::OnceLock;

use dhcproto::v4::{Message, MessageType, Opcode};
use dhcproto::{Decodable, Decoder};
use libfuzzer_sys::fuzz_target;
use vdd::config::Config;
use vdd::dhcp::codec::{self, MIN_REPLY_LEN};
use vdd::dhcp::leases::{Change, LeaseTable};
use vdd::dhcp::policy::{self, Ctx, Port};

const SEP: &[u8] = b"\n--vdd--\n";

const BASE: &str = r#"
[server]
interface = "br0"
address = "10.77.0.1/24"
[dhcp]
MODE
lease_time = "1h"
router = "10.77.0.1"
dns = ["10.77.0.1"]
[[dhcp.host]]
mac = "52:54:00:12:34:56"
address = "10.77.0.50"
hostname = "seat-01"
"#;

fn configs() -> &'static [Config; 3] {
    static C: OnceLock<[Config; 3]> = OnceLock::new();
    C.get_or_init(|| {
        let parse = |mode: &str| {
            let text = BASE.replace("MODE", mode);
            Config::parse(&text, Path::new("/nonexistent/vdd-fuzz.toml")).expect("fuzz config")
        };
        [
            parse("mode = \"full\"\npool = \"10.77.0.100-10.77.0.102\""),
            parse("mode = \"proxy\""),
            parse("mode = \"off\""),
        ]
    })
}

fn split<'a>(mut b: &'a [u8]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    while let Some(at) = b.windows(SEP.len()).position(|w| w == SEP) {
        out.push(&b[..at]);
        b = &b[at + SEP.len()..];
    }
    out.push(b);
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let cfg = &configs()[usize::from(flags & 3).min(2)];
    let port = if flags & 4 != 0 {
        Port::Proxy
    } else {
        Port::Dhcp
    };
    let mut table = LeaseTable::default();
    let mut now = 1_000u64;
    for dgram in split(rest).into_iter().take(8) {
        now += 7;
        let Ok(p) = codec::decode(dgram) else {
            continue;
        };
        assert_eq!(&p.mac.0[..], &dgram[28..34], "the MAC is chaddr");
        let ctx = Ctx {
            cfg,
            server: Ipv4Addr::new(10, 77, 0, 1),
            subnet: "10.77.0.0/24".parse().unwrap(),
            now,
        };
        let d = policy::decide(&p, port, &table, &ctx);
        let own = cfg.dhcp.hosts.get(&p.mac).and_then(|h| h.address);
        let allowed =
            |ip: Ipv4Addr| Some(ip) == own || cfg.dhcp.pool.is_some_and(|pool| pool.contains(ip));
        for c in &d.changes {
            match *c {
                Change::Offer { ip, mac, until } | Change::Bind { ip, mac, until } => {
                    assert!(allowed(ip), "{ip} handed out: {c:?}");
                    assert_eq!(mac, p.mac);
                    assert!(until >= now);
                }
                Change::Free { mac, .. } => assert_eq!(mac, p.mac),
                Change::Decline { .. } => {}
            }
            table.apply(c);
        }
        if let Some((m, _dest)) = &d.reply {
            assert_eq!(m.opcode(), Opcode::BootReply);
            assert_eq!(m.xid(), p.msg.xid());
            assert_eq!(m.chaddr(), &p.mac.0[..]);
            let kind = m.opts().msg_type();
            if matches!(kind, Some(MessageType::Offer | MessageType::Ack))
                && !m.yiaddr().is_unspecified()
            {
                assert!(allowed(m.yiaddr()), "yiaddr {} in {kind:?}", m.yiaddr());
            }
            let wire = codec::encode_with_relay_info(m, p.relay_info.as_deref());
            assert!(wire.len() >= MIN_REPLY_LEN, "reply of {} bytes", wire.len());
            let back = Message::decode(&mut Decoder::new(&wire)).expect("our reply decodes");
            assert_eq!(back.xid(), m.xid());
            assert_eq!(back.opts().msg_type(), kind);
        }
    }
});
