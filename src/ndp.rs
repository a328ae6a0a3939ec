//! Answers IPv6 Router Solicitations on the LAN with a Router Advertisement that offers
//! nothing: no prefixes, not a default router (lifetime 0), no DHCPv6 (M = O = 0).
//!
//! Why: iPXE configures a NIC with every configurator at once (DHCPv4 and IPv6) and waits
//! until all of them end (`ifconf` in iPXE's usr/ifmgmt.c). On a LAN without an IPv6
//! router, its IPv6 configurator ends only when its router solicitations time out, about
//! 15 s of every boot spent waiting. The first solicited RA with M = O = 0 ends it at once
//! (ipv6conf_rx_router_advertisement in net/ndp.c). An RA with router lifetime 0 and no
//! options tells the other hosts on the link nothing they act on (RFC 4861 6.3.4: lifetime
//! 0 means "not a default router"; no prefix, no MTU), so answering is harmless.
//!
//! Hand-written: it is one raw ICMPv6 socket and two 8-byte headers (RFC 4861 4.1, 4.2);
//! no crate does this, and an RA daemon (radvd) would advertise far more than we want.

use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::net::{Ipv6Addr, SocketAddrV6};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Domain, MaybeUninitSlice, MsgHdrMut, Protocol, SockAddr, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{Config, Mac};
use crate::warnlimit::WarnLimit;

pub const ROUTER_SOLICITATION: u8 = 133;
pub const ROUTER_ADVERTISEMENT: u8 = 134;
/// Option type of a Source Link-Layer Address (RFC 4861 4.6.1).
const OPT_SOURCE_LL: u8 = 1;
/// All-routers and all-nodes link-local multicast groups.
const ALL_ROUTERS: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2);
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
/// RFC 4861 6.1.1: a solicitation must arrive with hop limit 255, which proves it was
/// not forwarded by a router (only on-link nodes can send it).
const HOP_LIMIT: u32 = 255;
/// One answer per soliciting address per this interval; iPXE solicits every few seconds.
const PER_SOURCE: Duration = Duration::from_secs(1);
/// RFC 4861 6.2.6: multicast answers no closer together than MIN_DELAY_BETWEEN_RAS.
const MIN_DELAY_BETWEEN_RAS: Duration = Duration::from_secs(3);

/// A valid Router Solicitation.
#[derive(Debug, PartialEq, Eq)]
pub struct Solicitation {
    /// The sender's link-layer address, if it named one.
    pub mac: Option<Mac>,
}

/// Why a packet is not a solicitation we answer (silently discarded, RFC 4861 6.1.1).
#[derive(Debug, PartialEq, Eq)]
pub enum Discard {
    NotSolicitation(u8),
    BadCode(u8),
    HopLimit(Option<u32>),
    Short(usize),
    ZeroLengthOption,
    TruncatedOption,
    /// A solicitation from the unspecified address must not carry a source link-layer
    /// address option.
    UnspecifiedWithSourceLl,
}

/// Validates an ICMPv6 message (the kernel has checked its checksum) received with
/// `hop_limit` from `src`, per RFC 4861 6.1.1.
pub fn parse_solicitation(
    msg: &[u8],
    hop_limit: Option<u32>,
    src: &Ipv6Addr,
) -> Result<Solicitation, Discard> {
    if msg.len() < 8 {
        return Err(Discard::Short(msg.len()));
    }
    if msg[0] != ROUTER_SOLICITATION {
        return Err(Discard::NotSolicitation(msg[0]));
    }
    if msg[1] != 0 {
        return Err(Discard::BadCode(msg[1]));
    }
    if hop_limit != Some(HOP_LIMIT) {
        return Err(Discard::HopLimit(hop_limit));
    }
    let mut mac = None;
    let mut opts = &msg[8..];
    while !opts.is_empty() {
        if opts.len() < 2 {
            return Err(Discard::TruncatedOption);
        }
        let len = opts[1] as usize * 8;
        if len == 0 {
            return Err(Discard::ZeroLengthOption);
        }
        if len > opts.len() {
            return Err(Discard::TruncatedOption);
        }
        if opts[0] == OPT_SOURCE_LL {
            if src.is_unspecified() {
                return Err(Discard::UnspecifiedWithSourceLl);
            }
            if len >= 8 {
                let mut m = [0u8; 6];
                m.copy_from_slice(&opts[2..8]);
                mac = Some(Mac(m));
            }
        }
        opts = &opts[len..];
    }
    Ok(Solicitation { mac })
}

