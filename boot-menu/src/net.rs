//! Interface set-up over rtnetlink (RFC 3549; linux/rtnetlink.h, linux/if_addr.h): link up,
//! the leased address, the default route. Messages are built by hand: three fixed requests
//! do not justify the rtnetlink crate's async stack inside a static PID 1.

use std::net::Ipv4Addr;
use std::path::Path;

use nix::sys::socket::{
    bind, recv, send, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol,
    SockType,
};

const RTM_NEWLINK: u16 = 16;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;
const AF_INET: u8 = 2;
const IFF_UP: u32 = 0x1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_BROADCAST: u16 = 4;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RT_TABLE_MAIN: u8 = 254;
/// RTPROT_DHCP: marks the route as installed by a DHCP client (`ip route` shows "proto dhcp").
const RTPROT_DHCP: u8 = 16;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RTN_UNICAST: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no interface named {0}")]
    NoSuchLink(String),
    #[error("netlink socket")]
    Socket(#[source] nix::Error),
    #[error("netlink request {what} refused")]
    Refused {
        what: &'static str,
        #[source]
        err: nix::Error,
    },
    #[error("netlink reply to {0} is malformed")]
    BadReply(&'static str),
}

/// One netlink request: header, fixed part, then attributes, all 4-byte aligned.
pub fn message(kind: u16, flags: u16, seq: u32, fixed: &[u8], attrs: &[(u16, &[u8])]) -> Vec<u8> {
    let mut b = vec![0u8; 16];
    b.extend_from_slice(fixed);
    pad(&mut b);
    for (t, v) in attrs {
        b.extend_from_slice(&((4 + v.len()) as u16).to_ne_bytes());
        b.extend_from_slice(&t.to_ne_bytes());
        b.extend_from_slice(v);
        pad(&mut b);
    }
    let len = b.len() as u32;
    b[0..4].copy_from_slice(&len.to_ne_bytes());
    b[4..6].copy_from_slice(&kind.to_ne_bytes());
    b[6..8].copy_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    b[8..12].copy_from_slice(&seq.to_ne_bytes());
    b
}

fn pad(b: &mut Vec<u8>) {
    while b.len() % 4 != 0 {
        b.push(0);
    }
}

/// `struct ifinfomsg` asking for IFF_UP.
pub fn link_up(index: u32) -> Vec<u8> {
    let mut f = vec![0u8; 16];
    f[4..8].copy_from_slice(&(index as i32).to_ne_bytes());
    f[8..12].copy_from_slice(&IFF_UP.to_ne_bytes());
    f[12..16].copy_from_slice(&IFF_UP.to_ne_bytes());
    message(RTM_NEWLINK, 0, 1, &f, &[])
}

/// `struct ifaddrmsg` + IFA_LOCAL/IFA_ADDRESS/IFA_BROADCAST, replacing an earlier lease.
pub fn addr_add(index: u32, ip: Ipv4Addr, prefix: u8) -> Vec<u8> {
    let mut f = vec![AF_INET, prefix, 0, RT_SCOPE_UNIVERSE];
    f.extend_from_slice(&index.to_ne_bytes());
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix as u32)
    };
    let brd = Ipv4Addr::from(u32::from(ip) | !mask);
    message(
        RTM_NEWADDR,
        NLM_F_CREATE | NLM_F_REPLACE,
        2,
        &f,
        &[
            (IFA_LOCAL, &ip.octets()),
            (IFA_ADDRESS, &ip.octets()),
            (IFA_BROADCAST, &brd.octets()),
        ],
    )
}

/// `struct rtmsg` for 0.0.0.0/0 via `gw` out of `index`.
pub fn default_route(index: u32, gw: Ipv4Addr) -> Vec<u8> {
    let f = [
        AF_INET,
        0,
        0,
        0,
        RT_TABLE_MAIN,
        RTPROT_DHCP,
        RT_SCOPE_UNIVERSE,
        RTN_UNICAST,
        0,
        0,
        0,
        0,
    ];
    message(
        RTM_NEWROUTE,
        NLM_F_CREATE | NLM_F_REPLACE,
        3,
        &f,
        &[(RTA_GATEWAY, &gw.octets()), (RTA_OIF, &index.to_ne_bytes())],
    )
}

/// Reads the kernel's answer to an NLM_F_ACK request: Ok, or the errno it carries.
/// `None` when the reply is not an NLMSG_ERROR message at all.
pub fn parse_ack(reply: &[u8]) -> Option<Result<(), nix::Error>> {
    if reply.len() < 20 {
        return None;
    }
    let kind = u16::from_ne_bytes([reply[4], reply[5]]);
    if kind != NLMSG_ERROR {
        return None;
    }
    let code = i32::from_ne_bytes([reply[16], reply[17], reply[18], reply[19]]);
    Some(if code == 0 {
        Ok(())
    } else {
        Err(nix::Error::from_raw(-code))
    })
}

