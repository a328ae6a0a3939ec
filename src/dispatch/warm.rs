//! Warm pools (`[[guest]] warm = N`): N VMs of a guest booted ahead of the picks, each on
//! a fresh overlay, assigned to nobody. A pick takes one (`start.rs`: a VNC guest's display
//! gets the seat's one-time password then; an X11 guest's is bound to the seat with its
//! address and display manager already up) and the pool refills in the background.
//!
//! A warm VM is a session without a seat (`Record::warm`): it counts against
//! `dispatch.max_vms` and the memory budget like any VM, is adopted after a crash like
//! any, but no seat sees it, and it gives way: when a seat's VM would not fit, warm VMs
//! are stopped first. A warm VM starts only when it fits beside the running VMs *and* the
//! starts in flight; one that comes up over the limits (a seat's start overtook it) stops
//! at once. Its record keeps the [`fingerprint`](super::saved::fingerprint) it was booted
//! for; when the guest's base image or the seats' screen changes, the pool is rebuilt.
//!
//! The maintenance pass runs after every pick and every few seconds: first the saved
//! states that are missing (`saved.rs`), then stale warm VMs out, then one new warm VM at
//! a time (each is a boot, and boots share the server's CPUs with the seats' guests).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tracing::{info, warn};

use super::saved::{
    fingerprint, settled, Fingerprint, IDLE_CPU, SAMPLE_EVERY, SETTLE, SETTLE_LIMIT,
};
use super::start::{Plan, Priority};
use super::*;
use crate::config::{Guest, Start};

/// The screen `guest`'s warm VMs and saved state are made for: the one its seats asked
/// for last, else its `screen` in the config.
pub(super) fn wanted_screen<B: Backend>(
    st: &State<B>,
    guest: &Guest,
) -> Option<screen::ScreenSize> {
    st.screens.get(&guest.name).copied().or(guest
        .screen
        .map(|(width, height)| screen::ScreenSize { width, height }))
}

impl<B: Backend> Dispatcher<B> {
    /// The fingerprint of `guest` at `screen` on this dispatcher's backend.
    pub(super) fn fingerprint(
        &self,
        guest: &Guest,
        screen: Option<screen::ScreenSize>,
    ) -> Fingerprint {
        fingerprint(guest, screen, &self.backend.state_tag())
    }

    /// The warm VM of `guest` booted for `digest` that is furthest along: one that is up
    /// before one still booting, then the oldest.
    pub(super) fn take_warm(&self, st: &State<B>, guest: &str, digest: &str) -> Option<String> {
        st.sessions
            .values()
            .filter(|s| s.rec.warm && s.rec.guest == guest && s.rec.fingerprint == digest)
            .min_by_key(|s| (s.state != SessionState::Ready, s.rec.started))
            .map(|s| s.rec.id.clone())
    }

    /// A warm VM to stop so that a seat's VM of `guest` fits: another guest's before one
    /// of `guest` (which would have been taken, had it been of the pick's screen), and of
    /// those the one least far along.
    pub(super) fn evict_warm(&self, st: &mut State<B>, guest: &str) -> Option<Session<B>> {
        let id = st
            .sessions
            .values()
            .filter(|s| s.rec.warm)
            .max_by_key(|s| {
                (
                    s.rec.guest != guest,
                    s.state != SessionState::Ready,
                    s.rec.started,
                )
            })
            .map(|s| s.rec.id.clone())?;
        st.sessions.remove(&id)
    }

    /// Stops VMs nobody uses (warm VMs that give way) in the background, at once: they
    /// hold no one's data.
    pub(super) fn stop_now(&self, vms: Vec<Session<B>>, why: &'static str) {
        if vms.is_empty() {
            return;
        }
        let me = self.me.upgrade().expect("a dispatcher in use is alive");
        tokio::spawn(async move {
            for mut s in vms {
                if let Some(p) = s.probe.take() {
                    p.abort();
                }
                me.backend.stop(&mut s.vm, std::time::Duration::ZERO).await;
                me.cleanup(&s.rec);
                info!(session = %s.rec.id, guest = %s.rec.guest, "warm VM {why}");
            }
        });
    }

    /// Starts a maintenance pass unless one runs.
    pub(super) fn kick(&self) {
        // Also with no such guest left: a reload may have taken the warm VMs' guest away.
        let needed = self
            .cfg()
            .guests
            .iter()
            .any(|g| g.warm > 0 || g.start == Start::Saved)
            || self
                .state
                .try_lock()
                .map_or(true, |st| st.sessions.values().any(|s| s.rec.warm));
        if !needed || self.maintaining.swap(true, Ordering::SeqCst) {
            return;
        }
        let me = self.me.upgrade().expect("a dispatcher in use is alive");
        tokio::spawn(async move {
            me.maintain().await;
            me.maintaining.store(false, Ordering::SeqCst);
        });
    }

