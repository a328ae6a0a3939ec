//! DHCP policy, pure: (request, lease table, config, now) -> reply, where it goes, and the
//! lease changes to make. No sockets, no clock, no logging: what happened comes back as
//! [`Event`]s the driver logs.
//!
//! RFC 2131 section 4.3 (server behaviour: DISCOVER 4.3.1, REQUEST 4.3.2 in its SELECTING,
//! INIT-REBOOT, RENEWING and REBINDING forms, DECLINE 4.3.3, RELEASE 4.3.4, INFORM 4.3.5),
//! section 4.1 (where replies go, [`Dest`]), RFC 2132 (options), RFC 4578 and the PXE 2.1
//! specification (options 60, 93, 43, proxyDHCP on port 4011).

use std::net::Ipv4Addr;

use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, Opcode, OptionCode};
use ipnet::Ipv4Net;

use super::codec::Packet;
use super::leases::{Change, LeaseTable};
use crate::boot::{self, BootFile};
use crate::config::{Config, DhcpMode};

/// How long an offered address stays reserved for the client it was offered to.
pub const OFFER_HOLD_SECS: u64 = 60;

/// Which socket the request came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Port {
    /// The DHCP server port (67).
    Dhcp,
    /// The PXE boot-server port of proxyDHCP (4011).
    Proxy,
}

/// Where a reply goes: the rules of RFC 2131 section 4.1, in their order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dest {
    /// giaddr is set: to the relay agent's server port 67.
    Relay(Ipv4Addr),
    /// ciaddr is set (RENEWING, REBINDING, INFORM): unicast to ciaddr, port 68.
    Ciaddr(Ipv4Addr),
    /// The client set the broadcast flag, or this is a NAK (4.3.2): 255.255.255.255:68.
    Broadcast,
    /// Otherwise: unicast to yiaddr at chaddr. That needs an ARP entry for an address the
    /// client does not have yet; the driver broadcasts instead (see driver.rs).
    Hardware(Ipv4Addr),
    /// proxyDHCP on port 4011: back to the address and port the request came from (PXE 2.1).
    Source,
}

/// What the policy saw, for the driver's log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Offered(Ipv4Addr),
    Acked(Ipv4Addr),
    Nak(Ipv4Addr, &'static str),
    Informed,
    Released(Ipv4Addr),
    Declined(Ipv4Addr),
    /// No free address for a DISCOVER: silence, and the admin must grow the pool.
    PoolExhausted,
    /// A PXE client of an architecture we have no file for: no boot information.
    UnsupportedArch(u16),
    /// Dropped without an answer, and why (RFC 2131 asks for silence in these cases).
    Ignored(&'static str),
    ProxyOffer,
    ProxyAck,
}

/// The decision for one request.
#[derive(Clone, Debug, Default)]
pub struct Decision {
    pub reply: Option<(Message, Dest)>,
    /// Applied to the table in order; the durable ones are journaled, and a reply of a
    /// decision with durable changes leaves only after they are on disk.
    pub changes: Vec<Change>,
    pub events: Vec<Event>,
}

/// Everything besides the request and the table that the policy reads.
pub struct Ctx<'a> {
    pub cfg: &'a Config,
    /// Our address: server identifier (54), siaddr, TFTP server.
    pub server: Ipv4Addr,
    /// The LAN subnet the pool lives in.
    pub subnet: Ipv4Net,
    /// Unix seconds.
    pub now: u64,
}

impl Decision {
    fn ignore(why: &'static str) -> Decision {
        Decision {
            events: vec![Event::Ignored(why)],
            ..Default::default()
        }
    }
}

/// Decides what to do with one request.
pub fn decide(p: &Packet, port: Port, t: &LeaseTable, ctx: &Ctx) -> Decision {
    match (ctx.cfg.dhcp.mode, port) {
        (DhcpMode::Off, _) => Decision::ignore("dhcp is off"),
        (DhcpMode::Proxy, _) => proxy(p, port, ctx),
        // A full server has no 4011 socket; keep the match total.
        (DhcpMode::Full, Port::Proxy) => Decision::ignore("full mode has no proxy port"),
        (DhcpMode::Full, Port::Dhcp) => full(p, t, ctx),
    }
}

