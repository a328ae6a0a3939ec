//! `cargo xtask e2e initramfs`: boots images/out/{vmlinuz,initramfs.img} in QEMU (TCG,
//! user-mode networking) and waits for boot-menu's serial-console markers, printing how
//! long each stage took. slirp answers DHCP itself (RFC 2131, server 10.0.2.2), and maps
//! 10.0.2.2:PORT to the host's 127.0.0.1:PORT, where a tiny HTTP server of ours serves the
//! guest list; nothing leaves loopback. nbdkit on 127.0.0.1 serves a tiny squashfs root
//! (static busybox + the image marker) as the NBD export, so a pick goes all the way to
//! the check command chrooted in the overlay root.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The guest list the test's HTTP server hands out; `x` is what the command line
/// autopicks. Both are X11 guests. This test has no vdd (`cargo xtask e2e boot`,
/// `session` and `x11` run the real one): its server answers the session API the way vdd
/// does for an X11 guest, "starting" at first and "ready" on the second poll, so the
/// client's polling runs; the test root has no Xorg, so the X session ends at once.
pub const GUESTS: &str = r#"[{"name":"x","label":"Guest X","display":"x11","description":"the test guest"},{"name":"y","label":"Guest Y","display":"x11","description":""}]"#;

/// Markers in the order they must appear, with a name for the timing table.
const MARKERS: [(&str, &str); 15] = [
    ("Linux version", "kernel started"),
    ("vdd-boot-menu: started as PID 1", "boot-menu is PID 1"),
    ("vdd-boot-menu: loaded module e1000", "NIC driver loaded"),
    ("vdd-boot-menu: dhcp bound", "DHCP bound"),
    ("vdd-boot-menu: menu: 2 guests", "menu shown"),
    ("vdd-boot-menu: picked x", "autopick done"),
    ("vdd-boot-menu: nbd: attached /dev/nbd0", "NBD attached"),
    (
        "vdd-boot-menu: check: root=vdd-thin-client",
        "squashfs root readable",
    ),
    ("vdd-boot-menu: check: overlay=ok", "overlay writable"),
    ("vdd-boot-menu: session check passed", "check passed"),
    (
        "vdd-boot-menu: x11: x is ready at 10.0.2.2:177",
        "session ready (polled)",
    ),
    ("vdd-boot-menu: nbd: detached", "NBD detached"),
    ("back to the menu", "back at the menu"),
    // Keys typed on the serial console (Down, Enter; see KEYS) pick the second guest.
    ("vdd-boot-menu: picked y", "Down+Enter picked y"),
    (
        "vdd-boot-menu: session check passed",
        "second session passed",
    ),
];

/// What is typed on ttyS0 once the marker with this index was seen: cursor down (CSI B)
/// and Enter, as a VT100 terminal sends them.
const KEYS: (usize, &[u8]) = (12, b"\x1b[B\r");