/// Sends one request and waits for its ACK.
fn request(what: &'static str, msg: &[u8]) -> Result<(), Error> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )
    .map_err(Error::Socket)?;
    use std::os::fd::AsRawFd;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)).map_err(Error::Socket)?;
    send(fd.as_raw_fd(), msg, MsgFlags::empty()).map_err(Error::Socket)?;
    let mut buf = [0u8; 4096];
    let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()).map_err(Error::Socket)?;
    match parse_ack(&buf[..n]) {
        Some(Ok(())) => Ok(()),
        Some(Err(err)) => Err(Error::Refused { what, err }),
        None => Err(Error::BadReply(what)),
    }
}

pub fn index(iface: &str) -> Result<u32, Error> {
    nix::net::if_::if_nametoindex(iface).map_err(|_| Error::NoSuchLink(iface.to_string()))
}

pub fn set_up(iface: &str) -> Result<(), Error> {
    request("link up", &link_up(index(iface)?))
}

/// Address and, when DHCP gave a router, the default route.
pub fn configure(
    iface: &str,
    ip: Ipv4Addr,
    prefix: u8,
    router: Option<Ipv4Addr>,
) -> Result<(), Error> {
    let i = index(iface)?;
    request("address", &addr_add(i, ip, prefix))?;
    if let Some(gw) = router {
        request("default route", &default_route(i, gw))?;
    }
    Ok(())
}

/// Ethernet interfaces (ARPHRD_ETHER = 1) under `/sys/class/net`, sorted by name.
pub fn ethernet_links(sys: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(sys.join("class/net"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| std::fs::read_to_string(e.path().join("type")).is_ok_and(|t| t.trim() == "1"))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The MAC of `iface` from sysfs.
pub fn mac(sys: &Path, iface: &str) -> Option<[u8; 6]> {
    let s = std::fs::read_to_string(sys.join("class/net").join(iface).join("address")).ok()?;
    let mut out = [0u8; 6];
    let mut parts = s.trim().split(':');
    for b in &mut out {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

pub fn carrier(sys: &Path, iface: &str) -> bool {
    std::fs::read_to_string(sys.join("class/net").join(iface).join("carrier"))
        .is_ok_and(|s| s.trim() == "1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_request_layout() {
        let m = addr_add(3, Ipv4Addr::new(10, 0, 2, 15), 24);
        // 16 header + 8 ifaddrmsg + 3 * (4 + 4) attributes.
        assert_eq!(m.len(), 48);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 48);
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), RTM_NEWADDR);
        let flags = u16::from_ne_bytes([m[6], m[7]]);
        assert_eq!(
            flags,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
        );
        assert_eq!(&m[16..20], &[AF_INET, 24, 0, 0]);
        assert_eq!(u32::from_ne_bytes(m[20..24].try_into().unwrap()), 3);
        assert_eq!(&m[24..28], &[8, 0, IFA_LOCAL as u8, 0]);
        assert_eq!(&m[28..32], &[10, 0, 2, 15]);
        assert_eq!(&m[44..48], &[10, 0, 2, 255], "broadcast");
    }

    #[test]
    fn route_and_link_layout() {
        let r = default_route(2, Ipv4Addr::new(10, 0, 2, 2));
        assert_eq!(r.len(), 16 + 12 + 8 + 8);
        assert_eq!(r[16 + 4], RT_TABLE_MAIN);
        assert_eq!(&r[28..36], &[8, 0, RTA_GATEWAY as u8, 0, 10, 0, 2, 2]);
        let l = link_up(7);
        assert_eq!(l.len(), 32);
        assert_eq!(i32::from_ne_bytes(l[20..24].try_into().unwrap()), 7);
    }

    #[test]
    fn acks_and_errors() {
        let mut ok = vec![0u8; 36];
        ok[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        assert_eq!(parse_ack(&ok), Some(Ok(())));
        let mut e = ok.clone();
        e[16..20].copy_from_slice(&(-17i32).to_ne_bytes());
        assert_eq!(parse_ack(&e), Some(Err(nix::Error::EEXIST)));
        assert_eq!(parse_ack(&ok[..10]), None);
        let mut other = ok.clone();
        other[4] = 99;
        assert_eq!(parse_ack(&other), None);
    }

    #[test]
    fn loopback_is_not_ethernet() {
        let links = ethernet_links(Path::new("/sys"));
        assert!(!links.iter().any(|l| l == "lo"));
        assert_eq!(mac(Path::new("/nonexistent"), "eth0"), None);
    }
}