/// The Router Advertisement we send (RFC 4861 4.2): current hop limit unspecified, M = O
/// = 0, router lifetime 0, reachable time and retrans timer unspecified, and our own
/// link-layer address (so the client needs no neighbour solicitation to answer us). The
/// kernel fills in the checksum of a raw ICMPv6 socket (RFC 3542 3.1).
pub fn advertisement(our_mac: Option<Mac>) -> Vec<u8> {
    let mut ra = vec![
        ROUTER_ADVERTISEMENT,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
    ];
    if let Some(m) = our_mac {
        ra.extend_from_slice(&[OPT_SOURCE_LL, 1]);
        ra.extend_from_slice(&m.0);
    }
    ra
}

/// The hop limit from an IPV6_HOPLIMIT control message (RFC 3542 6.3), read by hand: the
/// control buffer is a sequence of `cmsghdr { size_t len; int level; int type; }` each
/// followed by its data, aligned to `size_t`.
fn hop_limit(control: &[u8]) -> Option<u32> {
    const HDR: usize = std::mem::size_of::<usize>() + 8;
    const ALIGN: usize = std::mem::size_of::<usize>();
    let mut rest = control;
    while rest.len() >= HDR {
        let len = usize::from_ne_bytes(rest[..ALIGN].try_into().ok()?);
        let level = i32::from_ne_bytes(rest[ALIGN..ALIGN + 4].try_into().ok()?);
        let kind = i32::from_ne_bytes(rest[ALIGN + 4..ALIGN + 8].try_into().ok()?);
        if len < HDR || len > rest.len() {
            return None;
        }
        if level == nix::libc::IPPROTO_IPV6 && kind == nix::libc::IPV6_HOPLIMIT && len >= HDR + 4 {
            return Some(i32::from_ne_bytes(rest[HDR..HDR + 4].try_into().ok()?) as u32);
        }
        let next = len.div_ceil(ALIGN) * ALIGN;
        rest = rest.get(next..)?;
    }
    None
}

/// The bound raw socket, ready to run.
pub struct Service {
    sock: AsyncFd<Socket>,
    ifindex: u32,
    our_mac: Option<Mac>,
    interface: String,
}