/// The root image of the test: static busybox as /bin/sh and the marker file the real
/// thin-client recipe writes. Built with mksquashfs (squashfs-tools).
fn test_root(out: &Path) -> Result<std::path::PathBuf> {
    let dir = out.join("e2e-root");
    let _ = std::fs::remove_dir_all(&dir);
    for d in ["bin", "etc", "tmp", "proc", "sys", "dev"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    let bb = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .context("busybox (static) is not installed")?;
    let data = std::fs::read(bb)?;
    if !crate::initramfs::is_static_elf(&data) {
        bail!("{bb} is not static (install busybox-static)");
    }
    std::fs::write(dir.join("bin/busybox"), &data)?;
    std::fs::set_permissions(
        dir.join("bin/busybox"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    std::os::unix::fs::symlink("busybox", dir.join("bin/sh"))?;
    std::fs::write(dir.join("etc/vdd-thin-client"), "vdd-thin-client\n")?;
    let img = out.join("e2e-root.squashfs");
    let _ = std::fs::remove_file(&img);
    let st = Command::new("mksquashfs")
        .arg(&dir)
        .arg(&img)
        .args(["-noappend", "-all-root", "-quiet", "-no-progress"])
        .stdout(Stdio::null())
        .status()
        .context("running mksquashfs (squashfs-tools)")?;
    if !st.success() {
        bail!("mksquashfs failed: {st}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(img)
}

/// A port that was free a moment ago (nbdkit takes no port 0).
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Kills a child (QEMU, nbdkit) by its pid and reaps it on every path out.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Serves `body` for every GET until dropped; counts requests.
struct Http {
    port: u16,
    stop: Arc<AtomicBool>,
    hits: Arc<AtomicU32>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Http {
    fn start(body: &'static str) -> Result<Http> {
        let l = TcpListener::bind("127.0.0.1:0").context("binding the test HTTP server")?;
        l.set_nonblocking(true)?;
        let port = l.local_addr()?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let hits = Arc::new(AtomicU32::new(0));
        let (s2, h2) = (stop.clone(), hits.clone());
        let polls = AtomicU32::new(0);
        let thread = std::thread::spawn(move || {
            while !s2.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut c, _)) => {
                        let _ = c.set_nonblocking(false);
                        let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
                        let mut req = Vec::new();
                        let mut buf = [0u8; 1024];
                        while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 65536 {
                            match c.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => req.extend_from_slice(&buf[..n]),
                            }
                        }
                        h2.fetch_add(1, Ordering::Relaxed);
                        let resp = answer(&req, body, &polls);
                        let _ = c.write_all(resp.as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(Http {
            port,
            stop,
            hits,
            thread: Some(thread),
        })
    }
}

/// The answer to one request: the guest list, and the session API as vdd answers it
/// for an X11 guest (see [`GUESTS`]).
fn answer(req: &[u8], guests: &str, polls: &AtomicU32) -> String {
    let text = String::from_utf8_lossy(req);
    // The pick is in a create's body, and in the session's id after that.
    let guest = if text.contains(r#""guest":"y""#) || text.contains("/e2ey ") {
        "y"
    } else {
        "x"
    };
    let session = |state: &str, host: &str| {
        format!(
            r#"{{"id":"e2e{guest}","seat":"52:54:00:12:34:56","guest":"{guest}","protocol":"xdmcp","host":{host},"port":177,"state":"{state}","started":1}}"#
        )
    };
    let (status, body) = if text.starts_with("GET /api/v1/guests ") {
        ("200 OK", guests.to_string())
    } else if text.starts_with("GET /api/v1/sessions ") {
        ("200 OK", "[]".to_string())
    } else if text.starts_with("POST /api/v1/sessions ") {
        polls.store(0, Ordering::Relaxed);
        ("201 Created", session("starting", "null"))
    } else if text.starts_with("GET /api/v1/sessions/e2e") {
        let ready = polls.fetch_add(1, Ordering::Relaxed) >= 1;
        let state = if ready { "ready" } else { "starting" };
        ("200 OK", session(state, r#""10.0.2.2""#))
    } else if text.starts_with("DELETE /api/v1/sessions/e2e") {
        return "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n".to_string();
    } else {
        return "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            .to_string();
    };
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

impl Drop for Http {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Boots the images and returns the time of each marker since QEMU started. The serial
/// log is written to images/out/e2e-initramfs.log on failure, or always with `keep_log`.
pub fn run(out: &Path, timeout: Duration, keep_log: bool) -> Result<Vec<(&'static str, Duration)>> {
    let kernel = out.join("vmlinuz");
    let initrd = out.join("initramfs.img");
    for f in [&kernel, &initrd] {
        if !f.is_file() {
            bail!(
                "{} is missing: run `cargo xtask initramfs` first",
                f.display()
            );
        }
    }
    let http = Http::start(GUESTS)?;
    let root = test_root(out)?;
    let nbd_port = free_port()?;
    let nbdkit = Command::new("nbdkit")
        .args([
            "-f",
            "-r",
            "-i",
            "127.0.0.1",
            "-p",
            &nbd_port.to_string(),
            "file",
        ])
        .arg(&root)
        .stdin(Stdio::null())
        .spawn()
        .context("starting nbdkit")?;
    let _nbdkit = Qemu(nbdkit);
    let append = format!(
        "console=ttyS0 vdd.server=10.0.2.2:{} vdd.nbd=10.0.2.2:{nbd_port} vdd.autopick=x panic=-1",
        http.port
    );
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-m", "512", "-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", &append])
        .args(["-netdev", "user,id=n0", "-device", "e1000,netdev=n0"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    eprintln!("xtask: running {cmd:?}");
    let t0 = Instant::now();
    let mut q = Qemu(cmd.spawn().context("starting qemu-system-x86_64")?);
    let stdout = q.0.stdout.take().context("qemu stdout")?;
    let mut stdin = q.0.stdin.take().context("qemu stdin")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n') {
            let Ok(line) = line else { break };
            let s = String::from_utf8_lossy(&line).trim_end().to_string();
            if tx.send((Instant::now(), s)).is_err() {
                break;
            }
        }
    });
    let mut log = String::new();
    let mut got = Vec::new();
    let mut next = 0;
    let fail = |log: &str, why: String| -> Result<Vec<(&'static str, Duration)>> {
        let p = out.join("e2e-initramfs.log");
        let _ = std::fs::write(&p, log);
        bail!("{why}; serial log kept in {}", p.display())
    };
    while next < MARKERS.len() {
        let left = timeout.saturating_sub(t0.elapsed());
        match rx.recv_timeout(left) {
            Ok((at, line)) => {
                log.push_str(&line);
                log.push('\n');
                // Failures boot-menu reports end the wait at once instead of at the timeout.
                if [
                    "Kernel panic",
                    "vdd-boot-menu: error:",
                    "vdd-boot-menu: session failed",
                ]
                .iter()
                .any(|m| line.contains(m))
                {
                    return fail(&log, format!("boot failed: {line}"));
                }
                if line.contains(MARKERS[next].0) {
                    got.push((MARKERS[next].1, at - t0));
                    if next == KEYS.0 {
                        stdin
                            .write_all(KEYS.1)
                            .context("typing on the serial console")?;
                        stdin.flush()?;
                    }
                    next += 1;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return fail(
                    &log,
                    format!(
                        "timed out after {timeout:?} waiting for `{}`",
                        MARKERS[next].0
                    ),
                )
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let st = q.0.wait().ok();
                let mut err = String::new();
                if let Some(mut e) = q.0.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                return fail(
                    &log,
                    format!(
                        "QEMU exited ({st:?}) before `{}`: {}",
                        MARKERS[next].0,
                        err.trim()
                    ),
                );
            }
        }
    }
    if http.hits.load(Ordering::Relaxed) == 0 {
        return fail(
            &log,
            "the menu appeared without fetching the guest list".into(),
        );
    }
    drop(q);
    if keep_log {
        let p = out.join("e2e-initramfs.log");
        std::fs::write(&p, &log).with_context(|| format!("writing {}", p.display()))?;
        eprintln!("xtask: serial log in {}", p.display());
    }
    Ok(got)
}
