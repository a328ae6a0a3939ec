//! DHCP driver: the UDP sockets, the receive loop around [`policy::decide`], and the
//! group-commit writer that makes every ACK's lease durable before the ACK leaves
//! (RFC 2131 section 4.1 for where replies go; see leases.rs for why a journal).
//!
//! One task receives and decides (the table is only touched there, so it needs no lock);
//! one OS thread owns the journal: it takes every pending lease, writes them in one
//! append, fdatasyncs once, and only then sends their ACKs. While it syncs, the next
//! batch piles up, so the sync rate of the disk bounds batches per second, not leases.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::codec;
use super::leases::{Change, Journal, LeaseTable};
use super::policy::{self, Ctx, Decision, Dest, Event, Port};
use super::{unix_now, Error};
use crate::config::{Config, DhcpMode, Live};
use crate::warnlimit::WarnLimit;

const CLIENT_PORT: u16 = 68;
/// Batches larger than this are split, so one sync never holds ACKs for too long.
const MAX_BATCH: usize = 8192;

/// A reply waiting for its leases to be on disk.
struct Job {
    changes: Vec<Change>,
    reply: Option<(Vec<u8>, SocketAddr)>,
}

/// Bound sockets and the replayed table, ready to run.
pub struct Driver {
    /// The running config: each packet is decided on the one current when it arrived.
    cfg: Live,
    /// Our address on the LAN: server identifier and next-server.
    server: Ipv4Addr,
    subnet: ipnet::Ipv4Net,
    /// Port 67, bound to the LAN interface only (SO_BINDTODEVICE), so vdd never answers
    /// on another network even with a wildcard address.
    sock: Socket,
    /// Port 4011 in proxy mode.
    proxy: Option<Socket>,
    /// The journal (full mode only; proxy mode keeps no state).
    journal: Option<Journal>,
    table: LeaseTable,
    /// Reservations and releases for guest VMs, from the dispatcher.
    cmds: tokio::sync::mpsc::UnboundedReceiver<super::LeaseCmd>,
    /// What the admin sees: packets counted, boot firmware's requests as seats' stages.
    pub(crate) hub: crate::telemetry::Hub,
}

/// UDP 0.0.0.0:port with SO_REUSEADDR (a restart must not wait for anything), SO_BROADCAST
/// (replies to 255.255.255.255) and SO_BINDTODEVICE to the LAN interface.
fn udp_socket(interface: &str, port: u16) -> Result<Socket, Error> {
    let bind_err = |source| Error::BindSocket {
        port,
        interface: interface.to_string(),
        source,
    };
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(bind_err)?;
    s.set_reuse_address(true).map_err(bind_err)?;
    s.set_broadcast(true).map_err(bind_err)?;
    s.bind_device(Some(interface.as_bytes()))
        .map_err(bind_err)?;
    // Bursts of thousands of DISCOVERs (a room of PCs powered on together, or a stalled
    // CPU) must queue in the kernel, not be dropped there. SO_RCVBUFFORCE lets root go
    // past net.core.rmem_max (often 208 KiB, a few hundred packets); without root the
    // plain request gets what the sysctl allows.
    if nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::RcvBufForce, &(8 << 20)).is_err()
    {
        let _ = s.set_recv_buffer_size(8 << 20);
    }
    let _ = s.set_send_buffer_size(8 << 20);
    // Answers go ahead of the bulk data that fills the link while a room boots.
    let _ = crate::netif::waited_on(&s);
    s.set_nonblocking(true).map_err(bind_err)?;
    s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())
        .map_err(bind_err)?;
    Ok(s)
}

