//! The admin's `config.toml`: `Config::parse` on any text (TOML, then the validation into
//! a `Config`).
//!
//! Invariants of a config that validates: the DHCP pool is an ordered range (its length
//! is what the lease code divides by), full mode has one, the VNC port range is ordered,
//! reserved addresses are unique, and export and guest names are unique; parsing is
//! deterministic.
#![no_main]

use std::collections::HashSet;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use vdd::config::{Config, DhcpMode};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/nonexistent/vdd/config.toml");
    let Ok(c) = Config::parse(text, path) else {
        return;
    };
    if let Some(p) = c.dhcp.pool {
        assert!(p.first <= p.last, "{p:?}");
        assert!(p.len() >= 1);
    }
    if c.dhcp.mode == DhcpMode::Full {
        assert!(c.dhcp.pool.is_some(), "full mode without a pool");
    }
    assert!(c.dispatch.vnc_ports.0 <= c.dispatch.vnc_ports.1);
    let mut seen = HashSet::new();
    for h in c.dhcp.hosts.values() {
        if let Some(a) = h.address {
            assert!(seen.insert(a), "{a} reserved twice");
        }
    }
    let mut names = HashSet::new();
    assert!(
        c.nbd.exports.iter().all(|e| names.insert(e.name.clone())),
        "export twice"
    );
    let mut names = HashSet::new();
    assert!(
        c.guests.iter().all(|g| names.insert(g.name.clone())),
        "guest twice"
    );
    let again = Config::parse(text, path).expect("deterministic");
    assert_eq!(format!("{:?}", again.dhcp), format!("{:?}", c.dhcp));
});
