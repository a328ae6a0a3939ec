//! The dispatcher: a guest VM on demand for each seat. A session is one seat (the thin
//! client, by MAC) + one guest + one VM; a seat may run several guests at once.
//!
//! Sessions are written to `STATE_DIR/sessions/ID/session.json` before their VM is
//! reported started, so a vdd killed at any moment finds its VMs again on restart and
//! adopts them (pid still alive and still that VM) or cleans up after them. A graceful
//! shutdown stops every VM: nothing outlives vdd but what a crash leaves for adoption.

pub mod qemu;
pub mod qmp;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{AccelChoice, Config, Mac};
use qemu::{Accel, Vm, VmSpec};

/// Why a dispatcher request failed. The HTTP API maps each to a status and shows the
/// message to the user on the thin client's menu.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no guest named {0:?} in the config")]
    UnknownGuest(String),
    /// The server cannot take another VM; the reason is for the user.
    #[error("the server is full: {0}")]
    Full(String),
    #[error("no session {0}")]
    NotFound(String),
    #[error("session {0} belongs to another seat")]
    NotYours(String),
    #[error("the base image of guest {guest} is missing: {path}")]
    MissingImage { guest: String, path: PathBuf },
    #[error("{0} failed: {1}")]
    Tool(String, String),
    #[error("state folder {0}")]
    State(PathBuf, #[source] std::io::Error),
    #[error("the VM exited at once ({0}); QEMU said: {1}")]
    VmExited(String, String),
    #[error("QMP: {0}")]
    Qmp(String),
}

/// What a client learns about a session. The password is only in the answer to the
/// request that set it (create, reattach, reset).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct SessionInfo {
    pub id: String,
    pub seat: String,
    pub guest: String,
    /// "vnc"
    pub protocol: String,
    pub host: Ipv4Addr,
    pub port: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    pub started: u64,
}

/// What is written to disk for each session, for adoption after a crash.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Record {
    id: String,
    seat: Mac,
    guest: String,
    port: u16,
    pid: u32,
    started: u64,
    overlay: PathBuf,
    persist: bool,
    memory_mib: u64,
}

struct Session {
    rec: Record,
    vm: Vm,
    last_seen: Instant,
}

#[derive(Default)]
struct State {
    sessions: BTreeMap<String, Session>,
    /// Ports and memory promised to VMs still starting, so concurrent creates never
    /// share a port or overrun the budget while the lock is not held.
    pending_ports: Vec<u16>,
    pending_mib: u64,
    pending_seats: Vec<(Mac, String)>,
    /// Set when vdd stops: VMs still starting are stopped as soon as they are up.
    closing: bool,
}

/// Runs the sessions of one server.
pub struct Dispatcher {
    cfg: Arc<Config>,
    accel: Accel,
    vnc_addr: Ipv4Addr,
    budget_mib: u64,
    dir: PathBuf,
    state: Mutex<State>,
}

impl serde::Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Mac, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map_err(|_| serde::de::Error::custom(format!("bad MAC {s:?}")))
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Random bytes from the kernel, for session ids and passwords.
fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).expect("the kernel's random source");
    b
}

/// A VNC password: 8 characters, the most RFB's DES authentication uses.
fn new_password() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnpqrstuvwxyz23456789";
    random::<8>()
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

fn machine_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb / 1024)
        .unwrap_or(1024)
}

impl Dispatcher {
    /// Probes the accelerator and adopts (or cleans up after) the VMs a previous vdd left.
    pub async fn new(cfg: Arc<Config>) -> Result<Arc<Dispatcher>, Error> {
        let d = &cfg.dispatch;
        let accel = match d.accel {
            AccelChoice::Kvm => Accel::Kvm,
            AccelChoice::Tcg => Accel::Tcg,
            AccelChoice::Auto => qemu::probe_accel(&d.qemu, Duration::from_secs(5)).await,
        };
        let dir = cfg.server.state_dir.join("sessions");
        std::fs::create_dir_all(&dir).map_err(|e| Error::State(dir.clone(), e))?;
        let me = Arc::new(Dispatcher {
            accel,
            vnc_addr: cfg.server_ip().unwrap_or(Ipv4Addr::LOCALHOST),
            budget_mib: d.memory_budget_mib.unwrap_or(machine_memory_mib() * 8 / 10),
            dir,
            state: Mutex::new(State::default()),
            cfg,
        });
        me.adopt().await;
        Ok(me)
    }