impl Driver {
    pub(crate) fn bind(
        live: Live,
        cmds: tokio::sync::mpsc::UnboundedReceiver<super::LeaseCmd>,
    ) -> Result<Driver, Error> {
        // Interface, address, ports and mode are fixed at start (a reload leaves them).
        let cfg = live.get();
        let iface = cfg.server.interface.clone();
        let (Some(server), Some(subnet)) = (cfg.server_ip(), cfg.server.subnet) else {
            return Err(Error::NoAddress(iface));
        };
        let sock = udp_socket(&iface, cfg.dhcp.port)?;
        let proxy = match cfg.dhcp.mode {
            DhcpMode::Proxy => Some(udp_socket(&iface, cfg.dhcp.proxy_port)?),
            _ => None,
        };
        let (journal, table) = match cfg.dhcp.mode {
            DhcpMode::Full => {
                let (j, t) = Journal::open(&cfg.server.state_dir, unix_now())?;
                (Some(j), t)
            }
            _ => (None, LeaseTable::default()),
        };
        let n = table.all().iter().filter(|l| l.active(unix_now())).count();
        info!(interface = %iface, ip = %server, leases = n, mode = ?cfg.dhcp.mode, "dhcp bound");
        Ok(Driver {
            cfg: live,
            server,
            subnet,
            sock,
            proxy,
            journal,
            table,
            cmds,
            hub: Default::default(),
        })
    }

    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let Driver {
            cfg: live,
            server,
            subnet,
            sock,
            proxy,
            journal,
            mut table,
            mut cmds,
            hub,
        } = self;
        let to_tokio = |s: Socket| UdpSocket::from_std(std::net::UdpSocket::from(s));
        let recv_err = Error::Recv;
        // The writer sends ACKs through its own handle on the same socket.
        let (tx, writer) = match journal {
            Some(j) => {
                let send = std::net::UdpSocket::from(sock.try_clone().map_err(recv_err)?);
                let (tx, rx) = mpsc::channel::<Job>();
                let h = std::thread::Builder::new()
                    .name("dhcp-journal".into())
                    .spawn(move || writer(j, send, rx))
                    .map_err(Error::Recv)?;
                (Some(tx), Some(h))
            }
            None => (None, None),
        };
        let main = to_tokio(sock).map_err(Error::Recv)?;
        let proxy = match proxy {
            Some(p) => Some(to_tokio(p).map_err(Error::Recv)?),
            None => None,
        };
        let mut buf = vec![0u8; 4096];
        let mut pbuf = vec![0u8; 4096];
        // At most one warning a second from a misbehaving network; the rest are counted.
        let limiter = WarnLimit::new(1, Duration::from_secs(1));
        let mut new_clients =
            NewClients::new(live.get().dhcp.new_clients_per_minute, Instant::now());
        let mut per_mac = PerMac::new(Instant::now());
        let mut unicast = Unicast {
            fd: main.as_raw_fd(),
            interface: live.get().server.interface.clone(),
            works: true,
        };
        let result = loop {
            let cfg = live.get();
            new_clients.set_rate(cfg.dhcp.new_clients_per_minute);
            let (n, peer, port) = tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                Some(cmd) = cmds.recv() => {
                    let changes = lease_cmd(cmd, &cfg, &mut table);
                    if let (Some(tx), false) = (&tx, changes.is_empty()) {
                        if tx.send(Job { changes, reply: None }).is_err() {
                            break Err(Error::WriterGone);
                        }
                    }
                    continue;
                }
                r = main.recv_from(&mut buf) => match r {
                    Ok((n, peer)) => (n, peer, Port::Dhcp),
                    Err(e) if transient(&e) => continue,
                    Err(e) => break Err(Error::Recv(e)),
                },
                r = async { proxy.as_ref().expect("guarded").recv_from(&mut pbuf).await }, if proxy.is_some() => match r {
                    Ok((n, peer)) => (n, peer, Port::Proxy),
                    Err(e) if transient(&e) => continue,
                    Err(e) => break Err(Error::Recv(e)),
                },
            };
            let bytes = match port {
                Port::Dhcp => &buf[..n],
                Port::Proxy => &pbuf[..n],
            };
            let p = match codec::decode(bytes) {
                Ok(p) => p,
                Err(e) => {
                    debug!(%peer, len = n, "refused packet: {e}");
                    if let Some(dropped) = limiter.allow() {
                        warn!(%peer, dropped, "malformed DHCP packet refused: {e}");
                    }
                    continue;
                }
            };
            hub.dhcp_received(&p);
            if !per_mac.allow(p.mac, Instant::now()) {
                if let Some(dropped) = limiter.allow() {
                    warn!(mac = %p.mac, dropped, per_second = PER_MAC_PER_SECOND, "a client sends more DHCP messages a second than any boot needs (a PXE ROM stuck in a loop?); the rest of this second's are left unanswered");
                }
                continue;
            }
            if port == Port::Dhcp
                && is_new_client(&p, &cfg, &table)
                && !new_clients.take(Instant::now())
            {
                // Unanswered, the client retries its DISCOVER in a few seconds (RFC 2131
                // 4.1), by which time the bucket has refilled a little.
                if let Some(dropped) = limiter.allow() {
                    warn!(mac = %p.mac, dropped, per_minute = cfg.dhcp.new_clients_per_minute, "more never-seen clients than dhcp.new_clients_per_minute; DISCOVER left unanswered (a host faking MACs to drain the pool?)");
                }
                continue;
            }
            let now = unix_now();
            let ctx = Ctx {
                cfg: &cfg,
                server,
                subnet,
                now,
            };
            let d = policy::decide(&p, port, &table, &ctx);
            log_events(&p, &d, &limiter);
            hub.dhcp_decided(&p, &d.events);
            let Decision {
                reply,
                changes,
                events: _,
            } = d;
            for c in &changes {
                table.apply(c);
            }
            let reply = reply.map(|(m, to)| {
                let bytes = codec::encode_with_relay_info(&m, p.relay_info.as_deref());
                let to = match to {
                    Dest::Hardware(yiaddr) if unicast.prepare(yiaddr, &p.mac) => {
                        SocketAddrV4::new(yiaddr, CLIENT_PORT).into()
                    }
                    other => address(other, peer),
                };
                (bytes, to)
            });
            let durable = changes.iter().any(Change::durable);
            match (&tx, durable) {
                (Some(tx), true) => {
                    if tx.send(Job { changes, reply }).is_err() {
                        break Err(Error::WriterGone);
                    }
                }
                _ => {
                    if let Some((bytes, to)) = reply {
                        let sock = if port == Port::Proxy {
                            proxy.as_ref().unwrap_or(&main)
                        } else {
                            &main
                        };
                        if let Err(e) = sock.send_to(&bytes, to).await {
                            debug!(peer = %to, "send failed: {e}");
                        }
                    }
                }
            }
        };
        // Let the writer finish what it has, so every ACK decided is either sent durable
        // or never sent.
        drop(tx);
        if let Some(h) = writer {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
        result
    }
}

