//! Crash adoption: after a `kill -9`, the next vdd reads `STATE_DIR/sessions/*/session.json`
//! and takes over each VM that still runs as that session (same pid, its command line
//! names the session), restores an X11 guest's DHCP binding, and cleans up after the rest;
//! a VM whose record was lost is found by its command line and stopped.

use std::time::Instant;

use tracing::{info, warn};

use super::{Backend, Dispatcher, Record, Session, SessionState};

impl<B: Backend> Dispatcher<B> {
    /// Adopts or cleans up what a previous run left in the sessions folder.
    pub(super) async fn adopt(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut st = self.state.lock().await;
        for e in entries.flatten() {
            let folder = e.path();
            let rec: Option<Record<B::Saved>> = std::fs::read(folder.join("session.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            let adopted = rec
                .as_ref()
                .and_then(|r| self.backend.adopt(&folder, &r.id, &r.vm));
            match (rec, adopted) {
                (Some(rec), Some(mut vm)) => {
                    info!(session = %rec.id, mac = %rec.seat, guest = %rec.guest, vm = ?rec.vm, "adopted the VM of a previous run");
                    let mut state = SessionState::Ready;
                    let mut probe = None;
                    if let Some(x) = &rec.x11 {
                        // Its DHCP binding back (the journal has it too, unless it expired),
                        // then ask its display manager again: it may have been starting.
                        let bound = match &self.lan {
                            Some(l) => l
                                .leases
                                .reserve(x.mac, Some(x.ip))
                                .await
                                .map_err(|e| e.to_string()),
                            None => Err("this vdd serves X11 guests no LAN".to_string()),
                        };
                        match bound {
                            Ok(ip) if ip == x.ip => {
                                info!(session = %rec.id, mac = %rec.seat, guest_mac = %x.mac, ip = %x.ip, tap = %x.tap, "adopted X11 guest's address restored");
                                state = SessionState::Starting;
                                probe = Some(self.spawn_probe(&rec.id, x.ip, Instant::now()));
                            }
                            other => {
                                let why = match other {
                                    Ok(ip) => {
                                        if let Some(l) = &self.lan {
                                            l.leases.release(x.mac, ip);
                                        }
                                        format!("{} went to another client", x.ip)
                                    }
                                    Err(e) => e,
                                };
                                warn!(session = %rec.id, mac = %rec.seat, guest_mac = %x.mac, "adopted X11 VM cannot keep its address ({why}); stopping it");
                                self.backend
                                    .stop(&mut vm, self.cfg().dispatch.shutdown_timeout)
                                    .await;
                                if !rec.persist {
                                    self.backend.remove_overlay(&rec.vm, &rec.overlay);
                                }
                                let _ = std::fs::remove_dir_all(&folder);
                                continue;
                            }
                        }
                    }
                    st.sessions.insert(
                        rec.id.clone(),
                        Session {
                            rec,
                            vm,
                            last_seen: Instant::now(),
                            state,
                            probe,
                        },
                    );
                }
                (rec, _) => {
                    // A VM without a live record (vdd killed between its start and its
                    // record, or a record lost) would keep its VNC port for good.
                    let id = e.file_name().to_string_lossy().into_owned();
                    let strays = self.backend.stop_strays(&folder, &id).await;
                    if strays > 0 {
                        warn!(session = %id, strays, "VMs of a previous run without a record stopped");
                    }
                    if let Some(rec) = &rec {
                        info!(session = %rec.id, mac = %rec.seat, guest = %rec.guest, "VM of a previous run is gone; cleaning up");
                        if !rec.persist {
                            self.backend.remove_overlay(&rec.vm, &rec.overlay);
                        }
                        // Its tap went with its QEMU; its address is free again.
                        if let (Some(x), Some(l)) = (&rec.x11, &self.lan) {
                            l.leases.release(x.mac, x.ip);
                        }
                    }
                    let _ = std::fs::remove_dir_all(&folder);
                }
            }
        }
    }
}
