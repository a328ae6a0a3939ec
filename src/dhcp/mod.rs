//! The dhcp service (being written; see its issue).

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// Why the dhcp service could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not written yet.
    #[error("the dhcp service is not built yet")]
    NotBuilt,
}

/// The dhcp service with its sockets bound.
pub struct Service {
    _cfg: Arc<Config>,
}

impl Service {
    pub async fn bind(cfg: Arc<Config>) -> Result<Service, Error> {
        let _ = cfg;
        Err(Error::NotBuilt)
    }

    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        shutdown.cancelled().await;
        Ok(())
    }
}

/// Prints the lease table kept in the state directory.
pub fn print_leases(cfg: &Config, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    writeln!(out, "no leases yet in {}", cfg.server.state_dir.display())
}
