//! Reads the LAN interface (index, MAC, first IPv4 address and subnet) from the kernel,
//! and marks the packets that must not queue behind bulk data on it.
//!
//! getifaddrs(3) through nix answers all of it in one synchronous call, which `vdd check`
//! needs before any runtime exists; rtnetlink is kept for what must change links
//! (boot-menu, the X11 bridge), where a netlink socket is the only way.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use nix::ifaddrs::getifaddrs;

use crate::config::{InterfaceInfo, Mac};

/// Looks up interface `name`; `None` when this machine has no such interface.
pub fn lookup(name: &str) -> std::io::Result<Option<InterfaceInfo>> {
    let index = match nix::net::if_::if_nametoindex(name) {
        Ok(i) => i,
        Err(nix::errno::Errno::ENODEV) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut info = InterfaceInfo {
        name: name.to_string(),
        index,
        addr: None,
        mac: None,
    };
    for ifa in getifaddrs()? {
        if ifa.interface_name != name {
            continue;
        }
        let Some(addr) = ifa.address else { continue };
        if let Some(sin) = addr.as_sockaddr_in() {
            if info.addr.is_none() {
                let ip = sin.ip();
                let mask = ifa
                    .netmask
                    .and_then(|m| m.as_sockaddr_in().map(|m| m.ip()))
                    .unwrap_or(Ipv4Addr::BROADCAST);
                let prefix = u32::from(mask).leading_ones() as u8;
                let net = Ipv4Net::new(ip, prefix).expect("prefix <= 32").trunc();
                info.addr = Some((ip, net));
            }
        } else if let Some(ll) = addr.as_link_addr() {
            if let Some(m) = ll.addr() {
                info.mac = Some(Mac(m));
            }
        }
    }
    Ok(Some(info))
}

/// SO_PRIORITY of the packets a PXE firmware waits on (DHCP, TFTP): TC_PRIO_INTERACTIVE,
/// which the kernel's default queue of a NIC (pfifo_fast) sends first, from a band of its
/// own. While a room boots the link is full of HTTP and NBD data, and in one queue with it
/// DHCP answers were dropped where it overflowed: `cargo xtask bench storm --seats 300
/// --scale 0.2` left 173 of 300 seats without a lease, 62 with this priority, none once
/// the answers were also unicast (dhcp/arp.rs). Values up to 6 need no privilege.
pub const TC_PRIO_INTERACTIVE: u32 = 6;

/// Marks `sock`'s packets [`TC_PRIO_INTERACTIVE`].
pub fn waited_on(sock: &impl std::os::fd::AsFd) -> std::io::Result<()> {
    socket2::SockRef::from(sock).set_priority(TC_PRIO_INTERACTIVE)
}

#[cfg(test)]
mod tests {
    #[test]
    fn loopback_is_found() {
        let lo = super::lookup("lo")
            .unwrap()
            .expect("every Linux machine has lo");
        let (ip, net) = lo.addr.expect("lo has 127.0.0.1");
        assert_eq!(ip, std::net::Ipv4Addr::LOCALHOST);
        assert_eq!(net.prefix_len(), 8);
        assert!(super::lookup("no-such-if0").unwrap().is_none());
    }
}
