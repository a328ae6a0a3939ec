//! `[[guest]]`: the systems the menu offers.

use std::path::PathBuf;

use serde::Deserialize;

use super::types::parse_mib;
use super::{invalid, ConfigError, Cx, DhcpMode};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WireGuest {
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
#[derive(Clone, Debug, PartialEq, Eq)]
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

/// The menu, in the order of the file: names unique.
pub(super) fn guests(wire: Vec<WireGuest>, cx: &Cx<'_>) -> Result<Vec<Guest>, ConfigError> {
    let mut guests: Vec<Guest> = Vec::new();
    for (i, g) in wire.into_iter().enumerate() {
        // A repeated name is valid in itself: the first guest's name passed.
        if guests.iter().any(|x| x.name == g.name) {
            return Err(invalid(
                format!("guest[{i}].name"),
                &g.name,
                "another [[guest]] has this name; names must be unique",
            ));
        }
        guests.push(Guest::try_from((g, i, cx))?);
    }
    Ok(guests)
}

/// One `[[guest]]`, the `i`th of the file (for the keys in messages).
impl TryFrom<(WireGuest, usize, &Cx<'_>)> for Guest {
    type Error = ConfigError;

    fn try_from((g, i, cx): (WireGuest, usize, &Cx<'_>)) -> Result<Guest, ConfigError> {
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
        let display = match g.display.as_deref().unwrap_or("vnc") {
            "vnc" => Display::Vnc,
            "x11" => Display::X11,
            other => return Err(invalid(key("display"), other, "\"vnc\" or \"x11\"")),
        };
        // vdd learns an X11 guest's address by handing it out itself; another DHCP
        // server's leases are not ours to read.
        if display == Display::X11 && cx.dhcp_mode != DhcpMode::Full {
            return Err(invalid(
                key("display"),
                "x11",
                format!(
                    "X11 guests need dhcp.mode = \"full\" (vdd hands each guest its address and so knows where to find it); this config has dhcp.mode = {:?}; use display = \"vnc\" or full DHCP",
                    cx.dhcp_mode.as_str()
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
        Ok(Guest {
            label: g.label.unwrap_or_else(|| g.name.clone()),
            name: g.name,
            display,
            image: cx.resolve(&g.image),
            memory_mib,
            cpus,
            description: g.description.unwrap_or_default(),
            persist: g.persist.unwrap_or(false),
            nat: g.nat.unwrap_or(false),
        })
    }
}
