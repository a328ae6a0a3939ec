//! Per-address caps: how many of a shared resource (transfer slots, connections) one
//! client address may hold at once, so one host on the LAN cannot take all of them.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// The slots each address holds now; shared by a service and its transfers.
#[derive(Debug, Default, Clone)]
pub struct PerAddress {
    held: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One slot of one address; given back on Drop, on every exit path.
#[derive(Debug)]
pub struct Slot {
    held: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl PerAddress {
    /// A slot for `ip`, or `None` when it holds `cap` already.
    pub fn take(&self, ip: IpAddr, cap: usize) -> Option<Slot> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let n = held.entry(ip).or_insert(0);
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(Slot {
            held: self.held.clone(),
            ip,
        })
    }

    /// Slots `ip` holds now.
    pub fn held(&self, ip: IpAddr) -> usize {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.get(&ip).copied().unwrap_or(0)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = held.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_per_address_and_gives_back_on_drop() {
        let p = PerAddress::default();
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let s1 = p.take(a, 2).unwrap();
        let s2 = p.take(a, 2).unwrap();
        assert!(p.take(a, 2).is_none(), "a third slot for one address");
        let other = p.take(b, 2).unwrap();
        assert_eq!((p.held(a), p.held(b)), (2, 1));
        drop(s1);
        let s3 = p.take(a, 2).unwrap();
        drop((s2, s3, other));
        assert_eq!((p.held(a), p.held(b)), (0, 0));
        assert!(p.held.lock().unwrap().is_empty(), "no entry left behind");
    }
}
