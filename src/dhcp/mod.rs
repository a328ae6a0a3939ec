//! The DHCP service (RFC 2131, RFC 2132; PXE per RFC 4578 and PXE 2.1): a full server
//! with a durable lease journal, or a proxyDHCP server that only gives boot information.
//!
//! Three layers, as everywhere in vdd: [`codec`] (bytes <-> checked messages, on
//! `dhcproto`), [`policy`] (pure decisions), [`leases`] (the table and its journal) and
//! [`driver`] (sockets, the group-commit writer, logging).

pub mod arp;
pub mod codec;
pub mod driver;
pub mod leases;
pub mod policy;

use std::time::{SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

use crate::config::{Config, Live};

/// Why the dhcp service could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server address or subnet is unknown (config not bound to the interface).
    #[error("no server address and subnet for interface {0}; set server.address or give the interface one")]
    NoAddress(String),
    /// A listening socket could not be set up.
    #[error("cannot bind UDP port {port} on {interface}")]
    BindSocket {
        port: u16,
        interface: String,
        #[source]
        source: std::io::Error,
    },
    /// The lease journal could not be opened or replayed.
    #[error("opening the lease store")]
    Leases(#[from] leases::LeaseError),
    /// Receiving failed for a reason other than a bad packet.
    #[error("receiving on the DHCP socket")]
    Recv(#[source] std::io::Error),
    /// The journal writer stopped (the disk failed); no ACK can be made durable.
    #[error("the lease journal writer stopped")]
    WriterGone,
}

/// The dhcp service with its sockets bound and its leases replayed.
pub struct Service {
    driver: driver::Driver,
    leases: Leases,
}

/// Why an address could not be reserved for a guest.
#[derive(Debug, thiserror::Error)]
pub enum ReserveError {
    /// The pool is full, or this server hands out no addresses.
    #[error("{0}")]
    Refused(&'static str),
    #[error("the DHCP service is not running")]
    Stopped,
}

/// A request of the dispatcher to the DHCP driver, which alone owns the lease table.
pub(crate) enum LeaseCmd {
    Reserve {
        mac: crate::config::Mac,
        want: Option<std::net::Ipv4Addr>,
        reply: tokio::sync::oneshot::Sender<Result<std::net::Ipv4Addr, &'static str>>,
    },
    Release {
        mac: crate::config::Mac,
        ip: std::net::Ipv4Addr,
    },
    /// Leases active now, for `GET /api/v1/status`.
    Count {
        reply: tokio::sync::oneshot::Sender<usize>,
    },
}

/// The dispatcher's way into the lease table: it binds an address to a guest VM's MAC
/// before the VM starts (so vdd knows where the guest will be) and frees it when the
/// session ends. The table stays owned by the driver's task (no lock on the DHCP path);
/// these requests are served there between packets and journaled like any lease.
#[derive(Clone, Debug)]
pub struct Leases {
    tx: tokio::sync::mpsc::UnboundedSender<LeaseCmd>,
}

impl Leases {
    /// Binds a pool address to `mac` (`want`, if still free for it) and returns it.
    pub async fn reserve(
        &self,
        mac: crate::config::Mac,
        want: Option<std::net::Ipv4Addr>,
    ) -> Result<std::net::Ipv4Addr, ReserveError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(LeaseCmd::Reserve { mac, want, reply })
            .map_err(|_| ReserveError::Stopped)?;
        rx.await
            .map_err(|_| ReserveError::Stopped)?
            .map_err(ReserveError::Refused)
    }

    /// How many leases are active now (`None`: the DHCP service is not running).
    pub async fn active(&self) -> Option<usize> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.tx.send(LeaseCmd::Count { reply }).ok()?;
        rx.await.ok()
    }

    /// Frees the lease of `mac` on `ip` (a no-op if it is no longer theirs).
    pub fn release(&self, mac: crate::config::Mac, ip: std::net::Ipv4Addr) {
        let _ = self.tx.send(LeaseCmd::Release { mac, ip });
    }
}

impl Service {
    /// Binds port 67 (and 4011 in proxy mode) on the configured interface and replays the
    /// lease journal, so a busy port or unreadable state stops `vdd serve` at start.
    pub async fn bind(cfg: impl Into<Live>) -> Result<Service, Error> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        Ok(Service {
            driver: driver::Driver::bind(cfg.into(), rx)?,
            leases: Leases { tx },
        })
    }

    /// Reports packets and seats' boot stages to `hub` (the admin's panel and metrics).
    pub fn with_hub(mut self, hub: crate::telemetry::Hub) -> Service {
        self.driver.hub = hub;
        self
    }

    /// The handle the dispatcher reserves guest addresses through.
    pub fn leases(&self) -> Leases {
        self.leases.clone()
    }

    /// Serves until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        self.driver.run(shutdown).await
    }
}

/// Unix seconds now; leases use wall time so expiry survives a restart.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Prints the lease table kept in the state directory.
pub fn print_leases(cfg: &Config, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    let t = leases::read_table(&cfg.server.state_dir).map_err(std::io::Error::other)?;
    let now = unix_now();
    let all = t.all();
    if all.is_empty() {
        return writeln!(
            out,
            "no leases in {}",
            cfg.server.state_dir.join(leases::JOURNAL).display()
        );
    }
    writeln!(
        out,
        "{:<16} {:<18} {:<9} expires",
        "address", "mac", "state"
    )?;
    for l in all {
        let mac = l.mac.map_or("-".to_string(), |m| m.to_string());
        let (state, left) = match l.state {
            leases::State::Declined if l.active(now) => ("declined", l.until - now),
            leases::State::Declined => continue,
            _ if l.active(now) => ("bound", l.until - now),
            _ => ("expired", 0),
        };
        let when = if left == 0 {
            "-".to_string()
        } else {
            format!(
                "in {}",
                humantime::format_duration(std::time::Duration::from_secs(left))
            )
        };
        writeln!(
            out,
            "{:<16} {:<18} {:<9} {when}",
            l.ip.to_string(),
            mac,
            state
        )?;
    }
    Ok(())
}
