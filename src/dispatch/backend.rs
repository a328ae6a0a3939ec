//! The seam between the dispatcher and what runs its VMs. The dispatcher decides (who gets
//! a VM, admission, sessions, records, the LAN side of X11 guests); a backend starts,
//! finds again, watches and stops the VMs. The local QEMU backend (`qemu.rs`) is the
//! default; the libvirt backend (`libvirt/`) runs them on several hypervisor hosts.
//!
//! As in firecracker's building blocks, a backend reports through return values and logs
//! nothing about sessions itself; what it needs to find a VM again after a crash is its
//! own type ([`Backend::Saved`]), kept in the session's record, not a pid the dispatcher
//! has to understand.
//!
//! What the libvirt backend added, each with a default that is the QEMU backend's
//! behaviour, so QEMU's code did not change: [`Backend::display_addr`] (a VM's screen on
//! another host's address), [`Backend::lost`] (a host that stopped answering ends its
//! sessions with that reason), [`Backend::remove_overlay`] (an overlay on another host)
//! [`Backend::capacity_mib`] (the memory budget is the hosts' sum) and
//! [`Backend::hosts`] (their health in the admin's summary). The check that a
//! guest's base image exists moved from the dispatcher into the QEMU backend's `start`:
//! on hosts, the image is the host's, not vdd's.
//!
//! Warm pools (`warm.rs`) and saved states (`saved.rs`) are the dispatcher's; a backend
//! only starts a VM from a saved state ([`VmSpec::restore`]), saves one
//! ([`Backend::save_state`]), and says what a guest does ([`Backend::activity`]). Only
//! the QEMU backend does these; the libvirt one keeps the defaults (no saved states, no
//! screen size), and the config refuses `warm` and `start = "saved"` with its hosts.

use std::future::Future;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::qemu::VmSpec;
use super::saved::Activity;
use super::screen::ScreenSize;
use super::Error;
use crate::config::Mac;

/// A display password and how long it opens the display from the moment it is set
/// (`dispatch.password_lifetime`): its lifetime starts when the seat is handed it, right
/// before its viewer connects, not when the session was created. No `Debug`: it is a secret.
#[derive(Clone)]
pub struct OneTime {
    pub password: String,
    pub valid_for: Duration,
}

