//! boot-menu: `/init` of the thin-client initramfs (PID 1). Mounts the kernel file systems,
//! loads the NIC driver, gets an address by DHCP (RFC 2131), fetches the guest list from
//! the vdd server and shows the menu on /dev/tty1 and /dev/ttyS0 at once. A pick attaches
//! the thin-client root over NBD, mounts it under a tmpfs overlay and runs a check in it.
//!
//! PID 1 must never exit (the kernel panics when it does), so every failure, even a
//! panic, ends in a screen that shows the error and offers retry or reboot.
//!
//! Outside PID 1, `boot-menu dhcp IFACE` runs only the network steps; the lab integration
//! test uses it inside a network namespace.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use anyhow::{bail, Context, Result};
use boot_menu::menu::{Action, Key, Menu};
use boot_menu::{cmdline, dhcp, guests, modules, nbd, net, screen, session, sessions};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// The stable prefix end-to-end tests match on the serial console.
const PREFIX: &str = "vdd-boot-menu:";
/// Modules every session needs besides the NIC driver.
/// Loaded on every client: the session's root (NBD, squashfs, overlay), and evdev, through
/// which the X server reads every keyboard and mouse (it has no modalias of its own).
const BASE_MODULES: [&str; 4] = ["nbd", "squashfs", "overlay", "evdev"];
const DHCP_LIMIT: Duration = Duration::from_secs(90);
const HTTP_TIMEOUT: Duration = Duration::from_secs(15);
/// With nobody at the keyboard, a failed boot retries by itself after this long, so a
/// room of clients recovers when the server comes back.
const AUTO_RETRY: Duration = Duration::from_secs(30);
/// How long the check in the new root may take (TCG on a busy host is slow).
const CHECK_LIMIT: Duration = Duration::from_secs(120);
/// A desktop session may last a school day; the limit only bounds the wait.
const SESSION_LIMIT: Duration = Duration::from_secs(24 * 3600);

/// The consoles: every terminal we draw on and read keys from, plus the kernel log.
struct Console {
    ttys: Vec<File>,
    kmsg: Option<File>,
}

impl Console {
    fn open() -> Console {
        let mut ttys = Vec::new();
        for p in ["/dev/ttyS0", "/dev/tty1"] {
            // O_NOCTTY: PID 1 must not acquire a controlling terminal by accident; a
            // serial port without hardware fails open() with EIO and is skipped.
            if let Ok(f) = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc_o_noctty())
                .open(p)
            {
                raw_mode(&f);
                ttys.push(f);
            }
        }
        let kmsg = OpenOptions::new().write(true).open("/dev/kmsg").ok();
        Console { ttys, kmsg }
    }

    /// The consoles for writing only (no raw mode change), for background threads.
    fn open_output() -> Console {
        let ttys = ["/dev/ttyS0", "/dev/tty1"]
            .iter()
            .filter_map(|p| {
                OpenOptions::new()
                    .write(true)
                    .custom_flags(libc_o_noctty())
                    .open(p)
                    .ok()
            })
            .collect();
        let kmsg = OpenOptions::new().write(true).open("/dev/kmsg").ok();
        Console { ttys, kmsg }
    }

    fn say(&mut self, msg: &str) {
        let line = format!("{PREFIX} {msg}\r\n");
        self.draw(&line);
        if let Some(k) = &mut self.kmsg {
            // Level 7 (debug): kept in dmesg but not echoed by the kernel to the console,
            // which already shows the line once.
            let _ = k.write_all(format!("<7>{PREFIX} {msg}\n").as_bytes());
        }
    }

    fn draw(&mut self, text: &str) {
        if self.ttys.is_empty() {
            print!("{}", text);
            let _ = std::io::stdout().flush();
        }
        for t in &mut self.ttys {
            let _ = t.write_all(text.as_bytes());
        }
    }

    /// Keys from any console, waiting at most `timeout`; empty on timeout.
    fn keys(&mut self, timeout: Duration) -> Vec<Key> {
        if self.ttys.is_empty() {
            std::thread::sleep(timeout);
            return Vec::new();
        }
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        let mut fds: Vec<PollFd> = self
            .ttys
            .iter()
            .map(|t| PollFd::new(t.as_fd(), PollFlags::POLLIN))
            .collect();
        let ready = poll(
            &mut fds,
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
        );
        let readable: Vec<bool> = fds
            .iter()
            .map(|f| f.revents().is_some_and(|r| r.contains(PollFlags::POLLIN)))
            .collect();
        drop(fds);
        if !matches!(ready, Ok(n) if n > 0) {
            return Vec::new();
        }
        let mut keys = Vec::new();
        for (t, r) in self.ttys.iter_mut().zip(readable) {
            if r {
                let mut buf = [0u8; 64];
                if let Ok(n) = t.read(&mut buf) {
                    keys.extend(boot_menu::menu::decode(&buf[..n]));
                }
            }
        }
        keys
    }
}

