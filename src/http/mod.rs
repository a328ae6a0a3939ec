//! The http service (being written; see its issue).

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// Why the http service could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not written yet.
    #[error("the http service is not built yet")]
    NotBuilt,
}

/// The http service with its sockets bound.
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

pub mod api;
