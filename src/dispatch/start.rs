//! A session's start: reattach to the seat's running one, take a warm VM (`warm.rs`), or
//! admit a new VM (`ledger.rs`, warm VMs giving way), reserve an X11 guest's address,
//! start the VM on the backend (from a saved state where there is one, `saved.rs`), and
//! write its record.

use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::saved::{guest_screen, Ready};
use super::screen::ScreenSize;
use super::*;

/// Whose VM is admitted: a seat's, or one started ahead of the seats (a warm VM, a VM
/// booted to be saved), which never takes a seat's place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Priority {
    Seat,
    Background,
}

/// What a new VM is for, beside its guest.
pub(super) struct Plan {
    pub(super) warm: bool,
    pub(super) screen: Option<ScreenSize>,
    pub(super) fingerprint: String,
}

impl<B: Backend> Dispatcher<B> {
    /// The seat's session of `guest`: its running one (reattached with a new password),
    /// or a new VM.
    /// `key`: the key of the seat's running session of this guest, to reattach to it; the
    /// admin (`Who::Admin`) needs none.
    pub async fn create(
        &self,
        seat: Mac,
        guest_name: &str,
        who: Who<'_>,
    ) -> Result<SessionInfo, Error> {
        self.create_keyed(seat, guest_name, who, None, None).await
    }

    /// [`Dispatcher::create`] for a seat whose monitor shows `screen`: a new VNC guest
    /// starts at that size.
    pub async fn create_at(
        &self,
        seat: Mac,
        guest_name: &str,
        who: Who<'_>,
        screen: Option<ScreenSize>,
    ) -> Result<SessionInfo, Error> {
        self.create_keyed(seat, guest_name, who, None, screen).await
    }