fn libc_o_noctty() -> i32 {
    nix::fcntl::OFlag::O_NOCTTY.bits()
}

/// Raw input (keys arrive one by one, no echo) but with output processing left on.
fn raw_mode(f: &File) {
    use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, OutputFlags, SetArg};
    if let Ok(mut t) = tcgetattr(f) {
        cfmakeraw(&mut t);
        t.output_flags |= OutputFlags::OPOST;
        let _ = tcsetattr(f, SetArg::TCSANOW, &t);
    }
}

fn mount_all(con: &mut Console) {
    use nix::mount::{mount, MsFlags};
    let none: Option<&str> = None;
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV;
    for (src, dir, fs, flags, data) in [
        ("proc", "/proc", "proc", nosuid, None),
        ("sysfs", "/sys", "sysfs", nosuid, None),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
        ),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("gid=5,mode=620,ptmxmode=000"),
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
        ),
    ] {
        let _ = std::fs::create_dir_all(dir);
        match mount(Some(src), dir, Some(fs), flags, data.or(none)) {
            // EBUSY: already mounted (a kernel with DEVTMPFS_MOUNT, or a retry).
            Ok(()) | Err(nix::Error::EBUSY) => {}
            Err(e) => con.say(&format!("mount {dir} failed: {e}")),
        }
    }
}

/// Exit codes of reaped children (128 + signal when killed), newest last. Bounded: orphans
/// nobody asks about must not grow PID 1's memory.
/// Set by the lease keeper when the lease is gone; the menu then starts over.
static LEASE_LOST: Mutex<Option<&'static str>> = Mutex::new(None);
/// Stop flag of the running lease keeper.
static KEEPER: Mutex<Option<Arc<AtomicBool>>> = Mutex::new(None);

static EXITS: Mutex<VecDeque<(i32, i32)>> = Mutex::new(VecDeque::new());
static EXITED: Condvar = Condvar::new();