fn full(p: &Packet, t: &LeaseTable, ctx: &Ctx) -> Decision {
    let m = &p.msg;
    let giaddr = m.giaddr();
    // One pool, on our own LAN: a relay from another subnet has no pool here.
    if !giaddr.is_unspecified() && !ctx.subnet.contains(&giaddr) {
        return Decision::ignore("relayed from a subnet without a pool");
    }
    let requested = match m.opts().get(OptionCode::RequestedIpAddress) {
        Some(DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
        _ => None,
    };
    let server_id = match m.opts().get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
        _ => None,
    };
    match p.kind {
        MessageType::Discover => discover(p, requested, t, ctx),
        MessageType::Request => request(p, requested, server_id, t, ctx),
        MessageType::Decline => {
            let Some(ip) = requested else {
                return Decision::ignore("DECLINE without option 50");
            };
            if server_id != Some(ctx.server) {
                return Decision::ignore("DECLINE for another server");
            }
            match t.get(ip) {
                Some(l) if l.mac == Some(p.mac) => Decision {
                    changes: vec![Change::Decline {
                        ip,
                        until: ctx.now + ctx.cfg.dhcp.lease_time.as_secs(),
                    }],
                    events: vec![Event::Declined(ip)],
                    ..Default::default()
                },
                _ => Decision::ignore("DECLINE of an address not leased to this client"),
            }
        }
        MessageType::Release => {
            let ip = m.ciaddr();
            match t.get(ip) {
                Some(l) if l.mac == Some(p.mac) && l.active(ctx.now) => Decision {
                    changes: vec![Change::Free { ip, mac: p.mac }],
                    events: vec![Event::Released(ip)],
                    ..Default::default()
                },
                _ => Decision::ignore("RELEASE of an address not leased to this client"),
            }
        }
        MessageType::Inform => {
            // 4.3.5: no lease time, no yiaddr; to ciaddr (or the relay).
            if m.ciaddr().is_unspecified() {
                return Decision::ignore("INFORM without ciaddr");
            }
            let mut r = reply(m, MessageType::Ack, ctx);
            add_config(&mut r, p, ctx, None);
            add_boot(&mut r, p, ctx);
            Decision {
                reply: Some((r, dest(m, Ipv4Addr::UNSPECIFIED, false))),
                events: vec![Event::Informed],
                ..Default::default()
            }
        }
        _ => Decision::ignore("not a client message"),
    }
}

/// The address this client should get now, if any: its reservation, its current or last
/// address, the one it asks for, or the next free one.
fn pick(p: &Packet, requested: Option<Ipv4Addr>, t: &LeaseTable, ctx: &Ctx) -> Option<Ipv4Addr> {
    if let Some(ip) = ctx.cfg.host(&p.mac).and_then(|h| h.address) {
        return Some(ip);
    }
    let pool = ctx.cfg.dhcp.pool.as_ref()?;
    if let Some(l) = t.of_mac(&p.mac) {
        if pool.contains(l.ip) && t.available_to(l.ip, &p.mac, ctx.now) {
            return Some(l.ip);
        }
    }
    if let Some(ip) = requested {
        if pool.contains(ip) && t.available_to(ip, &p.mac, ctx.now) {
            return Some(ip);
        }
    }
    t.find_free(pool, ctx.now)
}

fn discover(p: &Packet, requested: Option<Ipv4Addr>, t: &LeaseTable, ctx: &Ctx) -> Decision {
    let Some(ip) = pick(p, requested, t, ctx) else {
        return Decision {
            events: vec![Event::PoolExhausted],
            ..Default::default()
        };
    };
    let m = &p.msg;
    let mut r = reply(m, MessageType::Offer, ctx);
    r.set_yiaddr(ip);
    add_config(&mut r, p, ctx, Some(ctx.cfg.dhcp.lease_time.as_secs()));
    let mut events = vec![Event::Offered(ip)];
    events.extend(add_boot(&mut r, p, ctx));
    // A reservation is never in the table's pool search; holding it changes nothing, but
    // an offer of a pool address keeps it from being offered to someone else meanwhile.
    let changes = match t.get(ip) {
        Some(l) if l.mac == Some(p.mac) && l.active(ctx.now) => vec![],
        _ => vec![Change::Offer {
            ip,
            mac: p.mac,
            until: ctx.now + OFFER_HOLD_SECS,
        }],
    };
    Decision {
        reply: Some((r, dest(m, ip, false))),
        changes,
        events,
    }
}

