//! A test's state folder that takes its VMs with it. A VM whose dispatcher was dropped or
//! whose vdd was killed is nobody's child, and a test that panics would leave it running,
//! holding its VNC port for the next run: on Drop, every guest VM whose command line
//! names the folder (its overlay and QMP socket live there) is killed, then the folder is
//! removed.

use std::path::{Path, PathBuf};

pub struct VmDir(PathBuf);

impl VmDir {
    /// A fresh `vdd-TAG-PID` in the temporary folder.
    pub fn new(tag: &str) -> VmDir {
        let d = std::env::temp_dir().join(format!("vdd-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        VmDir(d)
    }
}

impl std::ops::Deref for VmDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for VmDir {
    fn drop(&mut self) {
        for pid in vms_under(&self.0) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The guest VMs (QEMU named `vdd-SESSION` by the dispatcher) whose command line names
/// `dir`; vdd itself, whose `--config` may be in `dir`, is not one of them.
pub fn vms_under(dir: &Path) -> Vec<u32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    let needle = dir.as_os_str().as_encoded_bytes();
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            comm.starts_with("vdd-")
                && !state.contains(") Z ")
                && cmd.windows(needle.len()).any(|w| w == needle)
        })
        .collect()
}
