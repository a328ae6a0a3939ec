//! The LAN side of X11 guests: the bridge their NICs join, one tap per VM, and the sweep
//! of taps a previous vdd left. Links are changed over rtnetlink (never by running `ip`).
//!
//! Why a tap is opened here and handed to QEMU as a file descriptor instead of created
//! persistent: a non-persistent tap lives exactly as long as some process holds its fd.
//! vdd closes its copy right after QEMU is spawned, so the tap goes away by itself when
//! the VM exits, on every path (DELETE, crash of the VM, kill -9 of vdd and then of the VM);
//! the start-up sweep only has to catch taps whose VM vdd never got to hand them to.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::packet_route::route::{RouteAttribute, RouteHeader, RouteMessage};
use rtnetlink::{Handle, LinkBridge, LinkUnspec, RouteMessageBuilder};
use tracing::{info, warn};

use crate::config::{Config, Mac, DEFAULT_BRIDGE};

/// Every tap of vdd is named `vdt-<session>`; nothing else may use the prefix.
pub const TAP_PREFIX: &str = "vdt-";

/// Why a LAN link could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("opening a netlink socket")]
    Netlink(#[source] std::io::Error),
    /// The message names the link and the change; the source is the kernel's answer.
    #[error("{0}")]
    Link(String, #[source] rtnetlink::Error),
    #[error("no interface {0} on this machine")]
    NoSuchLink(String),
    #[error("server.bridge = {0:?} exists and is not a bridge; name a bridge, or leave the key out so vdd creates {DEFAULT_BRIDGE}")]
    NotABridge(String),
    #[error("opening /dev/net/tun for tap {0}")]
    OpenTun(String, #[source] std::io::Error),
    #[error("creating tap {0} (TUNSETIFF)")]
    CreateTap(String, #[source] std::io::Error),
}

/// A netlink handle whose connection runs on the current runtime until it is dropped.
async fn handle() -> Result<Handle, Error> {
    let (conn, h, _) = rtnetlink::new_connection().map_err(Error::Netlink)?;
    tokio::spawn(conn);
    Ok(h)
}

fn link_err(what: String) -> impl FnOnce(rtnetlink::Error) -> Error {
    move |e| Error::Link(what, e)
}

/// One link as vdd needs to know it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// The bridge it is enslaved to, by index.
    pub master: Option<u32>,
    pub is_bridge: bool,
    pub mac: Option<Mac>,
}

fn to_link(m: &LinkMessage) -> Link {
    let mut l = Link {
        index: m.header.index,
        name: String::new(),
        master: None,
        is_bridge: false,
        mac: None,
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name = n.clone(),
            LinkAttribute::Controller(i) => l.master = Some(*i),
            LinkAttribute::Address(b) if b.len() == 6 => {
                let mut m = [0u8; 6];
                m.copy_from_slice(b);
                l.mac = Some(Mac(m));
            }
            LinkAttribute::LinkInfo(infos) => {
                l.is_bridge |= infos
                    .iter()
                    .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Bridge)));
            }
            _ => {}
        }
    }
    l
}

/// Every link of this network namespace.
pub async fn links() -> Result<Vec<Link>, Error> {
    let h = handle().await?;
    let msgs: Vec<LinkMessage> = h
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(link_err("listing links".into()))?;
    Ok(msgs.iter().map(to_link).collect())
}

/// The link named `name`, if there is one.
pub async fn link(name: &str) -> Result<Option<Link>, Error> {
    Ok(links().await?.into_iter().find(|l| l.name == name))
}

/// The IPv4 addresses (as kernel messages, ready to delete) of link `index`.
async fn ipv4_addresses(
    h: &Handle,
    index: u32,
) -> Result<Vec<(Ipv4Addr, u8, AddressMessage)>, Error> {
    let msgs: Vec<AddressMessage> = h
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(link_err(format!("listing the addresses of link {index}")))?;
    Ok(msgs
        .into_iter()
        .filter(|m| m.header.index == index)
        .filter_map(|m| {
            let ip = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(std::net::IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            })?;
            Some((ip, m.header.prefix_len, m))
        })
        .collect())
}

