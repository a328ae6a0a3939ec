//! Where the libvirt backend puts a new VM, as it sees its hosts: each host's view for
//! placement (VMs still starting counted), the host of a seat's kept disk and the note
//! that names it, and the wait for an overlay volume still being deleted.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{Libvirt, Starting};
use crate::dispatch::placement::HostView;
use crate::dispatch::Error;

impl Libvirt {
    /// Each host as placement sees it, VMs still starting included.
    pub(super) fn views(&self, starting: &mut Vec<Starting>) -> Vec<(HostView<'_>, bool)> {
        let now = Instant::now();
        let snaps: Vec<_> = self.hosts.iter().map(|h| h.snapshot()).collect();
        // A start counts here until an answer of its host that began after it returned:
        // that answer shows its domain (then it counts there) or not (it is gone).
        starting.retain(|s| match s.done {
            None => true,
            Some(t) => snaps[s.host].at.is_none_or(|a| a <= t),
        });
        self.hosts
            .iter()
            .zip(&snaps)
            .enumerate()
            .map(|(i, (h, s))| {
                let ours = s
                    .domains
                    .values()
                    .filter(|d| d.meta.as_ref().is_some_and(|m| m.owner == self.owner));
                let (mut mib, mut cpus) = ours.fold((0, 0), |(m, c), d| (m + d.mib, c + d.cpus));
                let mut pending = 0;
                for st in starting.iter().filter(|st| st.host == i) {
                    if !s.domains.contains_key(&st.domain) {
                        mib += st.mib;
                        cpus += st.cpus;
                        pending += st.mib;
                    }
                }
                let view = HostView {
                    name: &h.cfg.name,
                    up: s.up(now),
                    limit_mib: h.cfg.memory_mib,
                    limit_cpus: h.cfg.cpus,
                    placed_mib: mib,
                    placed_cpus: cpus,
                    total_mib: s.total_mib,
                    free_mib: s.free_mib.saturating_sub(pending),
                    cpu_busy: s.cpu_busy,
                    bridge: h.cfg.bridge.is_some(),
                };
                (view, s.kvm)
            })
            .collect()
    }

    /// The host a seat's kept disk is on, from the note beside its overlay path.
    pub(super) fn kept_on(&self, overlay: &Path) -> Result<Option<usize>, Error> {
        let Ok(name) = std::fs::read_to_string(marker(overlay)) else {
            return Ok(None);
        };
        let name = name.trim();
        match self.host_index(name) {
            Some(i) => Ok(Some(i)),
            None => Err(Error::Full(format!(
                "this seat's kept disk is on hypervisor host {name}, which is no longer in [[dispatch.host]]"
            ))),
        }
    }

    pub(super) async fn wait_deleted(&self, host: usize, volume: &str) {
        let end = Instant::now() + Duration::from_secs(30);
        while Instant::now() < end
            && self
                .deleting
                .lock()
                .expect("deleting lock")
                .iter()
                .any(|(h, v)| *h == host && v == volume)
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Where the name of the host of a seat's kept disk is noted.
pub(super) fn marker(overlay: &Path) -> PathBuf {
    let mut m = overlay.as_os_str().to_owned();
    m.push(".host");
    PathBuf::from(m)
}