impl Service {
    /// A raw ICMPv6 socket on the LAN interface, in the all-routers group.
    pub fn bind(cfg: Arc<Config>) -> std::io::Result<Service> {
        let interface = cfg.server.interface.clone();
        let info = crate::netif::lookup(&interface)?.ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no interface {interface}"),
            )
        })?;
        let s = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))?;
        s.bind_device(Some(interface.as_bytes()))?;
        s.set_recv_hoplimit_v6(true)?;
        s.set_multicast_hops_v6(HOP_LIMIT)?;
        s.set_unicast_hops_v6(HOP_LIMIT)?;
        s.set_multicast_loop_v6(false)?;
        s.join_multicast_v6(&ALL_ROUTERS, info.index)?;
        s.set_nonblocking(true)?;
        Ok(Service {
            // SAFETY: the AsyncFd owns the Socket, which owns the fd: it stays open for
            // exactly as long as it is registered.
            sock: unsafe { AsyncFd::register(s) }.map_err(|e| e.into_parts().1)?,
            ifindex: info.index,
            our_mac: info.mac,
            interface,
        })
    }

    /// Answers solicitations until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> std::io::Result<()> {
        info!(interface = %self.interface, "answering IPv6 router solicitations (no prefixes, not a default router)");
        let ra = advertisement(self.our_mac);
        let mut last: HashMap<Ipv6Addr, Instant> = HashMap::new();
        let mut last_multicast: Option<Instant> = None;
        // At most 5 lines a second about solicitations; the rest are debug.
        let lines = WarnLimit::new(5, Duration::from_secs(1));
        let mut buf = [MaybeUninit::<u8>::uninit(); 1500];
        let mut control = [MaybeUninit::<u8>::uninit(); 64];
        loop {
            let mut guard = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                g = self.sock.readable() => g?,
            };
            let got = guard.try_io(|s| {
                let mut addr = SockAddr::from(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, 0, 0, 0));
                let mut iov = [MaybeUninitSlice::new(&mut buf)];
                let mut msg = MsgHdrMut::new()
                    .with_addr(&mut addr)
                    .with_buffers(&mut iov)
                    .with_control(&mut control);
                let n = s.get_ref().recvmsg(&mut msg, 0)?;
                let clen = msg.control_len();
                Ok((n, clen, addr))
            });
            let (n, clen, addr) = match got {
                Err(_would_block) => continue,
                Ok(Err(e)) => {
                    if let Some(dropped) = lines.allow() {
                        warn!(error = %e, dropped, "ICMPv6 receive failed");
                    }
                    continue;
                }
                Ok(Ok(r)) => r,
            };
            // SAFETY: the kernel initialised the first n bytes and clen control bytes.
            let msg = unsafe { std::slice::from_raw_parts(buf.as_ptr() as *const u8, n) };
            let ctl = unsafe { std::slice::from_raw_parts(control.as_ptr() as *const u8, clen) };
            let Some(src) = addr.as_socket_ipv6() else {
                continue;
            };
            let sol = match parse_solicitation(msg, hop_limit(ctl), src.ip()) {
                Ok(s) => s,
                // Every other ICMPv6 message on the link arrives here too; only a
                // malformed solicitation is worth a line.
                Err(Discard::NotSolicitation(_)) => continue,
                Err(why) => {
                    debug!(ip = %src.ip(), ?why, "router solicitation discarded");
                    continue;
                }
            };
            let now = Instant::now();
            last.retain(|_, t| now.duration_since(*t) < PER_SOURCE);
            // RFC 4861 6.2.6: a solicitation from the unspecified address is answered to
            // all nodes (rate-limited); otherwise straight to the asker.
            let dest = if src.ip().is_unspecified() {
                if last_multicast.is_some_and(|t| now.duration_since(t) < MIN_DELAY_BETWEEN_RAS) {
                    continue;
                }
                last_multicast = Some(now);
                SocketAddrV6::new(ALL_NODES, 0, 0, self.ifindex)
            } else {
                if last.contains_key(src.ip()) || last.len() >= 4096 {
                    continue;
                }
                last.insert(*src.ip(), now);
                SocketAddrV6::new(*src.ip(), 0, 0, self.ifindex)
            };
            let mac = sol.mac.map_or("-".into(), |m| m.to_string());
            // Up to 4096 sources are each answered once per PER_SOURCE, and sources can be
            // spoofed: the log gets a few lines a second, the rest go to debug.
            let sent = self.send(&ra, dest).await;
            let Some(dropped) = lines.allow() else {
                debug!(mac = %mac, ip = %src.ip(), ok = sent.is_ok(), "router solicitation answered");
                continue;
            };
            match sent {
                Ok(()) => {
                    info!(mac = %mac, ip = %src.ip(), dropped, "router solicitation answered: no IPv6 router here")
                }
                Err(e) => {
                    warn!(mac = %mac, ip = %src.ip(), error = %e, dropped, "router advertisement not sent")
                }
            }
        }
    }

    async fn send(&self, ra: &[u8], dest: SocketAddrV6) -> std::io::Result<()> {
        let to = SockAddr::from(dest);
        loop {
            let mut g = self.sock.writable().await?;
            match g.try_io(|s| s.get_ref().send_to(ra, &to)) {
                Ok(r) => return r.map(drop),
                Err(_would_block) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0x5054, 0xff, 0xfe12, 0x3456);

    #[test]
    fn solicitation_validation_rfc4861_6_1_1() {
        // Type 133, code 0, checksum, reserved, then a source link-layer address option.
        let rs = [
            133, 0, 0x12, 0x34, 0, 0, 0, 0, 1, 1, 0x52, 0x54, 0, 0x12, 0x34, 0x56,
        ];
        let s = parse_solicitation(&rs, Some(255), &LL).unwrap();
        assert_eq!(s.mac.unwrap().to_string(), "52:54:00:12:34:56");
        assert_eq!(
            parse_solicitation(&rs[..8], Some(255), &LL),
            Ok(Solicitation { mac: None })
        );
        assert_eq!(
            parse_solicitation(&rs, Some(64), &LL),
            Err(Discard::HopLimit(Some(64)))
        );
        assert_eq!(
            parse_solicitation(&rs, None, &LL),
            Err(Discard::HopLimit(None))
        );
        let mut code = rs;
        code[1] = 1;
        assert_eq!(
            parse_solicitation(&code, Some(255), &LL),
            Err(Discard::BadCode(1))
        );
        let mut zero = rs;
        zero[9] = 0;
        assert_eq!(
            parse_solicitation(&zero, Some(255), &LL),
            Err(Discard::ZeroLengthOption)
        );
        assert_eq!(
            parse_solicitation(&rs[..12], Some(255), &LL),
            Err(Discard::TruncatedOption)
        );
        assert_eq!(
            parse_solicitation(&rs, Some(255), &Ipv6Addr::UNSPECIFIED),
            Err(Discard::UnspecifiedWithSourceLl)
        );
        assert_eq!(
            parse_solicitation(&rs[..4], Some(255), &LL),
            Err(Discard::Short(4))
        );
        // A neighbour solicitation is not ours to answer.
        let ns = [135, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(
            parse_solicitation(&ns, Some(255), &LL),
            Err(Discard::NotSolicitation(135))
        );
    }

    /// iPXE's solicitation (QEMU's iPXE ROM, MAC 52:54:00:e2:e0:01), captured with
    /// tcpdump on the lab bridge during `cargo xtask e2e boot`: the ICMPv6 message after
    /// the IPv6 header (which carried hop limit 255).
    const IPXE_RS: [u8; 16] = [
        0x85, 0x00, 0x18, 0xbe, 0x00, 0x00, 0x00, 0x00, 0x01, 0x01, 0x52, 0x54, 0x00, 0xe2, 0xe0,
        0x01,
    ];

    #[test]
    fn ipxe_solicitation_captured() {
        let src = Ipv6Addr::new(0xfe80, 0, 0, 0, 0x5054, 0xff, 0xfee2, 0xe001);
        let s = parse_solicitation(&IPXE_RS, Some(255), &src).unwrap();
        assert_eq!(s.mac.unwrap().to_string(), "52:54:00:e2:e0:01");
    }

    #[test]
    fn garbage_never_panics() {
        let mut x: u32 = 0x1234_5678;
        for len in 0..200usize {
            for _ in 0..50 {
                let v: Vec<u8> = (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 17;
                        x ^= x << 5;
                        x as u8
                    })
                    .collect();
                let mut v = v;
                if let Some(t) = v.first_mut() {
                    *t = ROUTER_SOLICITATION;
                }
                let _ = parse_solicitation(&v, Some(255), &LL);
                let _ = hop_limit(&v);
            }
        }
    }

    #[test]
    fn advertisement_offers_nothing() {
        let ra = advertisement(Some(Mac([2, 0, 0, 0, 0, 1])));
        assert_eq!(ra.len(), 24);
        assert_eq!(ra[0], ROUTER_ADVERTISEMENT);
        assert_eq!(ra[4], 0, "current hop limit unspecified");
        assert_eq!(ra[5], 0, "M = O = 0: no DHCPv6");
        assert_eq!(
            &ra[6..8],
            &[0, 0],
            "router lifetime 0: not a default router"
        );
        assert_eq!(&ra[8..16], &[0; 8]);
        assert_eq!(&ra[16..24], &[1, 1, 2, 0, 0, 0, 0, 1]);
        assert_eq!(advertisement(None).len(), 16);
    }

    #[test]
    fn hop_limit_from_control_messages() {
        let w = std::mem::size_of::<usize>();
        let mut c = Vec::new();
        // An unrelated message first (IPV6_PKTINFO-sized), then the hop limit.
        c.extend_from_slice(&(w + 8 + 20).to_ne_bytes());
        c.extend_from_slice(&nix::libc::IPPROTO_IPV6.to_ne_bytes());
        c.extend_from_slice(&nix::libc::IPV6_PKTINFO.to_ne_bytes());
        c.extend_from_slice(&[0; 20]);
        c.resize((w + 8 + 20).div_ceil(w) * w, 0);
        c.extend_from_slice(&(w + 8 + 4).to_ne_bytes());
        c.extend_from_slice(&nix::libc::IPPROTO_IPV6.to_ne_bytes());
        c.extend_from_slice(&nix::libc::IPV6_HOPLIMIT.to_ne_bytes());
        c.extend_from_slice(&255i32.to_ne_bytes());
        assert_eq!(hop_limit(&c), Some(255));
        assert_eq!(hop_limit(&c[..w + 8 + 24]), None);
        assert_eq!(hop_limit(&[]), None);
    }
}
