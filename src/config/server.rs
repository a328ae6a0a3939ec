//! `[server]`: the LAN interface, the server's address, the state folder, the bridge of the
//! X11 guests.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use serde::Deserialize;

use super::types::parse_ip;
use super::{invalid, resolve, ConfigError};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WireServer {
    interface: String,
    address: Option<String>,
    state_dir: Option<String>,
    bridge: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Server {
    pub interface: String,
    /// Set in the file, or filled from the interface by [`super::Config::bind_interface`].
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

/// A Linux interface name: 1-15 bytes, no '/', no whitespace, not "." or "..".
fn valid_ifname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s != "."
        && s != ".."
        && !s.chars().any(|c| c == '/' || c == ':' || c.is_whitespace())
}

/// `[server]` comes first: the others resolve paths against the file's folder (`base`) and
/// default into its state folder.
impl TryFrom<(WireServer, &Path)> for Server {
    type Error = ConfigError;

    fn try_from((w, base): (WireServer, &Path)) -> Result<Server, ConfigError> {
        if !valid_ifname(&w.interface) {
            return Err(invalid(
                "server.interface",
                &w.interface,
                "an interface name of 1-15 characters, such as \"eth0\" or \"vdd0\"",
            ));
        }
        let (address, subnet) = match &w.address {
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
        let state_dir = resolve(base, w.state_dir.as_deref().unwrap_or("/var/lib/vdd"));
        if let Some(b) = &w.bridge {
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
        Ok(Server {
            interface: w.interface,
            address,
            subnet,
            state_dir,
            bridge: w.bridge,
        })
    }
}
