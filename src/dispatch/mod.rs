//! The dispatcher: a guest VM on demand for each seat. A session is one seat (the thin
//! client, by MAC) + one guest + one VM; a seat may run several guests at once.
//!
//! Sessions are written to `STATE_DIR/sessions/ID/session.json` before their VM is
//! reported started, so a vdd killed at any moment finds its VMs again on restart and
//! adopts them (pid still alive and still that VM) or cleans up after them. A graceful
//! shutdown stops every VM: nothing outlives vdd but what a crash leaves for adoption.
//!
//! An X11 guest gets a NIC on the LAN instead of a VNC screen: a MAC made for the session,
//! an address bound to that MAC in vdd's own DHCP before the VM starts, and a tap in the
//! LAN bridge (see `lan.rs`). Its session is `starting` until the guest's display manager
//! answers an XDMCP Query (`xdmcp.rs`), then `ready`; or `failed` after
//! `dispatch.x11_timeout`, when its VM is stopped and the failure stays readable for
//! [`FAILED_KEPT`].
//!
//! Here: the dispatcher's types, its state and its construction.
//! Beside it: `access.rs` (the API's view: sessions, who may do what, and a session's
//! end), `sessions.rs` (the seam the HTTP API sees), `start.rs` (a session's start),
//! `backend.rs` (the trait the VMs run behind), `observe.rs` (what the admin's panel
//! sees of them: screens, CPU and memory, failed sessions), `qemu.rs` (the local QEMU
//! backend), `libvirt/` and `placement.rs` (the libvirt backend over hypervisor hosts),
//! `ledger.rs` (admission: VM slots, memory, VNC ports), `record.rs` (the record
//! on disk), `adopt.rs` (taking over after a crash), `monitor.rs` (the watch over running
//! VMs), `x11.rs` (an X11 guest's way to ready), `warm.rs` (warm pools), `saved.rs`
//! (saved-state starts; `qemu_state.rs` is the QEMU side), `screen.rs` (the seat's
//! screen size). An X11 guest's DHCP reservation is made here; its NIC (for QEMU: a tap
//! in the bridge, behind the tap filter) by the backend.

mod access;
mod adopt;
pub mod backend;
mod ledger;
pub mod libvirt;
mod monitor;
mod observe;
pub mod placement;
pub mod qemu;
mod qemu_launch;
mod qemu_proc;
mod qemu_state;
mod record;
pub mod saved;
pub mod screen;
mod sessions;
mod start;
mod warm;
mod x11;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::Mutex;

use crate::config::{AccelChoice, Config, Display, Live, Mac};
use crate::{dhcp, lan, tapfilter, xdmcp};
pub use access::Who;
pub use backend::{Backend, Screen, VmUsage};
use qemu::{Accel, Qemu, VmDisplay, VmSpec};
use record::{new_key, write_record, How, Record, X11Rec};
pub use screen::ScreenSize;
pub use sessions::{Counts, Pending, Sessions, Usage};
/// The session states and protocols, shared with the thin client (the `vdd-api` crate).
pub use vdd_api::{Protocol, SessionState};

