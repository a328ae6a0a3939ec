//! A session's start: reattach to the seat's running one, or admit a new VM (`ledger.rs`),
//! reserve an X11 guest's address, start the VM on the backend, and write its record.

use std::time::{Duration, Instant};

use tracing::info;

use super::*;

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
        self.create_keyed(seat, guest_name, who, None).await
    }

    /// [`Dispatcher::create`]; a new session gets `key`, or a new one.
    pub(super) async fn create_keyed(
        &self,
        seat: Mac,
        guest_name: &str,
        who: Who<'_>,
        key: Option<String>,
    ) -> Result<SessionInfo, Error> {
        let guest = self
            .cfg()
            .guests
            .iter()
            .find(|g| g.name == guest_name)
            .cloned()
            .ok_or_else(|| Error::UnknownGuest(guest_name.to_string()))?;

        // Under the lock: reattach, or check the limits and reserve a port and memory.
        let (id, port) = {
            let mut st = self.state.lock().await;
            if let Some(s) = st
                .sessions
                .values_mut()
                .find(|s| s.rec.seat == seat && s.rec.guest == guest.name)
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
                let password = new_password();
                self.backend.set_password(control, password.clone()).await?;
                info!(session = %rec.id, mac = %seat, guest = %rec.guest, "session reattached");
                return Ok(SessionInfo {
                    password: Some(password),
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
            let ports: Vec<u16> = st
                .pending_ports
                .iter()
                .copied()
                .chain(st.sessions.values().map(|s| s.rec.port))
                .collect();
            let used = ledger::InUse {
                vms: st.sessions.len() + st.pending_vms,
                mib: st.sessions.values().map(|s| s.rec.memory_mib).sum::<u64>() + st.pending_mib,
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
            st.pending_vms += 1;
            st.pending_mib += guest.memory_mib;
            // A new try of the same guest replaces the report of a failed one.
            st.failed
                .retain(|_, f| !(f.info.seat == seat.to_string() && f.info.guest == guest.name));
            st.pending_seats.push((seat, guest.name.clone()));
            let id: String = random::<6>().iter().map(|b| format!("{b:02x}")).collect();
            (id, port)
        };

        let key = key.unwrap_or_else(new_key);
        let result = self.start_vm(&id, seat, &guest, port, key).await;

        let mut st = self.state.lock().await;
        st.pending_ports.retain(|p| *p != port);
        st.pending_vms -= 1;
        st.pending_mib -= guest.memory_mib;
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
            info!(session = %id, mac = %seat, guest = %guest.name, port, backend = %self.backend.describe(), "VM started");
        }
        let info = SessionInfo {
            key: Some(session.rec.key.clone()),
            ..self.info(&session, password)
        };
        st.sessions.insert(id, session);
        Ok(info)
    }

    async fn start_vm(
        &self,
        id: &str,
        seat: Mac,
        guest: &crate::config::Guest,
        port: u16,
        key: String,
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
        };
        let password = x11.is_none().then(new_password);
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
        let (vm, saved) = match started {
            Ok(x) => x,
            Err(e) => {
                release(&x11, false);
                let _ = std::fs::remove_dir_all(&folder);
                return Err(e);
            }
        };
        let rec = Record {
            id: id.to_string(),
            seat,
            guest: guest.name.clone(),
            port,
            vm: saved,
            started: now_unix(),
            overlay,
            persist: guest.persist,
            memory_mib: guest.memory_mib,
            key,
            x11,
        };
        let mut vm = vm;
        if let Err(e) = write_record(&folder, &rec) {
            self.backend.stop(&mut vm, Duration::from_secs(1)).await;
            release(&rec.x11, true);
            let _ = std::fs::remove_dir_all(&folder);
            return Err(e);
        }
        let state = if rec.x11.is_some() {
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
            password,
        ))
    }
}