fn request(
    p: &Packet,
    requested: Option<Ipv4Addr>,
    server_id: Option<Ipv4Addr>,
    t: &LeaseTable,
    ctx: &Ctx,
) -> Decision {
    let m = &p.msg;
    let ciaddr = m.ciaddr();
    // 4.3.2: SELECTING carries option 54; INIT-REBOOT carries 50 and no ciaddr;
    // RENEWING / REBINDING carry ciaddr and neither.
    let ip = match (server_id, requested, ciaddr.is_unspecified()) {
        (Some(sid), _, _) if sid != ctx.server => {
            // The client took another server's offer: our offer is free again.
            let changes = match t.get(requested.unwrap_or(ciaddr)) {
                Some(l) if l.mac == Some(p.mac) && l.state == super::leases::State::Offered => {
                    vec![Change::Free {
                        ip: l.ip,
                        mac: p.mac,
                    }]
                }
                _ => vec![],
            };
            return Decision {
                changes,
                events: vec![Event::Ignored("client chose another server")],
                ..Default::default()
            };
        }
        (Some(_), Some(ip), _) => ip,
        (Some(_), None, _) => return Decision::ignore("SELECTING REQUEST without option 50"),
        (None, Some(ip), true) => ip,
        (None, _, false) => ciaddr,
        (None, None, true) => return Decision::ignore("REQUEST without an address"),
    };
    let subnet = if m.giaddr().is_unspecified() {
        ctx.subnet
    } else {
        Ipv4Net::new(m.giaddr(), ctx.subnet.prefix_len()).unwrap_or(ctx.subnet)
    };
    let reserved = ctx.cfg.host(&p.mac).and_then(|h| h.address);
    // A lease bound before a reload shrank the pool: the client keeps the address until
    // the lease ends (renewals get what is left of it, never more), then moves.
    let left_over = t
        .get(ip)
        .filter(|l| {
            l.mac == Some(p.mac) && l.state == super::leases::State::Bound && l.active(ctx.now)
        })
        .map(|l| l.until);
    // 4.3.2: "If the DHCP server has no record of this client, then it MUST remain
    // silent". A record is a lease of this MAC in any state, or a [[dhcp.host]] entry.
    // Without this, a LAN host binds any free address with one blind REQUEST per MAC
    // and starves the pool; a real client that gets no answer falls back to DISCOVER.
    // An INIT-REBOOT for another network is still NAKed (4.3.2: SHOULD), at once, for a
    // machine that moved here; it binds nothing.
    let known = t.of_mac(&p.mac).is_some() || ctx.cfg.host(&p.mac).is_some();
    if !known && server_id.is_none() && subnet.contains(&ip) {
        return Decision::ignore("REQUEST from a client with no record here (RFC 2131 4.3.2)");
    }
    // vdd is the only server of its LAN (authoritative, like dnsmasq's
    // --dhcp-authoritative): for a known client, a free pool address is confirmed and
    // anything it cannot give is NAKed at once, instead of leaving it to time out.
    let why_not = if !subnet.contains(&ip) {
        Some("address not on this network")
    } else if reserved.is_some_and(|r| r != ip) {
        Some("client has a reservation for another address")
    } else if reserved == Some(ip) {
        None
    } else if !ctx.cfg.dhcp.pool.is_some_and(|pool| pool.contains(ip)) && left_over.is_none() {
        Some("address outside the pool")
    } else if !t.available_to(ip, &p.mac, ctx.now) {
        Some("address leased to another client")
    } else {
        None
    };
    if let Some(why) = why_not {
        // 4.3.2: NAK goes to the relay, or is broadcast; never to ciaddr.
        let mut r = reply(m, MessageType::Nak, ctx);
        r.set_ciaddr(Ipv4Addr::UNSPECIFIED);
        r.opts_mut().insert(DhcpOption::Message(why.to_string()));
        return Decision {
            reply: Some((r, dest(m, Ipv4Addr::UNSPECIFIED, true))),
            events: vec![Event::Nak(ip, why)],
            ..Default::default()
        };
    }
    let in_pool = reserved == Some(ip) || ctx.cfg.dhcp.pool.is_some_and(|pool| pool.contains(ip));
    let lease = match left_over {
        Some(until) if !in_pool => until - ctx.now,
        _ => ctx.cfg.dhcp.lease_time.as_secs(),
    };
    let mut r = reply(m, MessageType::Ack, ctx);
    r.set_yiaddr(ip);
    add_config(&mut r, p, ctx, Some(lease));
    let mut events = vec![Event::Acked(ip)];
    events.extend(add_boot(&mut r, p, ctx));
    Decision {
        reply: Some((r, dest(m, ip, false))),
        changes: vec![Change::Bind {
            ip,
            mac: p.mac,
            until: ctx.now + lease,
        }],
        events,
    }
}

/// proxyDHCP (PXE 2.1 section 2.2.4, as dnsmasq's `dhcp-range=...,proxy` and pixiecore
/// do): answer PXE clients only, never with an address. On 67 a DISCOVER gets an OFFER
/// with boot information and no yiaddr; on 4011 a REQUEST gets the ACK with the boot file.
fn proxy(p: &Packet, port: Port, ctx: &Ctx) -> Decision {
    if !p.pxe {
        return Decision::ignore("proxy mode answers PXE clients only");
    }
    let m = &p.msg;
    let (kind, event, to) = match (port, p.kind) {
        (Port::Dhcp, MessageType::Discover) => (
            MessageType::Offer,
            Event::ProxyOffer,
            dest(m, Ipv4Addr::UNSPECIFIED, false),
        ),
        (Port::Proxy, MessageType::Request) | (Port::Proxy, MessageType::Inform) => {
            (MessageType::Ack, Event::ProxyAck, Dest::Source)
        }
        // A REQUEST on 67 is for the primary server; it owns the address.
        _ => return Decision::ignore("proxy mode: not a DISCOVER on 67 or REQUEST on 4011"),
    };
    let mut r = reply(m, kind, ctx);
    let boot_events = add_boot(&mut r, p, ctx);
    if boot_events
        .iter()
        .any(|e| matches!(e, Event::UnsupportedArch(_)))
    {
        // Nothing to offer: an answer without boot information would only confuse the ROM.
        return Decision {
            events: boot_events,
            ..Default::default()
        };
    }
    let mut events = vec![event];
    events.extend(boot_events);
    Decision {
        reply: Some((r, to)),
        changes: vec![],
        events,
    }
}

/// An address for a guest VM's NIC, bound before the guest asks so the dispatcher knows
/// it at once (the guest's DISCOVER then finds it as its own lease in [`pick`], and its
/// REQUEST is ACKed like any renewal). `want` is the address a restarted vdd had given the
/// same MAC; it is kept when still free for it. Refused when the pool has no free address.
pub fn reserve(
    mac: crate::config::Mac,
    want: Option<Ipv4Addr>,
    t: &LeaseTable,
    cfg: &Config,
    now: u64,
) -> Result<Change, &'static str> {
    let pool = cfg
        .dhcp
        .pool
        .as_ref()
        .ok_or("DHCP hands out no addresses (dhcp.mode is not \"full\")")?;
    let usable = |ip: Ipv4Addr| pool.contains(ip) && t.available_to(ip, &mac, now);
    let ip = want
        .filter(|ip| usable(*ip))
        .or_else(|| t.of_mac(&mac).map(|l| l.ip).filter(|ip| usable(*ip)))
        .or_else(|| t.find_free(pool, now))
        .ok_or("the DHCP pool has no free address; grow dhcp.pool")?;
    Ok(Change::Bind {
        ip,
        mac,
        until: now + cfg.dhcp.lease_time.as_secs(),
    })
}

