//! The value types and parsers every section of the config shares: MAC addresses, address
//! pools, sizes, addresses and durations as the admin writes them.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;
use std::time::Duration;

use super::{invalid, ConfigError};

/// A MAC address (Ethernet, 6 bytes). Written and parsed as `52:54:00:12:34:56`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl FromStr for Mac {
    type Err = ();
    fn from_str(s: &str) -> Result<Mac, ()> {
        let parts: Vec<&str> = s.split([':', '-']).collect();
        if parts.len() != 6 {
            return Err(());
        }
        let mut m = [0u8; 6];
        for (b, p) in m.iter_mut().zip(parts) {
            if p.len() != 2 {
                return Err(());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| ())?;
        }
        Ok(Mac(m))
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// An inclusive range of IPv4 addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pool {
    pub first: Ipv4Addr,
    pub last: Ipv4Addr,
}

impl Pool {
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        self.first <= ip && ip <= self.last
    }
    pub fn len(&self) -> u32 {
        u32::from(self.last) - u32::from(self.first) + 1
    }
    pub fn is_empty(&self) -> bool {
        false
    }
    pub fn iter(&self) -> impl Iterator<Item = Ipv4Addr> {
        (u32::from(self.first)..=u32::from(self.last)).map(Ipv4Addr::from)
    }
}

/// "2G", "512M", "1024" (MiB), "1T" -> MiB.
pub(super) fn parse_mib(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last()? {
        (i, 'K' | 'k') => (&s[..i], 0),
        (i, 'M' | 'm') => (&s[..i], 1),
        (i, 'G' | 'g') => (&s[..i], 1024),
        (i, 'T' | 't') => (&s[..i], 1024 * 1024),
        _ => (s, 1),
    };
    let n: u64 = num.trim().parse().ok()?;
    if mult == 0 {
        return Some(n / 1024);
    }
    n.checked_mul(mult)
}

pub(super) fn parse_ip(key: &str, s: &str) -> Result<Ipv4Addr, ConfigError> {
    s.parse()
        .map_err(|_| invalid(key, s, "an IPv4 address such as \"10.77.0.1\""))
}

/// A duration such as "30s" or "10m"; `default` seconds when the key is not set.
pub(super) fn parse_duration(
    key: &str,
    v: Option<&str>,
    default: u64,
) -> Result<Duration, ConfigError> {
    match v {
        None => Ok(Duration::from_secs(default)),
        Some(s) => humantime::parse_duration(s)
            .map_err(|_| invalid(key, s, "a duration such as \"30s\", \"10m\" or \"1h\"")),
    }
}

/// A count that must be at least 1: `v`, or `default` when the key is not set.
pub(super) fn at_least_one(
    key: &str,
    v: Option<usize>,
    default: usize,
    fix: &str,
) -> Result<usize, ConfigError> {
    match v {
        Some(0) => Err(invalid(key, 0, fix)),
        Some(n) => Ok(n),
        None => Ok(default),
    }
}
