//! An X11 session's way to `ready`: vdd sends the guest's display manager XDMCP Queries
//! (`xdmcp.rs`) until it answers, or fails the session after `dispatch.x11_timeout`,
//! stopping its VM and keeping the failure readable for [`super::FAILED_KEPT`].

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::{Backend, Dispatcher, Failed, SessionState};
use crate::xdmcp;

impl<B: Backend> Dispatcher<B> {
    /// Starts the probe of session `id` at `ip`; its handle stops it when the session ends.
    pub(super) fn spawn_probe(
        &self,
        id: &str,
        ip: Ipv4Addr,
        since: Instant,
    ) -> tokio::task::AbortHandle {
        let me = self.me.upgrade().expect("a dispatcher in use is alive");
        let id = id.to_string();
        tokio::spawn(async move { me.watch_x11(id, ip, since).await }).abort_handle()
    }

    async fn watch_x11(self: Arc<Self>, id: String, ip: Ipv4Addr, since: Instant) {
        let limit = self.cfg().dispatch.x11_timeout;
        let r = xdmcp::probe(ip, xdmcp::PORT, Duration::from_secs(1), limit).await;
        let mut st = self.state.lock().await;
        let Some(s) = st.sessions.get_mut(&id) else {
            return;
        };
        // This task is ending: nothing may abort it from here on (finish below).
        s.probe = None;
        let guest_mac = s.rec.x11.as_ref().map(|x| x.mac);
        let (seat, guest) = (s.rec.seat, s.rec.guest.clone());
        match r {
            Ok(reply) => {
                s.state = SessionState::Ready;
                let host = match reply {
                    xdmcp::Reply::Willing { hostname, .. } => hostname,
                    xdmcp::Reply::Unwilling { hostname, .. } => hostname,
                };
                info!(session = %id, mac = %seat, %guest, guest_mac = ?guest_mac, %ip, guest_host = %host, secs = since.elapsed().as_secs_f32(), "X11 guest ready: its display manager answered XDMCP");
            }
            Err(e) if s.rec.warm => {
                // A warm VM nobody waits for: the pool tries again later.
                let s = st.sessions.remove(&id).expect("just found");
                st.warm_failed.insert(guest.clone(), Instant::now());
                drop(st);
                warn!(session = %id, %guest, guest_mac = ?guest_mac, %ip, "warm X11 VM never answered XDMCP: {e}; stopping it");
                self.finish(s, "failed").await;
            }
            Err(e) => {
                let s = st.sessions.remove(&id).expect("just found");
                let mut info = self.info(&s, None);
                info.state = SessionState::Failed;
                info.error = Some(e.to_string());
                st.failed.insert(
                    id.clone(),
                    Failed {
                        info,
                        key: s.rec.key.clone(),
                        since: Instant::now(),
                    },
                );
                drop(st);
                warn!(session = %id, mac = %seat, %guest, guest_mac = ?guest_mac, %ip, "X11 session failed: {e}; stopping its VM");
                self.finish(s, "failed").await;
            }
        }
    }
}
