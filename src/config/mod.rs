//! config.toml: raw serde "wire" structs (`deny_unknown_fields`), then one validated
//! [`Config`] that every service reads through an `Arc`.
//!
//! Each section has a file of its own with its wire struct, its validated form and the
//! `TryFrom` from one to the other (dora's `libs/config` is the model): `server.rs`,
//! `dhcp.rs`, `boot.rs`, `tftp.rs`, `http.rs`, `nbd.rs`, `guest.rs`, `dispatch.rs` (with `hosts.rs`, its hypervisor hosts); the
//! value types and parsers they share (`Mac`, `Pool`, sizes, durations) are in `types.rs`.
//! The validated sections compare with `==`, so a reload can tell which of them changed.
//! Here: the whole [`Config`], its error, the order of the sections and the checks that
//! span more than one.
//!
//! Validation happens in two steps. [`Config::load`] checks everything the file alone can
//! tell (syntax, unknown keys, addresses, pool, reservations, exports). [`Config::bind_interface`]
//! then checks the file against the LAN interface's real address and subnet; `vdd check`
//! only warns when the interface is missing (admins check configs on laptops), `vdd serve`
//! refuses to start.

mod boot;
mod dhcp;
mod dispatch;
mod guest;
mod hosts;
mod http;
mod live;
mod nbd;
mod server;
mod tftp;
mod types;

#[cfg(test)]
mod tests;

use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use serde::Deserialize;

pub use boot::Boot;
pub use dhcp::{Dhcp, DhcpMode, Host};
pub use dispatch::{AccelChoice, Dispatch};
pub use guest::{Display, Guest, Start};
pub use hosts::{HvHost, Placement};
pub use http::Http;
pub use live::Live;
pub use nbd::{Export, ExportMode, Nbd};
pub use server::{Server, DEFAULT_BRIDGE};
pub use tftp::Tftp;
pub use types::{Mac, Pool};

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
            dhcp::check_subnet(&self.dhcp, if_net)?;
        }
        Ok(())
    }

    /// Checks the pool, the router and the reservations against the LAN subnet, when
    /// it is known (a reload checks the new file against the running one's).
    pub fn check_subnet(&self) -> Result<(), ConfigError> {
        match self.server.subnet {
            Some(net) => dhcp::check_subnet(&self.dhcp, net),
            None => Ok(()),
        }
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

/// The whole file as the admin writes it: one wire struct per section.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireConfig {
    server: server::WireServer,
    #[serde(default)]
    dhcp: dhcp::WireDhcp,
    #[serde(default)]
    boot: boot::WireBoot,
    #[serde(default)]
    tftp: tftp::WireTftp,
    #[serde(default)]
    http: http::WireHttp,
    #[serde(default)]
    nbd: nbd::WireNbd,
    #[serde(default)]
    guest: Vec<guest::WireGuest>,
    #[serde(default)]
    dispatch: dispatch::WireDispatch,
}

/// A path from the file: relative ones resolve against the file's folder `base`.
fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// What the sections after `[server]` and `[dhcp]` need from outside their own table.
struct Cx<'a> {
    /// The config file's folder: relative paths resolve against it.
    base: &'a Path,
    /// Boot's IPv6 answers and X11 guests depend on it.
    dhcp_mode: DhcpMode,
    /// `tftp.root` (default `STATE_DIR/tftp`), also the default root of HTTP's `/files/`.
    tftp_root: PathBuf,
}

impl Cx<'_> {
    fn resolve(&self, p: &str) -> PathBuf {
        resolve(self.base, p)
    }
}

/// The sections in the order their messages come (the first wrong key is reported), then
/// the checks that span sections.
fn validate(w: WireConfig, path: &Path, base: &Path) -> Result<Config, ConfigError> {
    let server = Server::try_from((w.server, base))?;
    let dhcp = Dhcp::try_from((w.dhcp, base))?;
    if let Some(net) = server.subnet {
        dhcp::check_subnet(&dhcp, net)?;
    }
    let cx = Cx {
        base,
        dhcp_mode: dhcp.mode,
        tftp_root: w.tftp.root(base, &server.state_dir),
    };
    let boot = Boot::try_from((w.boot, &cx))?;
    let tftp = Tftp::try_from((w.tftp, &cx))?;
    let http = Http::try_from((w.http, &cx))?;
    let nbd = Nbd::try_from((w.nbd, &cx))?;
    if let Some(r) = &boot.root {
        if !nbd.exports.iter().any(|e| &e.name == r) {
            let names: Vec<&str> = nbd.exports.iter().map(|e| e.name.as_str()).collect();
            return Err(invalid(
                "boot.root",
                r,
                format!("name one of the [[nbd.export]] tables: {names:?}"),
            ));
        }
    }
    let guests = guest::guests(w.guest, &cx)?;
    let dispatch = Dispatch::try_from(w.dispatch)?;
    hosts::check_bridges(&dispatch.hosts, &guests)?;
    guest::check_instant(&guests, &dispatch)?;
    Ok(Config {
        path: path.to_path_buf(),
        server,
        dhcp,
        boot,
        tftp,
        http,
        nbd,
        guests,
        dispatch,
    })
}
