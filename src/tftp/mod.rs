//! The TFTP service: read-only, for PXE ROMs fetching iPXE (and anything else in the
//! root). RFC 1350, with options RFC 2347 (OACK), 2348 (blksize), 2349 (timeout, tsize)
//! and 7440 (windowsize).
//!
//! Written here rather than taken from a crate: async-tftp keeps retransmitting after a
//! client's ERROR (its bug #18, which is exactly what PXE ROMs trigger by aborting after
//! the tsize OACK), and none of the crates implements RFC 7440 windows with the
//! rollover and duplicate-ACK rules we need. The protocol is small enough to own.
//!
//! Layers: [`codec`] (bytes <-> packets), [`session`] (pure state machine of one read
//! transfer), [`paths`] (which names may be served), [`driver`] (one UDP socket with
//! blocking calls on its own thread per transfer, see `spawn_transfer`).
//! This file is the listener: it takes requests on `[tftp] port`, caps concurrent
//! transfers at `[tftp] max_transfers`, and hands each RRQ to a transfer.

pub mod codec;
pub mod driver;
pub mod paths;
pub mod session;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::config::Live;
use crate::warnlimit::WarnLimit;

use codec::{Packet, ERR_ACCESS, ERR_ILLEGAL_OP, ERR_UNDEFINED};
use driver::OwnedRequest;

/// Why the tftp service could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The listening socket could not be bound (port in use, address not local).
    #[error("cannot bind the TFTP socket to {addr}")]
    BindSocket {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// Receiving on the listening socket failed for good.
    #[error("receiving on the TFTP socket failed")]
    Recv(#[source] std::io::Error),
}

/// Counters of a running service, shared with its tasks; tests and benchmarks read them.
#[derive(Debug)]
pub struct Metrics {
    /// Transfers whose task (and socket) is alive now.
    pub active: AtomicUsize,
    /// Transfers that ended with the last block acknowledged.
    pub completed: AtomicU64,
    /// Requests refused because `max_transfers` were running.
    pub refused_busy: AtomicU64,
    /// Requests refused because their address had `tftp.max_per_address` transfers running.
    pub refused_per_address: AtomicU64,
    /// Bytes of netascii windows held by running transfers (see
    /// [`session::NETASCII_TOTAL_BYTES`]).
    pub netascii_bytes: AtomicU64,
    /// At most 50 warn lines per 10 s: a flood of bad requests must not flood the log.
    warns: WarnLimit,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            active: AtomicUsize::new(0),
            completed: AtomicU64::new(0),
            refused_busy: AtomicU64::new(0),
            refused_per_address: AtomicU64::new(0),
            netascii_bytes: AtomicU64::new(0),
            warns: WarnLimit::new(50, Duration::from_secs(10)),
        }
    }
}

impl Metrics {
    /// Transfers running now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Emits a warn line through `f` unless the rate limit is hit; the first line of a
    /// new window says how many were held back.
    pub fn warn(&self, f: impl FnOnce()) {
        if let Some(suppressed) = self.warns.allow() {
            if suppressed > 0 {
                warn!(suppressed, "TFTP warnings suppressed in the last window");
            }
            f();
        }
    }
}

/// The tftp service with its listening socket bound.
pub struct Service {
    /// The running config: root, boot files, per-address cap (each transfer takes the one
    /// current at its request); port and `max_transfers` are fixed at start.
    cfg: Live,
    /// Takes requests on `[tftp] port`; transfers use their own sockets.
    socket: UdpSocket,
    /// Caps concurrent transfers: every transfer holds one permit until its task ends,
    /// so sockets and file descriptors stay bounded under a boot storm.
    limit: Arc<Semaphore>,
    per_address: crate::peers::PerAddress,
    metrics: Arc<Metrics>,
    /// What the admin sees: bytes and transfers, boot files as seats' stages.
    hub: crate::telemetry::Hub,
}

