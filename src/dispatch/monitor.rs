//! The dispatcher's watch over its VMs, every 2 s until shutdown: a VM that exits ends its
//! session; a VM whose host stopped answering fails its session with the reason; a seat not seen for `dispatch.idle_timeout` (no API call, no VNC viewer) gets
//! its VMs stopped; X11 guests' DHCP bindings are renewed by vdd itself; failed sessions
//! are forgotten after [`FAILED_KEPT`]; saved states and warm pools are kept up
//! (`warm.rs`). On shutdown every VM is stopped.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use super::{Backend, Dispatcher, Failed, Session, SessionState, X11Rec, FAILED_KEPT};

impl<B: Backend> Dispatcher<B> {
    /// Watches the VMs until shutdown: a VM that dies ends its session; a seat not seen
    /// (no API call, no VNC viewer connected) for `idle_timeout` gets its VMs stopped.
    /// On shutdown every VM is stopped.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        let mut n: u64 = 0;
        let refresh_ticks = (self.cfg().dhcp.lease_time.as_secs() / 4).max(1);
        let mut refresh: Vec<(String, X11Rec)> = Vec::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            n += 1;
            let mut dead = Vec::new();
            let mut lost = Vec::new();
            let mut probe = Vec::new();
            {
                let mut st = self.state.lock().await;
                for (id, s) in st.sessions.iter_mut() {
                    if let Some(why) = self.backend.lost(&s.vm) {
                        lost.push((id.clone(), why));
                    } else if self.backend.exited(&mut s.vm) {
                        dead.push(id.clone());
                    } else if n % 5 == 0 && !s.rec.warm {
                        probe.push((id.clone(), self.backend.control(&s.vm)));
                    }
                }
                for id in &dead {
                    if let Some(mut s) = st.sessions.remove(id) {
                        if s.rec.warm {
                            warn!(session = %id, guest = %s.rec.guest, "warm VM exited on its own");
                        } else {
                            error!(session = %id, mac = %s.rec.seat, guest = %s.rec.guest, "VM exited on its own; session ended");
                        }
                        if let Some(p) = s.probe.take() {
                            p.abort();
                        }
                        self.cleanup(&s.rec);
                    }
                }
                // Out of reach (its host stopped answering): the session fails, readable
                // with its reason for FAILED_KEPT, and what of it can be undone is.
                for (id, why) in lost {
                    if let Some(mut s) = st.sessions.remove(&id) {
                        error!(session = %id, mac = %s.rec.seat, guest = %s.rec.guest, "session ended: {why}");
                        if let Some(p) = s.probe.take() {
                            p.abort();
                        }
                        let mut info = self.info(&s, None);
                        info.state = SessionState::Failed;
                        info.error = Some(why);
                        let key = s.rec.key.clone();
                        let since = Instant::now();
                        st.failed.insert(id, Failed { info, key, since });
                        self.cleanup(&s.rec);
                    }
                }
                st.failed.retain(|_, f| f.since.elapsed() < FAILED_KEPT);
                if n % refresh_ticks == 0 {
                    refresh = st
                        .sessions
                        .values()
                        .filter_map(|s| s.rec.x11.clone().map(|x| (s.rec.id.clone(), x)))
                        .collect();
                }
            }
            // An X11 guest's binding is renewed by vdd too, at half the lease time: a guest
            // that does not ask DHCP again (or asks late) never loses its address while
            // its session runs.
            if let Some(l) = &self.lan {
                for (id, x) in std::mem::take(&mut refresh) {
                    match l.leases.reserve(x.mac, Some(x.ip)).await {
                        Ok(ip) if ip == x.ip => {}
                        Ok(ip) => {
                            l.leases.release(x.mac, ip);
                            error!(session = %id, guest_mac = %x.mac, ip = %x.ip, "the X11 guest's address was taken by another client");
                        }
                        Err(e) => {
                            warn!(session = %id, guest_mac = %x.mac, ip = %x.ip, "renewing the X11 guest's address: {e}")
                        }
                    }
                }
            }
            // Saved states and warm pools: made at start, and again whenever the guest's
            // image or settings or the seats' screen changed (checked every 10 s).
            if n == 1 || n % 5 == 0 || !dead.is_empty() {
                self.kick();
            }
            // Every 10 s: a connected VNC viewer means the seat is there.
            for (id, control) in probe {
                let viewing = self.backend.has_viewer(control).await;
                let idle = {
                    let mut st = self.state.lock().await;
                    match st.sessions.get_mut(&id) {
                        Some(s) if viewing => {
                            s.last_seen = Instant::now();
                            None
                        }
                        Some(s) if s.last_seen.elapsed() > self.cfg().dispatch.idle_timeout => {
                            st.sessions.remove(&id)
                        }
                        _ => None,
                    }
                };
                if let Some(s) = idle {
                    warn!(session = %id, mac = %s.rec.seat, guest = %s.rec.guest, "seat gone for dispatch.idle_timeout; stopping its VM");
                    self.finish(s, "ended (idle)").await;
                }
            }
        }
        // VMs still starting finish starting (and stop themselves, seeing `closing`) before
        // the running ones are collected: none may be left behind.
        self.state.lock().await.closing = true;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while self.state.lock().await.starting() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let all: Vec<Session<B>> = {
            let mut st = self.state.lock().await;
            std::mem::take(&mut st.sessions).into_values().collect()
        };
        // In parallel: each shutdown may wait out its grace period.
        let mut stops = tokio::task::JoinSet::new();
        for s in all {
            let me = self.clone();
            stops.spawn(async move { me.finish(s, "ended (vdd stopping)").await });
        }
        while stops.join_next().await.is_some() {}
    }
}