    pub fn accel(&self) -> Accel {
        self.accel
    }

    async fn adopt(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut st = self.state.lock().await;
        for e in entries.flatten() {
            let folder = e.path();
            let rec: Option<Record> = std::fs::read(folder.join("session.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            match rec {
                Some(rec) if qemu::alive(rec.pid) && qemu::is_our_vm(rec.pid, &rec.id) => {
                    info!(session = %rec.id, mac = %rec.seat, guest = %rec.guest, pid = rec.pid, "adopted the VM of a previous run");
                    let vm = Vm {
                        pid: rec.pid,
                        qmp: folder.join("qmp.sock"),
                        child: None,
                    };
                    st.sessions.insert(
                        rec.id.clone(),
                        Session {
                            rec,
                            vm,
                            last_seen: Instant::now(),
                        },
                    );
                }
                rec => {
                    if let Some(rec) = &rec {
                        info!(session = %rec.id, mac = %rec.seat, guest = %rec.guest, "VM of a previous run is gone; cleaning up");
                        if !rec.persist {
                            let _ = std::fs::remove_file(&rec.overlay);
                        }
                    }
                    let _ = std::fs::remove_dir_all(&folder);
                }
            }
        }
    }

    fn info(&self, rec: &Record, password: Option<String>) -> SessionInfo {
        SessionInfo {
            id: rec.id.clone(),
            seat: rec.seat.to_string(),
            guest: rec.guest.clone(),
            protocol: "vnc".into(),
            host: self.vnc_addr,
            port: rec.port,
            password,
            started: rec.started,
        }
    }

    /// The seat's session of `guest`: its running one (reattached with a new password),
    /// or a new VM.
    pub async fn create(&self, seat: Mac, guest_name: &str) -> Result<SessionInfo, Error> {
        let guest = self
            .cfg
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
                s.last_seen = Instant::now();
                let rec = s.rec.clone();
                let qmp_path = s.vm.qmp.clone();
                drop(st);
                let password = new_password();
                let mut q = qmp::Qmp::connect(&qmp_path, Duration::from_secs(5))
                    .await
                    .map_err(|e| Error::Qmp(e.to_string()))?;
                qemu::set_password(&mut q, &password).await?;
                info!(session = %rec.id, mac = %seat, guest = %rec.guest, "session reattached");
                return Ok(self.info(&rec, Some(password)));
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
            let running = st.sessions.len() + st.pending_ports.len();
            if running >= self.cfg.dispatch.max_vms {
                return Err(Error::Full(format!(
                    "{running} of {} VMs are running; end a session or ask the admin to raise dispatch.max_vms",
                    self.cfg.dispatch.max_vms
                )));
            }
            let used: u64 =
                st.sessions.values().map(|s| s.rec.memory_mib).sum::<u64>() + st.pending_mib;
            if used + guest.memory_mib > self.budget_mib {
                return Err(Error::Full(format!(
                    "{} needs {} MiB and only {} MiB of the {} MiB budget are free",
                    guest.label,
                    guest.memory_mib,
                    self.budget_mib.saturating_sub(used),
                    self.budget_mib
                )));
            }
            let (lo, hi) = self.cfg.dispatch.vnc_ports;
            let port = (lo..=hi)
                .find(|p| {
                    !st.pending_ports.contains(p) && !st.sessions.values().any(|s| s.rec.port == *p)
                })
                .ok_or_else(|| {
                    Error::Full(format!(
                        "all VNC ports {lo}-{hi} are in use (dispatch.vnc_ports)"
                    ))
                })?;
            st.pending_ports.push(port);
            st.pending_mib += guest.memory_mib;
            st.pending_seats.push((seat, guest.name.clone()));
            let id: String = random::<6>().iter().map(|b| format!("{b:02x}")).collect();
            (id, port)
        };

        let result = self.start_vm(&id, seat, &guest, port).await;

        let mut st = self.state.lock().await;
        st.pending_ports.retain(|p| *p != port);
        st.pending_mib -= guest.memory_mib;
        st.pending_seats
            .retain(|s| *s != (seat, guest.name.clone()));
        let (mut session, password) = result?;
        if st.closing {
            // vdd began to stop while this VM started: stop it too, or it would outlive us.
            drop(st);
            qemu::stop(&mut session.vm, self.cfg.dispatch.shutdown_timeout).await;
            let _ = std::fs::remove_dir_all(self.dir.join(&id));
            return Err(Error::Full("the server is shutting down".into()));
        }
        let info = self.info(&session.rec, Some(password));
        info!(session = %id, mac = %seat, guest = %guest.name, port, accel = self.accel.as_str(), "VM started");
        st.sessions.insert(id, session);
        Ok(info)
    }

