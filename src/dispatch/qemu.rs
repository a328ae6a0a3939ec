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

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::json;
use tokio::process::Command;
use tracing::{info, warn};

use super::backend::OneTime;
use super::screen::ScreenSize;
use super::Error;
use crate::config::{Guest, Mac};
use crate::{lan, tapfilter};
use qemu_ctl::qmp::Qmp;

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

/// CPU time (utime + stime of /proc/PID/stat, in clock ticks) and VmRSS of a process.
pub fn usage(pid: u32) -> Option<super::backend::VmUsage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the ")" that closes the command name: state is the 1st, utime the
    // 12th, stime the 13th (proc(5) numbers them 3, 14, 15).
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|&h| h > 0)
        .unwrap_or(100) as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    Some(super::backend::VmUsage {
        cpu_seconds: ticks as f64 / hz,
        rss_bytes: rss_kib * 1024,
    })
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

/// The format of a base image, from `qemu-img info`, so the overlay names it (`-F`):
/// QEMU refuses to guess a backing format for safety.
async fn image_format(base: &Path) -> Result<String, Error> {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(base)
        .output()
        .await
        .map_err(|source| Error::Spawn {
            tool: "qemu-img info".into(),
            source,
        })?;
    if !out.status.success() {
        return Err(Error::ToolFailed {
            tool: format!("qemu-img info {}", base.display()),
            said: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| Error::ToolFailed {
            tool: format!("qemu-img info {}", base.display()),
            said: format!("not JSON: {e}"),
        })?;
    Ok(v["format"].as_str().unwrap_or("raw").to_string())
}

/// Creates `dir` (and its parents) and makes it 0700: a session's folder holds its disk
/// overlay, its QEMU and serial logs and its key, for nobody but vdd to read, whatever
/// the umask or QEMU's own file modes.
pub fn private_dir(dir: &Path) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
        .map_err(|e| Error::State(dir.to_path_buf(), e))
}

/// Creates a qcow2 overlay on `base`; the base is only ever read.
pub async fn create_overlay(base: &Path, overlay: &Path) -> Result<(), Error> {
    let fmt = image_format(base).await?;
    if let Some(d) = overlay.parent() {
        private_dir(d)?;
    }
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", &fmt, "-b"])
        .arg(base)
        .arg(overlay)
        .output()
        .await
        .map_err(|source| Error::Spawn {
            tool: "qemu-img create".into(),
            source,
        })?;
    if !out.status.success() {
        return Err(Error::ToolFailed {
            tool: "qemu-img create".into(),
            said: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    // What the guest writes is the seat's: 0600 as nbd overlays are.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(overlay, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::State(overlay.to_path_buf(), e))
}

/// Starts the VM and, for a VNC guest, sets its password over QMP.
/// `tap_fd`: the open tap of a `VmDisplay::Lan` guest.
pub async fn start(
    qemu: &Qemu,
    spec: &VmSpec,
    tap_fd: Option<std::os::fd::RawFd>,
    password: Option<&OneTime>,
) -> Result<Vm, Error> {
    if !spec.overlay.exists() {
        let base = spec.restore.as_ref().map_or(&spec.guest.image, |r| &r.disk);
        create_overlay(base, &spec.overlay).await?;
    }
    // The saved state is read by QEMU from a descriptor it inherits, as the tap is: no
    // path on its command line, no shell.
    let state = match &spec.restore {
        Some(r) => Some(
            std::fs::File::open(&r.state)
                .map_err(|e| Error::Restore(r.state.clone(), e.to_string()))?,
        ),
        None => None,
    };
    let mut inherit: Vec<std::os::fd::RawFd> = tap_fd.into_iter().collect();
    let qmp = spec.dir.join("qmp.sock");
    let _ = std::fs::remove_file(&qmp);
    let log = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(spec.dir.join("qemu.log"))
            .map_err(|e| Error::State(spec.dir.clone(), e))?
    };
    let mut cmd = Command::new(&qemu.binary);
    // The packaged unit (debian/vdd.service) gives vdd CAP_NET_ADMIN, CAP_NET_RAW and
    // CAP_NET_BIND_SERVICE as ambient capabilities, which every program it starts would
    // inherit. A VM needs none (its tap comes open), so a guest that breaks out of QEMU
    // finds none of them. (As root, vdd's VMs keep root's; the unit runs it as vdd.)
    // SAFETY: only prctl(2), which is async-signal-safe, runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            // EINVAL before Linux 4.3, which has no ambient set to clear.
            nix::libc::prctl(
                nix::libc::PR_CAP_AMBIENT,
                nix::libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            );
            Ok(())
        });
    }
    cmd.arg("-name")
        .arg(format!("vdd-{},process=vdd-{}", spec.session, spec.session))
        .args(["-accel", qemu.accel.as_str(), "-M", "q35"])
        .args(["-m", &spec.guest.memory_mib.to_string()])
        .args(["-smp", &spec.guest.cpus.to_string()])
        .arg("-drive")
        .arg(format!(
            "file={},format=qcow2,if=ide",
            spec.overlay.display()
        ))
        .arg("-no-user-config");
    match &spec.display {
        VmDisplay::Vnc { addr, port } => {
            // Nothing reaches in. Out: nothing, unless the guest is `nat = true`; QEMU's
            // user network would otherwise forward 10.0.2.2 to the server's loopback.
            let restrict = if spec.guest.nat { "off" } else { "on" };
            cmd.args(["-nic", &format!("user,model=e1000,restrict={restrict}")]);
            vga(&mut cmd, spec.screen);
            cmd.arg("-vnc")
                .arg(format!("{addr}:{},password=on", port - 5900));
        }
        &VmDisplay::Lan { mac, .. } => {
            let tap_fd = tap_fd.expect("a LAN guest's tap is open");
            cmd.arg("-netdev")
                .arg(format!("tap,id=lan,fd={tap_fd}"))
                .arg("-device")
                .arg(format!("virtio-net-pci,netdev=lan,mac={mac}"))
                .args(["-vga", "std", "-display", "none"]);
        }
    }
    if let Some(f) = &state {
        let fd = std::os::fd::AsRawFd::as_raw_fd(f);
        cmd.arg("-incoming").arg(format!("fd:{fd}"));
        inherit.push(fd);
    }
    if !inherit.is_empty() {
        // SAFETY: only fcntl(2), which is async-signal-safe, runs between fork and
        // exec. It clears close-on-exec on the tap and the state file for this child
        // alone; every other process vdd starts (even concurrently) never sees them.
        unsafe {
            cmd.pre_exec(move || {
                for &fd in &inherit {
                    if nix::libc::fcntl(fd, nix::libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    }
    cmd.arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .arg("-serial")
        .arg(format!("file:{}", spec.dir.join("serial.log").display()))
        .stdin(Stdio::null())
        .stdout(
            log.try_clone()
                .map_err(|e| Error::State(spec.dir.clone(), e))?,
        )
        .stderr(log)
        // Its own process group: signals to vdd's group (Ctrl-C) leave the VMs running.
        .process_group(0);
    let child = cmd.spawn().map_err(|source| Error::Spawn {
        tool: qemu.binary.clone(),
        source,
    })?;
    // QEMU has its own copy now.
    drop(state);
    let pid = child.id().unwrap_or(0);
    let mut vm = Vm {
        pid,
        qmp,
        child: Some(child),
    };
    // QEMU creates the socket during start-up; retry the connect until it is there.
    let mut q = None;
    for _ in 0..100 {
        if let Some(Ok(Some(st))) = vm.child.as_mut().map(|c| c.try_wait()) {
            let log = std::fs::read_to_string(spec.dir.join("qemu.log")).unwrap_or_default();
            return Err(Error::VmExited(st.to_string(), log.trim().to_string()));
        }
        match Qmp::connect(&vm.qmp, Duration::from_secs(10)).await {
            Ok(c) => {
                q = Some(c);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let Some(mut q) = q else {
        stop(&mut vm, Duration::from_secs(1)).await;
        return Err(Error::QmpNeverUp);
    };
    if let Some(r) = &spec.restore {
        if let Err(e) = super::qemu_state::wait_restored(&mut q, &mut vm, &spec.dir).await {
            stop(&mut vm, Duration::ZERO).await;
            return Err(Error::Restore(r.state.clone(), e));
        }
    }
    if let Some(password) = password {
        if let Err(e) = set_password(&mut q, password).await {
            stop(&mut vm, Duration::from_secs(1)).await;
            return Err(e);
        }
    }
    Ok(vm)
}

/// The VNC guest's graphics card: QEMU's standard VGA, with an EDID that makes `screen`
/// its monitor's preferred mode and that mode in its VBE list (`xres`, `yres`), so a
/// guest with a KMS driver (Linux's bochs-drm) starts its console and desktop at it.
fn vga(cmd: &mut Command, screen: Option<ScreenSize>) {
    match screen {
        None => {
            cmd.args(["-vga", "std"]);
        }
        Some(s) => {
            cmd.args(["-vga", "none", "-device"])
                .arg(format!("VGA,edid=on,xres={},yres={}", s.width, s.height));
        }
    }
}

/// Sets the VNC password. It must be used within its lifetime from now; a viewer already
/// connected stays connected (RFB authenticates once, at connect).
pub async fn set_password(q: &mut Qmp, password: &OneTime) -> Result<(), Error> {
    q.execute(
        "set_password",
        Some(json!({"protocol": "vnc", "password": password.password})),
    )
    .await?;
    // QEMU's "+N": N seconds from now (at least one: "+0" would be expired at once).
    let secs = password.valid_for.as_secs().max(1);
    q.execute(
        "expire_password",
        Some(json!({"protocol": "vnc", "time": format!("+{secs}")})),
    )
    .await?;
    Ok(())
}

/// Is a process with this pid alive (and not a zombie)?
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the field after the ")" that closes the command name.
        Ok(s) => s
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|st| st != "Z" && st != "X"),
        Err(_) => false,
    }
}

/// The VM's command line names its session; an adopted pid must still be that VM and not
/// a recycled pid of something else.
pub fn is_our_vm(pid: u32, session: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            let want = format!("vdd-{session}");
            c.split(|b| *b == 0)
                .any(|a| String::from_utf8_lossy(a).starts_with(&want))
        })
        .unwrap_or(false)
}

/// The pids of every running VM of this session (by its command line, as
/// [`is_our_vm`]): a VM whose record was never written, or was lost, is found this way.
pub fn vms_of(session: &str) -> Vec<u32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| alive(*pid) && is_our_vm(*pid, session))
        .collect()
}

/// Whether nothing listens on `addr:port` yet (a VM of another run, or another program,
/// may hold a port of `dispatch.vnc_ports` that vdd's records do not know of).
pub fn port_free(addr: std::net::Ipv4Addr, port: u16) -> bool {
    std::net::TcpListener::bind((addr, port)).is_ok()
}

/// Shuts the VM down: ACPI power button, then `quit`, then SIGKILL, each after `grace`.
/// A zero `grace` is for a VM whose disk is thrown away (a reset, a warm VM giving way, a
/// saved VM): `quit` at once, SIGKILL a second later.
pub async fn stop(vm: &mut Vm, grace: Duration) {
    let gone = |vm: &mut Vm| match vm.child.as_mut() {
        Some(c) => matches!(c.try_wait(), Ok(Some(_))),
        None => !alive(vm.pid),
    };
    async fn wait_gone(vm: &mut Vm, grace: Duration, gone: impl Fn(&mut Vm) -> bool) -> bool {
        let end = tokio::time::Instant::now() + grace;
        while tokio::time::Instant::now() < end {
            if gone(vm) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        gone(vm)
    }
    let (steps, wait): (&[&str], Duration) = if grace.is_zero() {
        (&["quit"], Duration::from_secs(1))
    } else {
        (&["system_powerdown", "quit"], grace)
    };
    for cmd in steps {
        if gone(vm) {
            return;
        }
        if let Ok(mut q) = Qmp::connect(&vm.qmp, Duration::from_secs(2)).await {
            let _ = q.execute(cmd, None).await;
        }
        if wait_gone(vm, wait, gone).await {
            return;
        }
    }
    warn!(
        pid = vm.pid,
        "VM ignored {}; killing it",
        steps.join(" and ")
    );
    if vm.pid > 0 {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(vm.pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    if let Some(c) = vm.child.as_mut() {
        let _ = c.wait().await;
    } else {
        wait_gone(vm, Duration::from_secs(5), gone).await;
    }
}
