//! The libvirt backend's start and end: this vdd's owner id, the connection to every
//! host with the wait for their first answers, their watchers' shutdown, and the
//! dispatcher over the hosts.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::warn;

use super::hosts::{Host, DOWN_AFTER};
use super::Libvirt;
use crate::config::Config;
use crate::dispatch::{Dispatcher, Error, LanSide};

/// This vdd's owner id, made once: `STATE_DIR/libvirt-owner`.
fn owner_id(state_dir: &Path) -> Result<String, Error> {
    let path = state_dir.join("libvirt-owner");
    if let Ok(s) = std::fs::read_to_string(&path) {
        let s = s.trim();
        if s.len() == 16 && s.chars().all(|c| c.is_ascii_hexdigit()) {
            return Ok(s.to_string());
        }
    }
    let id: String = crate::dispatch::random::<8>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    std::fs::write(&path, format!("{id}\n")).map_err(|e| Error::State(path, e))?;
    Ok(id)
}

impl Libvirt {
    /// Connects to every host and waits (up to [`DOWN_AFTER`]) for each one's first
    /// answer, so what a previous run left can be adopted. A host that does not answer
    /// yet is skipped until it does.
    pub async fn connect(cfg: &Config) -> Result<Libvirt, Error> {
        virt::error::clear_error_callback();
        let d = &cfg.dispatch;
        let owner = owner_id(&cfg.server.state_dir)?;
        let sessions = cfg.server.state_dir.join("sessions");
        let hosts: Vec<Arc<Host>> = d
            .hosts
            .iter()
            .map(|h| Host::new(h.clone(), owner.clone(), sessions.clone()))
            .collect();
        for h in &hosts {
            h.watch();
        }
        let end = Instant::now() + DOWN_AFTER;
        while Instant::now() < end
            && hosts.iter().any(|h| {
                let s = h.snapshot();
                s.at.is_none() && s.failing.is_none()
            })
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for h in &hosts {
            let s = h.snapshot();
            if s.at.is_none() {
                let why = s
                    .failing
                    .map(|f| f.1)
                    .unwrap_or_else(|| "no answer yet".into());
                warn!(host = %h.cfg.name, uri = %h.cfg.uri, "hypervisor host does not answer ({why}): no VMs go there until it does, and its VMs of a previous run are not adopted");
            }
        }
        Ok(Libvirt {
            hosts,
            owner,
            policy: d.placement,
            accel: d.accel,
            starting: Mutex::new(Vec::new()),
            deleting: Arc::new(Mutex::new(Vec::new())),
        })
    }
}

impl Drop for Libvirt {
    fn drop(&mut self) {
        for h in &self.hosts {
            h.shutdown();
        }
    }
}

impl Dispatcher<Libvirt> {
    /// A dispatcher whose VMs run on the `[[dispatch.host]]` hosts; adopts what a previous
    /// run left on them.
    pub async fn on_hosts(
        cfg: impl Into<crate::config::Live>,
        lan: Option<LanSide>,
    ) -> Result<Arc<Dispatcher<Libvirt>>, Error> {
        let cfg = cfg.into();
        let backend = Libvirt::connect(&cfg.get()).await?;
        Dispatcher::with_backend(cfg, lan, backend).await
    }
}
