//! `[dhcp]` and its `[[dhcp.host]]` reservations.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::Ipv4Net;
use serde::Deserialize;

use super::types::{at_least_one, parse_ip, Mac, Pool};
use super::{invalid, resolve, ConfigError};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WireDhcp {
    mode: Option<String>,
    pool: Option<String>,
    lease_time: Option<String>,
    router: Option<String>,
    #[serde(default)]
    dns: Vec<String>,
    domain: Option<String>,
    port: Option<u16>,
    proxy_port: Option<u16>,
    new_clients_per_minute: Option<usize>,
    #[serde(default)]
    host: Vec<WireHost>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireHost {
    mac: String,
    address: Option<String>,
    hostname: Option<String>,
    kernel: Option<String>,
    initrd: Option<String>,
    cmdline: Option<String>,
}

/// What the DHCP service does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DhcpMode {
    /// Hands out addresses and boot information.
    Full,
    /// Another server hands out addresses; vdd answers PXE clients with boot information only
    /// (ports 67 and 4011).
    Proxy,
    /// No DHCP at all.
    Off,
}

impl DhcpMode {
    /// As written in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            DhcpMode::Full => "full",
            DhcpMode::Proxy => "proxy",
            DhcpMode::Off => "off",
        }
    }
}

/// A reservation: a fixed address and per-client boot overrides, keyed by MAC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    pub mac: Mac,
    pub address: Option<Ipv4Addr>,
    pub hostname: Option<String>,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dhcp {
    pub mode: DhcpMode,
    /// `None` in proxy and off modes.
    pub pool: Option<Pool>,
    pub lease_time: Duration,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub domain: Option<String>,
    /// Server port, 67 unless a test moves it.
    pub port: u16,
    /// PXE boot-server port of proxy mode (PXE 2.1), 4011 by default.
    pub proxy_port: u16,
    /// Clients vdd has never seen (no lease record, no reservation) that may get an
    /// address per minute, with as many at once: a host faking new MACs cannot drain the
    /// pool in a second (`dhcp.new_clients_per_minute`). Default: a quarter of the pool,
    /// at least 64.
    pub new_clients_per_minute: usize,
    pub hosts: BTreeMap<Mac, Host>,
}

/// `base`: the config file's folder, for the reservations' kernel and initrd paths.
impl TryFrom<(WireDhcp, &Path)> for Dhcp {
    type Error = ConfigError;

    fn try_from((w, base): (WireDhcp, &Path)) -> Result<Dhcp, ConfigError> {
        let mode = match w.mode.as_deref().unwrap_or("full") {
            "full" => DhcpMode::Full,
            "proxy" => DhcpMode::Proxy,
            "off" => DhcpMode::Off,
            other => {
                return Err(invalid(
                    "dhcp.mode",
                    other,
                    "one of \"full\" (hand out addresses), \"proxy\" (another server does; vdd adds boot info) or \"off\"",
                ))
            }
        };
        let pool = match (&w.pool, mode) {
            (Some(p), DhcpMode::Full) => Some(parse_pool(p)?),
            (None, DhcpMode::Full) => {
                return Err(invalid(
                    "dhcp.pool",
                    "(missing)",
                    "full mode needs a pool such as \"10.77.0.100-10.77.0.199\", or set dhcp.mode = \"proxy\"",
                ))
            }
            (Some(p), _) => {
                return Err(invalid(
                    "dhcp.pool",
                    p,
                    "a pool only makes sense with dhcp.mode = \"full\"; remove it or change the mode",
                ))
            }
            (None, _) => None,
        };
        let lease_time = match &w.lease_time {
            None => Duration::from_secs(3600),
            Some(s) => {
                let d = humantime::parse_duration(s).map_err(|_| {
                    invalid(
                        "dhcp.lease_time",
                        s,
                        "a duration such as \"1h\", \"30m\" or \"12h\"",
                    )
                })?;
                if d < Duration::from_secs(60) || d > Duration::from_secs(u32::MAX as u64 / 2) {
                    return Err(invalid(
                        "dhcp.lease_time",
                        s,
                        "between \"1m\" and \"68y\"; \"1h\" suits a lab",
                    ));
                }
                d
            }
        };
        let router = w
            .router
            .as_deref()
            .map(|r| parse_ip("dhcp.router", r))
            .transpose()?;
        let dns = w
            .dns
            .iter()
            .enumerate()
            .map(|(i, d)| parse_ip(&format!("dhcp.dns[{i}]"), d))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(d) = &w.domain {
            if d.is_empty()
                || d.len() > 253
                || !d
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
            {
                return Err(invalid(
                    "dhcp.domain",
                    d,
                    "a DNS domain such as \"lab.example\"",
                ));
            }
        }
        let hosts = hosts(&w.host, pool, w.pool.as_deref(), base)?;
        Ok(Dhcp {
            mode,
            pool,
            lease_time,
            router,
            dns,
            domain: w.domain,
            port: w.port.unwrap_or(67),
            proxy_port: w.proxy_port.unwrap_or(4011),
            new_clients_per_minute: at_least_one(
                "dhcp.new_clients_per_minute",
                w.new_clients_per_minute,
                pool.as_ref().map_or(64, |p| (p.len() as usize / 4).max(64)),
                "at least 1: how many never-seen clients may get an address per minute",
            )?,
            hosts,
        })
    }
}

