//! The session runs after a pick: the session on the server, the NBD root, the check in
//! it, then the guest's display (a VNC viewer, or Xorg over XDMCP) until it ends.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use boot_menu::sessions::{Protocol, SessionState};
use boot_menu::{cmdline, guests, nbd, report, screen, session, sessions};
use vdd_api::Stage;

use crate::console::{chain, Console};
use crate::init::{load_modules, wait_child};
use crate::HTTP_TIMEOUT;

/// How long the check in the new root may take (TCG on a busy host is slow).
const CHECK_LIMIT: Duration = Duration::from_secs(120);
/// A desktop session may last a school day; the limit only bounds the wait.
const SESSION_LIMIT: Duration = Duration::from_secs(24 * 3600);

/// Runs `script` chrooted in `root`, relaying its output to the consoles as
/// `PREFIX label: line`; returns its exit code, or `None` when it outlived `limit` (it is
/// killed then).
fn run_in_root(
    con: &mut Console,
    root: &session::Root,
    label: &str,
    script: &str,
    env: &[(&str, &str)],
    limit: Duration,
    group: Option<&AtomicI32>,
) -> Result<Ran> {
    let mut cmd = root.command(&format!("exec 2>&1; {script}"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting the {label} in the new root"))?;
    let pid = child.id() as i32;
    if let Some(g) = group {
        g.store(pid, Ordering::SeqCst);
    }
    let out = child.stdout.take().context("child stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let t0 = Instant::now();
    let mut refused = false;
    while let Ok(l) = rx.recv_timeout(limit.saturating_sub(t0.elapsed())) {
        refused |= sessions::refused(&l);
        con.say(&format!("{label}: {l}"));
    }
    let code = wait_child(pid, limit.saturating_sub(t0.elapsed()));
    if let Some(g) = group {
        g.store(0, Ordering::SeqCst);
    }
    if code.is_none() {
        // The whole group: `sh -c` alone would leave its Xorg or viewer behind.
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    Ok(Ran { code, refused })
}

/// How a program in the new root ended.
struct Ran {
    /// Its exit code; `None` when it was killed or outlived its limit.
    code: Option<i32>,
    /// Whether a VNC viewer in it said the server refused its password.
    refused: bool,
}

/// After a pick: the session on the server, the NBD root under a tmpfs overlay, the
/// check command, then the guest's display until it ends: TigerVNC full screen for a VNC
/// guest, or Xorg asking the guest's display manager over XDMCP for an X11 guest. The
/// root is mounted while an X11 guest still boots, so the two waits overlap.
pub fn session(
    con: &mut Console,
    args: &cmdline::BootArgs,
    server: SocketAddr,
    guest: &guests::Guest,
) -> Result<()> {
    // USB keyboards and mice enumerate only after their host controller's driver loaded
    // at boot: load the drivers of devices that turned up since then.
    load_modules(con)?;
    // The monitor's preferred mode, so the guest starts at the size of this screen.
    let monitor = screen::preferred(Path::new("/sys"));
    match monitor {
        Some(m) => con.say(&format!("screen: {}x{}", m.width, m.height)),
        None => con.say("screen: unknown (no DRM driver for this graphics card)"),
    }
    let s = sessions::create(server, &guest.name, monitor, HTTP_TIMEOUT)
        .with_context(|| format!("starting {} on the server", guest.title()))?;
    con.say(&format!(
        "session {} for {}: {} on {} ({})",
        s.id,
        s.guest,
        s.protocol,
        s.target(),
        s.state
    ));
    let addr = args
        .nbd
        .unwrap_or_else(|| SocketAddr::new(server.ip(), cmdline::NBD_PORT));
    let export = args.export.as_deref().unwrap_or(cmdline::DEFAULT_EXPORT);
    con.say(&format!("nbd: attaching export {export} from {addr}"));
    let dev = nbd::attach(addr, export, "/dev/nbd0", HTTP_TIMEOUT)
        .with_context(|| format!("NBD export {export} from {addr}"))?;
    con.say(&format!(
        "nbd: attached {} ({} bytes, flags {:#x})",
        dev.path, dev.export.size, dev.export.flags
    ));
    report::stage(Stage::NbdAttached, Some(s.id.clone()));
    let root = session::Root::assemble(&dev.path).context("assembling the root")?;
    con.say(&format!(
        "root: squashfs + tmpfs overlay on {}",
        root.dir.display()
    ));
    let result = (|| -> Result<()> {
        match run_in_root(con, &root, "check", session::CHECK, &[], CHECK_LIMIT, None)?.code {
            Some(0) => con.say("session check passed"),
            Some(c) => bail!("the check in the new root failed (exit {c})"),
            None => bail!("the check in the new root did not end within {CHECK_LIMIT:?}"),
        }
        if s.protocol == Protocol::Xdmcp {
            x11_session(con, server, &root, &s)
        } else {
            vnc_session(con, server, &root, &s)
        }
    })();
    drop(root);
    drop(dev);
    con.say("nbd: detached");
    if result.is_err() && s.protocol == Protocol::Xdmcp {
        // The session is of no use to anyone once its seat gave up on it.
        let _ = sessions::end(server, &s.id, HTTP_TIMEOUT);
    }
    result
}

/// How often a seat asks for a fresh password when the display refuses one.
const VIEWER_TRIES: u32 = 3;

/// What [`hand_password`] did.
enum Handed {
    /// The viewer never asked (X or the script ended first).
    NotAsked,
    /// The viewer got a fresh password.
    Given,
    /// The server gave none: why.
    Failed(String),
}

/// Waits, until `stop`, for the viewer's shell to open the password pipe (X is up then),
/// and only then asks the server for a fresh one-time password and writes it into the
/// pipe: its lifetime starts right before the viewer connects, however long this seat
/// took to mount its root and start X. A pipe, so the password is never in a file.
fn hand_password(
    server: SocketAddr,
    id: String,
    fifo: std::path::PathBuf,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Handed> {
    std::thread::spawn(move || {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        // A non-blocking open for writing fails with ENXIO while no one reads the pipe.
        let mut pipe = loop {
            if stop.load(Ordering::Relaxed) {
                return Handed::NotAsked;
            }
            match std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
                .open(&fifo)
            {
                Ok(f) => break f,
                Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ENXIO as i32) => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Handed::Failed(format!("opening {}: {e}", fifo.display())),
            }
        };
        // Dropping the pipe unwritten ends the viewer's wait with no password.
        match sessions::password(server, &id, HTTP_TIMEOUT) {
            Ok(fresh) => match fresh.password.filter(|p| !p.is_empty()) {
                None => Handed::Failed("the server's answer has no password".into()),
                Some(p) => match pipe.write_all(p.as_bytes()) {
                    Ok(()) => Handed::Given,
                    Err(e) => Handed::Failed(format!("writing the password pipe: {e}")),
                },
            },
            Err(e) => Handed::Failed(chain(&e)),
        }
    })
}

/// TigerVNC full screen until the viewer exits; F8 -> "Exit viewer" keeps the session.
fn vnc_session(
    con: &mut Console,
    server: SocketAddr,
    root: &session::Root,
    s: &sessions::Session,
) -> Result<()> {
    let mut attempt = 1;
    let fifo = root.dir.join(sessions::PASSWORD_FIFO);
    let (viewer, ran) = loop {
        con.say(&format!(
            "viewer: connecting to {} (F8 then \"Exit viewer\" leaves the guest running)",
            s.target()
        ));
        // X and the viewer's connection, as the admin's panel shows them.
        let stop = Arc::new(AtomicBool::new(false));
        let target = s.host.map(|h| SocketAddr::from((h, s.port)));
        let watch =
            report::watch_display(root.dir.clone(), target, None, s.id.clone(), stop.clone());
        let _ = std::fs::remove_file(&fifo);
        nix::unistd::mkfifo(
            &fifo,
            nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
        )
        .with_context(|| format!("making the password pipe {}", fifo.display()))?;
        let handed = hand_password(server, s.id.clone(), fifo.clone(), stop.clone());
        let ran = run_in_root(
            con,
            root,
            "viewer",
            &sessions::vnc_script(s),
            &[("HOME", "/root")],
            SESSION_LIMIT,
            None,
        );
        stop.store(true, Ordering::Relaxed);
        let _ = watch.join();
        let handed = handed.join().unwrap_or(Handed::NotAsked);
        let _ = std::fs::remove_file(&fifo);
        let mut ran = ran?;
        if let Handed::Failed(why) = &handed {
            con.say(&format!(
                "viewer: no one-time password from the server: {why}"
            ));
            ran.refused = true;
        }
        let viewer = std::fs::read_to_string(root.dir.join("tmp/vdd-viewer-exit"))
            .ok()
            .and_then(|t| t.trim().parse::<i32>().ok());
        if !ran.refused || attempt == VIEWER_TRIES {
            break (viewer, ran);
        }
        attempt += 1;
        con.say(&format!(
            "viewer: the guest's display refused the password; asking the server for a fresh \
             one (try {attempt} of {VIEWER_TRIES})"
        ));
    };
    con.say(&format!(
        "viewer: ended (viewer exit {}, X exit {})",
        viewer.map_or("-".into(), |c| c.to_string()),
        ran.code.map_or("-".into(), |c| c.to_string())
    ));
    if ran.refused {
        // Not the guest's fault: its VM goes on, and a later pick tries again.
        con.say(&format!(
            "viewer: the display refused {VIEWER_TRIES} fresh passwords; session {} keeps \
             running, pick {} again to retry",
            s.id, s.guest
        ));
    } else if viewer == Some(0) {
        con.say(&format!(
            "session {} keeps running; pick {} again to return",
            s.id, s.guest
        ));
    } else {
        match sessions::end(server, &s.id, HTTP_TIMEOUT) {
            Ok(()) => con.say(&format!("session {} ended", s.id)),
            Err(e) => con.say(&format!("ending session {} failed: {}", s.id, chain(&e))),
        }
    }
    Ok(())
}

/// Waits until the server says the guest's display manager answers XDMCP, then runs
/// Xorg with `-query` until the X server exits (the user logged out, or X failed);
/// then the session ends and the menu comes back.
fn x11_session(
    con: &mut Console,
    server: SocketAddr,
    root: &session::Root,
    s: &sessions::Session,
) -> Result<()> {
    let s = wait_ready(con, server, s)?;
    let host = s
        .host
        .context("the server called the session ready but gave no guest address")?;
    con.say(&format!(
        "x11: asking {host} for a login over XDMCP (UDP 177); the guest draws on TCP 6000"
    ));
    let watch = Watch::start(server, s.id.clone());
    // X, and the guest's display manager connecting to it (TCP 6000), for the panel.
    let stop = Arc::new(AtomicBool::new(false));
    let shown = report::watch_display(
        root.dir.clone(),
        None,
        Some(6000),
        s.id.clone(),
        stop.clone(),
    );
    let t0 = Instant::now();
    let code = run_in_root(
        con,
        root,
        "xorg",
        &sessions::x11_script(host),
        &[("HOME", "/root")],
        SESSION_LIMIT,
        Some(&watch.group),
    );
    let ended = watch.stop();
    stop.store(true, Ordering::Relaxed);
    let _ = shown.join();
    let code = code?.code;
    con.say(&format!(
        "x11: X server ended after {:.0} s (exit {})",
        t0.elapsed().as_secs_f64(),
        code.map_or("-".into(), |c| c.to_string())
    ));
    if let Some(why) = ended {
        con.say(&format!("session {} was ended by the server: {why}", s.id));
        return Ok(());
    }
    match sessions::end(server, &s.id, HTTP_TIMEOUT) {
        Ok(()) => con.say(&format!("session {} ended", s.id)),
        Err(e) => con.say(&format!("ending session {} failed: {}", s.id, chain(&e))),
    }
    Ok(())
}

/// How long the menu waits for an X11 guest to boot, beyond the server's own limit.
const X11_WAIT: Duration = Duration::from_secs(600);

/// Polls the session until it is ready; a failed session's error is the server's.
fn wait_ready(
    con: &mut Console,
    server: SocketAddr,
    s: &sessions::Session,
) -> Result<sessions::Session> {
    let t0 = Instant::now();
    let mut s = s.clone();
    let mut said = Duration::ZERO;
    loop {
        match s.state {
            SessionState::Ready => {
                con.say(&format!(
                    "x11: {} is ready at {} after {:.1} s",
                    s.guest,
                    s.target(),
                    t0.elapsed().as_secs_f64()
                ));
                return Ok(s);
            }
            SessionState::Failed => bail!(
                "{}",
                s.error
                    .clone()
                    .unwrap_or_else(|| "the server gave no reason".into())
            ),
            SessionState::Starting => {}
        }
        if t0.elapsed() >= X11_WAIT {
            bail!("{} was not ready within {X11_WAIT:?}", s.guest);
        }
        if t0.elapsed() >= said + Duration::from_secs(10) {
            said = t0.elapsed();
            con.say(&format!(
                "x11: waiting for {}'s display manager ({:.0} s, address {})",
                s.guest,
                said.as_secs_f64(),
                s.target()
            ));
        }
        std::thread::sleep(Duration::from_secs(1));
        match sessions::get(server, &s.id, HTTP_TIMEOUT) {
            Ok(n) => s = n,
            // One lost poll is no reason to give up; the deadline above is.
            Err(e) => con.say(&format!("x11: asking for session {}: {}", s.id, chain(&e))),
        }
    }
}

/// Watches an X11 session while its X server runs. The server stops sessions whose seat
/// it no longer hears from, and the X traffic goes to the guest, not to vdd: so the watch
/// asks for the session every few seconds. When the server says the session is gone
/// (ended by the admin, its VM died, or it failed), the X server is stopped, since the
/// guest behind it is gone too, and the menu comes back.
struct Watch {
    /// The process group of the X server, once it runs; 0 before and after.
    group: Arc<AtomicI32>,
    stop: std::sync::mpsc::Sender<()>,
    thread: Option<std::thread::JoinHandle<Option<String>>>,
}

impl Watch {
    const EVERY: Duration = Duration::from_secs(5);

    fn start(server: SocketAddr, id: String) -> Watch {
        let group = Arc::new(AtomicI32::new(0));
        let (stop, rx) = std::sync::mpsc::channel::<()>();
        let g = group.clone();
        let thread = std::thread::spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                rx.recv_timeout(Watch::EVERY)
            {
                let why = match sessions::get(server, &id, HTTP_TIMEOUT) {
                    Err(guests::Error::Refused(404, e)) => e,
                    Ok(s) if s.state == SessionState::Failed => {
                        s.error.unwrap_or_else(|| "failed".into())
                    }
                    // Ready, or the server did not answer this time: keep going.
                    _ => continue,
                };
                let pid = g.load(Ordering::SeqCst);
                if pid > 0 {
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGTERM,
                    );
                }
                return Some(why);
            }
            None
        });
        Watch {
            group,
            stop,
            thread: Some(thread),
        }
    }

    /// Stops watching; says why the server ended the session, if it did.
    fn stop(mut self) -> Option<String> {
        let _ = self.stop.send(());
        self.thread.take().and_then(|t| t.join().ok().flatten())
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.stop.send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
