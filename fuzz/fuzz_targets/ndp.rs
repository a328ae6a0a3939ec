//! IPv6 Router Solicitations from the LAN: `ndp::parse_solicitation` (RFC 4861 6.1.1),
//! with the hop limit and source address the socket reported.
//!
//! Input: one byte choosing hop limit (255, none, or another) and source (unspecified,
//! link-local), then the ICMPv6 message. Invariants: only a type-133, code-0 message
//! received with hop limit 255 is accepted; a named MAC is the first six bytes of a
//! Source Link-Layer Address option in the message; the unspecified source never names
//! one; our own advertisement is never taken for a solicitation.
#![no_main]

use std::net::Ipv6Addr;

use libfuzzer_sys::fuzz_target;
use vdd::config::Mac;
use vdd::ndp::{self, Discard, ROUTER_ADVERTISEMENT, ROUTER_SOLICITATION};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, msg)) = data.split_first() else {
        return;
    };
    let hop = match sel & 3 {
        0 | 1 => Some(255),
        2 => None,
        _ => Some(u32::from(sel >> 2)),
    };
    let src = if sel & 0x80 != 0 {
        Ipv6Addr::UNSPECIFIED
    } else {
        Ipv6Addr::new(0xfe80, 0, 0, 0, 0x5054, 0xff, 0xfe12, 0x3456)
    };
    if let Ok(s) = ndp::parse_solicitation(msg, hop, &src) {
        assert_eq!(msg[0], ROUTER_SOLICITATION);
        assert_eq!(msg[1], 0);
        assert_eq!(hop, Some(255));
        if let Some(m) = s.mac {
            assert!(!src.is_unspecified());
            // Walk the options the way RFC 4861 4.6 lays them out.
            let mut o = &msg[8..];
            let mut found = false;
            while o.len() >= 8 && o[1] != 0 {
                let len = usize::from(o[1]) * 8;
                if o[0] == 1 && o[2..8] == m.0 {
                    found = true;
                }
                o = &o[len.min(o.len())..];
            }
            assert!(found, "MAC {m} is in no option");
        }
        let ra = ndp::advertisement(s.mac.or(Some(Mac([2, 0, 0, 0, 0, 1]))));
        assert_eq!(ra[0], ROUTER_ADVERTISEMENT);
        assert_eq!(
            ndp::parse_solicitation(&ra, Some(255), &src),
            Err(Discard::NotSolicitation(ROUTER_ADVERTISEMENT))
        );
    }
});
