//! The NBD service: serves the configured exports (read-only files, or per-client
//! copy-on-write overlays) to network-booted clients over TCP.
//!
//! Spec: NetworkBlockDevice/nbd `doc/proto.md` (fixed newstyle negotiation, simple and
//! structured replies). Layers: [`codec`] (bytes), [`policy`] (pure decisions),
//! [`export`] (file backends), [`session`] (the tokio driver of one connection); this file
//! is the accept loop.

pub mod codec;
pub mod export;
pub mod policy;
pub mod session;
pub mod transmit;

use crate::warnlimit::WarnLimit;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Live;

/// Why the nbd service could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The listening socket could not be bound.
    #[error("cannot listen on {addr}")]
    BindSocket {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Payload bytes in flight over all connections, in KiB: 1 GiB. With the per-connection
/// cap of 64 MiB this is what bounds memory for a classroom of clients.
const TOTAL_BYTES_KIB: usize = 1 << 20;

/// The nbd service with its socket bound.
pub struct Service {
    listener: TcpListener,
    /// Caps connections (`nbd.max_connections`); a connection holds a permit for its life,
    /// and the accept loop waits for one before accepting, so excess clients queue in the
    /// kernel's backlog instead of costing memory here.
    limit: Arc<Semaphore>,
    max: usize,
    per_address: crate::peers::PerAddress,
    /// The running config, for `nbd.max_per_address` (live) and the exports.
    cfg: Live,
    shared: Arc<session::Shared>,
}

impl Service {
    /// Binds `nbd.port` on the server's LAN address (all addresses when none is known).
    pub async fn bind(cfg: impl Into<Live>) -> Result<Service, Error> {
        let cfg = cfg.into();
        let ip = cfg
            .get()
            .server_ip()
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), IpAddr::V4);
        let addr = SocketAddr::new(ip, cfg.get().nbd.port);
        Self::bind_addr(cfg, addr).await
    }

    /// Binds an explicit address (tests use 127.0.0.1:0).
    pub async fn bind_addr(cfg: impl Into<Live>, addr: SocketAddr) -> Result<Service, Error> {
        let cfg: Live = cfg.into();
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| Error::BindSocket { addr, source })?;
        let max = cfg.get().nbd.max_connections;
        Ok(Service {
            listener,
            limit: Arc::new(Semaphore::new(max)),
            max,
            per_address: crate::peers::PerAddress::default(),
            cfg: cfg.clone(),
            shared: Arc::new(session::Shared {
                exports: Arc::new(export::Exports::new(cfg.clone())),
                bytes: Arc::new(Semaphore::new(TOTAL_BYTES_KIB)),
                // At most a few warnings per second for misbehaving clients.
                warn: WarnLimit::new(10, Duration::from_secs(1)),
                hub: Default::default(),
            }),
        })
    }

    /// Reports connections and bytes to `hub` (the admin's panel and metrics). Before
    /// `run`, while nothing else holds the shared state.
    pub fn with_hub(mut self, hub: crate::telemetry::Hub) -> Service {
        if let Some(s) = Arc::get_mut(&mut self.shared) {
            s.hub = hub;
        }
        self
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Accepts until `shutdown`, then gives open connections a few seconds to finish
    /// what they were doing.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        info!(addr = %self.local_addr(), max_connections = self.max, "nbd listening");
        loop {
            let permit = tokio::select! {
                p = self.limit.clone().acquire_owned() => p.expect("never closed"),
                _ = shutdown.cancelled() => break,
            };
            let (stream, peer) = tokio::select! {
                r = self.listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn!("nbd accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = shutdown.cancelled() => break,
            };
            let cap = self.cfg.get().nbd.max_per_address;
            let Some(slot) = self.per_address.take(peer.ip(), cap) else {
                if let Some(dropped) = self.shared.warn.allow() {
                    warn!(dropped, %peer, max_per_address = cap, "nbd: this address holds nbd.max_per_address connections already; closed");
                }
                continue;
            };
            let (shared, token) = (self.shared.clone(), shutdown.clone());
            tokio::spawn(async move {
                session::serve(stream, peer, shared, token).await;
                // The address's slot first: once the permit is back, the accept loop may
                // take the next connection from this address at once.
                drop((slot, permit));
            });
        }
        let all = self.max.min(u32::MAX as usize) as u32;
        if tokio::time::timeout(Duration::from_secs(5), self.limit.acquire_many(all))
            .await
            .is_err()
        {
            warn!("nbd: connections still open at shutdown");
        }
        Ok(())
    }
}