/// Makes sure the X11 guests' taps have a bridge on the LAN and returns its name; vdd's
/// services then serve on it. See `server.bridge` in config.toml for the rules:
/// the configured bridge; else the LAN interface itself when it is a bridge; else vdd
/// creates [`DEFAULT_BRIDGE`] with the LAN interface's MAC, moves the interface's IPv4
/// addresses and gateway routes (a default route) onto it and enslaves the interface. Run before any service binds; on a
/// restart every step finds its work done and changes nothing.
pub async fn prepare_bridge(cfg: &Config) -> Result<String, Error> {
    let lan_name = cfg.server.interface.clone();
    let all = links().await?;
    let lan = all
        .iter()
        .find(|l| l.name == lan_name)
        .cloned()
        .ok_or_else(|| Error::NoSuchLink(lan_name.clone()))?;
    let name = match &cfg.server.bridge {
        Some(b) => b.clone(),
        None if lan.is_bridge => lan_name.clone(),
        None => DEFAULT_BRIDGE.to_string(),
    };
    if name == lan_name {
        if !lan.is_bridge {
            return Err(Error::NotABridge(name));
        }
        return Ok(name);
    }
    let h = handle().await?;
    let bridge = match all.iter().find(|l| l.name == name) {
        Some(b) if !b.is_bridge => return Err(Error::NotABridge(name)),
        Some(b) => b.clone(),
        None => {
            // The LAN's MAC, so the server keeps its identity on the LAN (switch port
            // security, static DHCP reservations of the server itself).
            let mut msg = LinkBridge::new(&name);
            if let Some(m) = lan.mac {
                msg = msg.address(m.0.to_vec());
            }
            h.link()
                .add(msg.build())
                .execute()
                .await
                .map_err(link_err(format!("creating bridge {name}")))?;
            info!(bridge = %name, interface = %lan_name, "bridge created for the X11 guests");
            link(&name)
                .await?
                .ok_or_else(|| Error::NoSuchLink(name.clone()))?
        }
    };
    h.link()
        .set(LinkUnspec::new_with_index(bridge.index).up().build())
        .execute()
        .await
        .map_err(link_err(format!("bringing bridge {name} up")))?;
    // Routes through a gateway on the LAN interface (its default route), read before the
    // addresses move: deleting an address can take them with it.
    let routes: Vec<RouteMessage> = h
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(link_err("listing routes".into()))?;
    let via_lan: Vec<RouteMessage> = routes
        .into_iter()
        .filter(|r| {
            r.header.table == RouteHeader::RT_TABLE_MAIN
                && r.attributes.contains(&RouteAttribute::Oif(lan.index))
                && r.attributes
                    .iter()
                    .any(|a| matches!(a, RouteAttribute::Gateway(_)))
        })
        .collect();
    // Addresses first, so the server is never without its address for long; the old ones
    // go only after the new ones are there.
    for (ip, prefix, msg) in ipv4_addresses(&h, lan.index).await? {
        let on_bridge = ipv4_addresses(&h, bridge.index)
            .await?
            .iter()
            .any(|(b, p, _)| *b == ip && *p == prefix);
        if !on_bridge {
            h.address()
                .add(bridge.index, ip.into(), prefix)
                .execute()
                .await
                .map_err(link_err(format!("adding {ip}/{prefix} to {name}")))?;
        }
        h.address()
            .del(msg)
            .execute()
            .await
            .map_err(link_err(format!("removing {ip}/{prefix} from {lan_name}")))?;
        info!(ip = %ip, prefix, from = %lan_name, to = %name, "address moved to the bridge");
    }
    for mut r in via_lan {
        for a in r.attributes.iter_mut() {
            if let RouteAttribute::Oif(i) = a {
                *i = bridge.index;
            }
        }
        // Replace: the same route through the LAN interface, if the kernel kept it, is
        // swapped for the one through the bridge.
        let mut req = h.route().add(r);
        req = req.replace();
        req.execute().await.map_err(link_err(format!(
            "moving a gateway route from {lan_name} to {name}"
        )))?;
        info!(from = %lan_name, to = %name, "gateway route moved to the bridge");
    }
    if lan.master != Some(bridge.index) {
        h.link()
            .set(
                LinkUnspec::new_with_index(lan.index)
                    .controller(bridge.index)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(link_err(format!("enslaving {lan_name} to {name}")))?;
        info!(interface = %lan_name, bridge = %name, "LAN interface enslaved to the bridge");
    }
    Ok(name)
}

/// The tap name of a session: the prefix and as much of the id as fits in 15 bytes.
pub fn tap_name(session: &str) -> String {
    let room = 15 - TAP_PREFIX.len();
    format!("{TAP_PREFIX}{}", &session[..session.len().min(room)])
}

/// A random locally administered unicast MAC for a guest's NIC: first byte 0x0a
/// (bit 1 set: local; bit 0 clear: unicast), so it never equals a seat's
/// vendor-assigned (universal) MAC, nor QEMU's default 52:54:00 prefix.
pub fn guest_mac(random: [u8; 5]) -> Mac {
    let mut m = [0u8; 6];
    m[0] = 0x0a;
    m[1..].copy_from_slice(&random);
    Mac(m)
}

/// An open, non-persistent tap: it exists while this fd (or QEMU's inherited copy) is open.
#[derive(Debug)]
pub struct Tap {
    pub name: String,
    pub fd: OwnedFd,
}

/// Creates tap `name` (TUNSETIFF with IFF_TAP | IFF_NO_PI; the fd is close-on-exec, so only
/// the child it is meant for gets it), enslaves it to `bridge` and brings it up.
pub async fn open_tap(name: &str, bridge: &str) -> Result<Tap, Error> {
    use nix::fcntl::{open, OFlag};
    use nix::sys::stat::Mode;
    const TUNSETIFF: nix::libc::c_ulong = 0x4004_54ca;
    const IFF_TAP: i16 = 0x0002;
    const IFF_NO_PI: i16 = 0x1000;
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: i16,
        _pad: [u8; 22],
    }
    let raw = open(
        "/dev/net/tun",
        OFlag::O_RDWR | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::OpenTun(name.into(), e.into()))?;
    // SAFETY: `open` returned a fresh descriptor that nothing else owns.
    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
    let mut req = IfReq {
        name: [0; 16],
        flags: IFF_TAP | IFF_NO_PI,
        _pad: [0; 22],
    };
    let n = name.len().min(15);
    req.name[..n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq` (40 bytes, laid out as IfReq)
    // through the pointer, which lives for the call.
    let r = unsafe { nix::libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, &mut req as *mut IfReq) };
    if r < 0 {
        return Err(Error::CreateTap(
            name.into(),
            std::io::Error::last_os_error(),
        ));
    }
    let tap = Tap {
        name: name.to_string(),
        fd,
    };
    let h = handle().await?;
    let (Some(t), Some(b)) = (link(name).await?, link(bridge).await?) else {
        return Err(Error::NoSuchLink(format!("{name} or {bridge}")));
    };
    h.link()
        .set(
            LinkUnspec::new_with_index(t.index)
                .controller(b.index)
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(link_err(format!("enslaving tap {name} to {bridge}")))?;
    Ok(tap)
}

/// Deletes every `vdt-*` link whose name is not in `keep` (the taps of adopted VMs):
/// leftovers of a vdd that died between opening a tap and starting its VM.
pub async fn sweep_taps(keep: &[String]) -> Result<Vec<String>, Error> {
    let h = handle().await?;
    let mut gone = Vec::new();
    for l in links().await? {
        if l.name.starts_with(TAP_PREFIX) && !keep.contains(&l.name) {
            match h.link().del(l.index).execute().await {
                Ok(()) => {
                    info!(tap = %l.name, "stale tap of a previous run removed");
                    gone.push(l.name);
                }
                Err(e) => warn!(tap = %l.name, "cannot remove a stale tap: {e}"),
            }
        }
    }
    Ok(gone)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_macs_are_local_unicast_and_differ() {
        let a = guest_mac([1, 2, 3, 4, 5]);
        assert_eq!(a.to_string(), "0a:01:02:03:04:05");
        assert_eq!(a.0[0] & 0x01, 0, "unicast");
        assert_eq!(a.0[0] & 0x02, 0x02, "locally administered");
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let mut r = [0u8; 5];
            getrandom::fill(&mut r).unwrap();
            let m = guest_mac(r);
            assert_eq!(m.0[0], 0x0a);
            seen.insert(m);
        }
        assert!(seen.len() > 990, "random MACs repeat");
    }

    #[test]
    fn tap_names_fit_ifnamsiz() {
        assert_eq!(tap_name("0a1b2c3d4e5f"), "vdt-0a1b2c3d4e5");
        assert!(tap_name("0a1b2c3d4e5f").len() <= 15);
        assert_eq!(tap_name("ab"), "vdt-ab");
    }
}
