//! The seam between the HTTP API and the dispatcher: what the API asks, as a trait object
//! a test can fill with a fake (tests/api_paths.rs).

use serde::Serialize;

use super::backend::{Screen, VmUsage};
use super::saved::SavedInfo;
use super::{Backend, Dispatcher, Error, ScreenSize, SessionInfo, Who};
use crate::config::Mac;

/// A boxed future of the [`Sessions`] interface.
pub type Pending<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// What the HTTP API asks of the dispatcher: the seam between the two. [`Dispatcher`]
/// is the real one; the API's tests fill it with a fake, so every refusal of the API is
/// tested without QEMU (tests/api_paths.rs). Boxed futures, so it works as a trait object.
pub trait Sessions: Send + Sync {
    /// Whether `mac` is the NIC of one of our guests (an X11 guest on the LAN).
    fn is_guest_mac(&self, mac: Mac) -> Pending<'_, bool>;
    /// Running sessions (without passwords or keys), of one seat or all.
    fn list(&self, seat: Option<Mac>) -> Pending<'_, Vec<SessionInfo>>;
    /// [`Dispatcher::create_at`]: `screen` is the seat's monitor, if it said.
    fn create<'a>(
        &'a self,
        seat: Mac,
        guest: &'a str,
        screen: Option<ScreenSize>,
        who: Who<'a>,
    ) -> Pending<'a, Result<SessionInfo, Error>>;
    fn get<'a>(&'a self, id: &'a str, who: Who<'a>) -> Pending<'a, Result<SessionInfo, Error>>;
    fn end<'a>(&'a self, id: &'a str, who: Who<'a>) -> Pending<'a, Result<(), Error>>;
    fn password<'a>(&'a self, id: &'a str, who: Who<'a>)
        -> Pending<'a, Result<SessionInfo, Error>>;
    fn reset<'a>(&'a self, id: &'a str, who: Who<'a>) -> Pending<'a, Result<SessionInfo, Error>>;
    /// What runs now, for the admin's summary.
    fn usage(&self) -> Pending<'_, Usage>;
    /// Sessions that failed in the last [`super::FAILED_KEPT`], with their error.
    fn failed(&self) -> Pending<'_, Vec<SessionInfo>> {
        Box::pin(async { Vec::new() })
    }
    /// The screen of a session's VM (the admin's panel).
    fn screenshot<'a>(&'a self, id: &'a str) -> Pending<'a, Result<Screen, Error>> {
        Box::pin(async move { Err(Error::NotFound(id.to_string())) })
    }
    /// CPU time and memory of every running session's VM, by session id.
    fn vm_usage(&self) -> Pending<'_, Vec<(String, VmUsage)>> {
        Box::pin(async { Vec::new() })
    }
}

/// The dispatcher's load, for `GET /api/v1/status`.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Usage {
    /// Running sessions (VMs), and VMs still starting.
    pub vms: usize,
    pub starting: usize,
    /// Seats with at least one session.
    pub seats: usize,
    pub memory_mib: u64,
    pub memory_budget_mib: u64,
    pub max_vms: usize,
    /// Of `vms`, warm VMs waiting for a pick (counted in `memory_mib` too), and of those
    /// the ones whose guest is up (its screen settled, or its display manager answered).
    pub warm: usize,
    pub warm_up: usize,
    /// Per guest, how its sessions' VMs started.
    pub starts: std::collections::BTreeMap<String, Counts>,
    /// The saved states, with what each costs on disk.
    pub saved: Vec<SavedInfo>,
    /// The hypervisor hosts (`[[dispatch.host]]`), when the VMs run on them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<super::backend::HostStatus>,
}

/// How one guest's VMs started since vdd did.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Counts {
    /// Picks that found a warm VM, and picks of a guest with `warm` that did not.
    pub warm_hits: u64,
    pub warm_misses: u64,
    /// VMs (seats' and warm ones) resumed from a saved state, and booted.
    pub saved_starts: u64,
    pub boots: u64,
    /// Saved states that were missing or did not load (a cold boot instead).
    pub saved_fallbacks: u64,
}

impl<B: Backend> Sessions for Dispatcher<B> {
    fn is_guest_mac(&self, mac: Mac) -> Pending<'_, bool> {
        Box::pin(Dispatcher::<B>::is_guest_mac(self, mac))
    }
    fn list(&self, seat: Option<Mac>) -> Pending<'_, Vec<SessionInfo>> {
        Box::pin(Dispatcher::<B>::list(self, seat))
    }
    fn create<'a>(
        &'a self,
        seat: Mac,
        guest: &'a str,
        screen: Option<ScreenSize>,
        who: Who<'a>,
    ) -> Pending<'a, Result<SessionInfo, Error>> {
        Box::pin(Dispatcher::<B>::create_at(self, seat, guest, who, screen))
    }
    fn get<'a>(&'a self, id: &'a str, who: Who<'a>) -> Pending<'a, Result<SessionInfo, Error>> {
        Box::pin(Dispatcher::<B>::get(self, id, who))
    }
    fn end<'a>(&'a self, id: &'a str, who: Who<'a>) -> Pending<'a, Result<(), Error>> {
        Box::pin(Dispatcher::<B>::end(self, id, who))
    }
    fn password<'a>(
        &'a self,
        id: &'a str,
        who: Who<'a>,
    ) -> Pending<'a, Result<SessionInfo, Error>> {
        Box::pin(Dispatcher::<B>::password(self, id, who))
    }
    fn reset<'a>(&'a self, id: &'a str, who: Who<'a>) -> Pending<'a, Result<SessionInfo, Error>> {
        Box::pin(Dispatcher::<B>::reset(self, id, who))
    }
    fn failed(&self) -> Pending<'_, Vec<SessionInfo>> {
        Box::pin(Dispatcher::<B>::failed_sessions(self))
    }
    fn screenshot<'a>(&'a self, id: &'a str) -> Pending<'a, Result<Screen, Error>> {
        Box::pin(Dispatcher::<B>::screenshot(self, id))
    }
    fn vm_usage(&self) -> Pending<'_, Vec<(String, VmUsage)>> {
        Box::pin(Dispatcher::<B>::vm_usage(self))
    }
    fn usage(&self) -> Pending<'_, Usage> {
        Box::pin(async move {
            let st = self.state.lock().await;
            let mut seats: Vec<Mac> = st
                .sessions
                .values()
                .filter(|s| !s.rec.warm)
                .map(|s| s.rec.seat)
                .collect();
            seats.sort_by_key(|m| m.0);
            seats.dedup();
            Usage {
                vms: st.sessions.len(),
                starting: st.pending_vms + st.bg_pending_vms,
                seats: seats.len(),
                memory_mib: st.sessions.values().map(|s| s.rec.memory_mib).sum::<u64>()
                    + st.pending_mib
                    + st.bg_pending_mib,
                memory_budget_mib: self.budget_mib(),
                max_vms: self.cfg().dispatch.max_vms,
                warm: st.sessions.values().filter(|s| s.rec.warm).count(),
                warm_up: st
                    .sessions
                    .values()
                    .filter(|s| s.rec.warm && s.state == super::SessionState::Ready)
                    .count(),
                starts: st.counts.clone(),
                saved: super::saved::infos(&st.saved),
                hosts: self.backend.hosts(),
            }
        })
    }
}
