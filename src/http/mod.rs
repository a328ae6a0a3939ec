//! The HTTP service: boot files for iPXE (RFC 9110 semantics, RFC 9112 HTTP/1.1 syntax).
//! Serves `/boot.ipxe`, `/boot/[<mac>/]kernel|initrd` and `/files/<name>`; the session
//! API (`/api/v1/...`) joins as more [`routes::Route`]s.
//!
//! Layers: [`codec`] (request heads, response heads), [`range`] and [`routes`] (pure
//! decisions), [`files`] (the safe resolver), and this driver (sockets, limits, bodies):
//! the service here, a connection in `conn`, the writing of answers in `send`.
//!
//! Why a small HTTP/1.1 driver of our own instead of axum/hyper: hyper owns the socket
//! and only writes bodies it was handed as byte buffers, so every file byte would be read
//! into user space and copied back into the kernel. We own the socket and send file
//! bodies with sendfile(2), page cache to socket, driven by tokio readiness.
//!
//! Measured with `cargo xtask bench http --rounds 10` (20 concurrent curl downloads of a
//! 64 MiB file in a lab namespace, release build, 2 cores shared with other builds at
//! load average 20-25), two runs: sendfile 0.087 / 0.098 CPU-s per GB served; the same
//! server copying through a 256 KiB buffer read with `tokio::fs::File` (the work a hyper
//! body over a file does; hyper itself was not built to measure) 0.414 / 0.413, 4.2-4.8x
//! more; `python3 -m http.server` 0.31 / 0.34. Aggregate medians: sendfile 794 / 917 MB/s,
//! copy 903 / 1165, python 586 / 769; with 4 clients sendfile 1637 vs copy 1572. The
//! copy path's edge at 20 clients is not explained; our guess, not verified, is a
//! loopback effect (the receiving curl copies from pages the server just touched, hot in
//! cache; a NIC reads them by DMA). A first version with TCP_NODELAY ran sendfile at
//! half the copy rate from 4 clients up; Nagle plus a push per answer fixed that. At ~0.09 CPU-s/GB one core feeds ~10 GB/s, so a LAN
//! link is the limit, and CPU per GB is what grows with the number of seats: sendfile.
//! `[http] sendfile = false` keeps the copy
//! path for file systems without sendfile support.

pub mod admin;
pub mod api;
pub mod codec;
mod conn;
pub mod files;
pub mod range;
pub mod routes;
mod send;

use crate::warnlimit::WarnLimit;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Live;

use conn::{next, Conn, Next};

/// Why the http service could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The listening socket could not be bound (port in use, no permission for port 80).
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// Accepting connections failed for good.
    #[error("accepting connections")]
    Accept(#[source] io::Error),
}

/// Connections served at once; more wait in the kernel's accept queue. A classroom of
/// iPXE clients opens one or two each.
const MAX_CONNECTIONS: usize = 1024;
/// How long an idle keep-alive connection, or a slow request head, may take.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a client may accept no body bytes at all before we give up on it.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// The slowest a body may go, after the first `STALL_TIMEOUT`: a reader that takes a byte
/// now and then no longer resets a timer with each partial send and holds its slot for
/// ever. An old PC on 10 Mbit/s reads 76 times faster than this.
const MIN_RATE: f64 = 16.0 * 1024.0;

/// How long running transfers may go on after shutdown is asked for.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// The largest API request body we read (a session request is under 100 bytes).
const MAX_API_BODY: usize = 64 * 1024;
/// Buffer of the copy path (`sendfile = false`).
const COPY_BUF: usize = 256 * 1024;

/// The http service with its socket bound.
pub struct Service {
    /// The running config; each connection takes the one current when it was accepted.
    cfg: Live,
    listener: TcpListener,
    /// Caps concurrent connections; a permit lives as long as its connection task.
    limit: Arc<Semaphore>,
    per_address: crate::peers::PerAddress,
    /// Rate limit of `warn` lines about misbehaving clients.
    warns: Arc<WarnLimit>,
    /// The JSON API under /api/v1/ (menu and sessions).
    api: Arc<api::Api>,
    /// The admin's panel (`/admin/`) and `/metrics`; `None`: 404.
    panel: Option<Arc<admin::Panel>>,
    /// What the admin sees: bytes and transfers, boot files as seats' stages.
    hub: crate::telemetry::Hub,
}