/// Serves one request of the dispatcher; returns the changes to journal.
fn lease_cmd(cmd: super::LeaseCmd, cfg: &Config, table: &mut LeaseTable) -> Vec<Change> {
    match cmd {
        super::LeaseCmd::Reserve { mac, want, reply } => {
            match policy::reserve(mac, want, table, cfg, unix_now()) {
                Ok(c) => {
                    table.apply(&c);
                    if let Change::Bind { ip, .. } = c {
                        info!(%mac, %ip, "address reserved for a guest VM");
                        let _ = reply.send(Ok(ip));
                    }
                    vec![c]
                }
                Err(why) => {
                    warn!(%mac, "no address for a guest VM: {why}");
                    let _ = reply.send(Err(why));
                    vec![]
                }
            }
        }
        super::LeaseCmd::Count { reply } => {
            let now = unix_now();
            let _ = reply.send(table.all().iter().filter(|l| l.active(now)).count());
            vec![]
        }
        super::LeaseCmd::Release { mac, ip } => {
            if table.get(ip).is_some_and(|l| l.mac == Some(mac)) {
                let c = Change::Free { ip, mac };
                table.apply(&c);
                info!(%mac, %ip, "guest VM's address released");
                vec![c]
            } else {
                vec![]
            }
        }
    }
}