/// The `[[dhcp.host]]` tables: one per MAC, each address reserved once and outside the
/// pool (`pool_text` is the pool as written, for the message).
fn hosts(
    wire: &[WireHost],
    pool: Option<Pool>,
    pool_text: Option<&str>,
    base: &Path,
) -> Result<BTreeMap<Mac, Host>, ConfigError> {
    let mut hosts = BTreeMap::new();
    let mut by_addr: HashMap<Ipv4Addr, usize> = HashMap::new();
    for (i, h) in wire.iter().enumerate() {
        let key = |k: &str| format!("dhcp.host[{i}].{k}");
        let mac: Mac = h.mac.parse().map_err(|_| {
            invalid(
                key("mac"),
                &h.mac,
                "six hex bytes with colons, such as \"52:54:00:00:00:01\"",
            )
        })?;
        let address = h
            .address
            .as_deref()
            .map(|a| parse_ip(&key("address"), a))
            .transpose()?;
        if let Some(a) = address {
            if let Some(j) = by_addr.insert(a, i) {
                return Err(invalid(
                    key("address"),
                    a,
                    format!(
                        "dhcp.host[{j}] reserves the same address; give each reservation its own"
                    ),
                ));
            }
            if pool.is_some_and(|p| p.contains(a)) {
                return Err(invalid(
                    key("address"),
                    a,
                    format!(
                        "inside dhcp.pool ({}); reserve an address outside the pool so it is never handed to another client",
                        pool_text.unwrap_or_default()
                    ),
                ));
            }
        }
        if let Some(hn) = &h.hostname {
            if hn.is_empty()
                || hn.len() > 63
                || !hn.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            {
                return Err(invalid(
                    key("hostname"),
                    hn,
                    "letters, digits and '-', at most 63, such as \"seat-01\"",
                ));
            }
        }
        let host = Host {
            mac,
            address,
            hostname: h.hostname.clone(),
            kernel: h.kernel.as_deref().map(|p| resolve(base, p)),
            initrd: h.initrd.as_deref().map(|p| resolve(base, p)),
            cmdline: h.cmdline.clone(),
        };
        if hosts.insert(mac, host).is_some() {
            return Err(invalid(
                key("mac"),
                mac,
                "this MAC has an earlier [[dhcp.host]]; merge the two",
            ));
        }
    }
    Ok(hosts)
}

fn parse_pool(s: &str) -> Result<Pool, ConfigError> {
    let bad = || {
        invalid(
            "dhcp.pool",
            s,
            "FIRST-LAST, such as \"10.77.0.100-10.77.0.199\"",
        )
    };
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let first: Ipv4Addr = a.trim().parse().map_err(|_| bad())?;
    let last: Ipv4Addr = b.trim().parse().map_err(|_| bad())?;
    if first > last {
        return Err(invalid(
            "dhcp.pool",
            s,
            "the first address must not be above the last",
        ));
    }
    Ok(Pool { first, last })
}

/// The pool, the router and every reservation must sit in the LAN subnet.
pub(super) fn check_subnet(d: &Dhcp, net: Ipv4Net) -> Result<(), ConfigError> {
    if let Some(p) = d.pool {
        for ip in [p.first, p.last] {
            if !net.contains(&ip) || ip == net.network() || ip == net.broadcast() {
                return Err(invalid(
                    "dhcp.pool",
                    format!("{}-{}", p.first, p.last),
                    format!("must lie inside the interface's subnet {net} (host addresses only)"),
                ));
            }
        }
    }
    if let Some(r) = d.router {
        if !net.contains(&r) {
            return Err(invalid(
                "dhcp.router",
                r,
                format!("must be inside the subnet {net}"),
            ));
        }
    }
    for h in d.hosts.values() {
        if let Some(a) = h.address {
            if !net.contains(&a) {
                return Err(invalid(
                    format!("dhcp.host (mac {}).address", h.mac),
                    a,
                    format!("must be inside the subnet {net}"),
                ));
            }
        }
    }
    Ok(())
}
