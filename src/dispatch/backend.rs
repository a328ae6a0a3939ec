//! The seam between the dispatcher and what runs its VMs. The dispatcher decides (who gets
//! a VM, admission, sessions, records, the LAN side of X11 guests); a backend starts,
//! finds again, watches and stops the VMs. The local QEMU backend (`qemu.rs`) is the one
//! there is; another (libvirt on several hosts) fits behind the same trait.
//!
//! As in firecracker's building blocks, a backend reports through return values and logs
//! nothing about sessions itself; what it needs to find a VM again after a crash is its
//! own type ([`Backend::Saved`]), kept in the session's record, not a pid the dispatcher
//! has to understand.
//!
//! Warm pools (`warm.rs`) and saved states (`saved.rs`) are the dispatcher's; a backend
//! only starts a VM from a saved state ([`VmSpec::restore`]), saves one
//! ([`Backend::save_state`]), and says what a guest does ([`Backend::activity`]).

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::qemu::VmSpec;
use super::saved::Activity;
use super::screen::Screen;
use super::Error;
use crate::config::Mac;

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
        password: Option<String>,
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
        password: String,
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
    fn state_tag(&self) -> String;

    /// Saves the RAM and device state of the running `vm` to the new file `state`: the VM
    /// is paused first and its disk flushed, so its disk as it is now and `state` belong
    /// together. The VM stays paused; the caller stops it. Returns the file's size.
    fn save_state(
        &self,
        vm: &mut Self::Vm,
        state: &Path,
    ) -> impl Future<Output = Result<u64, Error>> + Send;

    /// What the guest does now, to tell when it is up (see `saved::settled`): a digest of
    /// its screen and the CPU time its VM has used. `None` when the VM cannot be asked.
    fn activity(&self, vm: Self::Control) -> impl Future<Output = Option<Activity>> + Send;

    /// The size of the guest's screen now (`None` when it cannot be asked): the seat's
    /// viewer scales a guest that did not take the seat's size to fit.
    fn screen_size(&self, vm: Self::Control) -> impl Future<Output = Option<Screen>> + Send;
}
