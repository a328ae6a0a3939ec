//! The configured exports as connections open them: which file an export name means, the
//! live overlays shared by a client's connections (one per export and client address), and
//! the lease whose last drop discards or saves an overlay. Also the [`Catalog`] the
//! negotiation asks for names and sizes.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::config::{self, ExportMode};
use crate::nbd::policy::{Catalog, ExportInfo};

use super::{Backend, Base, Error, Overlay};

/// The configured exports and the live overlays, shared by every connection.
pub struct Exports {
    /// The running config's `[[nbd.export]]`s: a reload changes what new connections
    /// open; an open connection keeps the file it opened (a replaced image file is served
    /// to new connections only).
    cfg: config::Live,
    /// Fixed at start (a reload leaves `server.state_dir`).
    state_dir: PathBuf,
    /// (export, client address) -> the overlay and how many connections use it.
    overlays: Mutex<HashMap<OverlayKey, (Arc<Overlay>, usize)>>,
}

/// An overlay's identity: export name and client address.
type OverlayKey = (String, IpAddr);

/// A connection's hold on a backend; the last lease of an overlay discards (or saves) it.
pub struct Lease {
    pub backend: Backend,
    key: Option<OverlayKey>,
    exports: Arc<Exports>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(key) = self.key.take() else { return };
        let mut map = self
            .exports
            .overlays
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let last = match map.get_mut(&key) {
            Some((_, n)) => {
                *n -= 1;
                *n == 0
            }
            None => false,
        };
        if last {
            // Finished under the lock, so a client reconnecting right now waits and then
            // gets a fresh overlay instead of one whose file is being deleted.
            if let Some((o, _)) = map.remove(&key) {
                if let Err(e) = o.finish() {
                    tracing::error!(export = %key.0, ip = %key.1, file = %o.path.display(), "overlay not finished: {e}");
                } else {
                    tracing::debug!(export = %key.0, ip = %key.1, kept = o.persist, "overlay closed");
                }
            }
        }
    }
}

/// File-name-safe form of an export name (names come from the admin, but one with a `/`
/// must not reach outside the state directory).
fn safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect::<String>()
        .trim_start_matches('.')
        .to_string()
}

impl Exports {
    pub fn new(cfg: impl Into<config::Live>) -> Exports {
        let cfg = cfg.into();
        Exports {
            state_dir: cfg.get().server.state_dir.clone(),
            cfg,
            overlays: Mutex::new(HashMap::new()),
        }
    }

    fn find(&self, name: &str) -> Option<config::Export> {
        self.cfg
            .get()
            .nbd
            .exports
            .iter()
            .find(|e| e.name == name)
            .cloned()
    }

    /// Where the overlay of `ip` on `export` lives.
    pub fn overlay_path(&self, export: &str, ip: IpAddr) -> PathBuf {
        self.state_dir
            .join("nbd")
            .join(safe(export))
            .join(format!("{ip}.overlay"))
    }

    /// Opens an export for one connection from `ip` (the overlay identity).
    pub fn open(self: &Arc<Self>, name: &str, ip: IpAddr) -> Result<Lease, Error> {
        let e = self
            .find(name)
            .ok_or_else(|| Error::Unknown(name.to_string()))?;
        if e.mode == ExportMode::ReadOnly {
            return Ok(Lease {
                backend: Backend::ReadOnly(Arc::new(Base::open(&e.path)?)),
                key: None,
                exports: self.clone(),
            });
        }
        let ip = ip.to_canonical();
        let key = (e.name.clone(), ip);
        let mut map = self.overlays.lock().unwrap_or_else(|p| p.into_inner());
        let overlay = match map.get_mut(&key) {
            Some((o, n)) => {
                *n += 1;
                o.clone()
            }
            None => {
                let base = Arc::new(Base::open(&e.path)?);
                let o = Arc::new(Overlay::open(base, self.overlay_path(name, ip), e.persist)?);
                map.insert(key.clone(), (o.clone(), 1));
                o
            }
        };
        Ok(Lease {
            backend: Backend::Overlay(overlay),
            key: Some(key),
            exports: self.clone(),
        })
    }
}

impl Catalog for Exports {
    fn list(&self) -> Vec<(String, String)> {
        // An export whose file is missing is not offered: clients such as `nbdinfo
        // --list` would fail on it (info() logs why).
        self.cfg
            .get()
            .nbd
            .exports
            .iter()
            .filter(|e| self.info(&e.name).is_some())
            .map(|e| (e.name.clone(), e.description.clone()))
            .collect()
    }

    fn info(&self, name: &str) -> Option<ExportInfo> {
        let e = self.find(name)?;
        let size = match std::fs::metadata(&e.path) {
            Ok(m) => m.len(),
            Err(err) => {
                tracing::error!(export = %name, file = %e.path.display(), "export file unusable: {err}");
                return None;
            }
        };
        Some(ExportInfo {
            name: e.name.clone(),
            description: e.description.clone(),
            size,
            read_only: e.mode == ExportMode::ReadOnly,
        })
    }
}
