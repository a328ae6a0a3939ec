//! The XDMCP probe against a real display manager: Debian's `xdm`, unpacked (not installed)
//! from its package into the target folder and run in a lab namespace with a temporary
//! config (request port 177, no local X servers). It answers Willing when its Xaccess lets
//! everyone in, Unwilling when it lets nobody in; nothing listening is a timeout with the
//! message the session API shows.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vdd::xdmcp::{self, ProbeError, Reply};
use xtask::lab::{self, Lab};

/// xdm's binary, unpacked once per target folder with `apt-get download` + `dpkg -x`;
/// `Err` says why it cannot be had here.
fn xdm() -> Result<PathBuf, String> {
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

fn skip() -> Option<String> {
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

/// Starts xdm in `ns` with `access` as its Xaccess; returns when it listens.
fn start_xdm(lab: &mut Lab, dir: &Path, access: &str) -> u32 {
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
    let mut c = Lab::cmd(&lab.server_ns, xdm().unwrap());
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

/// Runs the probe from inside namespace `ns` (a thread of its own joins it).
fn probe_in(ns: &str, ip: &str, limit: Duration) -> Result<Reply, ProbeError> {
    let ns = ns.to_string();
    let ip = ip.parse().unwrap();
    std::thread::spawn(move || {
        let f = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
        // SAFETY: setns(2) on a file descriptor we own; it moves only this thread.
        let r = unsafe {
            nix::libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), nix::libc::CLONE_NEWNET)
        };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(xdmcp::probe(
                ip,
                xdmcp::PORT,
                Duration::from_millis(500),
                limit,
            ))
    })
    .join()
    .unwrap()
}

#[test]
fn probe_against_real_xdm() {
    if let Some(why) = skip() {
        eprintln!("skipping: {why}");
        return;
    }
    let dir = std::env::temp_dir().join(format!("vdd-xdmcp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut lab = Lab::new("xdmcp").unwrap();
    let ns = lab.server_ns.clone();

    // Nobody listens yet: a timeout, with the message the session API shows.
    let t = Instant::now();
    match probe_in(&ns, "10.77.0.1", Duration::from_secs(2)) {
        Err(e @ ProbeError::Timeout { .. }) => assert_eq!(
            e.to_string(),
            "the guest's display manager did not answer XDMCP at 10.77.0.1:177 within 2s"
        ),
        r => panic!("expected a timeout, got {r:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(5));

    // xdm willing to serve anyone.
    let pid = start_xdm(&mut lab, &dir.join("open"), "*\n");
    match probe_in(&ns, "10.77.0.1", Duration::from_secs(20)) {
        Ok(Reply::Willing {
            auth_name, status, ..
        }) => {
            assert_eq!(auth_name, "");
            assert!(!status.is_empty());
        }
        r => panic!("expected Willing from xdm, got {r:?}"),
    }
    lab.kill(pid, "TERM").unwrap();

    // xdm that lets nobody in answers a direct Query with Unwilling.
    let _pid = start_xdm(&mut lab, &dir.join("closed"), "192.0.2.1\n");
    match probe_in(&ns, "10.77.0.1", Duration::from_secs(20)) {
        Err(e @ ProbeError::Unwilling { .. }) => {
            assert!(e.to_string().contains("refused XDMCP"), "{e}")
        }
        r => panic!("expected Unwilling from xdm, got {r:?}"),
    }
    drop(lab);
    let _ = std::fs::remove_dir_all(&dir);
}
