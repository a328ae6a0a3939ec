//! config.toml: raw serde "wire" structs (`deny_unknown_fields`), then one validated
//! [`Config`] that every service reads through an `Arc`.
//!
//! Validation happens in two steps. [`Config::load`] checks everything the file alone can
//! tell (syntax, unknown keys, addresses, pool, reservations, exports). [`Config::bind_interface`]
//! then checks the file against the LAN interface's real address and subnet; `vdd check`
//! only warns when the interface is missing (admins check configs on laptops), `vdd serve`
//! refuses to start.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use ipnet::Ipv4Net;
use serde::Deserialize;

/// A config that cannot be used. Each message names the key, the bad value and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Reading the file failed.
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// TOML syntax, an unknown key, or a value of the wrong type.
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A key whose value is wrong.
    #[error("{key} = {value:?}: {fix}")]
    Invalid {
        key: String,
        value: String,
        fix: String,
    },
    /// No config file was given and none exists in the default places.
    #[error("no config file: tried {tried}; pass --config PATH")]
    NotFound { tried: String },
}

fn invalid(
    key: impl Into<String>,
    value: impl fmt::Display,
    fix: impl Into<String>,
) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        value: value.to_string(),
        fix: fix.into(),
    }
}

/// A count that must be at least 1: `v`, or `default` when the key is not set.
fn at_least_one(
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

// ---------------------------------------------------------------------------------------
// Wire structs: exactly what the admin writes.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireConfig {
    server: WireServer,
    #[serde(default)]
    dhcp: WireDhcp,
    #[serde(default)]
    boot: WireBoot,
    #[serde(default)]
    tftp: WireTftp,
    #[serde(default)]
    http: WireHttp,
    #[serde(default)]
    nbd: WireNbd,
    #[serde(default)]
    guest: Vec<WireGuest>,
    #[serde(default)]
    dispatch: WireDispatch,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireDispatch {
    max_vms: Option<usize>,
    memory_budget: Option<String>,
    disk_reserve: Option<String>,
    vnc_ports: Option<String>,
    idle_timeout: Option<String>,
    accel: Option<String>,
    qemu: Option<String>,
    shutdown_timeout: Option<String>,
    x11_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireGuest {
    name: String,
    label: Option<String>,
    display: Option<String>,
    image: String,
    memory: Option<String>,
    cpus: Option<u32>,
    description: Option<String>,
    persist: Option<bool>,
    nat: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireServer {
    interface: String,
    address: Option<String>,
    state_dir: Option<String>,
    bridge: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireDhcp {
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

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireBoot {
    root: Option<String>,
    bios: Option<String>,
    uefi: Option<String>,
    ipxe_dir: Option<String>,
    kernel: Option<String>,
    initrd: Option<String>,
    cmdline: Option<String>,
    ipv6_ra: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireTftp {
    enabled: Option<bool>,
    port: Option<u16>,
    root: Option<String>,
    max_transfers: Option<usize>,
    max_per_address: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireHttp {
    enabled: Option<bool>,
    port: Option<u16>,
    root: Option<String>,
    admin_token: Option<String>,
    sendfile: Option<bool>,
    max_per_address: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireNbd {
    enabled: Option<bool>,
    port: Option<u16>,
    max_connections: Option<usize>,
    max_per_address: Option<usize>,
    #[serde(default)]
    export: Vec<WireExport>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireExport {
    name: String,
    path: String,
    mode: Option<String>,
    persist: Option<bool>,
    description: Option<String>,
}

// ---------------------------------------------------------------------------------------
// The validated config.

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

#[derive(Clone, Debug)]
pub struct Server {
    pub interface: String,
    /// Set in the file, or filled from the interface by [`Config::bind_interface`].
    pub address: Option<Ipv4Addr>,
    /// The LAN subnet: from `address = "A/PREFIX"` or from the interface.
    pub subnet: Option<Ipv4Net>,
    pub state_dir: PathBuf,
    /// The bridge the taps of X11 guests join (`server.bridge`). `None`: the LAN interface
    /// itself when it is a bridge, else one vdd creates ([`DEFAULT_BRIDGE`]).
    pub bridge: Option<String>,
}

/// The bridge vdd creates for X11 guests when the LAN interface is no bridge and
/// `server.bridge` names none.
pub const DEFAULT_BRIDGE: &str = "vddbr0";

#[derive(Clone, Debug)]
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

#[derive(Clone, Debug)]
pub struct Boot {
    /// Boot file for legacy BIOS PXE ROMs (arch 0), served over TFTP.
    pub bios: String,
    /// Boot file for UEFI x64 PXE clients (arch 7, 9), served over TFTP.
    pub uefi: String,
    /// Where Debian's `ipxe` package keeps undionly.kpxe and ipxe.efi.
    pub ipxe_dir: PathBuf,
    /// What the iPXE script boots, served over HTTP.
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    /// The NBD export the thin clients mount as their root (an `[[nbd.export]]` name).
    pub root: Option<String>,
    /// Answer IPv6 router solicitations with an advertisement that offers nothing, so
    /// iPXE stops waiting for an IPv6 router (see src/ndp.rs).
    pub ipv6_ra: bool,
}

#[derive(Clone, Debug)]
pub struct Tftp {
    pub enabled: bool,
    pub port: u16,
    pub root: PathBuf,
    pub max_transfers: usize,
    /// Transfers one client address may run at once.
    pub max_per_address: usize,
}

#[derive(Clone, Debug)]
pub struct Http {
    pub enabled: bool,
    pub port: u16,
    /// Extra files served under /files/ (default: the TFTP root).
    pub root: PathBuf,
    /// `Authorization: Bearer` token of the admin API routes; `None` disables them.
    pub admin_token: Option<String>,
    /// Send file bodies with sendfile(2) (default); `false` copies through user space,
    /// for file systems that do not support sendfile.
    pub sendfile: bool,
    /// Connections one client address may hold at once.
    pub max_per_address: usize,
}

/// How an NBD export treats writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportMode {
    /// The file is served read-only.
    ReadOnly,
    /// Writes go to a per-client sparse overlay in the state directory; the base is never written.
    Overlay,
}

#[derive(Clone, Debug)]
pub struct Export {
    pub name: String,
    pub path: PathBuf,
    pub mode: ExportMode,
    pub persist: bool,
    pub description: String,
}

#[derive(Clone, Debug)]
pub struct Nbd {
    pub enabled: bool,
    pub port: u16,
    pub max_connections: usize,
    /// Connections one client address may hold at once.
    pub max_per_address: usize,
    pub exports: Vec<Export>,
}

/// How a guest's desktop reaches the thin client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Display {
    /// QEMU's VNC server, with a one-time password per session.
    Vnc,
    /// The guest's display manager over XDMCP; the thin client runs the X server.
    X11,
}

impl Display {
    pub fn as_str(self) -> &'static str {
        match self {
            Display::Vnc => "vnc",
            Display::X11 => "x11",
        }
    }
}

/// A guest system the menu offers.
#[derive(Clone, Debug)]
pub struct Guest {
    /// Short id, used in URLs and `vdd.autopick`.
    pub name: String,
    /// What the menu shows.
    pub label: String,
    pub display: Display,
    /// The base image; sessions run on a qcow2 overlay of it.
    pub image: PathBuf,
    pub memory_mib: u64,
    pub cpus: u32,
    pub description: String,
    /// Keep each seat's overlay between sessions.
    pub persist: bool,
    /// A VNC guest's user-mode NIC reaches out through the server (NAT). Off (the
    /// default), QEMU's `restrict=on` isolates it: QEMU's user network forwards the guest's
    /// 10.0.2.2 to the server's loopback, so a NAT guest reaches every service there.
    pub nat: bool,
}

/// Which accelerator guest VMs get.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccelChoice {
    /// KVM where a probe shows it really runs guests, TCG otherwise (with a warning).
    Auto,
    Kvm,
    Tcg,
}

/// Limits and tools of the dispatcher (guest VMs).
#[derive(Clone, Debug)]
pub struct Dispatch {
    pub max_vms: usize,
    /// MiB of guest memory all sessions together may use; `None`: 80% of the machine's.
    pub memory_budget_mib: Option<u64>,
    /// MiB that must stay free on the state disk for a new VM to start: overlays grow
    /// there, beside the lease journal (`dispatch.disk_reserve`).
    pub disk_reserve_mib: u64,
    /// TCP ports for the VMs' VNC servers, inclusive.
    pub vnc_ports: (u16, u16),
    /// A seat whose client has not been seen this long gets its VMs stopped.
    pub idle_timeout: Duration,
    pub accel: AccelChoice,
    pub qemu: String,
    /// How long each step of a VM's shutdown (powerdown, quit) may take.
    pub shutdown_timeout: Duration,
    /// How long an X11 guest's display manager may take to answer XDMCP after its VM
    /// starts (`dispatch.x11_timeout`).
    pub x11_timeout: Duration,
}

/// The validated configuration. Built only by [`Config::load`] / [`Config::parse`].
#[derive(Clone, Debug)]
pub struct Config {
    /// The file it came from; relative paths in it were resolved against its folder.
    pub path: PathBuf,
    pub server: Server,
    pub dhcp: Dhcp,
    pub boot: Boot,
    pub tftp: Tftp,
    pub http: Http,
    pub nbd: Nbd,
    /// The menu, in the order of the file.
    pub guests: Vec<Guest>,
    pub dispatch: Dispatch,
}

/// What the LAN interface looks like, as read from the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceInfo {
    pub name: String,
    pub index: u32,
    /// The first IPv4 address and its subnet.
    pub addr: Option<(Ipv4Addr, Ipv4Net)>,
    pub mac: Option<Mac>,
}

impl Config {
    /// Where `vdd` looks when no `--config` is given.
    pub const DEFAULT_PATHS: [&'static str; 2] = ["./config.toml", "/etc/vdd/config.toml"];

    /// Finds the config file: the given path, else the first default that exists.
    pub fn locate(given: Option<&Path>) -> Result<PathBuf, ConfigError> {
        if let Some(p) = given {
            return Ok(p.to_path_buf());
        }
        Self::DEFAULT_PATHS
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .ok_or_else(|| ConfigError::NotFound {
                tried: Self::DEFAULT_PATHS.join(", "),
            })
    }

    /// Reads and validates the file (everything but the interface).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Validates `text` as if read from `path` (relative paths resolve against its folder).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let wire: WireConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().replace('\n', " | "),
        })?;
        let base = path
            .parent()
            .map(|p| {
                if p.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    p
                }
            })
            .unwrap_or(Path::new("."));
        let base = std::fs::canonicalize(base).unwrap_or_else(|_| base.to_path_buf());
        validate(wire, path, &base)
    }

    /// Checks the config against the real LAN interface and fills in the server address and
    /// subnet from it where the file left them out.
    pub fn bind_interface(&mut self, iface: &InterfaceInfo) -> Result<(), ConfigError> {
        let Some((if_ip, if_net)) = iface.addr else {
            if self.server.address.is_none() {
                return Err(invalid(
                    "server.interface",
                    &iface.name,
                    "the interface has no IPv4 address; give it one, or set server.address",
                ));
            }
            return Ok(());
        };
        match self.server.address {
            None => self.server.address = Some(if_ip),
            Some(a) if a != if_ip && !if_net.contains(&a) => {
                return Err(invalid(
                    "server.address",
                    a,
                    format!(
                        "not on interface {} ({if_net}); use {if_ip} or leave the key out",
                        iface.name
                    ),
                ))
            }
            Some(_) => {}
        }
        if self.server.subnet.is_none() {
            self.server.subnet = Some(if_net);
            check_subnet(&self.dhcp, if_net)?;
        }
        Ok(())
    }

    /// The address every boot URL and next-server field points at.
    /// Only `None` before [`Config::bind_interface`] when the file gave no address.
    pub fn server_ip(&self) -> Option<Ipv4Addr> {
        self.server.address
    }

    /// The reservation of a MAC, if any.
    pub fn host(&self, mac: &Mac) -> Option<&Host> {
        self.dhcp.hosts.get(mac)
    }

    /// Whether any guest runs on the LAN (X11 over XDMCP), so vdd needs a bridge and taps.
    pub fn has_x11(&self) -> bool {
        self.guests.iter().any(|g| g.display == Display::X11)
    }
}

/// A Linux interface name: 1-15 bytes, no '/', no whitespace, not "." or "..".
fn valid_ifname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s != "."
        && s != ".."
        && !s.chars().any(|c| c == '/' || c == ':' || c.is_whitespace())
}