/// PID 1 inherits every orphan; one thread reaps them all so none stays a zombie, and
/// records exit codes for [`wait_child`] (our own children are reaped here too, so nobody
/// else may call wait()).
fn spawn_reaper() {
    std::thread::spawn(|| loop {
        use nix::sys::wait::{waitpid, WaitStatus};
        use nix::unistd::Pid;
        let (pid, code) = match waitpid(Pid::from_raw(-1), None) {
            Ok(WaitStatus::Exited(p, c)) => (p.as_raw(), c),
            Ok(WaitStatus::Signaled(p, sig, _)) => (p.as_raw(), 128 + sig as i32),
            Ok(_) => continue,
            // ECHILD: no children right now.
            Err(_) => {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let mut q = EXITS.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() >= 64 {
            q.pop_front();
        }
        q.push_back((pid, code));
        EXITED.notify_all();
    });
}

/// The exit code of child `pid`, or `None` if it did not end within `timeout`.
fn wait_child(pid: i32, timeout: Duration) -> Option<i32> {
    let t0 = Instant::now();
    let mut q = EXITS.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if let Some(i) = q.iter().position(|(p, _)| *p == pid) {
            return q.remove(i).map(|(_, c)| c);
        }
        let left = timeout.checked_sub(t0.elapsed())?;
        q = EXITED
            .wait_timeout(q, left)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

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
fn session(
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
        if s.protocol == "xdmcp" {
            x11_session(con, server, &root, &s)
        } else {
            vnc_session(con, server, &root, &s)
        }
    })();
    drop(root);
    drop(dev);
    con.say("nbd: detached");
    if result.is_err() && s.protocol == "xdmcp" {
        // The session is of no use to anyone once its seat gave up on it.
        let _ = sessions::end(server, &s.id, HTTP_TIMEOUT);
    }
    result
}

/// How often a seat asks for a fresh password when the display refuses one.
const VIEWER_TRIES: u32 = 3;

/// TigerVNC full screen until the viewer exits; F8 -> "Exit viewer" keeps the session.
fn vnc_session(
    con: &mut Console,
    server: SocketAddr,
    root: &session::Root,
    s: &sessions::Session,
) -> Result<()> {
    let mut attempt = 1;
    let (viewer, ran) = loop {
        // Asked for now, not at the pick: the password is valid for a minute from here,
        // however long this seat took to mount its root and start X.
        let fresh = sessions::password(server, &s.id, HTTP_TIMEOUT)
            .with_context(|| format!("a one-time password for session {}", s.id))?;
        let password = fresh.password.unwrap_or_default();
        con.say(&format!(
            "viewer: connecting to {} (F8 then \"Exit viewer\" leaves the guest running)",
            s.target()
        ));
        // The password goes in the environment, never on a command line (ps shows those).
        let ran = run_in_root(
            con,
            root,
            "viewer",
            &sessions::vnc_script(s),
            &[("VNC_PASSWORD", password.as_str()), ("HOME", "/root")],
            SESSION_LIMIT,
            None,
        )?;
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

/// Polls the session until it is "ready"; a "failed" session's error is the server's.
fn wait_ready(
    con: &mut Console,
    server: SocketAddr,
    s: &sessions::Session,
) -> Result<sessions::Session> {
    let t0 = Instant::now();
    let mut s = s.clone();
    let mut said = Duration::ZERO;
    loop {
        match s.state.as_str() {
            "ready" => {
                con.say(&format!(
                    "x11: {} is ready at {} after {:.1} s",
                    s.guest,
                    s.target(),
                    t0.elapsed().as_secs_f64()
                ));
                return Ok(s);
            }
            "failed" => bail!(
                "{}",
                s.error
                    .clone()
                    .unwrap_or_else(|| "the server gave no reason".into())
            ),
            _ => {}
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
                    Ok(s) if s.state == "failed" => s.error.unwrap_or_else(|| "failed".into()),
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

fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    if File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_ok()
    {
        return u32::from_ne_bytes(b);
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    t.subsec_nanos() ^ (t.as_secs() as u32)
}

/// Loads the base modules and, until nothing new turns up, the drivers of present devices.
fn load_modules(con: &mut Console) -> Result<()> {
    let dir = modules::Loader::running_kernel_dir();
    let mut l = modules::Loader::open(&dir).context("module index")?;
    for m in BASE_MODULES {
        match l.load(m) {
            Ok(done) => {
                for (name, how) in done {
                    if how == modules::Loaded::New {
                        con.say(&format!("loaded module {name}"));
                    }
                }
            }
            Err(e) => con.say(&format!("module {m}: {}", chain(&e))),
        }
    }
    let mut tried = std::collections::BTreeSet::new();
    // virtio devices appear only once virtio_pci is loaded: a few rounds find them.
    for _ in 0..3 {
        let mut new = false;
        for alias in modules::device_modaliases(Path::new("/sys")) {
            for m in l.aliases.resolve(&alias) {
                if !tried.insert(m.clone()) {
                    continue;
                }
                new = true;
                match l.load(&m) {
                    Ok(done) => {
                        for (name, how) in done {
                            if how == modules::Loaded::New {
                                con.say(&format!("loaded module {name}"));
                            }
                        }
                    }
                    Err(e) => con.say(&format!("module {m}: {}", chain(&e))),
                }
            }
        }
        if !new {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// Brings the links up and returns the first Ethernet link with carrier (or the first one).
fn pick_link(con: &mut Console) -> Result<String> {
    let sys = Path::new("/sys");
    let _ = net::set_up("lo");
    let t0 = Instant::now();
    let links = loop {
        let l = net::ethernet_links(sys);
        if !l.is_empty() {
            break l;
        }
        if t0.elapsed() > Duration::from_secs(20) {
            bail!("no Ethernet interface appeared (is the NIC driver in the initramfs?)");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    for l in &links {
        if let Err(e) = net::set_up(l) {
            con.say(&format!("link {l} up failed: {}", chain(&e)));
        }
    }
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        if let Some(l) = links.iter().find(|l| net::carrier(sys, l)) {
            return Ok(l.clone());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    con.say(&format!(
        "no carrier on {links:?}, trying {} anyway",
        links[0]
    ));
    Ok(links[0].clone())
}

/// DHCP on `iface`, then address and default route.
fn network(iface: &str, log: &mut dyn FnMut(String)) -> Result<(dhcp::Lease, dhcp::Holder)> {
    let mac = net::mac(Path::new("/sys"), iface).context("reading the interface's MAC")?;
    // Accept broadcast replies from a server we have no route to yet (strict rp_filter
    // would drop them before our socket sees them).
    for k in ["all", iface] {
        let _ = std::fs::write(format!("/proc/sys/net/ipv4/conf/{k}/rp_filter"), "0");
    }
    let (lease, holder) = dhcp::run(iface, mac, random_u32(), DHCP_LIMIT, log)?;
    net::configure(iface, lease.ip, lease.prefix, lease.router).context("configuring the lease")?;
    Ok((lease, holder))
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// One attempt at the whole boot, up to and including the menu loop.
fn boot(con: &mut Console, args: &cmdline::BootArgs, autopick: &mut Option<String>) -> Result<()> {
    con.say("loading modules");
    load_modules(con)?;
    let iface = pick_link(con)?;
    con.say(&format!("link {iface} up, starting DHCP"));
    let (lease, holder) = {
        let mut log = |m: String| con.say(&m);
        network(&iface, &mut log)?
    };
    // Keep the lease alive in the background; the menu notices when it is lost. The
    // previous attempt's keeper (if any) is stopped first so only one owns port 68.
    let stop = Arc::new(AtomicBool::new(false));
    if let Some(old) = KEEPER
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .replace(stop.clone())
    {
        old.store(true, Ordering::Relaxed);
    }
    *LEASE_LOST.lock().unwrap_or_else(|e| e.into_inner()) = None;
    std::thread::spawn(move || {
        let mut out = Console::open_output();
        let why = holder.keep(&stop, &mut |m| out.say(&m));
        if !stop.load(Ordering::Relaxed) {
            *LEASE_LOST.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
        }
    });
    con.say(&format!(
        "dhcp bound {}/{} router {} server {} lease {}s",
        lease.ip,
        lease.prefix,
        lease.router.map(|r| r.to_string()).unwrap_or("-".into()),
        lease.server,
        lease.lease_secs
    ));
    let server = args.server.unwrap_or_else(|| {
        let ip = if lease.next_server.is_unspecified() {
            lease.server
        } else {
            lease.next_server
        };
        SocketAddr::new(IpAddr::V4(ip), cmdline::DEFAULT_PORT)
    });
    loop {
        con.say(&format!("fetching http://{server}/api/v1/guests"));
        let list = guests::fetch(server, HTTP_TIMEOUT)
            .with_context(|| format!("guest list from {server}"))?;
        con.say(&format!("menu: {} guests", list.len()));
        let mut menu = Menu::new(list);
        // The seat's running sessions are marked; a server without the session API (or
        // one that is failing) just gives a menu without marks.
        let running = sessions::list(server, HTTP_TIMEOUT).unwrap_or_default();
        menu.running = running.iter().map(|s| s.guest.clone()).collect();
        if !running.is_empty() {
            con.say(&format!(
                "{} running session(s) of this seat",
                running.len()
            ));
        }
        con.draw(&menu.render(&server.to_string()));
        let mut pending = autopick.take().and_then(|name| {
            let hit = menu.autopick(&name);
            if hit.is_none() {
                con.say(&format!(
                    "vdd.autopick={name}: no such guest, showing the menu"
                ));
            }
            hit.map(Action::Pick)
        });
        'menu: loop {
            if let Some(why) = *LEASE_LOST.lock().unwrap_or_else(|e| e.into_inner()) {
                bail!("DHCP lease lost: {why}");
            }
            let actions: Vec<Action> = match pending.take() {
                Some(a) => vec![a],
                None => con
                    .keys(Duration::from_secs(2))
                    .into_iter()
                    .map(|k| menu.key(k))
                    .collect(),
            };
            for a in actions {
                match a {
                    Action::Moved => con.draw(&menu.render(&server.to_string())),
                    Action::Pick(name) => {
                        con.say(&format!("picked {name}"));
                        let guest = menu.guest(&name).cloned();
                        match guest.map(|g| session(con, args, server, &g)) {
                            Some(Ok(())) => con.say("back to the menu"),
                            Some(Err(e)) => {
                                con.say(&format!("session failed: {e:#}; back to the menu"))
                            }
                            None => con.say(&format!("no guest {name} in the menu")),
                        }
                        std::thread::sleep(Duration::from_secs(2));
                        // Fetch again: the session may have ended or still be running.
                        break 'menu;
                    }
                    Action::End(ref name) | Action::Reset(ref name) => {
                        let Some(s) = running.iter().find(|s| &s.guest == name) else {
                            continue;
                        };
                        let r = if matches!(a, Action::End(_)) {
                            sessions::end(server, &s.id, HTTP_TIMEOUT)
                                .map(|()| format!("session {} of {name} ended", s.id))
                        } else {
                            sessions::reset(server, &s.id, HTTP_TIMEOUT).map(|n| {
                                format!(
                                    "{name} reset to a clean desktop (session {}); Enter connects",
                                    n.id
                                )
                            })
                        };
                        match r {
                            Ok(m) => con.say(&m),
                            Err(e) => con.say(&format!("{name}: {}", chain(&e))),
                        }
                        std::thread::sleep(Duration::from_secs(1));
                        break 'menu;
                    }
                    Action::Refresh => break 'menu,
                    Action::Reboot => reboot(con),
                    Action::Nothing => {}
                }
            }
        }
    }
}

fn reboot(con: &mut Console) {
    con.say("rebooting");
    nix::unistd::sync();
    // Returns only on failure (reboot(2) does not come back when it works).
    let Err(e) = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    con.say(&format!("reboot failed: {e}"));
}

/// The screen after a failure: show it, then retry on `r` or after a while, reboot on `b`.
fn fatal(con: &mut Console, msg: &str) {
    con.say(&format!("error: {msg}"));
    con.say(&format!(
        "press r to retry, b to reboot (retrying by itself in {}s)",
        AUTO_RETRY.as_secs()
    ));
    let t0 = Instant::now();
    while t0.elapsed() < AUTO_RETRY {
        for k in con.keys(AUTO_RETRY.saturating_sub(t0.elapsed())) {
            match k {
                Key::Refresh => return,
                Key::Reboot => reboot(con),
                _ => {}
            }
        }
    }
}

/// `boot-menu dhcp IFACE [renew]`: the network steps alone, for tests in a network
/// namespace; with `renew`, also wait for the first renewal.
fn dhcp_probe(iface: &str, renew: bool) -> Result<()> {
    net::set_up(iface)?;
    let (lease, mut holder) = network(iface, &mut |m| eprintln!("{PREFIX} {m}"))?;
    println!(
        "{PREFIX} dhcp bound {}/{} router {} server {}",
        lease.ip,
        lease.prefix,
        lease.router.map(|r| r.to_string()).unwrap_or("-".into()),
        lease.server
    );
    if renew {
        let limit = Duration::from_secs(lease.lease_secs as u64 + 30);
        let l = holder.renew_once(limit, &mut |m| eprintln!("{PREFIX} {m}"))?;
        println!("{PREFIX} dhcp renewed {} for {}s", l.ip, l.lease_secs);
    }
    Ok(())
}

fn main() {
    let pid1 = nix::unistd::getpid().as_raw() == 1;
    if !pid1 {
        let argv: Vec<String> = std::env::args().collect();
        let r = match argv.get(1).map(String::as_str) {
            Some("dhcp") if argv.len() == 3 => dhcp_probe(&argv[2], false),
            Some("dhcp") if argv.len() == 4 && argv[3] == "renew" => dhcp_probe(&argv[2], true),
            _ => Err(anyhow::anyhow!(
                "this is the thin client's /init; outside PID 1 only `boot-menu dhcp IFACE [renew]` runs"
            )),
        };
        if let Err(e) = r {
            eprintln!("{PREFIX} error: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    let mut con = Console::open();
    mount_all(&mut con);
    // Reopen: /dev was a bare initramfs directory before devtmpfs was mounted.
    con = Console::open();
    spawn_reaper();
    con.say(&format!("started as PID 1 ({})", env!("CARGO_PKG_VERSION")));
    let line = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let args = cmdline::parse(&line);
    for w in &args.warnings {
        con.say(w);
    }
    let mut autopick = args.autopick.clone();
    loop {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            boot(&mut con, &args, &mut autopick)
        }));
        let msg = match r {
            Ok(Ok(())) => "boot ended".to_string(),
            Ok(Err(e)) => format!("{e:#}"),
            Err(p) => format!(
                "internal error (panic): {}",
                p.downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_default()
            ),
        };
        fatal(&mut con, &msg);
    }
}
