//! What the API asks of the dispatcher about sessions that exist: who may act on which
//! ([`Who`]: the admin, or a seat with the session's key), reading them, a new one-time
//! VNC password, ending and resetting one; and a session's end (`finish`, `cleanup`),
//! which the monitor, the starts and the warm pools use too. Apart from `mod.rs` (the
//! dispatcher's state and its construction), which was past 600 lines.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::record::Record;
use super::{report, Backend, Dispatcher, Error, Session, SessionInfo};
use crate::config::Mac;

/// Who asks for a session, as the API established it.
#[derive(Clone, Copy, Debug)]
pub enum Who<'a> {
    /// The admin (the token): any session.
    Admin,
    /// A seat: only its own sessions, and only with the key it got when it created one.
    Seat { mac: Mac, key: Option<&'a str> },
}

impl Who<'_> {
    /// Takes seat session `id` out of `sessions` when this caller may act on it (a warm
    /// VM is nobody's session): [`Dispatcher::end`] and [`Dispatcher::reset`] stop its VM
    /// next.
    fn take<B: Backend>(
        self,
        sessions: &mut BTreeMap<String, Session<B>>,
        id: &str,
    ) -> Result<Session<B>, Error> {
        let s = sessions
            .get(id)
            .filter(|s| !s.rec.warm)
            .ok_or_else(|| Error::NotFound(id.to_string()))?;
        self.check(id, &s.rec.seat.to_string(), &s.rec.key)?;
        Ok(sessions.remove(id).expect("just found"))
    }

    fn seat(&self) -> Option<Mac> {
        match self {
            Who::Admin => None,
            Who::Seat { mac, .. } => Some(*mac),
        }
    }

    /// Whether this caller may act on session `id` of `seat` whose key is `key`: the
    /// admin always; a seat only its own, with the key (compared in constant time).
    pub fn check(&self, id: &str, seat: &str, key: &str) -> Result<(), Error> {
        match self {
            Who::Admin => Ok(()),
            Who::Seat { mac, .. } if mac.to_string() != seat => Err(Error::NotYours(id.into())),
            Who::Seat { key: given, .. } => {
                use subtle::ConstantTimeEq;
                let ok = given.is_some_and(|g| {
                    !key.is_empty() && bool::from(g.as_bytes().ct_eq(key.as_bytes()))
                });
                if ok {
                    Ok(())
                } else {
                    Err(Error::WrongKey(id.into()))
                }
            }
        }
    }
}

impl<B: Backend> Dispatcher<B> {
    /// Whether `mac` is the NIC of one of our guests (an X11 guest on the LAN).
    pub async fn is_guest_mac(&self, mac: Mac) -> bool {
        let st = self.state.lock().await;
        // Warm VMs too: an X11 one is on the LAN before any seat picks it.
        st.sessions
            .values()
            .any(|s| s.rec.x11.as_ref().is_some_and(|x| x.mac == mac))
    }

    /// Sessions, all of them (`seat: None`, the admin) or one seat's.
    pub async fn list(&self, seat: Option<Mac>) -> Vec<SessionInfo> {
        let mut st = self.state.lock().await;
        st.sessions
            .values_mut()
            .filter(|s| !s.rec.warm && seat.is_none_or(|m| s.rec.seat == m))
            .map(|s| {
                // A seat that looks at its sessions is present.
                if seat.is_some() {
                    s.last_seen = Instant::now();
                }
                self.info(s, None)
            })
            .collect()
    }

    /// One session, running or recently failed; `seat: Some` only its own. A seat that
    /// asks is present (an X11 session has no VNC viewer to show it).
    pub async fn get(&self, id: &str, who: Who<'_>) -> Result<SessionInfo, Error> {
        let mut st = self.state.lock().await;
        if let Some(s) = st.sessions.get_mut(id).filter(|s| !s.rec.warm) {
            who.check(id, &s.rec.seat.to_string(), &s.rec.key)?;
            if who.seat().is_some() {
                s.last_seen = Instant::now();
            }
            return Ok(self.info(s, None));
        }
        match st.failed.get(id) {
            Some(f) => {
                who.check(id, &f.info.seat, &f.key)?;
                Ok(f.info.clone())
            }
            None => Err(Error::NotFound(id.to_string())),
        }
    }