fn transient(e: &std::io::Error) -> bool {
    // ICMP errors of earlier sends surface on recv; they are not the socket's end.
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::Interrupted
            | std::io::ErrorKind::WouldBlock
    ) || e.raw_os_error() == Some(nix::libc::EHOSTUNREACH)
        || e.raw_os_error() == Some(nix::libc::ENETUNREACH)
}

/// Unicast to a client without an address (`Dest::Hardware`), through an ARP entry
/// written first (see arp.rs). Where the kernel refuses that (no CAP_NET_ADMIN), replies
/// are broadcast, which RFC 2131 4.1 allows a server that cannot unicast.
struct Unicast {
    fd: std::os::fd::RawFd,
    interface: String,
    /// False once the kernel refused an entry for want of privilege.
    works: bool,
}

impl Unicast {
    /// Whether a reply to `ip` can now go to `mac` alone.
    fn prepare(&mut self, ip: Ipv4Addr, mac: &crate::config::Mac) -> bool {
        if !self.works {
            return false;
        }
        match super::arp::set(self.fd, &self.interface, ip, mac) {
            Ok(()) => true,
            Err(e) => {
                if matches!(
                    e.raw_os_error(),
                    Some(nix::libc::EPERM | nix::libc::EACCES | nix::libc::EOPNOTSUPP)
                ) {
                    self.works = false;
                    warn!(interface = %self.interface, "cannot write ARP entries ({e}); DHCP replies to clients without an address are broadcast");
                } else {
                    debug!(%mac, %ip, "no ARP entry ({e}); this reply is broadcast");
                }
                false
            }
        }
    }
}

/// Where a [`Dest`] is on the wire, but for a `Dest::Hardware` that [`Unicast`] could
/// not prepare: that one is broadcast.
fn address(to: Dest, peer: SocketAddr) -> SocketAddr {
    let bcast = SocketAddrV4::new(Ipv4Addr::BROADCAST, CLIENT_PORT).into();
    match to {
        Dest::Relay(gi) => SocketAddrV4::new(gi, 67).into(),
        Dest::Ciaddr(ci) => SocketAddrV4::new(ci, CLIENT_PORT).into(),
        Dest::Broadcast | Dest::Hardware(_) => bcast,
        Dest::Source => peer,
    }
}

fn log_events(p: &codec::Packet, d: &Decision, limiter: &WarnLimit) {
    let mac = p.mac;
    let xid = Xid(p.msg.xid());
    for e in &d.events {
        match e {
            Event::Offered(ip) => info!(%mac, %ip, %xid, "offer"),
            Event::Acked(ip) => info!(%mac, %ip, %xid, "ack"),
            Event::Nak(ip, why) => info!(%mac, %ip, %xid, "nak: {why}"),
            Event::Informed => info!(%mac, %xid, ip = %p.msg.ciaddr(), "inform answered"),
            Event::Released(ip) => info!(%mac, %ip, "released"),
            Event::Declined(ip) => {
                warn!(%mac, %ip, "client declined the address (in use by someone else?); set aside")
            }
            Event::PoolExhausted => {
                if let Some(dropped) = limiter.allow() {
                    warn!(%mac, %xid, dropped, "pool exhausted: no address to offer, DISCOVER left unanswered; grow dhcp.pool")
                }
            }
            Event::UnsupportedArch(a) => {
                if let Some(dropped) = limiter.allow() {
                    warn!(%mac, %xid, arch = a, dropped, "no boot file for this client architecture (RFC 4578 option 93); no boot information sent")
                }
            }
            Event::Ignored(why) => debug!(%mac, %xid, "ignored: {why}"),
            Event::ProxyOffer => info!(%mac, %xid, "proxy offer"),
            Event::ProxyAck => info!(%mac, %xid, "proxy ack (port 4011)"),
        }
    }
}