    async fn start_vm(
        &self,
        id: &str,
        seat: Mac,
        guest: &crate::config::Guest,
        port: u16,
    ) -> Result<(Session, String), Error> {
        if !guest.image.exists() {
            return Err(Error::MissingImage {
                guest: guest.name.clone(),
                path: guest.image.clone(),
            });
        }
        let folder = self.dir.join(id);
        std::fs::create_dir_all(&folder).map_err(|e| Error::State(folder.clone(), e))?;
        let overlay = if guest.persist {
            self.cfg
                .server
                .state_dir
                .join("overlays")
                .join(&guest.name)
                .join(format!("{}.qcow2", seat.to_string().replace(':', "-")))
        } else {
            folder.join("overlay.qcow2")
        };
        let spec = VmSpec {
            session: id.to_string(),
            guest: guest.clone(),
            dir: folder.clone(),
            overlay: overlay.clone(),
            vnc_addr: self.vnc_addr,
            vnc_port: port,
            accel: self.accel,
            qemu: self.cfg.dispatch.qemu.clone(),
        };
        let password = new_password();
        let started = qemu::start(&spec, &password).await;
        let vm = match started {
            Ok(vm) => vm,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&folder);
                return Err(e);
            }
        };
        let rec = Record {
            id: id.to_string(),
            seat,
            guest: guest.name.clone(),
            port,
            pid: vm.pid,
            started: now_unix(),
            overlay,
            persist: guest.persist,
            memory_mib: guest.memory_mib,
        };
        let mut vm = vm;
        if let Err(e) = write_record(&folder, &rec) {
            qemu::stop(&mut vm, Duration::from_secs(1)).await;
            let _ = std::fs::remove_dir_all(&folder);
            return Err(e);
        }
        Ok((
            Session {
                rec,
                vm,
                last_seen: Instant::now(),
            },
            password,
        ))
    }

    /// Sessions, all of them (`seat: None`, the admin) or one seat's.
    pub async fn list(&self, seat: Option<Mac>) -> Vec<SessionInfo> {
        let mut st = self.state.lock().await;
        st.sessions
            .values_mut()
            .filter(|s| seat.is_none_or(|m| s.rec.seat == m))
            .map(|s| {
                // A seat that looks at its sessions is present.
                if seat.is_some() {
                    s.last_seen = Instant::now();
                }
                self.info(&s.rec, None)
            })
            .collect()
    }

    /// Ends a session; `seat: Some` only its own.
    pub async fn end(&self, id: &str, seat: Option<Mac>) -> Result<(), Error> {
        let s = {
            let mut st = self.state.lock().await;
            let s = st
                .sessions
                .get(id)
                .ok_or_else(|| Error::NotFound(id.to_string()))?;
            if seat.is_some_and(|m| m != s.rec.seat) {
                return Err(Error::NotYours(id.to_string()));
            }
            st.sessions.remove(id).expect("just found")
        };
        self.finish(s, "ended").await;
        Ok(())
    }

    /// Throws the session's overlay away and starts its guest afresh (a clean desktop).
    pub async fn reset(&self, id: &str, seat: Option<Mac>) -> Result<SessionInfo, Error> {
        let (seat_mac, guest, overlay) = {
            let st = self.state.lock().await;
            let s = st
                .sessions
                .get(id)
                .ok_or_else(|| Error::NotFound(id.to_string()))?;
            if seat.is_some_and(|m| m != s.rec.seat) {
                return Err(Error::NotYours(id.to_string()));
            }
            (s.rec.seat, s.rec.guest.clone(), s.rec.overlay.clone())
        };
        self.end(id, seat).await?;
        // A kept overlay is thrown away too: reset means a clean desktop.
        let _ = std::fs::remove_file(&overlay);
        self.create(seat_mac, &guest).await
    }

    async fn finish(&self, mut s: Session, why: &str) {
        qemu::stop(&mut s.vm, self.cfg.dispatch.shutdown_timeout).await;
        if !s.rec.persist {
            let _ = std::fs::remove_file(&s.rec.overlay);
        }
        let _ = std::fs::remove_dir_all(self.dir.join(&s.rec.id));
        info!(session = %s.rec.id, mac = %s.rec.seat, guest = %s.rec.guest, "session {why}");
    }

    /// Watches the VMs until shutdown: a VM that dies ends its session; a seat not seen
    /// (no API call, no VNC viewer connected) for `idle_timeout` gets its VMs stopped.
    /// On shutdown every VM is stopped.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        let mut n: u64 = 0;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            n += 1;
            let mut dead = Vec::new();
            let mut probe = Vec::new();
            {
                let mut st = self.state.lock().await;
                for (id, s) in st.sessions.iter_mut() {
                    let exited = match s.vm.child.as_mut() {
                        Some(c) => matches!(c.try_wait(), Ok(Some(_))),
                        None => !qemu::alive(s.vm.pid),
                    };
                    if exited {
                        dead.push(id.clone());
                    } else if n % 5 == 0 {
                        probe.push((id.clone(), s.vm.qmp.clone()));
                    }
                }
                for id in &dead {
                    if let Some(s) = st.sessions.remove(id) {
                        error!(session = %id, mac = %s.rec.seat, guest = %s.rec.guest, "VM exited on its own; session ended");
                        if !s.rec.persist {
                            let _ = std::fs::remove_file(&s.rec.overlay);
                        }
                        let _ = std::fs::remove_dir_all(self.dir.join(id));
                    }
                }
            }
            // Every 10 s: a connected VNC viewer means the seat is there.
            for (id, path) in probe {
                let viewing = match qmp::Qmp::connect(&path, Duration::from_secs(2)).await {
                    Ok(mut q) => q
                        .execute("query-vnc", None)
                        .await
                        .ok()
                        .and_then(|v| v["clients"].as_array().map(|c| !c.is_empty()))
                        .unwrap_or(false),
                    Err(_) => false,
                };
                let idle = {
                    let mut st = self.state.lock().await;
                    match st.sessions.get_mut(&id) {
                        Some(s) if viewing => {
                            s.last_seen = Instant::now();
                            None
                        }
                        Some(s) if s.last_seen.elapsed() > self.cfg.dispatch.idle_timeout => {
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
        while !self.state.lock().await.pending_ports.is_empty()
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let all: Vec<Session> = {
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

fn write_record(folder: &std::path::Path, rec: &Record) -> Result<(), Error> {
    // Written to a temporary name, synced, then renamed: a crash leaves the old record
    // or the new one, never half of one.
    let tmp = folder.join("session.json.tmp");
    let bytes = serde_json::to_vec_pretty(rec).expect("a record serializes");
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, folder.join("session.json"))?;
        std::fs::File::open(folder)?.sync_all()
    };
    write().map_err(|e| Error::State(folder.to_path_buf(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_vnc_sized_and_differ() {
        let a = new_password();
        let b = new_password();
        assert_eq!(a.len(), 8);
        assert_ne!(a, b);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()));
    }

    #[test]
    fn record_round_trip() {
        let rec = Record {
            id: "0a1b2c3d4e5f".into(),
            seat: "52:54:00:00:00:01".parse().unwrap(),
            guest: "demo".into(),
            port: 5910,
            pid: 42,
            started: 1,
            overlay: "/var/lib/vdd/sessions/x/overlay.qcow2".into(),
            persist: false,
            memory_mib: 256,
        };
        let j = serde_json::to_string(&rec).unwrap();
        assert!(j.contains("\"seat\":\"52:54:00:00:00:01\""), "{j}");
        let back: Record = serde_json::from_str(&j).unwrap();
        assert_eq!(back.seat, rec.seat);
    }
}
