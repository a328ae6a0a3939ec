//! XDMCP replies from a guest's display manager: `xdmcp::decode` of a Willing or
//! Unwilling (XDMCP 1.1 sections 8 and 9).
//!
//! Invariants: a decoded reply re-encodes to exactly the bytes it came from (when its
//! strings were text, which the lossy decoding otherwise changes), and the Query we send
//! is refused as no reply.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vdd::xdmcp::{self, Reply};

fn encode(r: &Reply) -> Vec<u8> {
    let (op, fields): (u16, Vec<&str>) = match r {
        Reply::Willing {
            auth_name,
            hostname,
            status,
        } => (5, vec![auth_name, hostname, status]),
        Reply::Unwilling { hostname, status } => (6, vec![hostname, status]),
    };
    let mut body = Vec::new();
    for f in fields {
        body.extend_from_slice(&(f.len() as u16).to_be_bytes());
        body.extend_from_slice(f.as_bytes());
    }
    let mut b = vec![0, 1];
    b.extend_from_slice(&op.to_be_bytes());
    b.extend_from_slice(&(body.len() as u16).to_be_bytes());
    b.extend(body);
    b
}

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = xdmcp::decode(data) {
        let lossless = match &r {
            Reply::Willing {
                auth_name,
                hostname,
                status,
            } => [auth_name, hostname, status]
                .iter()
                .all(|s| !s.contains('\u{fffd}')),
            Reply::Unwilling { hostname, status } => {
                [hostname, status].iter().all(|s| !s.contains('\u{fffd}'))
            }
        };
        if lossless {
            assert_eq!(encode(&r), data, "{r:?}");
        }
    }
    assert!(xdmcp::decode(&xdmcp::query()).is_err());
});