impl Service {
    /// Binds `[http] port` on the server's LAN address only: the API and the boot files
    /// are for the LAN, not for whatever else the server is plugged into.
    pub async fn bind(cfg: impl Into<Live>) -> Result<Service, Error> {
        let cfg = cfg.into();
        let now = cfg.get();
        let ip = now.server_ip().unwrap_or(Ipv4Addr::UNSPECIFIED);
        let addr = SocketAddr::from((ip, now.http.port));
        Self::bind_addr(cfg, addr).await
    }

    /// Binds `addr` instead (tests use 127.0.0.1:0).
    pub async fn bind_addr(cfg: impl Into<Live>, addr: SocketAddr) -> Result<Service, Error> {
        let cfg = cfg.into();
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Bind { addr, source })?;
        let api = Arc::new(api::Api {
            cfg: cfg.clone(),
            dispatcher: None,
            leases: None,
            seats: Arc::new(api::Neighbours {
                interface: cfg.get().server.interface.clone(),
            }),
            reload: None,
            hub: Default::default(),
        });
        Ok(Service {
            cfg,
            listener,
            limit: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            per_address: crate::peers::PerAddress::default(),
            // At most a few `warn` lines per second about bad clients; the rest go to `debug`.
            warns: Arc::new(WarnLimit::new(5, Duration::from_secs(1))),
            api,
            panel: None,
            hub: Default::default(),
        })
    }

    /// Serves `api` under /api/v1/ (by default: the guest list, and no sessions), the
    /// admin's panel over it at /admin/ and /metrics, and reports to the API's hub.
    pub fn with_api(mut self, api: Arc<api::Api>) -> Service {
        self.hub = api.hub.clone();
        self.panel = Some(Arc::new(admin::Panel::new(api.clone())));
        self.api = api;
        self
    }

    /// The bound address (the real port when bound to port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown`; then stops accepting, lets running transfers finish for
    /// a few seconds and drops the rest.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let addr = self.local_addr().map_err(Error::Accept)?;
        let cfg = self.cfg.get();
        info!(
            %addr,
            root = %cfg.http.root.display(),
            sendfile = cfg.http.sendfile,
            "http serving"
        );
        if !cfg.http.root.is_dir() {
            warn!(
                root = %cfg.http.root.display(),
                "[http] root is not a folder: every /files/ request will get 404"
            );
        }
        let mut conns = JoinSet::new();
        let result = loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                p = self.limit.clone().acquire_owned() => p.expect("semaphore never closed"),
            };
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                Some(_) = conns.join_next(), if !conns.is_empty() => continue,
                a = self.listener.accept() => a,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let cfg = self.cfg.get();
                    let cap = cfg.http.max_per_address;
                    let Some(slot) = self.per_address.take(peer.ip(), cap) else {
                        if let Some(dropped) = self.warns.allow() {
                            warn!(%peer, max_per_address = cap, dropped, "http: this address holds http.max_per_address connections already; refused");
                        }
                        // Best effort, never waiting: the client learns why, and the
                        // descriptor goes at once.
                        let _ = stream.try_write(
                            b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
                        );
                        continue;
                    };
                    let conn = Conn {
                        api: self.api.clone(),
                        panel: self.panel.clone(),
                        hub: self.hub.clone(),
                        cfg,
                        peer,
                        warns: self.warns.clone(),
                        shutdown: shutdown.clone(),
                    };
                    conns.spawn(async move {
                        conn.serve(stream).await;
                        // The address's slot first: once the permit is back, the accept loop may
                        // take the next connection from this address at once.
                        drop((slot, permit));
                    });
                }
                // Out of descriptors or a connection reset before accept: transient.
                Err(e) if is_transient(&e) => {
                    warn!(error = %e, "http accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => break Err(Error::Accept(e)),
            }
        };
        let drain = async { while conns.join_next().await.is_some() {} };
        if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
            info!(
                left = conns.len(),
                "http shutdown: dropping unfinished transfers"
            );
            conns.abort_all();
        }
        info!("http stopped");
        result
    }
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    ) || e.raw_os_error().is_some_and(|n| {
        use nix::errno::Errno;
        [Errno::ENFILE, Errno::EMFILE, Errno::ENOBUFS, Errno::ENOMEM].contains(&Errno::from_raw(n))
    })
}