    /// Saved states first, then the warm pools, until they are full or the server is.
    async fn maintain(self: &Arc<Self>) {
        let cfg = self.cfg();
        for g in &cfg.guests {
            if g.start == Start::Saved && !self.state.lock().await.closing {
                let screen = wanted_screen(&*self.state.lock().await, g);
                self.ensure_saved(g, screen).await;
            }
        }
        loop {
            let (stale, wanted) = {
                let mut st = self.state.lock().await;
                if st.closing {
                    return;
                }
                let mut stale = Vec::new();
                let mut wanted = None;
                // Warm VMs past their guest's `warm` (a reload lowered it, or removed the
                // guest): the newest go, the oldest are furthest along.
                let mut warm: Vec<(String, String, u64)> = st
                    .sessions
                    .values()
                    .filter(|s| s.rec.warm)
                    .map(|s| (s.rec.id.clone(), s.rec.guest.clone(), s.rec.started))
                    .collect();
                warm.sort_by_key(|w| w.2);
                let mut kept: std::collections::BTreeMap<String, usize> = Default::default();
                for (id, guest, _) in warm {
                    let keep = cfg
                        .guests
                        .iter()
                        .find(|g| g.name == guest)
                        .map_or(0, |g| g.warm);
                    let n = kept.entry(guest).or_default();
                    *n += 1;
                    if *n > keep {
                        stale.extend(st.sessions.remove(&id));
                    }
                }
                for g in cfg.guests.iter().filter(|g| g.warm > 0) {
                    let screen = wanted_screen(&st, g);
                    let fp = self.fingerprint(g, screen);
                    let old: Vec<String> = st
                        .sessions
                        .values()
                        .filter(|s| {
                            s.rec.warm && s.rec.guest == g.name && s.rec.fingerprint != fp.digest
                        })
                        .map(|s| s.rec.id.clone())
                        .collect();
                    for id in old {
                        stale.extend(st.sessions.remove(&id));
                    }
                    let have = st
                        .sessions
                        .values()
                        .filter(|s| s.rec.warm && s.rec.guest == g.name)
                        .count();
                    let backoff = st
                        .warm_failed
                        .get(&g.name)
                        .is_some_and(|t| t.elapsed() < saved::BACKOFF);
                    if have < g.warm && wanted.is_none() && !backoff {
                        wanted = Some((g.clone(), screen, fp));
                    }
                }
                (stale, wanted)
            };
            for s in &stale {
                info!(session = %s.rec.id, guest = %s.rec.guest, "warm VM out of date (the guest's image, settings, `warm` or seats' screen changed)");
            }
            self.stop_now(stale, "stopped (out of date)");
            let Some((g, screen, fp)) = wanted else {
                return;
            };
            match self.start_warm(&g, screen, &fp).await {
                Ok(()) => {}
                // The server is full: the next pass tries again.
                Err(Error::Full(_)) => return,
                Err(e) => {
                    warn!(guest = %g.name, "starting a warm VM failed ({}); trying again in {:?}", report(&e), saved::BACKOFF);
                    self.state
                        .lock()
                        .await
                        .warm_failed
                        .insert(g.name.clone(), Instant::now());
                }
            }
        }
    }

    /// One more warm VM of `guest`.
    async fn start_warm(
        self: &Arc<Self>,
        guest: &Guest,
        screen: Option<screen::ScreenSize>,
        fp: &Fingerprint,
    ) -> Result<(), Error> {
        let port = self.reserve(guest, Priority::Background).await?;
        let id: String = random::<6>().iter().map(|b| format!("{b:02x}")).collect();
        let plan = Plan {
            warm: true,
            screen,
            fingerprint: fp.digest.clone(),
        };
        let t0 = Instant::now();
        let r = self
            .start_vm(&id, Mac([0; 6]), guest, port, String::new(), &plan)
            .await;
        self.unreserve(guest, port, Priority::Background).await;
        let (mut s, _) = r?;
        let mut st = self.state.lock().await;
        st.warm_failed.remove(&guest.name);
        // A seat's start overtook this one, or vdd is stopping: it gives way at once.
        let over = st.sessions.len() + st.pending_vms >= self.cfg().dispatch.max_vms
            || st.sessions.values().map(|s| s.rec.memory_mib).sum::<u64>()
                + st.pending_mib
                + guest.memory_mib
                > self.budget_mib();
        if st.closing || over {
            drop(st);
            self.stop_now(vec![s], "stopped: it gave way to a seat");
            return Err(Error::Full("no room for a warm VM".into()));
        }
        s.probe = Some(match &s.rec.x11 {
            Some(x) => self.spawn_probe(&id, x.ip, t0),
            None => self.spawn_settle(&id, t0),
        });
        info!(session = %id, guest = %guest.name, start = s.rec.how.as_str(), screen = ?screen, "warm VM started");
        st.sessions.insert(id, s);
        Ok(())
    }

    /// Watches a warm VNC VM until its guest is up (`saved::settled`), then marks it
    /// ready: a pick prefers it, and the log says how long a refill takes.
    fn spawn_settle(self: &Arc<Self>, id: &str, t0: Instant) -> tokio::task::AbortHandle {
        let me = self.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            let mut samples = Vec::new();
            while t0.elapsed() < SETTLE_LIMIT {
                tokio::time::sleep(SAMPLE_EVERY).await;
                let (control, cpus) = {
                    let st = me.state.lock().await;
                    let Some(s) = st.sessions.get(&id).filter(|s| s.rec.warm) else {
                        return;
                    };
                    let cpus = me
                        .cfg()
                        .guests
                        .iter()
                        .find(|g| g.name == s.rec.guest)
                        .map_or(1, |g| g.cpus);
                    (me.backend.control(&s.vm), cpus)
                };
                if let Some(a) = me.backend.activity(control).await {
                    samples.push((t0.elapsed(), a));
                    if samples.len() > 64 {
                        samples.drain(..32);
                    }
                    if settled(&samples, SETTLE, cpus, IDLE_CPU) {
                        break;
                    }
                }
            }
            let mut st = me.state.lock().await;
            if let Some(s) = st.sessions.get_mut(&id).filter(|s| s.rec.warm) {
                s.state = SessionState::Ready;
                s.probe = None;
                info!(session = %id, guest = %s.rec.guest, secs = t0.elapsed().as_secs_f64(), start = s.rec.how.as_str(), "warm VM up: the pool has one more");
            }
        })
        .abort_handle()
    }
}
