//! Debian's real `xdm` for tests: unpacked (never installed) from `apt-get download xdm`
//! into the target folder, and run in a lab namespace with a temporary config (request
//! port 177, no local X servers, the given Xaccess).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use xtask::lab::{self, Lab};

/// xdm's binary, unpacked once per target folder with `apt-get download` + `dpkg -x`;
/// `Err` says why it cannot be had here.
pub fn xdm() -> Result<PathBuf, String> {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("xdm");
    let bin = dir.join("root/usr/bin/xdm");
    if bin.exists() {
        return Ok(bin);
    }
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let dl = Command::new("apt-get")
        .args(["download", "xdm"])
        .current_dir(&dir)
        .output()
        .map_err(|e| format!("apt-get: {e}"))?;
    let deb = std::fs::read_dir(&dir)
        .map_err(|e| e.to_string())?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| {
            format!(
                "apt-get download xdm failed: {}",
                String::from_utf8_lossy(&dl.stderr).trim()
            )
        })?;
    let x = Command::new("dpkg")
        .arg("-x")
        .arg(&deb)
        .arg(dir.join("root"))
        .status()
        .map_err(|e| format!("dpkg: {e}"))?;
    if !x.success() || !bin.exists() {
        return Err("dpkg -x of the xdm package failed".into());
    }
    Ok(bin)
}

/// Why xdm cannot run here (`None`: it can); panics under CI=true instead.
pub fn skip() -> Option<String> {
    let mut why = Vec::new();
    if let Some(w) = lab::missing(&["apt-get", "dpkg"]) {
        why.push(w);
    }
    if why.is_empty() {
        if let Err(e) = xdm() {
            why.push(e);
        }
    }
    if why.is_empty() {
        return None;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI must be able to run xdm: {}", why.join(", "));
    }
    Some(why.join(", "))
}

/// Starts xdm in namespace `ns` with `access` as its Xaccess; returns its pid when it
/// listens.
pub fn start(lab: &mut Lab, ns: &str, dir: &Path, access: &str) -> u32 {
    let cfg = dir.join("xdm-config");
    std::fs::create_dir_all(dir.join("auth")).unwrap();
    std::fs::write(dir.join("Xaccess"), access).unwrap();
    std::fs::write(dir.join("Xservers"), "").unwrap();
    std::fs::write(
        &cfg,
        format!(
            "DisplayManager.requestPort: 177\n\
             DisplayManager.servers: {d}/Xservers\n\
             DisplayManager.accessFile: {d}/Xaccess\n\
             DisplayManager.pidFile: {d}/xdm.pid\n\
             DisplayManager.errorLogFile: {d}/xdm.log\n\
             DisplayManager.authDir: {d}/auth\n",
            d = dir.display()
        ),
    )
    .unwrap();
    let mut c = Lab::cmd(ns, xdm().unwrap());
    c.args(["-nodaemon", "-config"])
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let pid = lab.spawn("xdm", c).unwrap();
    let log = dir.join("xdm.log");
    let end = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("Starting")
    {
        assert!(
            lab.is_running(pid),
            "xdm exited: {:?}",
            std::fs::read_to_string(&log)
        );
        assert!(Instant::now() < end, "xdm did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    pid
}