    /// A new one-time VNC password for a running session, which replaces the one before:
    /// the seat asks for it right before its viewer connects, however long its boot took
    /// since the session was created (an old PC may need minutes to mount its root and start
    /// X, and a password set at the pick would have expired by then).
    pub async fn password(&self, id: &str, who: Who<'_>) -> Result<SessionInfo, Error> {
        let (control, info) = {
            let mut st = self.state.lock().await;
            let Some(s) = st.sessions.get_mut(id).filter(|s| !s.rec.warm) else {
                if let Some(f) = st.failed.get(id) {
                    who.check(id, &f.info.seat, &f.key)?;
                }
                return Err(Error::NotFound(id.to_string()));
            };
            who.check(id, &s.rec.seat.to_string(), &s.rec.key)?;
            if s.rec.x11.is_some() {
                return Err(Error::NoPassword(id.to_string()));
            }
            if who.seat().is_some() {
                s.last_seen = Instant::now();
            }
            (self.backend.control(&s.vm), self.info(s, None))
        };
        let password = self.one_time();
        let valid_for = password.valid_for;
        self.backend
            .set_password(control.clone(), password.clone())
            .await?;
        // What the guest shows now, which its viewer is about to scale to fit if the
        // guest did not take the seat's size.
        let screen = self.backend.screen_size(control).await.or(info.screen);
        info!(session = %id, mac = %info.seat, guest = %info.guest, valid_s = valid_for.as_secs(), screen = ?screen, "new one-time VNC password handed out");
        Ok(SessionInfo {
            password: Some(password.password),
            screen,
            ..info
        })
    }

    /// Ends a session; `seat: Some` only its own.
    pub async fn end(&self, id: &str, who: Who<'_>) -> Result<(), Error> {
        let s = {
            let mut st = self.state.lock().await;
            if let Some(f) = st.failed.get(id) {
                // A failed session's VM is already stopped; DELETE only forgets it.
                who.check(id, &f.info.seat, &f.key)?;
                st.failed.remove(id);
                return Ok(());
            }
            who.take(&mut st.sessions, id)?
        };
        self.finish(s, "ended").await;
        self.kick();
        Ok(())
    }

    /// Throws the session's overlay away and starts its guest afresh (a clean desktop), at
    /// the same screen size. The new session keeps the old one's key: its seat reaches it
    /// as before, also when the admin reset it. The old VM is stopped at once, not shut
    /// down: its disk is thrown away anyway.
    pub async fn reset(&self, id: &str, who: Who<'_>) -> Result<SessionInfo, Error> {
        let mut s = {
            let mut st = self.state.lock().await;
            who.take(&mut st.sessions, id)?
        };
        if let Some(p) = s.probe.take() {
            p.abort();
        }
        self.backend.stop(&mut s.vm, Duration::ZERO).await;
        self.cleanup(&s.rec);
        info!(session = %id, mac = %s.rec.seat, guest = %s.rec.guest, "session reset: its VM stopped, its disk thrown away");
        // A kept overlay is thrown away too: reset means a clean desktop.
        let _ = std::fs::remove_file(&s.rec.overlay);
        let key = (!s.rec.key.is_empty()).then(|| s.rec.key.clone());
        self.create_keyed(s.rec.seat, &s.rec.guest, who, key, s.rec.screen)
            .await
    }

    pub(super) async fn finish(&self, mut s: Session<B>, why: &str) {
        if let Some(p) = s.probe.take() {
            p.abort();
        }
        self.backend
            .stop(&mut s.vm, self.cfg().dispatch.shutdown_timeout)
            .await;
        self.cleanup(&s.rec);
        info!(session = %s.rec.id, mac = %s.rec.seat, guest = %s.rec.guest, "session {why}");
    }

    /// What a session leaves once its VM is gone: overlay, folder, DHCP binding. (Its tap
    /// went with QEMU's last file descriptor.)
    pub(super) fn cleanup(&self, rec: &Record<B::Saved>) {
        if !rec.persist {
            self.backend.remove_overlay(&rec.vm, &rec.overlay);
        }
        let _ = std::fs::remove_dir_all(self.dir.join(&rec.id));
        if let (Some(x), Some(l)) = (&rec.x11, &self.lan) {
            if let Err(e) = self.backend.release_lan(&x.tap, x.mac) {
                warn!(session = %rec.id, tap = %x.tap, "{}", report(&e));
            }
            l.leases.release(x.mac, x.ip);
            info!(session = %rec.id, mac = %rec.seat, guest_mac = %x.mac, ip = %x.ip, tap = %x.tap, "X11 guest's address released; its tap is gone with its VM");
        }
    }
}
