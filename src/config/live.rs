//! The running config, replaced whole by a reload (`systemctl reload vdd`, SIGHUP,
//! `vdd reload`). Every service keeps a [`Live`] and takes the current [`Config`] when a
//! request starts (a DHCP packet, a TFTP transfer, an HTTP connection, an NBD handshake,
//! a pick), and uses that one to its end: a request never sees half of two configs.

use std::sync::Arc;

use arc_swap::ArcSwap;

use super::Config;

/// A handle on the running config; clones share it.
#[derive(Clone)]
pub struct Live(Arc<ArcSwap<Config>>);

impl Live {
    pub fn new(cfg: Arc<Config>) -> Live {
        Live(Arc::new(ArcSwap::new(cfg)))
    }

    /// The config now.
    pub fn get(&self) -> Arc<Config> {
        self.0.load_full()
    }

    /// Makes `cfg` the running config (a reload; see `src/reload.rs`).
    pub fn set(&self, cfg: Arc<Config>) {
        self.0.store(cfg);
    }
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Live").field(&self.get().path).finish()
    }
}

impl From<Arc<Config>> for Live {
    fn from(cfg: Arc<Config>) -> Live {
        Live::new(cfg)
    }
}

impl From<Config> for Live {
    fn from(cfg: Config) -> Live {
        Live::new(Arc::new(cfg))
    }
}