    /// [`Dispatcher::create`]; a new session gets `key`, or a new one.
    pub(super) async fn create_keyed(
        &self,
        seat: Mac,
        guest_name: &str,
        who: Who<'_>,
        key: Option<String>,
        screen: Option<ScreenSize>,
    ) -> Result<SessionInfo, Error> {
        let guest = self
            .cfg()
            .guests
            .iter()
            .find(|g| g.name == guest_name)
            .cloned()
            .ok_or_else(|| Error::UnknownGuest(guest_name.to_string()))?;
        let key = key.unwrap_or_else(new_key);

        // Under the lock: reattach, take a warm VM, or check the limits and reserve a
        // port and memory (stopping warm VMs that must give way).
        let (id, port, plan) = {
            let mut st = self.state.lock().await;
            if let Some(s) = st
                .sessions
                .values_mut()
                .find(|s| !s.rec.warm && s.rec.seat == seat && s.rec.guest == guest.name)
            {
                who.check(&s.rec.id, &s.rec.seat.to_string(), &s.rec.key)?;
                s.last_seen = Instant::now();
                if s.rec.x11.is_some() {
                    info!(session = %s.rec.id, mac = %seat, guest = %s.rec.guest, "X11 session handed out again");
                    return Ok(self.info(s, None));
                }
                let rec = s.rec.clone();
                let control = self.backend.control(&s.vm);
                let reattached = self.info(s, None);
                drop(st);
                let password = self.one_time();
                self.backend.set_password(control, password.clone()).await?;
                info!(session = %rec.id, mac = %seat, guest = %rec.guest, "session reattached");
                return Ok(SessionInfo {
                    password: Some(password.password),
                    ..reattached
                });
            }
            if st.closing {
                return Err(Error::Full("the server is shutting down".into()));
            }
            if st.pending_seats.contains(&(seat, guest.name.clone())) {
                return Err(Error::Full(format!(
                    "{} is already starting for this seat; try again in a moment",
                    guest.label
                )));
            }
            // What the seat's monitor shows is what this guest's warm VMs and saved
            // states are made for from now on.
            let reported = guest_screen(&guest, screen);
            if let Some(s) = reported {
                st.screens.insert(guest.name.clone(), s);
            }
            let screen = reported.or_else(|| super::warm::wanted_screen(&st, &guest));
            let fp = self.fingerprint(&guest, screen);
            // A new try of the same guest replaces the report of a failed one.
            st.failed
                .retain(|_, f| !(f.info.seat == seat.to_string() && f.info.guest == guest.name));
            if let Some(wid) = self.take_warm(&st, &guest.name, &fp.digest) {
                st.counts.entry(guest.name.clone()).or_default().warm_hits += 1;
                let bound = self.bind_warm(&mut st, &wid, seat, &key);
                drop(st);
                self.kick();
                let handed = match bound {
                    Ok((info, None)) => Ok(info),
                    Ok((info, Some(control))) => {
                        let password = self.one_time();
                        self.backend
                            .set_password(control, password.clone())
                            .await
                            .map(|()| SessionInfo {
                                password: Some(password.password),
                                ..info
                            })
                    }
                    Err(e) => Err(e),
                };
                match handed {
                    Ok(info) => return Ok(info),
                    // The warm VM broke (its QEMU died): a VM of its own for the seat.
                    Err(e) => {
                        warn!(session = %wid, mac = %seat, guest = %guest.name, "a warm VM could not be handed out ({}); starting one", report(&e));
                        let broken = self.state.lock().await.sessions.remove(&wid);
                        if let Some(b) = broken {
                            self.finish(b, "stopped (a warm VM that broke)").await;
                        }
                        st = self.state.lock().await;
                    }
                }
            } else if guest.warm > 0 {
                st.counts.entry(guest.name.clone()).or_default().warm_misses += 1;
            }
            let mut gave_way = Vec::new();
            let port = loop {
                match self.reserve_locked(&mut st, &guest, Priority::Seat) {
                    Ok(p) => break p,
                    Err(Error::Full(why)) => match self.evict_warm(&mut st, &guest.name) {
                        Some(w) => gave_way.push(w),
                        None => {
                            drop(st);
                            self.stop_now(gave_way, "stopped: it gave way to a seat");
                            return Err(Error::Full(why));
                        }
                    },
                    Err(e) => return Err(e),
                }
            };
            self.stop_now(gave_way, "stopped: it gave way to a seat");
            st.pending_seats.push((seat, guest.name.clone()));
            let id: String = random::<6>().iter().map(|b| format!("{b:02x}")).collect();
            let plan = Plan {
                warm: false,
                screen,
                fingerprint: fp.digest,
            };
            (id, port, plan)
        };
        self.kick();

        let result = self.start_vm(&id, seat, &guest, port, key, &plan).await;

        self.unreserve(&guest, port, Priority::Seat).await;
        let mut st = self.state.lock().await;
        st.pending_seats
            .retain(|s| *s != (seat, guest.name.clone()));
        let (mut session, password) = result?;
        if st.closing {
            // vdd began to stop while this VM started: stop it too, or it would outlive us.
            drop(st);
            self.finish(session, "stopped (vdd stopping)").await;
            return Err(Error::Full("the server is shutting down".into()));
        }
        if let Some(x) = &session.rec.x11 {
            session.probe = Some(self.spawn_probe(&id, x.ip, Instant::now()));
            info!(session = %id, mac = %seat, guest = %guest.name, guest_mac = %x.mac, ip = %x.ip, tap = %x.tap, backend = %self.backend.describe(), "X11 VM started; waiting for XDMCP");
        } else {
            info!(session = %id, mac = %seat, guest = %guest.name, port, start = session.rec.how.as_str(), screen = ?session.rec.screen, backend = %self.backend.describe(), "VM started");
        }
        let info = SessionInfo {
            key: Some(session.rec.key.clone()),
            ..self.info(&session, password)
        };
        st.sessions.insert(id, session);
        Ok(info)
    }

    /// Under the lock: whether one more VM of `guest` fits, and its VNC port (0 for an X11
    /// guest), reserved with its memory until [`Dispatcher::unreserve`]. A seat's VM is
    /// weighed against the running VMs and the seats' starts in flight; a background
    /// one against everything.
    pub(super) fn reserve_locked(
        &self,
        st: &mut State<B>,
        guest: &crate::config::Guest,
        prio: Priority,
    ) -> Result<u16, Error> {
        let ports: Vec<u16> = st
            .pending_ports
            .iter()
            .copied()
            .chain(st.sessions.values().map(|s| s.rec.port))
            .collect();
        let (vms, mib) = match prio {
            Priority::Seat => (st.pending_vms, st.pending_mib),
            Priority::Background => (
                st.pending_vms + st.bg_pending_vms,
                st.pending_mib + st.bg_pending_mib,
            ),
        };
        let used = ledger::InUse {
            vms: st.sessions.len() + vms,
            mib: st.sessions.values().map(|s| s.rec.memory_mib).sum::<u64>() + mib,
            ports: &ports,
            disk_free_mib: free_mib(&self.dir),
        };
        let need = ledger::Need {
            label: &guest.label,
            mib: guest.memory_mib,
            vnc: guest.display != Display::X11,
        };
        let vnc_addr = self.vnc_addr;
        let port = ledger::admit(&self.limits(), &used, &need, |p| {
            qemu::port_free(vnc_addr, p)
        })
        .map_err(Error::Full)?;
        // X11 guests have no VNC server: port 0 in their record, none taken.
        let port = match port {
            Some(p) => {
                st.pending_ports.push(p);
                p
            }
            None if self.lan.is_none() => {
                return Err(Error::NoLan(format!(
                    "{} is an X11 guest, and this vdd runs without its DHCP server and LAN bridge",
                    guest.label
                )));
            }
            None => 0,
        };
        match prio {
            Priority::Seat => {
                st.pending_vms += 1;
                st.pending_mib += guest.memory_mib;
            }
            Priority::Background => {
                st.bg_pending_vms += 1;
                st.bg_pending_mib += guest.memory_mib;
            }
        }
        Ok(port)
    }