/// RFC 2131 section 4.1, for a reply whose yiaddr is `yiaddr`.
pub fn dest(req: &Message, yiaddr: Ipv4Addr, nak: bool) -> Dest {
    let gi = req.giaddr();
    if !gi.is_unspecified() {
        return Dest::Relay(gi);
    }
    let ci = req.ciaddr();
    if nak {
        return Dest::Broadcast;
    }
    if !ci.is_unspecified() {
        return Dest::Ciaddr(ci);
    }
    if req.flags().broadcast() || yiaddr.is_unspecified() {
        return Dest::Broadcast;
    }
    Dest::Hardware(yiaddr)
}

/// The common part of every reply (RFC 2131 table 3).
fn reply(req: &Message, kind: MessageType, ctx: &Ctx) -> Message {
    let mut r = Message::default();
    r.set_opcode(Opcode::BootReply)
        .set_xid(req.xid())
        .set_flags(if req.flags().broadcast() {
            Flags::default().set_broadcast()
        } else {
            Flags::default()
        })
        .set_ciaddr(req.ciaddr())
        .set_giaddr(req.giaddr())
        .set_chaddr(&req.chaddr()[..6]);
    let o = r.opts_mut();
    o.insert(DhcpOption::MessageType(kind));
    o.insert(DhcpOption::ServerIdentifier(ctx.server));
    r
}

/// Network configuration: mask, router, DNS, domain, hostname, lease times.
fn add_config(r: &mut Message, p: &Packet, ctx: &Ctx, lease: Option<u64>) {
    let d = &ctx.cfg.dhcp;
    let o = r.opts_mut();
    o.insert(DhcpOption::SubnetMask(ctx.subnet.netmask()));
    o.insert(DhcpOption::BroadcastAddr(ctx.subnet.broadcast()));
    if let Some(router) = d.router {
        o.insert(DhcpOption::Router(vec![router]));
    }
    if !d.dns.is_empty() {
        o.insert(DhcpOption::DomainNameServer(d.dns.clone()));
    }
    if let Some(dom) = &d.domain {
        o.insert(DhcpOption::DomainName(dom.clone()));
    }
    if let Some(h) = ctx.cfg.host(&p.mac).and_then(|h| h.hostname.clone()) {
        o.insert(DhcpOption::Hostname(h));
    }
    if let Some(secs) = lease {
        let secs = secs.min(u32::MAX as u64 - 1) as u32;
        o.insert(DhcpOption::AddressLeaseTime(secs));
        o.insert(DhcpOption::Renewal(secs / 2));
        o.insert(DhcpOption::Rebinding((secs as u64 * 7 / 8) as u32));
    }
}

/// PXE boot information for clients that ask for it (option 60 "PXEClient", option 93,
/// or iPXE): siaddr and file (what BIOS ROMs read), options 66/67 (what UEFI and iPXE
/// read), option 60 echoed and option 43 with PXE_DISCOVERY_CONTROL = 8 ("boot the file
/// in this answer, no boot-server discovery", as pixiecore and dnsmasq send) so a PXE
/// ROM accepts the answer, including a proxy one without an address.
fn add_boot(r: &mut Message, p: &Packet, ctx: &Ctx) -> Vec<Event> {
    if !(p.pxe || p.fw.ipxe || p.fw.arch.is_some()) {
        return vec![];
    }
    let file = match boot::boot_file(ctx.cfg, ctx.server, &p.fw) {
        BootFile::Tftp(f) | BootFile::Url(f) => f,
        BootFile::Unsupported(a) => return vec![Event::UnsupportedArch(a)],
    };
    // The 128-byte file field (RFC 2131); a longer name lives only in option 67.
    if file.len() < 128 {
        r.set_fname_str(&file);
    }
    r.set_siaddr(ctx.server);
    let o = r.opts_mut();
    o.insert(DhcpOption::TFTPServerName(
        ctx.server.to_string().into_bytes(),
    ));
    o.insert(DhcpOption::BootfileName(file.into_bytes()));
    if p.fw.ipxe && ctx.cfg.dhcp.mode == DhcpMode::Full {
        // iPXE takes any offer carrying option 60 "PXEClient" for a ProxyDHCP offer as
        // well, and after the ACK asks port 4011 for it, waiting out all its retries when
        // nobody answers there (seen: 15-20 s per boot). A full server's answer already
        // holds everything, so say so in iPXE's own encapsulated option 175, sub-option
        // 176 "no-pxedhcp" = 1, and leave the PXE options out.
        o.insert(DhcpOption::Unknown(dhcproto::v4::UnknownOption::new(
            OptionCode::from(175u8),
            vec![176, 1, 1],
        )));
    } else if p.pxe {
        o.insert(DhcpOption::ClassIdentifier(b"PXEClient".to_vec()));
        o.insert(DhcpOption::VendorExtensions(vec![6, 1, 8, 255]));
    }
    vec![]
}

