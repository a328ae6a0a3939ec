//! The local QEMU backend: one `qemu-system-x86_64` per session, on a qcow2 overlay of the
//! guest's base image, with its VNC server on the LAN address behind a per-session
//! password set over QMP.
//!
//! A VNC guest has QEMU's user-mode NIC (NAT out, nothing in) and its screen on VNC; an X11
//! guest has only a virtio NIC on a tap in the LAN bridge (its display manager must be
//! reachable by the thin client) and no screen.
//!
//! VMs run in their own process group, so a Ctrl-C aimed at vdd does not reach them, and
//! their pid and QMP socket live in the session's folder, so a restarted vdd adopts them.
//!
//! Starting a VM is in `qemu_launch.rs`, the VMs as processes (alive, stopped) in
//! `qemu_proc.rs`, saved states in `qemu_state.rs`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use tracing::{info, warn};

use super::backend::OneTime;
use super::screen::ScreenSize;
use super::Error;
use crate::config::{Guest, Mac};
use crate::{lan, tapfilter};
use qemu_ctl::qmp::Qmp;

pub use super::qemu_launch::{create_overlay, private_dir, set_password, start};
pub use super::qemu_proc::{alive, is_our_vm, port_free, stop, usage, vms_of};

pub use qemu_ctl::accel::Accel;

/// KVM only where it really runs a guest (see `qemu_ctl::accel`); asked once per process.
pub async fn probe_accel(qemu: &str, limit: Duration) -> Accel {
    let qemu = qemu.to_string();
    let a = tokio::task::spawn_blocking(move || qemu_ctl::accel::detect(&qemu, limit))
        .await
        .unwrap_or(Accel::Tcg);
    if a == Accel::Tcg {
        warn!(
            "KVM does not run guests here (/dev/kvm missing or hanging); VMs use TCG and are slow"
        );
    } else {
        info!("KVM works; VMs are accelerated");
    }
    a
}

/// The local QEMU backend: `binary` with `accel`, one process per VM.
#[derive(Clone, Debug)]
pub struct Qemu {
    pub binary: String,
    pub accel: Accel,
}

/// What a session's record keeps of a QEMU VM: its pid (checked against the VM's command
/// line on adoption, so a recycled pid is not taken for it). Flattened into the record,
/// as `"pid"`, which older records have too.
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
pub struct Saved {
    pub pid: u32,
}

impl super::backend::Backend for Qemu {
    type Vm = Vm;
    type Control = Control;
    type Saved = Saved;

    fn describe(&self) -> String {
        format!("qemu, {}", self.accel.as_str())
    }

    /// An X11 guest's NIC is a tap `vdt-<session>` in the bridge, let through the tap
    /// filter (`tapfilter.rs`) before it exists, so no frame of the guest ever passes
    /// unchecked. QEMU inherits the tap's only other descriptor; vdd's goes right after
    /// the spawn, so the tap lives exactly as long as the VM.
    async fn start(&self, spec: VmSpec, password: Option<OneTime>) -> Result<(Vm, Saved), Error> {
        if !spec.guest.image.exists() {
            return Err(Error::MissingImage {
                guest: spec.guest.name.clone(),
                path: spec.guest.image.clone(),
            });
        }
        let tap = match &spec.display {
            VmDisplay::Vnc { .. } => None,
            VmDisplay::Lan { mac, bridge } => {
                let name = lan::tap_name(&spec.session);
                tapfilter::admit(&name, *mac).map_err(Error::TapFilter)?;
                match lan::open_tap(&name, bridge).await {
                    Ok(t) => {
                        info!(session = %spec.session, guest_mac = %mac, tap = %name, %bridge, "tap created");
                        Some((t, *mac))
                    }
                    Err(e) => {
                        let _ = tapfilter::forget(&name, *mac);
                        return Err(Error::Lan(e));
                    }
                }
            }
        };
        let tap_fd = tap
            .as_ref()
            .map(|(t, _)| std::os::fd::AsRawFd::as_raw_fd(&t.fd));
        let started = start(self, &spec, tap_fd, password.as_ref()).await;
        if let (Err(_), Some((t, mac))) = (&started, &tap) {
            let _ = tapfilter::forget(&t.name, *mac);
        }
        drop(tap);
        let vm = started?;
        let saved = Saved { pid: vm.pid };
        Ok((vm, saved))
    }

    async fn prepare_lan(&self, adopted: &[(String, Mac)]) -> Result<(), Error> {
        tapfilter::install().map_err(Error::TapFilter)?;
        info!(
            table = tapfilter::TABLE,
            "X11 guests' taps filtered to what README's table allows"
        );
        let keep: Vec<String> = adopted.iter().map(|(t, _)| t.clone()).collect();
        lan::sweep_taps(&keep).await.map_err(Error::Lan)?;
        for (tap, mac) in adopted {
            tapfilter::admit(tap, *mac).map_err(Error::TapFilter)?;
        }
        Ok(())
    }

    fn release_lan(&self, tap: &str, mac: Mac) -> Result<(), Error> {
        tapfilter::forget(tap, mac).map_err(Error::TapFilter)
    }