    /// [`Dispatcher::reserve_locked`], taking the lock; a background VM never makes a
    /// warm VM give way.
    pub(super) async fn reserve(
        &self,
        guest: &crate::config::Guest,
        prio: Priority,
    ) -> Result<u16, Error> {
        let mut st = self.state.lock().await;
        if st.closing {
            return Err(Error::Full("the server is shutting down".into()));
        }
        self.reserve_locked(&mut st, guest, prio)
    }

    /// Gives back what [`Dispatcher::reserve_locked`] held for a start that has ended.
    pub(super) async fn unreserve(&self, guest: &crate::config::Guest, port: u16, prio: Priority) {
        let mut st = self.state.lock().await;
        if let Some(i) = st
            .pending_ports
            .iter()
            .position(|p| *p == port && port != 0)
        {
            st.pending_ports.remove(i);
        }
        match prio {
            Priority::Seat => {
                st.pending_vms -= 1;
                st.pending_mib -= guest.memory_mib;
            }
            Priority::Background => {
                st.bg_pending_vms -= 1;
                st.bg_pending_mib -= guest.memory_mib;
            }
        }
    }

    /// Starts a VM of `guest` for `seat` (or for the warm pool) on `port`, from the
    /// guest's saved state when it has one for `plan.fingerprint`, else by booting it.
    pub(super) async fn start_vm(
        &self,
        id: &str,
        seat: Mac,
        guest: &crate::config::Guest,
        port: u16,
        key: String,
        plan: &Plan,
    ) -> Result<(Session<B>, Option<String>), Error> {
        let saved = self.saved_for(guest, &plan.fingerprint).await;
        match self
            .start_from(id, seat, guest, port, &key, plan, saved.as_ref())
            .await
        {
            Err(e @ Error::Restore(..)) => {
                let r = saved.expect("only a restore fails to restore");
                self.saved_broken(guest, &r, &e).await;
                self.state
                    .lock()
                    .await
                    .counts
                    .entry(guest.name.clone())
                    .or_default()
                    .saved_fallbacks += 1;
                self.start_from(id, seat, guest, port, &key, plan, None)
                    .await
            }
            r => r,
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn start_from(
        &self,
        id: &str,
        seat: Mac,
        guest: &crate::config::Guest,
        port: u16,
        key: &str,
        plan: &Plan,
        saved: Option<&Ready>,
    ) -> Result<(Session<B>, Option<String>), Error> {
        // Whether the base image exists is the backend's to tell: on a hypervisor host it
        // is the host's file, not vdd's.
        let folder = self.dir.join(id);
        qemu::private_dir(&folder)?;
        let overlay = if guest.persist {
            self.cfg()
                .server
                .state_dir
                .join("overlays")
                .join(&guest.name)
                .join(format!("{}.qcow2", seat.to_string().replace(':', "-")))
        } else {
            folder.join("overlay.qcow2")
        };
        if !guest.persist {
            // A fresh overlay, whatever a failed try before left.
            let _ = std::fs::remove_file(&overlay);
        }
        // An X11 guest's NIC: its address first, so it is known before the guest asks; the
        // backend makes the NIC itself (for QEMU: a tap in the bridge).
        let mut x11 = None;
        if guest.display == Display::X11 {
            let lan = self.lan.as_ref().expect("checked in create");
            let mac = lan::guest_mac(random::<5>());
            let ip = match lan.leases.reserve(mac, None).await {
                Ok(ip) => ip,
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&folder);
                    return Err(match e {
                        dhcp::ReserveError::Refused(why) => Error::Full(why.to_string()),
                        e => Error::Reserve(e),
                    });
                }
            };
            info!(session = %id, mac = %seat, guest_mac = %mac, %ip, "address reserved for the X11 guest");
            x11 = Some(X11Rec {
                mac,
                ip,
                tap: lan::tap_name(id),
            });
        }
        let display = match (&x11, &self.lan) {
            (Some(x), Some(lan)) => VmDisplay::Lan {
                mac: x.mac,
                bridge: lan.bridge.clone(),
            },
            _ => VmDisplay::Vnc {
                addr: self.vnc_addr,
                port,
            },
        };
        let spec = VmSpec {
            session: id.to_string(),
            guest: guest.clone(),
            dir: folder.clone(),
            overlay: overlay.clone(),
            display,
            screen: plan.screen,
            restore: saved.map(Ready::restore),
        };
        // A warm VM's display takes no password until a seat picks it: nobody can look.
        let password = (x11.is_none() && !plan.warm).then(|| self.one_time());
        let started = self.backend.start(spec, password.clone()).await;
        // The backend undid its own part of a failed start; this is the dispatcher's.
        let release = |x: &Option<X11Rec>, vm_ran: bool| {
            if let (Some(x), Some(l)) = (x, &self.lan) {
                if vm_ran {
                    let _ = self.backend.release_lan(&x.tap, x.mac);
                }
                l.leases.release(x.mac, x.ip);
            }
        };
        let (vm, backend_saved) = match started {
            Ok(x) => x,
            Err(e) => {
                release(&x11, false);
                if !guest.persist {
                    let _ = std::fs::remove_file(&overlay);
                }
                let _ = std::fs::remove_dir_all(&folder);
                return Err(e);
            }
        };
        let rec = Record {
            id: id.to_string(),
            seat,
            guest: guest.name.clone(),
            port,
            vm: backend_saved,
            started: now_unix(),
            overlay,
            persist: guest.persist,
            memory_mib: guest.memory_mib,
            key: key.to_string(),
            x11,
            warm: plan.warm,
            fingerprint: plan.fingerprint.clone(),
            screen: plan.screen,
            saved: saved.map(|r| r.dir.clone()),
            how: if saved.is_some() {
                How::Saved
            } else {
                How::Boot
            },
        };
        let mut vm = vm;
        if let Err(e) = write_record(&folder, &rec) {
            self.backend.stop(&mut vm, Duration::from_secs(1)).await;
            release(&rec.x11, true);
            let _ = std::fs::remove_dir_all(&folder);
            return Err(e);
        }
        {
            let mut st = self.state.lock().await;
            let c = st.counts.entry(guest.name.clone()).or_default();
            match rec.how {
                How::Saved => c.saved_starts += 1,
                _ => c.boots += 1,
            }
        }
        let state = if rec.x11.is_some() || plan.warm {
            SessionState::Starting
        } else {
            SessionState::Ready
        };
        Ok((
            Session {
                rec,
                vm,
                last_seen: Instant::now(),
                state,
                probe: None,
            },
            password.map(|p| p.password),
        ))
    }

    /// Binds warm VM `id` to `seat`, in place: its record names the seat and key from
    /// now on. For a VNC guest, also what sets the password the seat then gets.
    fn bind_warm(
        &self,
        st: &mut State<B>,
        id: &str,
        seat: Mac,
        key: &str,
    ) -> Result<(SessionInfo, Option<B::Control>), Error> {
        let w = st.sessions.get_mut(id).expect("a warm VM just found");
        w.rec.seat = seat;
        w.rec.key = key.to_string();
        w.rec.warm = false;
        w.rec.how = How::Warm;
        w.last_seen = Instant::now();
        let up = w.state == SessionState::Ready;
        let control = if w.rec.x11.is_none() {
            // Up or not, a VNC guest is the seat's to look at now.
            if let Some(p) = w.probe.take() {
                p.abort();
            }
            w.state = SessionState::Ready;
            Some(self.backend.control(&w.vm))
        } else {
            None
        };
        write_record(&self.dir.join(id), &w.rec)?;
        info!(session = %id, mac = %seat, guest = %w.rec.guest, up, "warm VM handed to the seat");
        let info = SessionInfo {
            key: Some(key.to_string()),
            ..self.info(w, None)
        };
        Ok((info, control))
    }
}
