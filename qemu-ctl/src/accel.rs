//! KVM only where it really runs a guest: `/dev/kvm` can exist and still hang every vCPU
//! (as on this project's build machines). The probe boots SeaBIOS under KVM and waits at
//! most `limit` for its banner on the serial port.

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// Which accelerator QEMU gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// The value of QEMU's `-accel`.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// The probe's answer, asked once per process (later calls return the first answer, even
/// with another `qemu` or `limit`). Blocks for at most `limit`.
pub fn detect(qemu: &str, limit: Duration) -> Accel {
    static ACCEL: OnceLock<Accel> = OnceLock::new();
    *ACCEL.get_or_init(|| probe(qemu, limit))
}

/// Boots SeaBIOS under KVM and waits at most `limit` for its banner.
pub fn probe(qemu: &str, limit: Duration) -> Accel {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return Accel::Tcg;
    }
    let child = Command::new(qemu)
        .args(["-accel", "kvm", "-M", "pc", "-m", "32", "-nodefaults"])
        .args(["-display", "none", "-serial", "stdio", "-no-reboot"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut child) = child else {
        return Accel::Tcg;
    };
    let mut out = child.stdout.take().expect("piped");
    // A reader thread, so that a vCPU that never runs (and a pipe that never speaks) is
    // bounded by `recv_timeout`; killing the child ends the thread's read.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 256];
        let mut seen = Vec::new();
        while let Ok(n) = out.read(&mut chunk) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&chunk[..n]);
            if seen.windows(7).any(|w| w == b"SeaBIOS") {
                let _ = tx.send(());
                break;
            }
        }
    });
    let works = rx.recv_timeout(limit).is_ok();
    let _ = child.kill();
    let _ = child.wait();
    if works {
        Accel::Kvm
    } else {
        Accel::Tcg
    }
}