#[cfg(test)]
mod tests {
    use super::super::codec::{decode, tests::raw};
    use super::*;
    use crate::config::Mac;
    use std::path::Path;

    const CFG: &str = r#"
[server]
interface = "br0"
address = "10.77.0.1/24"
[dhcp]
pool = "10.77.0.100-10.77.0.102"
lease_time = "1h"
router = "10.77.0.1"
dns = ["10.77.0.1"]
[[dhcp.host]]
mac = "52:54:00:00:00:01"
address = "10.77.0.50"
hostname = "seat-01"
"#;

    fn cfg(text: &str) -> Config {
        Config::parse(text, Path::new("/tmp/vdd-test.toml")).unwrap()
    }

    fn ctx(c: &Config) -> Ctx<'_> {
        Ctx {
            cfg: c,
            server: Ipv4Addr::new(10, 77, 0, 1),
            subnet: "10.77.0.0/24".parse().unwrap(),
            now: 1_000,
        }
    }

    const M1: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const M2: [u8; 6] = [2, 0, 0, 0, 0, 2];

    fn ip(n: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, 0, n)
    }

    fn pkt(kind: u8, mac: [u8; 6], opts: &[u8]) -> Packet {
        decode(&raw(kind, mac, opts)).unwrap()
    }

    fn with_ciaddr(mut p: Packet, ci: Ipv4Addr) -> Packet {
        p.msg.set_ciaddr(ci);
        p
    }

    fn run(p: &Packet, t: &mut LeaseTable, c: &Ctx) -> Decision {
        let d = decide(p, Port::Dhcp, t, c);
        for ch in &d.changes {
            t.apply(ch);
        }
        d
    }

    fn kind(d: &Decision) -> Option<MessageType> {
        d.reply.as_ref().and_then(|(m, _)| m.opts().msg_type())
    }

    fn opt50(ip: Ipv4Addr) -> Vec<u8> {
        let o = ip.octets();
        vec![50, 4, o[0], o[1], o[2], o[3]]
    }

    fn opt54(ip: Ipv4Addr) -> Vec<u8> {
        let o = ip.octets();
        vec![54, 4, o[0], o[1], o[2], o[3]]
    }

    #[test]
    fn guest_reservation_is_what_dhcp_then_gives() {
        let c = cfg(CFG);
        let x = ctx(&c);
        let mut t = LeaseTable::default();
        let guest = Mac([0x0a, 1, 2, 3, 4, 5]);
        let ch = reserve(guest, None, &t, &c, x.now).unwrap();
        let Change::Bind { ip: got, .. } = ch else {
            panic!("{ch:?}")
        };
        assert!(c.dhcp.pool.unwrap().contains(got));
        t.apply(&ch);
        // The guest's own DISCOVER / REQUEST get exactly that address.
        let d = run(&pkt(1, guest.0, &[]), &mut t, &x);
        assert_eq!(d.reply.as_ref().unwrap().0.yiaddr(), got);
        let mut o = opt50(got);
        o.extend(opt54(ip(1)));
        let d = run(&pkt(3, guest.0, &o), &mut t, &x);
        assert_eq!(kind(&d), Some(MessageType::Ack));
        assert_eq!(d.reply.as_ref().unwrap().0.yiaddr(), got);
        // Nobody else gets it; a restart asking for it again keeps it.
        let d = run(&pkt(1, M1, &[]), &mut t, &x);
        assert_ne!(d.reply.as_ref().unwrap().0.yiaddr(), got);
        assert_eq!(
            reserve(guest, Some(got), &t, &c, x.now),
            Ok(Change::Bind {
                ip: got,
                mac: guest,
                until: x.now + 3600
            })
        );
        // An address held by someone else is not taken over.
        let other = Mac([0x0a, 9, 9, 9, 9, 9]);
        let Ok(Change::Bind { ip: o_ip, .. }) = reserve(other, Some(got), &t, &c, x.now) else {
            panic!()
        };
        assert_ne!(o_ip, got);
        // The pool (3 addresses) runs out.
        let mut full = LeaseTable::default();
        for n in 0..3u8 {
            let ch = reserve(Mac([0x0a, 0, 0, 0, 0, n]), None, &full, &c, x.now).unwrap();
            full.apply(&ch);
        }
        assert!(reserve(Mac([0x0a, 0, 0, 0, 1, 0]), None, &full, &c, x.now)
            .unwrap_err()
            .contains("dhcp.pool"));
    }

    /// A reload shrinks the pool: a lease on an address now outside it is renewed for what
    /// is left of it, then NAKed; the address is offered to nobody.
    #[test]
    fn a_shrunk_pool_keeps_its_leases_until_they_end() {
        let c = cfg(CFG);
        let x = ctx(&c);
        let mut t = LeaseTable::default();
        t.apply(&Change::Bind {
            ip: ip(102),
            mac: Mac(M1),
            until: x.now + 3600,
        });
        let small = cfg(&CFG.replace("10.77.0.100-10.77.0.102", "10.77.0.100-10.77.0.101"));
        let later = Ctx {
            now: x.now + 600,
            ..ctx(&small)
        };
        let renew = with_ciaddr(pkt(3, M1, &[]), ip(102));
        let d = run(&renew, &mut t, &later);
        assert_eq!(kind(&d), Some(MessageType::Ack));
        assert_eq!(
            d.reply
                .as_ref()
                .unwrap()
                .0
                .opts()
                .get(OptionCode::AddressLeaseTime),
            Some(&DhcpOption::AddressLeaseTime(3000)),
            "renewed for what is left, not extended"
        );
        assert_eq!(
            d.changes,
            vec![Change::Bind {
                ip: ip(102),
                mac: Mac(M1),
                until: x.now + 3600
            }]
        );
        // Never offered to another client, in or out of the new pool.
        let d = run(&pkt(1, [2, 0, 0, 0, 0, 9], &opt50(ip(102))), &mut t, &later);
        assert_ne!(d.reply.as_ref().unwrap().0.yiaddr(), ip(102));
        // Once the lease has ended the address is outside the pool like any other.
        let after = Ctx {
            now: x.now + 3601,
            ..ctx(&small)
        };
        let d = run(&renew, &mut t, &after);
        assert_eq!(kind(&d), Some(MessageType::Nak));
    }

    #[test]
    fn dora_then_renew_keeps_address() {
        let c = cfg(CFG);
        let x = ctx(&c);
        let mut t = LeaseTable::default();
        let d = run(&pkt(1, M1.map(|b| b ^ 8), &[]), &mut t, &x);
        let (offer, to) = d.reply.clone().unwrap();
        assert_eq!(kind(&d), Some(MessageType::Offer));
        let yi = offer.yiaddr();
        assert_eq!(yi, ip(100));
        assert_eq!(to, Dest::Hardware(yi));
        assert!(offer.opts().get(OptionCode::AddressLeaseTime).is_some());
        assert_eq!(
            offer.opts().get(OptionCode::Router),
            Some(&DhcpOption::Router(vec![ip(1)]))
        );
        let mut o = opt50(yi);
        o.extend(opt54(ip(1)));
        let d = run(&pkt(3, M1.map(|b| b ^ 8), &o), &mut t, &x);
        assert_eq!(kind(&d), Some(MessageType::Ack));
        assert!(matches!(d.changes[..], [Change::Bind { .. }]));
        // RENEWING: ciaddr, unicast; same address, answered to ciaddr.
        let d = run(&with_ciaddr(pkt(3, M1.map(|b| b ^ 8), &[]), yi), &mut t, &x);
        assert_eq!(kind(&d), Some(MessageType::Ack));
        assert_eq!(d.reply.as_ref().unwrap().1, Dest::Ciaddr(yi));
        assert_eq!(d.reply.unwrap().0.yiaddr(), yi);
        // A returning client gets the same address offered again.
        let d = run(&pkt(1, M1.map(|b| b ^ 8), &[]), &mut t, &x);
        assert_eq!(d.reply.unwrap().0.yiaddr(), yi);
    }

    #[test]
    fn reservation_is_honoured() {
        let c = cfg(CFG);
        let x = ctx(&c);
        let mut t = LeaseTable::default();
        let mac = [0x52, 0x54, 0, 0, 0, 1];
        let d = run(&pkt(1, mac, &[]), &mut t, &x);
        let (m, _) = d.reply.unwrap();
        assert_eq!(m.yiaddr(), ip(50));
        assert_eq!(
            m.opts().get(OptionCode::Hostname),
            Some(&DhcpOption::Hostname("seat-01".into()))
        );
        let d = run(&pkt(3, mac, &opt50(ip(50))), &mut t, &x);
        assert_eq!(kind(&d), Some(MessageType::Ack));
        // Asking for a pool address instead is refused: it has its reservation.
        let d = run(&pkt(3, mac, &opt50(ip(101))), &mut t, &x);
        assert_eq!(kind(&d), Some(MessageType::Nak));
    }

    #[test]
    fn naks() {
        let c = cfg(CFG);
        let x = ctx(&c);
        let mut t = LeaseTable::default();
        t.apply(&Change::Bind {
            ip: ip(100),
            mac: Mac(M2),
            until: 5_000,
        });
        // Wrong subnet (INIT-REBOOT after moving networks).
        let d = run(
            &pkt(3, M1, &opt50(Ipv4Addr::new(192, 168, 1, 9))),
            &mut t,
            &x,
        );
        assert_eq!(kind(&d), Some(MessageType::Nak));
        assert_eq!(d.reply.as_ref().unwrap().1, Dest::Broadcast);
        assert!(d.changes.is_empty());
        // M1 has no record here: its INIT-REBOOT and RENEWING REQUESTs for addresses of
        // this network get silence (4.3.2), whether the address is taken or free.
        for r in [
            pkt(3, M1, &opt50(ip(100))),
            pkt(3, M1, &opt50(ip(101))),
            pkt(3, M1, &opt50(ip(20))),
            with_ciaddr(pkt(3, M1, &[]), ip(100)),
            with_ciaddr(pkt(3, M1, &[]), ip(101)),
        ] {
            let d = run(&r, &mut t, &x);
            assert!(d.reply.is_none() && d.changes.is_empty(), "{d:?}");
            assert!(matches!(d.events[..], [Event::Ignored(_)]), "{d:?}");
        }
        // Once M1 has a record (here: its own lease of 101), conflicts are NAKed.
        t.apply(&Change::Bind {
            ip: ip(101),
            mac: Mac(M1),
            until: 5_000,
        });
        // Another client's address.
        let d = run(&pkt(3, M1, &opt50(ip(100))), &mut t, &x);
        assert_eq!(kind(&d), Some(MessageType::Nak));
        // Renewing someone else's address: NAK, broadcast even though ciaddr is set.
        let d = run(&with_ciaddr(pkt(3, M1, &[]), ip(100)), &mut t, &x);
        assert_eq!(kind(&d), Some(MessageType::Nak));
        assert_eq!(d.reply.as_ref().unwrap().1, Dest::Broadcast);
        // In the subnet, outside the pool.
        let d = run(&pkt(3, M1, &opt50(ip(20))), &mut t, &x);
        assert_eq!(kind(&d), Some(MessageType::Nak));
        // Selecting another server: silence, and our offer is given back.
        let m3 = M1.map(|b| b ^ 0x40);
        let d = run(&pkt(1, m3, &[]), &mut t, &x);
        let offered = d.reply.unwrap().0.yiaddr();
        let mut o = opt50(offered);
        o.extend(opt54(ip(9)));
        let d = run(&pkt(3, m3, &o), &mut t, &x);
        assert!(d.reply.is_none());
        assert!(t.available_to(offered, &Mac(M2), x.now));
    }

    #[test]
    fn decline_release_inform() {
        let c = cfg(CFG);
        let x = ctx(&c);
        let mut t = LeaseTable::default();
        let mut o = opt50(ip(100));
        o.extend(opt54(ip(1)));
        run(&pkt(1, M1, &[]), &mut t, &x);
        run(&pkt(3, M1, &o), &mut t, &x);
        // DECLINE: no reply, the address is set aside, the client gets another one.
        let d = run(&pkt(4, M1, &o), &mut t, &x);
        assert!(d.reply.is_none());
        assert_eq!(d.events, vec![Event::Declined(ip(100))]);
        let d = run(&pkt(1, M1, &[]), &mut t, &x);
        assert_eq!(d.reply.unwrap().0.yiaddr(), ip(101));
        let d = run(&pkt(1, M2, &[]), &mut t, &x);
        assert_eq!(d.reply.unwrap().0.yiaddr(), ip(102));
        // RELEASE by M1 of 101 (after it binds it), then M2 can have it.
        run(&pkt(3, M1, &opt50(ip(101))), &mut t, &x);
        let d = run(&with_ciaddr(pkt(7, M1, &[]), ip(101)), &mut t, &x);
        assert!(d.reply.is_none());
        assert_eq!(d.events, vec![Event::Released(ip(101))]);
        assert!(t.available_to(ip(101), &Mac(M2), x.now));
        // A RELEASE from someone else changes nothing.
        let d = run(&with_ciaddr(pkt(7, M2, &[]), ip(101)), &mut t, &x);
        assert!(d.changes.is_empty());
        // INFORM: configuration without a lease, to ciaddr.
        let d = run(&with_ciaddr(pkt(8, M2, &[]), ip(30)), &mut t, &x);
        let (m, to) = d.reply.unwrap();
        assert_eq!(to, Dest::Ciaddr(ip(30)));
        assert_eq!(m.yiaddr(), Ipv4Addr::UNSPECIFIED);
        assert!(m.opts().get(OptionCode::AddressLeaseTime).is_none());
        assert!(m.opts().get(OptionCode::Router).is_some());
    }

    #[test]
    fn pool_exhaustion_is_silence() {
        let c = cfg(CFG);
        let x = ctx(&c);
        let mut t = LeaseTable::default();
        for n in 10..13 {
            let d = run(&pkt(1, [2, 0, 0, 0, 0, n], &[]), &mut t, &x);
            assert_eq!(kind(&d), Some(MessageType::Offer));
        }
        let d = run(&pkt(1, [2, 0, 0, 0, 0, 99], &[]), &mut t, &x);
        assert!(d.reply.is_none());
        assert_eq!(d.events, vec![Event::PoolExhausted]);
        // Offers time out; then there is room again.
        let later = Ctx {
            now: x.now + OFFER_HOLD_SECS + 1,
            ..ctx(&c)
        };
        let d = run(&pkt(1, [2, 0, 0, 0, 0, 99], &[]), &mut t, &later);
        assert_eq!(kind(&d), Some(MessageType::Offer));
    }

    #[test]
    fn reply_destinations() {
        let mut m = Message::default();
        m.set_chaddr(&M1);
        let y = ip(100);
        assert_eq!(dest(&m, y, false), Dest::Hardware(y));
        m.set_flags(Flags::default().set_broadcast());
        assert_eq!(dest(&m, y, false), Dest::Broadcast);
        m.set_ciaddr(ip(7));
        assert_eq!(dest(&m, y, false), Dest::Ciaddr(ip(7)));
        assert_eq!(dest(&m, y, true), Dest::Broadcast);
        m.set_giaddr(ip(2));
        assert_eq!(dest(&m, y, false), Dest::Relay(ip(2)));
        assert_eq!(dest(&m, y, true), Dest::Relay(ip(2)));
    }

    #[test]
    fn relayed_request_goes_back_to_relay() {
        let c = cfg(CFG);
        let x = ctx(&c);
        let mut t = LeaseTable::default();
        let mut p = pkt(1, M1, &[]);
        p.msg.set_giaddr(ip(2));
        let d = run(&p, &mut t, &x);
        assert_eq!(d.reply.as_ref().unwrap().1, Dest::Relay(ip(2)));
        assert_eq!(d.reply.unwrap().0.giaddr(), ip(2));
        let mut p = pkt(1, M1, &[]);
        p.msg.set_giaddr(Ipv4Addr::new(10, 9, 9, 1));
        assert!(run(&p, &mut t, &x).reply.is_none());
    }

    fn file_of(m: &Message) -> String {
        match m.opts().get(OptionCode::BootfileName) {
            Some(DhcpOption::BootfileName(b)) => String::from_utf8(b.clone()).unwrap(),
            _ => String::new(),
        }
    }

    #[test]
    fn pxe_boot_files_by_arch() {
        let c = cfg(CFG);
        let x = ctx(&c);
        let mut t = LeaseTable::default();
        let pxe = |arch: u8| {
            let mut o = vec![93, 2, 0, arch, 60, 32];
            o.extend_from_slice(b"PXEClient:Arch:00000:UNDI:002001");
            o
        };
        let d = run(&pkt(1, M1, &pxe(0)), &mut t, &x);
        let m = d.reply.unwrap().0;
        assert_eq!(file_of(&m), "undionly.kpxe");
        assert_eq!(m.fname_str().unwrap().unwrap(), "undionly.kpxe");
        assert_eq!(m.siaddr(), ip(1));
        assert_eq!(
            m.opts().get(OptionCode::ClassIdentifier),
            Some(&DhcpOption::ClassIdentifier(b"PXEClient".to_vec()))
        );
        assert_eq!(
            m.opts().get(OptionCode::VendorExtensions),
            Some(&DhcpOption::VendorExtensions(vec![6, 1, 8, 255]))
        );
        for arch in [7, 9] {
            let m = run(&pkt(1, M1, &pxe(arch)), &mut t, &x).reply.unwrap().0;
            assert_eq!(file_of(&m), "ipxe.efi");
        }
        let mut o = pxe(0);
        o.extend_from_slice(&[77, 4, b'i', b'P', b'X', b'E']);
        let m = run(&pkt(1, M1, &o), &mut t, &x).reply.unwrap().0;
        assert_eq!(file_of(&m), "http://10.77.0.1/boot.ipxe?mac=${net0/mac}");
        // A full server tells iPXE not to wait for ProxyDHCP (175.176 = 1), and sends no
        // PXEClient that iPXE would take for a proxy offer.
        assert_eq!(
            m.opts().get(OptionCode::from(175u8)),
            Some(&DhcpOption::Unknown(dhcproto::v4::UnknownOption::new(
                OptionCode::from(175u8),
                vec![176, 1, 1]
            )))
        );
        assert!(m.opts().get(OptionCode::ClassIdentifier).is_none());
        // Unknown arch: an address, but no boot information, and an event to log.
        let d = run(&pkt(1, M1, &pxe(11)), &mut t, &x);
        assert!(d.events.contains(&Event::UnsupportedArch(11)));
        let m = d.reply.unwrap().0;
        assert_eq!(file_of(&m), "");
        assert_eq!(m.siaddr(), Ipv4Addr::UNSPECIFIED);
        // Plain clients get no boot fields.
        let m = run(&pkt(1, M1, &[]), &mut t, &x).reply.unwrap().0;
        assert!(m.opts().get(OptionCode::BootfileName).is_none());
    }

    #[test]
    fn proxy_mode() {
        let c =
            cfg("[server]\ninterface=\"br0\"\naddress=\"10.77.0.1/24\"\n[dhcp]\nmode=\"proxy\"\n");
        let x = ctx(&c);
        let t = LeaseTable::default();
        let mut o = vec![93, 2, 0, 0, 60, 9];
        o.extend_from_slice(b"PXEClient");
        let d = decide(&pkt(1, M1, &o), Port::Dhcp, &t, &x);
        let (m, to) = d.reply.unwrap();
        assert_eq!(m.opts().msg_type(), Some(MessageType::Offer));
        assert_eq!(m.yiaddr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(to, Dest::Broadcast);
        assert_eq!(file_of(&m), "undionly.kpxe");
        assert!(d.changes.is_empty());
        assert!(m.opts().get(OptionCode::AddressLeaseTime).is_none());
        // 4011: REQUEST -> ACK, back to where it came from.
        let p = with_ciaddr(pkt(3, M1, &o), ip(120));
        let d = decide(&p, Port::Proxy, &t, &x);
        let (m, to) = d.reply.unwrap();
        assert_eq!(m.opts().msg_type(), Some(MessageType::Ack));
        assert_eq!(to, Dest::Source);
        assert_eq!(m.yiaddr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(file_of(&m), "undionly.kpxe");
        // Non-PXE clients and REQUESTs on 67 belong to the primary server.
        assert!(decide(&pkt(1, M1, &[]), Port::Dhcp, &t, &x).reply.is_none());
        assert!(decide(&pkt(3, M1, &o), Port::Dhcp, &t, &x).reply.is_none());
    }
}