/// The transaction id as logged, formatted only if a log line is really written.
struct Xid(u32);

impl std::fmt::Display for Xid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#010x}", self.0)
    }
}

/// A DISCOVER for the pool from a client vdd has no record of: no reservation, no lease
/// (even an expired one), no offer pending. Known seats never wait for the bucket below.
fn is_new_client(p: &codec::Packet, cfg: &Config, table: &LeaseTable) -> bool {
    p.kind == dhcproto::v4::MessageType::Discover
        && cfg.dhcp.pool.is_some()
        && cfg.host(&p.mac).is_none()
        && table.of_mac(&p.mac).is_none()
}

/// Messages one MAC may have answered per second. A booting client sends a DISCOVER and
/// a REQUEST, and retries after a second or more; a PXE ROM stuck in a loop sends
/// thousands, and each answer costs a decision, an encode and a send (and an OFFER holds
/// an address) while every other seat of a booting room waits in the same queue.
const PER_MAC_PER_SECOND: u32 = 8;

/// The per-MAC budget: [`PER_MAC_PER_SECOND`] messages in each one-second window of a MAC.
struct PerMac {
    seen: std::collections::HashMap<crate::config::Mac, (Instant, u32)>,
    pruned: Instant,
}

/// MACs tracked at most: a flood of made-up MACs (each of which sends few messages, and
/// meets `new_clients_per_minute` instead) cannot grow the table past this.
const PER_MAC_TRACKED: usize = 1 << 16;

impl PerMac {
    fn new(now: Instant) -> PerMac {
        PerMac {
            seen: Default::default(),
            pruned: now,
        }
    }

    fn allow(&mut self, mac: crate::config::Mac, now: Instant) -> bool {
        let window = Duration::from_secs(1);
        if now.saturating_duration_since(self.pruned) >= window {
            self.seen
                .retain(|_, (start, _)| now.saturating_duration_since(*start) < window);
            self.pruned = now;
        }
        if self.seen.len() >= PER_MAC_TRACKED && !self.seen.contains_key(&mac) {
            return true;
        }
        let (start, n) = self.seen.entry(mac).or_insert((now, 0));
        if now.saturating_duration_since(*start) >= window {
            (*start, *n) = (now, 0);
        }
        *n += 1;
        *n <= PER_MAC_PER_SECOND
    }
}

/// The token bucket of [`Config`]'s `dhcp.new_clients_per_minute`: that many new clients
/// at once, refilled at that many a minute. One host sending DISCOVERs from random MACs
/// (the classic pool-starvation attack) gets that many addresses a minute, not the pool.
struct NewClients {
    per_minute: f64,
    tokens: f64,
    last: Instant,
}

impl NewClients {
    fn new(per_minute: usize, now: Instant) -> NewClients {
        NewClients {
            per_minute: per_minute as f64,
            tokens: per_minute as f64,
            last: now,
        }
    }

    /// A reload changed `dhcp.new_clients_per_minute`: the bucket keeps what it holds, up
    /// to the new size.
    fn set_rate(&mut self, per_minute: usize) {
        self.per_minute = per_minute as f64;
        self.tokens = self.tokens.min(self.per_minute);
    }