    fn adopt(&self, dir: &Path, session: &str, saved: &Saved) -> Option<Vm> {
        (alive(saved.pid) && is_our_vm(saved.pid, session)).then(|| Vm {
            pid: saved.pid,
            qmp: dir.join("qmp.sock"),
            child: None,
        })
    }

    async fn stop_strays(&self, dir: &Path, session: &str) -> usize {
        let pids = vms_of(session);
        for &pid in &pids {
            let mut vm = Vm {
                pid,
                qmp: dir.join("qmp.sock"),
                child: None,
            };
            stop(&mut vm, Duration::from_secs(1)).await;
        }
        pids.len()
    }

    async fn stop(&self, vm: &mut Vm, grace: Duration) {
        stop(vm, grace).await
    }

    fn control(&self, vm: &Vm) -> Control {
        Control {
            qmp: vm.qmp.clone(),
            pid: vm.pid,
        }
    }

    async fn set_password(&self, c: Control, password: OneTime) -> Result<(), Error> {
        let mut q = Qmp::connect(&c.qmp, Duration::from_secs(5)).await?;
        set_password(&mut q, &password).await
    }

    async fn has_viewer(&self, c: Control) -> bool {
        match Qmp::connect(&c.qmp, Duration::from_secs(2)).await {
            Ok(mut q) => q
                .execute("query-vnc", None)
                .await
                .ok()
                .and_then(|v| v["clients"].as_array().map(|c| !c.is_empty()))
                .unwrap_or(false),
            Err(_) => false,
        }
    }

    fn exited(&self, vm: &mut Vm) -> bool {
        match vm.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(Some(_))),
            None => !alive(vm.pid),
        }
    }

    fn state_tag(&self) -> String {
        super::qemu_state::tag(&self.binary, self.accel.as_str())
    }

    async fn save_state(&self, vm: &mut Vm, state: &Path) -> Result<u64, Error> {
        let dir = vm.qmp.parent().unwrap_or(Path::new("/")).to_path_buf();
        super::qemu_state::save(&vm.qmp, &dir, state).await
    }

    async fn activity(&self, c: Control) -> Option<super::saved::Activity> {
        super::qemu_state::activity(&c.qmp, c.pid).await
    }

    async fn screen_size(&self, c: Control) -> Option<ScreenSize> {
        super::qemu_state::screen_size(&c.qmp).await
    }

    /// QMP `screendump` into the session's folder (PPM, QEMU's native format; PNG
    /// needs QEMU 7.1), read back and removed.
    async fn screenshot(&self, c: Control) -> Result<super::backend::Screen, Error> {
        let qmp = c.qmp;
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let file = qmp.with_file_name(format!("screen-{n}.ppm"));
        let mut q = Qmp::connect(&qmp, Duration::from_secs(5)).await?;
        let done = q
            .execute(
                "screendump",
                Some(json!({"filename": file.display().to_string()})),
            )
            .await;
        let bytes = std::fs::read(&file);
        let _ = std::fs::remove_file(&file);
        done?;
        let bytes = bytes.map_err(|e| Error::State(file.clone(), e))?;
        let img = qemu_ctl::ppm::parse(&bytes).map_err(|e| Error::ToolFailed {
            tool: "screendump".into(),
            said: e.to_string(),
        })?;
        Ok(super::backend::Screen {
            width: img.width,
            height: img.height,
            rgb: img.rgb.to_vec(),
        })
    }

    fn usage(&self, vm: &Vm) -> Option<super::backend::VmUsage> {
        usage(vm.pid)
    }
}

/// Everything needed to start one VM.
#[derive(Clone, Debug)]
pub struct VmSpec {
    pub session: String,
    pub guest: Guest,
    /// The session's folder: pid file, QMP socket, serial log, and the overlay unless kept.
    pub dir: PathBuf,
    /// The qcow2 overlay to run on (created here if missing).
    pub overlay: PathBuf,
    pub display: VmDisplay,
    /// A VNC guest's screen size (QEMU's VGA with that EDID and mode); `None`: QEMU's
    /// default VGA.
    pub screen: Option<ScreenSize>,
    /// Resume from this saved state instead of booting; the overlay then sits on its
    /// frozen disk instead of the guest's base image.
    pub restore: Option<Restore>,
}

/// A saved state to start from: the guest's disk as it was saved (a read-only qcow2 on
/// the base image) and its RAM and device state.
#[derive(Clone, Debug)]
pub struct Restore {
    pub disk: PathBuf,
    pub state: PathBuf,
}

/// How the guest is seen and reached.
#[derive(Clone, Debug)]
pub enum VmDisplay {
    /// QEMU's VNC server on `addr:port` behind a password; user-mode NAT networking.
    Vnc { addr: std::net::Ipv4Addr, port: u16 },
    /// A virtio NIC with `mac` in the LAN `bridge`. No screen.
    Lan {
        mac: crate::config::Mac,
        bridge: String,
    },
}

/// What talks to a running VM: its QMP socket, and its pid for its CPU time.
#[derive(Clone, Debug)]
pub struct Control {
    pub qmp: PathBuf,
    pub pid: u32,
}

/// A running VM.
#[derive(Debug)]
pub struct Vm {
    pub pid: u32,
    pub qmp: PathBuf,
    /// `Some` when vdd started it (so it reaps it); `None` for an adopted VM.
    pub child: Option<tokio::process::Child>,
}