fn validate(w: WireConfig, path: &Path, base: &Path) -> Result<Config, ConfigError> {
    let resolve = |p: &str| -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            base.join(p)
        }
    };

    // [server]
    if !valid_ifname(&w.server.interface) {
        return Err(invalid(
            "server.interface",
            &w.server.interface,
            "an interface name of 1-15 characters, such as \"eth0\" or \"vdd0\"",
        ));
    }
    let (address, subnet) = match &w.server.address {
        None => (None, None),
        Some(s) => {
            if let Ok(net) = s.parse::<Ipv4Net>() {
                (Some(net.addr()), Some(net.trunc()))
            } else {
                let ip = parse_ip("server.address", s)?;
                (Some(ip), None)
            }
        }
    };
    let state_dir = resolve(w.server.state_dir.as_deref().unwrap_or("/var/lib/vdd"));
    if let Some(b) = &w.server.bridge {
        if !valid_ifname(b) || b.starts_with(crate::lan::TAP_PREFIX) {
            return Err(invalid(
                "server.bridge",
                b,
                format!(
                    "a bridge name of 1-15 characters, such as \"br0\" (not starting with {:?}, which vdd's taps use), or leave the key out",
                    crate::lan::TAP_PREFIX
                ),
            ));
        }
    }

    // [dhcp]
    let mode = match w.dhcp.mode.as_deref().unwrap_or("full") {
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
    let pool = match (&w.dhcp.pool, mode) {
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
    let lease_time = match &w.dhcp.lease_time {
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
        .dhcp
        .router
        .as_deref()
        .map(|r| parse_ip("dhcp.router", r))
        .transpose()?;
    let dns = w
        .dhcp
        .dns
        .iter()
        .enumerate()
        .map(|(i, d)| parse_ip(&format!("dhcp.dns[{i}]"), d))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(d) = &w.dhcp.domain {
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
    let mut hosts = BTreeMap::new();
    let mut by_addr: HashMap<Ipv4Addr, usize> = HashMap::new();
    for (i, h) in w.dhcp.host.iter().enumerate() {
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
                        w.dhcp.pool.as_deref().unwrap_or_default()
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
            kernel: h.kernel.as_deref().map(resolve),
            initrd: h.initrd.as_deref().map(resolve),
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
    let dhcp = Dhcp {
        mode,
        pool,
        lease_time,
        router,
        dns,
        domain: w.dhcp.domain,
        port: w.dhcp.port.unwrap_or(67),
        proxy_port: w.dhcp.proxy_port.unwrap_or(4011),
        new_clients_per_minute: at_least_one(
            "dhcp.new_clients_per_minute",
            w.dhcp.new_clients_per_minute,
            pool.as_ref().map_or(64, |p| (p.len() as usize / 4).max(64)),
            "at least 1: how many never-seen clients may get an address per minute",
        )?,
        hosts,
    };
    if let Some(net) = subnet {
        check_subnet(&dhcp, net)?;
    }

    // [boot]
    let boot_file = |key: &str, v: Option<String>, default: &str| -> Result<String, ConfigError> {
        let v = v.unwrap_or_else(|| default.to_string());
        if v.is_empty() || v.len() > 127 || v.contains('\0') {
            return Err(invalid(
                key,
                &v,
                "a file name in the TFTP root or the iPXE folder, such as \"undionly.kpxe\"",
            ));
        }
        Ok(v)
    };
    let boot = Boot {
        bios: boot_file("boot.bios", w.boot.bios, "undionly.kpxe")?,
        uefi: boot_file("boot.uefi", w.boot.uefi, "ipxe.efi")?,
        ipxe_dir: resolve(w.boot.ipxe_dir.as_deref().unwrap_or("/usr/lib/ipxe")),
        kernel: w.boot.kernel.as_deref().map(resolve),
        initrd: w.boot.initrd.as_deref().map(resolve),
        cmdline: w.boot.cmdline.unwrap_or_default(),
        root: w.boot.root,
        // Where vdd runs the LAN's DHCP it may speak for the LAN's IPv6 too; beside
        // another DHCP server there may be a real IPv6 router, so only when asked.
        ipv6_ra: w.boot.ipv6_ra.unwrap_or(mode == DhcpMode::Full),
    };

    // [tftp]
    let tftp = Tftp {
        enabled: w.tftp.enabled.unwrap_or(true),
        port: w.tftp.port.unwrap_or(69),
        root: w
            .tftp
            .root
            .as_deref()
            .map(resolve)
            .unwrap_or_else(|| state_dir.join("tftp")),
        max_transfers: at_least_one(
            "tftp.max_transfers",
            w.tftp.max_transfers,
            256,
            "at least 1; the default 256 suits a classroom",
        )?,
        // A PXE ROM runs one transfer at a time (its tsize probe ends before the file
        // starts), a UEFI loader at most two.
        max_per_address: at_least_one(
            "tftp.max_per_address",
            w.tftp.max_per_address,
            4,
            "at least 1; the default 4 leaves room for any PXE or UEFI client",
        )?,
    };

    // [http]
    let http = Http {
        enabled: w.http.enabled.unwrap_or(true),
        port: w.http.port.unwrap_or(80),
        root: w
            .http
            .root
            .as_deref()
            .map(resolve)
            .unwrap_or_else(|| tftp.root.clone()),
        admin_token: match w.http.admin_token {
            Some(t) if t.len() < 16 || !t.chars().all(|c| c.is_ascii_graphic()) => {
                return Err(invalid(
                    "http.admin_token",
                    "(hidden)",
                    "at least 16 printable characters without spaces; `openssl rand -hex 16` makes one",
                ))
            }
            t => t,
        },
        sendfile: w.http.sendfile.unwrap_or(true),
        // iPXE opens one or two connections, a browser on the admin panel six.
        max_per_address: at_least_one(
            "http.max_per_address",
            w.http.max_per_address,
            16,
            "at least 1; the default 16 leaves room for iPXE and a browser",
        )?,
    };

    // [nbd]
    let mut exports: Vec<Export> = Vec::new();
    for (i, e) in w.nbd.export.iter().enumerate() {
        let key = |k: &str| format!("nbd.export[{i}].{k}");
        if e.name.is_empty()
            || e.name.len() > 64
            || !e
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-/".contains(c))
        {
            return Err(invalid(
                key("name"),
                &e.name,
                "letters, digits, '.', '_', '-' and '/', at most 64, such as \"thin-client\"",
            ));
        }
        if exports.iter().any(|x| x.name == e.name) {
            return Err(invalid(
                key("name"),
                &e.name,
                "another export has this name; names must be unique",
            ));
        }
        let mode = match e.mode.as_deref().unwrap_or("readonly") {
            "readonly" => ExportMode::ReadOnly,
            "overlay" => ExportMode::Overlay,
            other => return Err(invalid(key("mode"), other, "\"readonly\" or \"overlay\"")),
        };
        if e.persist.is_some() && mode != ExportMode::Overlay {
            return Err(invalid(
                key("persist"),
                e.persist.unwrap_or_default(),
                "persist only applies to mode = \"overlay\"",
            ));
        }
        exports.push(Export {
            name: e.name.clone(),
            path: resolve(&e.path),
            mode,
            persist: e.persist.unwrap_or(false),
            description: e.description.clone().unwrap_or_default(),
        });
    }
    if let Some(r) = &boot.root {
        if !exports.iter().any(|e| &e.name == r) {
            let names: Vec<&str> = exports.iter().map(|e| e.name.as_str()).collect();
            return Err(invalid(
                "boot.root",
                r,
                format!("name one of the [[nbd.export]] tables: {names:?}"),
            ));
        }
    }
    let nbd = Nbd {
        enabled: w.nbd.enabled.unwrap_or(!exports.is_empty()),
        port: w.nbd.port.unwrap_or(10809),
        max_connections: at_least_one(
            "nbd.max_connections",
            w.nbd.max_connections,
            512,
            "at least 1; the default 512 suits a classroom",
        )?,
        // A thin client's kernel client opens one connection, nbdcopy up to four.
        max_per_address: at_least_one(
            "nbd.max_per_address",
            w.nbd.max_per_address,
            4,
            "at least 1; the default 4 suits a thin client (1) and nbdcopy (4)",
        )?,
        exports,
    };

    // [[guest]]
    let mut guests: Vec<Guest> = Vec::new();
    for (i, g) in w.guest.iter().enumerate() {
        let key = |k: &str| format!("guest[{i}].{k}");
        if g.name.is_empty()
            || g.name.len() > 32
            || !g
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return Err(invalid(
                key("name"),
                &g.name,
                "lower-case letters, digits and '-', at most 32, such as \"debian\"",
            ));
        }
        if guests.iter().any(|x| x.name == g.name) {
            return Err(invalid(
                key("name"),
                &g.name,
                "another [[guest]] has this name; names must be unique",
            ));
        }
        let display = match g.display.as_deref().unwrap_or("vnc") {
            "vnc" => Display::Vnc,
            "x11" => Display::X11,
            other => return Err(invalid(key("display"), other, "\"vnc\" or \"x11\"")),
        };
        // vdd learns an X11 guest's address by handing it out itself; another DHCP
        // server's leases are not ours to read.
        if display == Display::X11 && mode != DhcpMode::Full {
            return Err(invalid(
                key("display"),
                "x11",
                format!(
                    "X11 guests need dhcp.mode = \"full\" (vdd hands each guest its address and so knows where to find it); this config has dhcp.mode = {:?}; use display = \"vnc\" or full DHCP",
                    w.dhcp.mode.as_deref().unwrap_or("full")
                ),
            ));
        }
        let memory_mib = match &g.memory {
            None => 1024,
            Some(m) => parse_mib(m)
                .filter(|&n| (64..=1 << 22).contains(&n))
                .ok_or_else(|| {
                    invalid(
                        key("memory"),
                        m,
                        "a size between \"64M\" and \"4T\", such as \"2G\" or \"512M\"",
                    )
                })?,
        };
        if g.nat.is_some() && display == Display::X11 {
            return Err(invalid(
                key("nat"),
                g.nat.unwrap_or_default(),
                "nat only applies to display = \"vnc\" guests (an X11 guest's NIC is on the LAN bridge); leave it out",
            ));
        }
        let cpus = g.cpus.unwrap_or(1);
        if !(1..=256).contains(&cpus) {
            return Err(invalid(key("cpus"), cpus, "between 1 and 256"));
        }
        guests.push(Guest {
            name: g.name.clone(),
            label: g.label.clone().unwrap_or_else(|| g.name.clone()),
            display,
            image: resolve(&g.image),
            memory_mib,
            cpus,
            description: g.description.clone().unwrap_or_default(),
            persist: g.persist.unwrap_or(false),
            nat: g.nat.unwrap_or(false),
        });
    }

    // [dispatch]
    let dur = |key: &str, v: &Option<String>, default: u64| -> Result<Duration, ConfigError> {
        match v {
            None => Ok(Duration::from_secs(default)),
            Some(s) => humantime::parse_duration(s)
                .map_err(|_| invalid(key, s, "a duration such as \"30s\", \"10m\" or \"1h\"")),
        }
    };
    let wd = &w.dispatch;
    let vnc_ports = match &wd.vnc_ports {
        None => (5910, 5999),
        Some(s) => {
            let bad = || {
                invalid(
                    "dispatch.vnc_ports",
                    s,
                    "FIRST-LAST within 5900-65535, such as \"5910-5999\"",
                )
            };
            let (a, b) = s.split_once('-').ok_or_else(bad)?;
            let a: u16 = a.trim().parse().map_err(|_| bad())?;
            let b: u16 = b.trim().parse().map_err(|_| bad())?;
            if a < 5900 || a > b {
                return Err(bad());
            }
            (a, b)
        }
    };
    let dispatch = Dispatch {
        max_vms: at_least_one("dispatch.max_vms", wd.max_vms, 16, "at least 1")?,
        memory_budget_mib: match wd.memory_budget.as_deref() {
            None | Some("auto") => None,
            Some(m) => Some(parse_mib(m).filter(|&n| n >= 64).ok_or_else(|| {
                invalid(
                    "dispatch.memory_budget",
                    m,
                    "\"auto\" (80% of the machine's memory) or a size such as \"16G\"",
                )
            })?),
        },
        disk_reserve_mib: match wd.disk_reserve.as_deref() {
            None => 1024,
            Some(m) => parse_mib(m).ok_or_else(|| {
                invalid(
                    "dispatch.disk_reserve",
                    m,
                    "a size such as \"1G\" (\"0\": no reserve)",
                )
            })?,
        },
        vnc_ports,
        idle_timeout: dur("dispatch.idle_timeout", &wd.idle_timeout, 600)?,
        accel: match wd.accel.as_deref().unwrap_or("auto") {
            "auto" => AccelChoice::Auto,
            "kvm" => AccelChoice::Kvm,
            "tcg" => AccelChoice::Tcg,
            other => {
                return Err(invalid(
                    "dispatch.accel",
                    other,
                    "\"auto\", \"kvm\" or \"tcg\"",
                ))
            }
        },
        qemu: wd
            .qemu
            .clone()
            .unwrap_or_else(|| "qemu-system-x86_64".into()),
        shutdown_timeout: dur("dispatch.shutdown_timeout", &wd.shutdown_timeout, 20)?,
        x11_timeout: {
            let d = dur("dispatch.x11_timeout", &wd.x11_timeout, 180)?;
            if d < Duration::from_secs(1) || d > Duration::from_secs(3600) {
                return Err(invalid(
                    "dispatch.x11_timeout",
                    wd.x11_timeout.as_deref().unwrap_or_default(),
                    "between \"1s\" and \"1h\"; \"3m\" gives a slow guest time to boot",
                ));
            }
            d
        },
    };

    Ok(Config {
        path: path.to_path_buf(),
        server: Server {
            interface: w.server.interface,
            address,
            subnet,
            state_dir,
            bridge: w.server.bridge,
        },
        dhcp,
        boot,
        tftp,
        http,
        nbd,
        guests,
        dispatch,
    })
}

/// "2G", "512M", "1024" (MiB), "1T" -> MiB.
fn parse_mib(s: &str) -> Option<u64> {
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

/// The pool, the router and every reservation must sit in the LAN subnet.
fn check_subnet(d: &Dhcp, net: Ipv4Net) -> Result<(), ConfigError> {
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

fn parse_ip(key: &str, s: &str) -> Result<Ipv4Addr, ConfigError> {
    s.parse()
        .map_err(|_| invalid(key, s, "an IPv4 address such as \"10.77.0.1\""))
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

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[server]
interface = "vdd0"
state_dir = "state"

[dhcp]
mode = "full"
pool = "10.77.0.100-10.77.0.199"
lease_time = "1h"
router = "10.77.0.1"
dns = ["10.77.0.1"]

[[dhcp.host]]
mac = "52:54:00:00:00:01"
address = "10.77.0.50"
hostname = "seat-01"

[boot]
bios = "undionly.kpxe"
uefi = "ipxe.efi"
"#;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, Path::new("/etc/vdd/config.toml"))
    }

    fn err(s: &str) -> String {
        parse(s).unwrap_err().to_string()
    }

    #[test]
    fn good_config_parses_with_defaults() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.server.state_dir, Path::new("/etc/vdd/state"));
        assert_eq!(c.tftp.root, Path::new("/etc/vdd/state/tftp"));
        assert_eq!(c.dhcp.pool.unwrap().len(), 100);
        assert_eq!(c.dhcp.lease_time, Duration::from_secs(3600));
        let mac: Mac = "52:54:00:00:00:01".parse().unwrap();
        assert_eq!(
            c.host(&mac).unwrap().address,
            Some(Ipv4Addr::new(10, 77, 0, 50))
        );
        assert_eq!(c.dhcp.port, 67);
        assert_eq!(c.http.port, 80);
        assert!(!c.nbd.enabled);
    }

    #[test]
    fn per_address_caps_default_and_refuse_zero() {
        let c = parse(GOOD).unwrap();
        assert_eq!(
            (
                c.tftp.max_per_address,
                c.http.max_per_address,
                c.nbd.max_per_address
            ),
            (4, 16, 4)
        );
        for (table, key) in [("tftp", "tftp"), ("http", "http"), ("nbd", "nbd")] {
            let e = err(&format!("{GOOD}\n[{table}]\nmax_per_address = 0\n"));
            assert!(
                e.starts_with(&format!("{key}.max_per_address = \"0\"")),
                "{e}"
            );
        }
    }

    #[test]
    fn shipped_config_passes() {
        let text = include_str!("../config.toml");
        parse(text).unwrap();
    }

    #[test]
    fn unknown_key_is_named() {
        let e = err(&GOOD.replace("lease_time", "lease_tim"));
        assert!(e.contains("unknown field `lease_tim`"), "{e}");
    }

    #[test]
    fn unknown_mode_is_named() {
        let e = err(&GOOD.replace("mode = \"full\"", "mode = \"fast\""));
        assert!(e.starts_with("dhcp.mode = \"fast\""), "{e}");
        assert!(e.contains("proxy"), "{e}");
    }

    #[test]
    fn malformed_mac_is_named() {
        let e = err(&GOOD.replace("52:54:00:00:00:01", "52:54:00:00:01"));
        assert!(
            e.starts_with("dhcp.host[0].mac = \"52:54:00:00:01\""),
            "{e}"
        );
    }

    #[test]
    fn reservation_inside_pool_is_refused() {
        let e = err(&GOOD.replace("10.77.0.50", "10.77.0.150"));
        assert!(
            e.contains("dhcp.host[0].address") && e.contains("inside dhcp.pool"),
            "{e}"
        );
    }

    #[test]
    fn same_address_reserved_twice_is_refused() {
        let twice = format!(
            "{GOOD}\n[[dhcp.host]]\nmac = \"52:54:00:00:00:02\"\naddress = \"10.77.0.50\"\n"
        );
        // [boot] came after the first host; TOML puts the second host in dhcp.host anyway.
        let e = err(&twice);
        assert!(
            e.contains("dhcp.host[1].address") && e.contains("dhcp.host[0]"),
            "{e}"
        );
    }

    #[test]
    fn pool_outside_subnet_is_refused() {
        let e = err(&GOOD.replace(
            "interface = \"vdd0\"",
            "interface = \"vdd0\"\naddress = \"10.78.0.1/24\"",
        ));
        assert!(
            e.starts_with("dhcp.pool") && e.contains("10.78.0.0/24"),
            "{e}"
        );
    }

    #[test]
    fn pool_checked_against_interface() {
        let mut c = parse(GOOD).unwrap();
        let iface = InterfaceInfo {
            name: "vdd0".into(),
            index: 3,
            addr: Some((
                Ipv4Addr::new(192, 168, 5, 1),
                "192.168.5.0/24".parse().unwrap(),
            )),
            mac: None,
        };
        let e = c.bind_interface(&iface).unwrap_err().to_string();
        assert!(e.contains("192.168.5.0/24"), "{e}");
        let mut c = parse(GOOD).unwrap();
        let iface = InterfaceInfo {
            addr: Some((Ipv4Addr::new(10, 77, 0, 1), "10.77.0.0/24".parse().unwrap())),
            ..iface
        };
        c.bind_interface(&iface).unwrap();
        assert_eq!(c.server_ip(), Some(Ipv4Addr::new(10, 77, 0, 1)));
    }

    #[test]
    fn bad_values_are_named() {
        for (from, to, key) in [
            (
                "pool = \"10.77.0.100-10.77.0.199\"",
                "pool = \"10.77.0.199-10.77.0.100\"",
                "dhcp.pool",
            ),
            (
                "pool = \"10.77.0.100-10.77.0.199\"",
                "pool = \"lots\"",
                "dhcp.pool",
            ),
            (
                "lease_time = \"1h\"",
                "lease_time = \"forever\"",
                "dhcp.lease_time",
            ),
            (
                "lease_time = \"1h\"",
                "lease_time = \"5s\"",
                "dhcp.lease_time",
            ),
            (
                "router = \"10.77.0.1\"",
                "router = \"10.77.0\"",
                "dhcp.router",
            ),
            (
                "dns = [\"10.77.0.1\"]",
                "dns = [\"10.77.0.1\", \"x\"]",
                "dhcp.dns[1]",
            ),
            (
                "hostname = \"seat-01\"",
                "hostname = \"seat 01\"",
                "dhcp.host[0].hostname",
            ),
            (
                "interface = \"vdd0\"",
                "interface = \"\"",
                "server.interface",
            ),
        ] {
            let e = err(&GOOD.replace(from, to));
            assert!(e.starts_with(key), "{to}: {e}");
        }
    }

    #[test]
    fn proxy_mode_needs_no_pool() {
        let s = GOOD
            .replace("mode = \"full\"", "mode = \"proxy\"")
            .replace("pool = \"10.77.0.100-10.77.0.199\"\n", "");
        let c = parse(&s).unwrap();
        assert_eq!(c.dhcp.mode, DhcpMode::Proxy);
        assert!(c.dhcp.pool.is_none());
        // Beside another DHCP server there may be a real IPv6 router: no RAs unless asked.
        assert!(!c.boot.ipv6_ra);
        assert!(parse(GOOD).unwrap().boot.ipv6_ra, "full mode answers RS");
        let off = parse(&GOOD.replace("[boot]\n", "[boot]\nipv6_ra = false\n")).unwrap();
        assert!(!off.boot.ipv6_ra);
    }

    #[test]
    fn exports() {
        let s = format!(
            "{GOOD}\n[nbd]\nport = 10809\n[[nbd.export]]\nname = \"thin-client\"\npath = \"images/out/tc.squashfs\"\n[[nbd.export]]\nname = \"scratch\"\npath = \"/srv/s.img\"\nmode = \"overlay\"\npersist = true\n"
        );
        let c = parse(&s).unwrap();
        assert!(c.nbd.enabled);
        assert_eq!(
            c.nbd.exports[0].path,
            Path::new("/etc/vdd/images/out/tc.squashfs")
        );
        assert_eq!(c.nbd.exports[1].mode, ExportMode::Overlay);
        let e = err(&s.replace("mode = \"overlay\"", "mode = \"cow\""));
        assert!(e.starts_with("nbd.export[1].mode"), "{e}");
        let c = parse(&s.replace("[boot]", "[boot]\nroot = \"thin-client\"")).unwrap();
        assert_eq!(c.boot.root.as_deref(), Some("thin-client"));
        let e = err(&s.replace("[boot]", "[boot]\nroot = \"thin\""));
        assert!(
            e.starts_with("boot.root = \"thin\"") && e.contains("scratch"),
            "{e}"
        );
    }

    #[test]
    fn guests() {
        let s = format!(
            "{GOOD}\n[[guest]]\nname = \"debian\"\nlabel = \"Debian 12 desktop\"\ndisplay = \"vnc\"\nimage = \"/srv/vdd/guests/debian.qcow2\"\nmemory = \"2G\"\ncpus = 2\n[[guest]]\nname = \"demo\"\nimage = \"images/out/demo.img\"\n"
        );
        let c = parse(&s).unwrap();
        assert_eq!(c.guests.len(), 2);
        assert_eq!(c.guests[0].memory_mib, 2048);
        assert_eq!(c.guests[0].display, Display::Vnc);
        assert_eq!(c.guests[1].label, "demo");
        assert_eq!(c.guests[1].image, Path::new("/etc/vdd/images/out/demo.img"));
        assert!(
            !c.guests[0].nat,
            "a VNC guest has no way out unless nat = true"
        );
        let nat = parse(&s.replace("cpus = 2", "cpus = 2\nnat = true")).unwrap();
        assert!(nat.guests[0].nat);
        for (from, to, key) in [
            ("memory = \"2G\"", "memory = \"2 gigs\"", "guest[0].memory"),
            ("memory = \"2G\"", "memory = \"1M\"", "guest[0].memory"),
            ("display = \"vnc\"", "display = \"rdp\"", "guest[0].display"),
            ("name = \"demo\"", "name = \"debian\"", "guest[1].name"),
            ("name = \"demo\"", "name = \"Demo\"", "guest[1].name"),
            ("cpus = 2", "cpus = 0", "guest[0].cpus"),
        ] {
            let e = err(&s.replace(from, to));
            assert!(e.starts_with(key), "{to}: {e}");
        }
        let d = parse(&format!(
            "{s}\n[dispatch]\nmax_vms = 4\nvnc_ports = \"5901-5904\"\nmemory_budget = \"8G\"\n"
        ))
        .unwrap();
        assert_eq!(
            (
                d.dispatch.max_vms,
                d.dispatch.vnc_ports,
                d.dispatch.memory_budget_mib
            ),
            (4, (5901, 5904), Some(8192))
        );
        let e = err(&format!("{s}\n[dispatch]\nvnc_ports = \"80-90\"\n"));
        assert!(e.starts_with("dispatch.vnc_ports"), "{e}");
        assert_eq!(parse_mib("512M"), Some(512));
        assert_eq!(parse_mib("1024"), Some(1024));
        assert_eq!(parse_mib("1T"), Some(1 << 20));
    }

    #[test]
    fn x11_keys() {
        let x11 = "\n[[guest]]\nname = \"desk\"\ndisplay = \"x11\"\nimage = \"/srv/desk.qcow2\"\n";
        let e = err(&format!("{GOOD}{x11}nat = true\n"));
        assert!(e.starts_with("guest[0].nat"), "{e}");
        let c = parse(&format!("{GOOD}{x11}")).unwrap();
        assert!(c.has_x11());
        assert_eq!(c.server.bridge, None);
        assert_eq!(c.dispatch.x11_timeout, Duration::from_secs(180));
        let with = GOOD.replace(
            "state_dir = \"state\"",
            "state_dir = \"state\"\nbridge = \"br0\"",
        );
        let c = parse(&format!("{with}{x11}\n[dispatch]\nx11_timeout = \"20s\"\n")).unwrap();
        assert_eq!(c.server.bridge.as_deref(), Some("br0"));
        assert_eq!(c.dispatch.x11_timeout, Duration::from_secs(20));
        assert!(!parse(GOOD).unwrap().has_x11());

        for (bridge, why) in [
            ("a-name-longer-than-15", "1-15"),
            ("", "1-15"),
            ("br/0", "1-15"),
            ("vdt-x", "taps"),
        ] {
            let e = err(&GOOD.replace(
                "state_dir = \"state\"",
                &format!("state_dir = \"state\"\nbridge = \"{bridge}\""),
            ));
            assert!(
                e.starts_with(&format!("server.bridge = {bridge:?}")) && e.contains(why),
                "{e}"
            );
        }
        for t in ["0s", "2h", "soon"] {
            let e = err(&format!("{GOOD}{x11}\n[dispatch]\nx11_timeout = \"{t}\"\n"));
            assert!(
                e.starts_with(&format!("dispatch.x11_timeout = {t:?}")),
                "{e}"
            );
        }
        // vdd must hand out the guest's address itself to know it.
        for mode in ["proxy", "off"] {
            let s = GOOD
                .replace("mode = \"full\"", &format!("mode = \"{mode}\""))
                .replace("pool = \"10.77.0.100-10.77.0.199\"\n", "");
            let e = err(&format!("{s}{x11}"));
            assert!(
                e.starts_with("guest[0].display = \"x11\"")
                    && e.contains("dhcp.mode = \"full\"")
                    && e.contains(mode),
                "{e}"
            );
        }
    }

    #[test]
    fn http_sendfile_key() {
        assert!(parse(GOOD).unwrap().http.sendfile);
        let c = parse(&format!("{GOOD}\n[http]\nsendfile = false\n")).unwrap();
        assert!(!c.http.sendfile);
    }

    #[test]
    fn mac_round_trip() {
        let m: Mac = "52:54:00:AB:cd:0f".parse().unwrap();
        assert_eq!(m.to_string(), "52:54:00:ab:cd:0f");
        assert!("52:54:00:ab:cd".parse::<Mac>().is_err());
        assert!("52:54:00:ab:cd:0g".parse::<Mac>().is_err());
    }
}