    fn take(&mut self, now: Instant) -> bool {
        let secs = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + secs * self.per_minute / 60.0).min(self.per_minute);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The group-commit writer: one append + one fdatasync per batch, then the batch's ACKs.
fn writer(mut j: Journal, sock: std::net::UdpSocket, rx: mpsc::Receiver<Job>) {
    let mut batch: Vec<Job> = Vec::new();
    let mut changes: Vec<Change> = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(job) => batch.push(job),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                compact_if_needed(&mut j);
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        changes.clear();
        changes.extend(batch.iter().flat_map(|b| b.changes.iter().copied()));
        let t0 = Instant::now();
        match j.commit(&changes) {
            Ok(()) => {
                debug!(
                    leases = changes.len(),
                    ms = t0.elapsed().as_millis() as u64,
                    "journal batch synced"
                );
                for job in batch.drain(..) {
                    if let Some((bytes, to)) = job.reply {
                        send_blocking(&sock, &bytes, to);
                    }
                }
            }
            Err(e) => {
                // Not on disk means not promised: the ACKs are withheld and the clients
                // retry; the admin must look at the disk.
                error!(
                    "lease journal write failed, {} ACKs withheld: {e:#}",
                    batch.len()
                );
                batch.clear();
            }
        }
        compact_if_needed(&mut j);
    }
}

fn compact_if_needed(j: &mut Journal) {
    if j.wants_compaction() {
        match j.compact(unix_now()) {
            Ok(()) => debug!("lease journal compacted"),
            Err(e) => error!("lease journal compaction failed: {e:#}"),
        }
    }
}

/// The socket is non-blocking (shared with the tokio side); a full send buffer is waited
/// out briefly rather than dropping an ACK that is already durable.
fn send_blocking(sock: &std::net::UdpSocket, bytes: &[u8], to: SocketAddr) {
    for _ in 0..200 {
        match sock.send_to(bytes, to) {
            Ok(_) => return,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_micros(500))
            }
            Err(e) => {
                debug!(peer = %to, "send failed: {e}");
                return;
            }
        }
    }
    warn!(peer = %to, "send buffer full for 100 ms; ACK dropped (the client will retry)");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// DHCP answers are sent from the first band of the kernel's default queue, not from
    /// the one the link's bulk data fills.
    #[test]
    fn answers_go_ahead_of_bulk_data() {
        // SO_BINDTODEVICE needs CAP_NET_RAW: root only.
        let s = match udp_socket("lo", 0) {
            Ok(s) => s,
            Err(e) if !xtask::lab::is_root() => {
                eprintln!("skipping: {e} (not root)");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        assert_eq!(s.priority().unwrap(), crate::netif::TC_PRIO_INTERACTIVE);
    }

    #[test]
    fn one_mac_gets_a_few_answers_a_second() {
        let t = Instant::now();
        let mut g = PerMac::new(t);
        let (a, b) = (crate::config::Mac([2; 6]), crate::config::Mac([3; 6]));
        let n = (0..100).filter(|_| g.allow(a, t)).count();
        assert_eq!(n, PER_MAC_PER_SECOND as usize);
        // Another MAC is not held back by the first.
        assert!(g.allow(b, t + Duration::from_millis(10)));
        // The next second, the stuck one is answered again, as few times.
        let later = t + Duration::from_millis(1100);
        assert_eq!(
            (0..100).filter(|_| g.allow(a, later)).count(),
            PER_MAC_PER_SECOND as usize
        );
        // Quiet MACs leave the table.
        let much_later = t + Duration::from_secs(5);
        assert!(g.allow(b, much_later));
        assert_eq!(g.seen.len(), 1);
    }

    #[test]
    fn new_clients_come_in_bursts_then_at_the_configured_rate() {
        let t = Instant::now();
        let mut b = NewClients::new(6, t);
        assert_eq!(
            (0..10).filter(|_| b.take(t)).count(),
            6,
            "a burst of one minute's worth"
        );
        assert!(!b.take(t + Duration::from_secs(5)));
        // Six a minute: one every ten seconds.
        assert!(b.take(t + Duration::from_secs(11)));
        assert!(!b.take(t + Duration::from_secs(12)));
        // A long quiet time refills no more than one burst.
        let later = t + Duration::from_secs(3600);
        assert_eq!((0..10).filter(|_| b.take(later)).count(), 6);
    }
}