impl Service {
    /// Binds `[tftp] port` on the server's LAN address. Binding the address (not 0.0.0.0)
    /// makes every transfer socket leave from the address the client talked to, without
    /// IP_PKTINFO. With no address known, all addresses are used and the kernel picks
    /// the source address of replies by route.
    pub async fn bind(cfg: impl Into<Live>) -> Result<Service, Error> {
        let cfg = cfg.into();
        let ip = cfg
            .get()
            .server_ip()
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), IpAddr::V4);
        let addr = SocketAddr::new(ip, cfg.get().tftp.port);
        Service::bind_addr(cfg, addr).await
    }

    /// Binds an explicit address (tests use 127.0.0.1:0).
    pub async fn bind_addr(cfg: impl Into<Live>, addr: SocketAddr) -> Result<Service, Error> {
        let cfg = cfg.into();
        let socket = UdpSocket::bind(addr)
            .await
            .map_err(|source| Error::BindSocket { addr, source })?;
        Ok(Service {
            limit: Arc::new(Semaphore::new(cfg.get().tftp.max_transfers)),
            per_address: crate::peers::PerAddress::default(),
            cfg,
            socket,
            metrics: Arc::new(Metrics::default()),
            hub: Default::default(),
        })
    }

    /// Reports transfers to `hub` (the admin's panel and metrics).
    pub fn with_hub(mut self, hub: crate::telemetry::Hub) -> Service {
        hub.watch_tftp(self.metrics.clone());
        self.hub = hub;
        self
    }

    /// The bound address (the real port when bound to port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// The counters; keep the Arc to watch a running service.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Serves until `shutdown` is cancelled; running transfers end with an ERROR then.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let local = self.socket.local_addr().map_err(Error::Recv)?.ip();
        // A request is at most one datagram; RFC 2347 bounds it at 512 bytes, but
        // clients send more options than that, so take any UDP payload.
        let mut buf = vec![0u8; 65536];
        let mut out = Vec::with_capacity(128);
        loop {
            let (len, peer) = tokio::select! {
                r = self.socket.recv_from(&mut buf) => match r {
                    Ok(x) => x,
                    // ICMP errors from earlier replies surface here; they say nothing
                    // about the listener itself.
                    Err(e) if is_transient(&e) => {
                        debug!(error = %e, "transient receive error");
                        continue;
                    }
                    Err(e) => return Err(Error::Recv(e)),
                },
                _ = shutdown.cancelled() => return Ok(()),
            };
            let reply = match Packet::parse(&buf[..len]) {
                Ok(Packet::Rrq(r)) => {
                    let cfg = self.cfg.get();
                    let file = codec::printable(r.filename);
                    let cap = cfg.tftp.max_per_address;
                    let Some(slot) = self.per_address.take(peer.ip(), cap) else {
                        self.metrics
                            .refused_per_address
                            .fetch_add(1, Ordering::Relaxed);
                        self.metrics.warn(|| {
                            warn!(%peer, %file, max_per_address = cap,
                                "refused: this address runs tftp.max_per_address transfers already")
                        });
                        codec::encode_error(
                            &mut out,
                            ERR_UNDEFINED,
                            "Too many transfers from your address",
                        );
                        if let Err(e) = self.socket.send_to(&out, peer).await {
                            debug!(%peer, error = %e, "cannot send ERROR");
                        }
                        continue;
                    };
                    match self.limit.clone().try_acquire_owned() {
                        Ok(permit) => {
                            debug!(%peer, %file, mode = %r.mode_text, options = ?r.options, "read request");
                            let req = OwnedRequest {
                                filename: r.filename.to_vec(),
                                mode: r.mode,
                                mode_text: r.mode_text,
                                options: r.options,
                            };
                            let (cfg, m, t, hub) = (
                                cfg.clone(),
                                self.metrics.clone(),
                                shutdown.child_token(),
                                self.hub.clone(),
                            );
                            // Counted here, not in the task, so the cap and the counter
                            // agree even before the task first runs.
                            m.active.fetch_add(1, Ordering::SeqCst);
                            spawn_transfer(move || {
                                driver::transfer(cfg, local, peer, req, m, (permit, slot), t, hub)
                            });
                            None
                        }
                        Err(_) => {
                            self.metrics.refused_busy.fetch_add(1, Ordering::Relaxed);
                            let max = cfg.tftp.max_transfers;
                            self.metrics.warn(|| {
                                warn!(%peer, %file, max_transfers = max,
                                    "refused: tftp.max_transfers transfers running; raise it if clients need to boot at once")
                            });
                            Some((ERR_UNDEFINED, "Server busy, try again"))
                        }
                    }
                }
                Ok(Packet::Wrq(r)) => {
                    let file = codec::printable(r.filename);
                    self.metrics
                        .warn(|| warn!(%peer, %file, "refused write request: read-only server"));
                    Some((ERR_ACCESS, "Read-only server"))
                }
                // Never answer an ERROR (no error loops between two servers), and
                // DATA/ACK/OACK to port 69 are late packets of finished transfers.
                Ok(p) => {
                    debug!(%peer, packet = %p, "not a request; ignored");
                    None
                }
                Err(e) => {
                    self.metrics
                        .warn(|| warn!(%peer, error = %e, "malformed request refused"));
                    Some((ERR_ILLEGAL_OP, "Illegal TFTP operation"))
                }
            };
            if let Some((code, msg)) = reply {
                codec::encode_error(&mut out, code, msg);
                if let Err(e) = self.socket.send_to(&out, peer).await {
                    debug!(%peer, error = %e, "cannot send ERROR");
                }
            }
        }
    }
}

/// Runs one transfer on its own thread; its socket calls block (see `driver::transfer`).
///
/// A lockstep transfer is one round trip per block, so its speed is the latency from
/// the ACK's arrival to the next DATA. On the shared multi-threaded runtime every ACK
/// went through the one I/O driver and a worker hand-off; measured with 20 concurrent
/// lockstep clients that was ~0.7x of the fork/thread-per-transfer peers. On its own
/// thread, the kernel wakes exactly the thread whose client answered, as it does for
/// tftpd-hpa and atftpd. Threads are bounded by `max_transfers` (the permit is held
/// inside). If a thread cannot be started, tokio's blocking pool takes the transfer.
fn spawn_transfer(f: impl FnOnce() + Send + 'static) {
    // The closure must survive a failed thread start, so it travels in a slot.
    let slot = Arc::new(Mutex::new(Some(f)));
    let theirs = slot.clone();
    let started = std::thread::Builder::new()
        .name("vdd-tftp".into())
        .spawn(move || {
            let f = theirs.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(f) = f {
                f();
            }
        });
    if let Err(e) = started {
        debug!(error = %e, "no thread for a transfer; using the blocking pool");
        if let Some(f) = slot.lock().unwrap_or_else(|p| p.into_inner()).take() {
            tokio::task::spawn_blocking(f);
        }
    }
}

fn is_transient(e: &std::io::Error) -> bool {
    use nix::libc::{ECONNREFUSED, ECONNRESET, EHOSTUNREACH, EINTR, ENETUNREACH};
    matches!(
        e.raw_os_error(),
        Some(ECONNREFUSED | ECONNRESET | EHOSTUNREACH | ENETUNREACH | EINTR)
    )
}
