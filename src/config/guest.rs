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
    warm: Option<usize>,
    start: Option<String>,
    screen: Option<String>,
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
    /// VMs of this guest kept booted for the next picks (`warm`, see `dispatch/warm.rs`).
    pub warm: usize,
    /// How a session's VM starts (`start`).
    pub start: Start,
    /// The screen size (width, height) warm VMs and saved states are made for until a
    /// seat reports its own (`screen`).
    pub screen: Option<(u32, u32)>,
}

/// How a guest's sessions start (`[[guest]] start`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// A cold boot of the guest.
    Boot,
    /// From the RAM and device state vdd saved once the guest was up (`dispatch/saved.rs`).
    Saved,
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
        let (warm, start, screen) = instant(&g, display, &key)?;
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
            warm,
            start,
            screen,
        })
    }
}

/// A guest's `warm`, `start` and `screen`.
type Instant = (usize, Start, Option<(u32, u32)>);

/// `warm`, `start` and `screen` (instant desktops), and what they cannot go with.
fn instant(
    g: &WireGuest,
    display: Display,
    key: &dyn Fn(&str) -> String,
) -> Result<Instant, ConfigError> {
    let screen = match &g.screen {
        None => None,
        Some(s) => {
            let size = s
                .split_once('x')
                .and_then(|(w, h)| Some((w.parse::<u32>().ok()?, h.parse::<u32>().ok()?)))
                .filter(|&(w, h)| (640..=2560).contains(&w) && (480..=1600).contains(&h));
            if size.is_none() || display == Display::X11 {
                return Err(invalid(
                    key("screen"),
                    s,
                    "WIDTHxHEIGHT between 640x480 and 2560x1600, such as \"1920x1080\" (VNC guests only: an X11 guest draws on the seat's own X server)",
                ));
            }
            size
        }
    };
    let warm = g.warm.unwrap_or(0);
    if warm > 64 {
        return Err(invalid(
            key("warm"),
            warm,
            "between 0 and 64 VMs kept booted",
        ));
    }
    let persist = g.persist.unwrap_or(false);
    if warm > 0 && persist {
        return Err(invalid(
            key("warm"),
            warm,
            "a warm VM runs on a fresh disk, and a persist = true guest runs on the seat's kept one; leave out warm or persist",
        ));
    }
    let start =
        match g.start.as_deref().unwrap_or("boot") {
            "boot" => Start::Boot,
            "saved" => Start::Saved,
            other => return Err(invalid(
                key("start"),
                other,
                "\"boot\" (a cold boot) or \"saved\" (from the state saved once the guest was up)",
            )),
        };
    if start == Start::Saved && display == Display::X11 {
        return Err(invalid(
            key("start"),
            "saved",
            "an X11 guest's MAC and DHCP address are in its saved RAM, so every session restored from it would have the same ones on the LAN; use warm = N for X11 guests",
        ));
    }
    if start == Start::Saved && persist {
        return Err(invalid(
            key("start"),
            "saved",
            "the saved RAM belongs to the saved disk, not to the seat's kept one (persist = true); leave out start or persist",
        ));
    }
    Ok((warm, start, screen))
}

/// What the guests' `warm` and `start` need of `[dispatch]`: room for the warm VMs in
/// `max_vms`, and the local QEMU backend: the libvirt one (`[[dispatch.host]]`) neither
/// keeps VMs booted ahead nor saves states.
pub(super) fn check_instant(
    guests: &[Guest],
    dispatch: &super::Dispatch,
) -> Result<(), ConfigError> {
    let warm: usize = guests.iter().map(|g| g.warm).sum();
    if warm > dispatch.max_vms {
        return Err(invalid(
            "dispatch.max_vms",
            dispatch.max_vms,
            format!("at least the {warm} warm VMs the [[guest]] entries keep (their `warm`), plus room for the seats"),
        ));
    }
    if dispatch.hosts.is_empty() {
        return Ok(());
    }
    for (i, g) in guests.iter().enumerate() {
        if g.warm > 0 {
            return Err(invalid(
                format!("guest[{i}].warm"),
                g.warm,
                "warm pools run on vdd's own QEMU only, not on [[dispatch.host]] hypervisor hosts; leave out warm or the hosts",
            ));
        }
        if g.start == Start::Saved {
            return Err(invalid(
                format!("guest[{i}].start"),
                "saved",
                "saved-state starts run on vdd's own QEMU only, not on [[dispatch.host]] hypervisor hosts; leave out start or the hosts",
            ));
        }
    }
    Ok(())
}