pub trait Backend: Send + Sync + 'static {
    /// A running VM, as the dispatcher holds it.
    type Vm: Send + Sync + 'static;
    /// What talks to a VM (password, viewers) without holding the dispatcher's lock.
    type Control: Clone + Send + Sync + 'static;
    /// What the session's record keeps to find the VM again after a crash.
    type Saved: Clone + std::fmt::Debug + Serialize + DeserializeOwned + Send + Sync + 'static;

    /// For log lines: what runs the VMs ("qemu, tcg").
    fn describe(&self) -> String;

    /// Starts the VM of `spec`; a VNC guest's display takes `password`. With
    /// `spec.restore`, the VM resumes from that saved state instead of booting, and a
    /// state that does not load is [`Error::Restore`] (the dispatcher then boots it cold).
    fn start(
        &self,
        spec: VmSpec,
        password: Option<OneTime>,
    ) -> impl Future<Output = Result<(Self::Vm, Self::Saved), Error>> + Send;

    /// The VM of session `session` (folder `dir`) that a previous run left, if it still
    /// runs as that session.
    fn adopt(&self, dir: &Path, session: &str, saved: &Self::Saved) -> Option<Self::Vm>;

    /// Stops whatever VM of `session` still runs without a usable record (vdd killed
    /// between the start and the record, or a record lost); returns how many.
    fn stop_strays(&self, dir: &Path, session: &str) -> impl Future<Output = usize> + Send;

    /// Shuts the VM down, politely first, each step within `grace`.
    fn stop(&self, vm: &mut Self::Vm, grace: Duration) -> impl Future<Output = ()> + Send;

    fn control(&self, vm: &Self::Vm) -> Self::Control;

    /// Sets a new one-time display password (it replaces the one before).
    fn set_password(
        &self,
        vm: Self::Control,
        password: OneTime,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// Whether a viewer is connected to the VM's display now.
    fn has_viewer(&self, vm: Self::Control) -> impl Future<Output = bool> + Send;

    /// Whether the VM has exited (on its own, or killed).
    fn exited(&self, vm: &mut Self::Vm) -> bool;

    /// Readies the LAN side of X11 guests at start, after adoption: `adopted` are the
    /// (tap, MAC) of the X11 guests a previous run left and this one adopted.
    fn prepare_lan(
        &self,
        adopted: &[(String, Mac)],
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// Undoes an X11 guest's LAN side once its VM is gone.
    fn release_lan(&self, tap: &str, mac: Mac) -> Result<(), Error>;

    /// What a saved state depends on besides the guest's own settings: a state saved by
    /// one hypervisor (or build of it) restores only on the same one.
    fn state_tag(&self) -> String {
        self.describe()
    }

    /// Saves the RAM and device state of the running `vm` to the new file `state`: the VM
    /// is paused first and its disk flushed, so its disk as it is now and `state` belong
    /// together. The VM stays paused; the caller stops it. Returns the file's size. A
    /// backend without saved states says so (config refuses `start = "saved"` there).
    fn save_state(
        &self,
        _vm: &mut Self::Vm,
        _state: &Path,
    ) -> impl Future<Output = Result<u64, Error>> + Send {
        async {
            Err(Error::ToolFailed {
                tool: "save_state".into(),
                said: "this backend saves no states".into(),
            })
        }
    }

    /// What the guest does now, to tell when it is up (see `saved::settled`): a digest of
    /// its screen and the CPU time its VM has used. `None` when the VM cannot be asked.
    fn activity(&self, _vm: Self::Control) -> impl Future<Output = Option<Activity>> + Send {
        async { None }
    }

    /// The size of the guest's screen now (`None` when it cannot be asked): the seat's
    /// viewer scales a guest that did not take the seat's size to fit.
    fn screen_size(&self, _vm: Self::Control) -> impl Future<Output = Option<ScreenSize>> + Send {
        async { None }
    }

    /// A picture of the VM's screen, for the admin's panel (QEMU: QMP `screendump`,
    /// libvirt: `virDomainScreenshot`). A backend without one says so.
    fn screenshot(&self, _vm: Self::Control) -> impl Future<Output = Result<Screen, Error>> + Send {
        async {
            Err(Error::ToolFailed {
                tool: "screenshot".into(),
                said: "this backend takes no screenshots".into(),
            })
        }
    }

    /// The VM's CPU time and memory now, when the backend can tell.
    fn usage(&self, _vm: &Self::Vm) -> Option<VmUsage> {
        None
    }

    /// Where the VM's VNC display listens, when not on vdd's own LAN address (a VM on
    /// another host). QEMU: `None`, vdd's address.
    fn display_addr(&self, _saved: &Self::Saved) -> Option<Ipv4Addr> {
        None
    }

    /// Why the VM's session must end although the VM may still run: its host stopped
    /// answering, so its screen, its stop and its disk are out of reach. The session
    /// fails with this message. QEMU's VMs run beside vdd: never.
    fn lost(&self, _vm: &Self::Vm) -> Option<String> {
        None
    }

    /// Throws a session's overlay away (at its end unless kept, and at a reset). QEMU:
    /// the file beside vdd.
    fn remove_overlay(&self, _saved: &Self::Saved, overlay: &Path) {
        let _ = std::fs::remove_file(overlay);
    }

    /// MiB of guest memory the backend offers, when it knows better than vdd's machine
    /// (`dispatch.memory_budget = "auto"`). QEMU: `None`, 80% of this machine's.
    fn capacity_mib(&self) -> Option<u64> {
        None
    }

    /// The hosts the VMs run on and their health, for the admin's summary. QEMU: none
    /// (vdd's own machine).
    fn hosts(&self) -> Vec<HostStatus> {
        Vec::new()
    }
}

/// One hypervisor host, as `GET /api/v1/status` shows it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct HostStatus {
    pub name: String,
    /// Answering now.
    pub up: bool,
    /// Why not, when it is down.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// vdd's VMs there, their memory, and what vdd may give there.
    pub vms: usize,
    pub memory_mib: u64,
    pub memory_limit_mib: u64,
    /// Its CPU busy share at its last answer (0..1).
    pub cpu_busy: f64,
}

/// A VM's screen: `width * height` RGB pixels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Screen {
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<u8>,
}

/// What a VM costs the server now.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct VmUsage {
    /// CPU time used since the VM started (user + system), in seconds.
    pub cpu_seconds: f64,
    /// Resident memory, in bytes.
    pub rss_bytes: u64,
}
