//! The QEMU backend's start of one VM: the qcow2 overlay it runs on, its command line
//! (display, NIC, inherited tap and saved-state descriptors), waiting for its QMP socket,
//! and its VNC password. Apart from `qemu.rs` (the backend and its types), which was
//! past 600 lines.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde_json::json;
use tokio::process::Command;

use super::backend::OneTime;
use super::qemu::{Qemu, Vm, VmDisplay, VmSpec};
use super::qemu_proc::stop;
use super::screen::ScreenSize;
use super::Error;
use qemu_ctl::qmp::Qmp;

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
            // A state QEMU rejects can end it before its monitor is up; that is a failed
            // restore (the caller boots cold), not a broken QEMU.
            if let Some(r) = &spec.restore {
                return Err(Error::Restore(
                    r.state.clone(),
                    format!("QEMU exited ({st}): {}", log.trim()),
                ));
            }
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