/// An error with its causes, for a log line or the message a seat sees.
pub fn report(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// How long a failed X11 session stays visible to `GET /api/v1/sessions/ID`.
pub const FAILED_KEPT: Duration = Duration::from_secs(300);

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
    /// A seat asked without the session's key, or with a wrong one.
    #[error(
        "session {0} needs its key (X-Vdd-Session-Key), which only the seat that started it got"
    )]
    WrongKey(String),
    /// An X11 session: the guest's display manager logs the user in, no VNC password.
    #[error("session {0} is an X11 session: it has no VNC password")]
    NoPassword(String),
    #[error("the base image of guest {guest} is missing: {path}")]
    MissingImage { guest: String, path: PathBuf },
    #[error("starting {tool}")]
    Spawn {
        tool: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} failed: {said}")]
    ToolFailed { tool: String, said: String },
    #[error("state folder {0}")]
    State(PathBuf, #[source] std::io::Error),
    #[error("the VM exited at once ({0}); QEMU said: {1}")]
    VmExited(String, String),
    #[error("QMP")]
    Qmp(#[from] qemu_ctl::qmp::Error),
    #[error("QEMU's QMP socket never came up")]
    QmpNeverUp,
    /// An X11 guest was asked of a vdd that serves no LAN for it.
    #[error("{0}")]
    NoLan(String),
    /// The guest's LAN side (bridge, tap) could not be set up.
    #[error("the X11 guest's network")]
    Lan(#[source] lan::Error),
    #[error("the filter of the X11 guests' taps")]
    TapFilter(#[source] tapfilter::Error),
    #[error("reserving the X11 guest's address")]
    Reserve(#[source] dhcp::ReserveError),
    /// A saved state did not load (`saved.rs`); the dispatcher boots the guest instead.
    #[error("the saved state {0} did not load: {1}")]
    Restore(PathBuf, String),
    /// A hypervisor host refused a libvirt call.
    #[error("hypervisor host {host}: {what}")]
    Host {
        host: String,
        what: String,
        #[source]
        source: virt::error::Error,
    },
    /// A hypervisor host did not answer.
    #[error("hypervisor host {host} does not answer: {what}")]
    HostDown { host: String, what: String },
}

/// Where an X11 guest's NIC sits: the bridge its tap joins and vdd's DHCP leases.
#[derive(Clone, Debug)]
pub struct LanSide {
    pub bridge: String,
    pub leases: dhcp::Leases,
}

/// What a client learns about a session. The password is only in the answer to the
/// request that set it (create, reattach, reset).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct SessionInfo {
    pub id: String,
    pub seat: String,
    pub guest: String,
    /// VNC (connect a viewer to host:port with the password) or XDMCP (run `X -query
    /// host`; the guest's display manager listens on host:177).
    pub protocol: Protocol,
    /// The server (VNC) or the guest's own address (XDMCP; `null` only if not yet known).
    pub host: Option<Ipv4Addr>,
    pub port: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    pub started: u64,
    pub state: SessionState,
    /// Why the session failed; only with `state: "failed"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The MAC of an X11 guest's NIC.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// How its VM started: "boot" (a cold boot), "saved" (resumed from the guest's saved
    /// state) or "warm" (a VM of the warm pool, booted before the pick).
    pub start: String,
    /// The guest's screen size, when the seat reported its own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub screen: Option<ScreenSize>,
    /// The session's key: only in the answer that created the session (or reset it).
    /// A seat must show it (`X-Vdd-Session-Key`) for everything else it does with the
    /// session: a seat is only a MAC in the neighbour table, and any LAN host can clone
    /// a MAC.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

struct Session<B: Backend> {
    rec: Record<B::Saved>,
    vm: B::Vm,
    last_seen: Instant,
    /// `Ready` for VNC; for X11 it follows the XDMCP probe.
    state: SessionState,
    /// The running XDMCP probe of a starting X11 session, stopped when the session ends.
    probe: Option<tokio::task::AbortHandle>,
}

/// A failed session, kept for GET until [`FAILED_KEPT`] has passed or it is deleted.
struct Failed {
    info: SessionInfo,
    key: String,
    since: Instant,
}

struct State<B: Backend> {
    sessions: BTreeMap<String, Session<B>>,
    /// Ports and memory promised to VMs still starting, so concurrent creates never
    /// share a port or overrun the budget while the lock is not held.
    pending_ports: Vec<u16>,
    /// Seats' VMs starting (of any display), so `max_vms` holds while the lock is not held.
    pending_vms: usize,
    pending_mib: u64,
    /// VMs starting ahead of the seats (warm, or to be saved): seats' admission does not
    /// wait for them, they give way when they come up over the limits.
    bg_pending_vms: usize,
    bg_pending_mib: u64,
    pending_seats: Vec<(Mac, String)>,
    /// Per guest, the screen its seats asked for last: its warm VMs and saved state are
    /// made for it.
    screens: BTreeMap<String, ScreenSize>,
    /// Per guest, how its VMs started (warm hits and misses, saved or cold).
    counts: BTreeMap<String, Counts>,
    saved: saved::Store,
    /// Per guest, when a warm VM last failed to start: refills wait [`saved::BACKOFF`].
    warm_failed: BTreeMap<String, Instant>,
    /// Set when vdd stops: VMs still starting are stopped as soon as they are up.
    closing: bool,
    failed: BTreeMap<String, Failed>,
}

impl<B: Backend> State<B> {
    /// VMs starting now: seats', warm ones and ones booted to be saved.
    fn starting(&self) -> usize {
        self.pending_vms + self.bg_pending_vms
    }
}

impl<B: Backend> Default for State<B> {
    fn default() -> Self {
        State {
            sessions: BTreeMap::new(),
            pending_ports: Vec::new(),
            pending_vms: 0,
            pending_mib: 0,
            bg_pending_vms: 0,
            bg_pending_mib: 0,
            pending_seats: Vec::new(),
            screens: BTreeMap::new(),
            counts: BTreeMap::new(),
            saved: saved::Store::default(),
            warm_failed: BTreeMap::new(),
            closing: false,
            failed: BTreeMap::new(),
        }
    }
}

/// Runs the sessions of one server, its VMs on backend `B` (the local QEMU by default).
pub struct Dispatcher<B: Backend = Qemu> {
    /// The running config: the menu and the limits change with a reload; a running
    /// session keeps the guest it started with, even when a reload removes it.
    cfg: Live,
    backend: B,
    vnc_addr: Ipv4Addr,
    /// The machine's memory, for the default budget (80% of it).
    machine_mib: u64,
    dir: PathBuf,
    state: Mutex<State<B>>,
    /// The bridge and leases X11 guests use; `None` when vdd serves no LAN (tests, or
    /// DHCP not in full mode), and then X11 sessions are refused.
    lan: Option<LanSide>,
    /// Itself, for the XDMCP probes that outlive the request that started them.
    me: Weak<Dispatcher<B>>,
    /// A maintenance pass (saved states, warm pools) runs (`warm.rs`).
    maintaining: AtomicBool,
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

/// MiB free (for an unprivileged writer) on the file system of `dir`.
fn free_mib(dir: &std::path::Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(dir).ok()?;
    Some((st.blocks_available() as u64 * st.fragment_size() as u64) >> 20)
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

impl Dispatcher<Qemu> {
    /// Probes the accelerator and adopts (or cleans up after) the VMs a previous vdd left.
    /// Without a LAN side: VNC guests only.
    pub async fn new(cfg: impl Into<Live>) -> Result<Arc<Dispatcher>, Error> {
        Self::with_lan(cfg, None).await
    }

    /// Like [`Dispatcher::new`]; X11 guests get their NIC on `lan`. Adopted X11 VMs get
    /// their DHCP binding back and are probed again; `vdt-*` taps no adopted VM holds are
    /// deleted.
    pub async fn with_lan(
        cfg: impl Into<Live>,
        lan: Option<LanSide>,
    ) -> Result<Arc<Dispatcher>, Error> {
        let cfg = cfg.into();
        let now = cfg.get();
        let d = &now.dispatch;
        let accel = match d.accel {
            AccelChoice::Kvm => Accel::Kvm,
            AccelChoice::Tcg => Accel::Tcg,
            AccelChoice::Auto => qemu::probe_accel(&d.qemu, Duration::from_secs(5)).await,
        };
        let backend = Qemu {
            binary: d.qemu.clone(),
            accel,
        };
        Dispatcher::with_backend(cfg, lan, backend).await
    }

    pub fn accel(&self) -> Accel {
        self.backend.accel
    }
}

impl<B: Backend> Dispatcher<B> {
    /// A dispatcher whose VMs run on `backend`; adopts what a previous run left.
    pub async fn with_backend(
        cfg: impl Into<Live>,
        lan: Option<LanSide>,
        backend: B,
    ) -> Result<Arc<Dispatcher<B>>, Error> {
        let cfg = cfg.into();
        let now = cfg.get();
        let dir = now.server.state_dir.join("sessions");
        qemu::private_dir(&dir)?;
        let me = Arc::new_cyclic(|me| Dispatcher {
            backend,
            vnc_addr: now.server_ip().unwrap_or(Ipv4Addr::LOCALHOST),
            machine_mib: machine_memory_mib(),
            dir,
            state: Mutex::new(State::default()),
            cfg,
            lan,
            me: me.clone(),
            maintaining: AtomicBool::new(false),
        });
        me.adopt().await;
        me.load_saved().await;
        me.gc_saved().await;
        if me.lan.is_some() {
            let adopted: Vec<(String, Mac)> = {
                let st = me.state.lock().await;
                st.sessions
                    .values()
                    .filter_map(|s| s.rec.x11.as_ref().map(|x| (x.tap.clone(), x.mac)))
                    .collect()
            };
            me.backend.prepare_lan(&adopted).await?;
        }
        Ok(me)
    }

    /// The config now (a reload may have replaced it since the last call).
    fn cfg(&self) -> Arc<Config> {
        self.cfg.get()
    }

    /// A new display password, valid for `dispatch.password_lifetime` from when it is set.
    fn one_time(&self) -> backend::OneTime {
        backend::OneTime {
            password: new_password(),
            valid_for: self.cfg().dispatch.password_lifetime,
        }
    }

    /// MiB of guest memory all VMs together may use (`dispatch.memory_budget`).
    fn budget_mib(&self) -> u64 {
        self.cfg()
            .dispatch
            .memory_budget_mib
            .or(self.backend.capacity_mib())
            .unwrap_or(self.machine_mib * 8 / 10)
    }

    fn limits(&self) -> ledger::Limits {
        let cfg = self.cfg();
        ledger::Limits {
            max_vms: cfg.dispatch.max_vms,
            budget_mib: self.budget_mib(),
            disk_reserve_mib: cfg.dispatch.disk_reserve_mib,
            vnc_ports: cfg.dispatch.vnc_ports,
        }
    }

    fn info(&self, s: &Session<B>, password: Option<String>) -> SessionInfo {
        let rec = &s.rec;
        let (protocol, host, port, mac) = match &rec.x11 {
            None => {
                let addr = self.backend.display_addr(&rec.vm).unwrap_or(self.vnc_addr);
                (Protocol::Vnc, Some(addr), rec.port, None)
            }
            Some(x) => (
                Protocol::Xdmcp,
                Some(x.ip),
                xdmcp::PORT,
                Some(x.mac.to_string()),
            ),
        };
        SessionInfo {
            id: rec.id.clone(),
            seat: rec.seat.to_string(),
            guest: rec.guest.clone(),
            protocol,
            host,
            port,
            password,
            started: rec.started,
            state: s.state,
            error: None,
            mac,
            start: rec.how.as_str().to_string(),
            screen: rec.screen,
            key: None,
        }
    }
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
}
