//! The init steps of PID 1 before the menu: kernel file systems, the reaper of orphans,
//! kernel modules, the network link and its DHCP lease.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use boot_menu::{dhcp, modules, net};

use crate::console::{chain, Console};

/// Modules every session needs besides the NIC driver.
/// Loaded on every client: the session's root (NBD, squashfs, overlay), and evdev, through
/// which the X server reads every keyboard and mouse (it has no modalias of its own).
const BASE_MODULES: [&str; 4] = ["nbd", "squashfs", "overlay", "evdev"];
const DHCP_LIMIT: Duration = Duration::from_secs(90);

pub fn mount_all(con: &mut Console) {
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
static EXITS: Mutex<VecDeque<(i32, i32)>> = Mutex::new(VecDeque::new());
static EXITED: Condvar = Condvar::new();

/// PID 1 inherits every orphan; one thread reaps them all so none stays a zombie, and
/// records exit codes for [`wait_child`] (our own children are reaped here too, so nobody
/// else may call wait()).
pub fn spawn_reaper() {
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
pub fn wait_child(pid: i32, timeout: Duration) -> Option<i32> {
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

pub fn random_u32() -> u32 {
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
pub fn load_modules(con: &mut Console) -> Result<()> {
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
pub fn pick_link(con: &mut Console) -> Result<String> {
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
pub fn network(iface: &str, log: &mut dyn FnMut(String)) -> Result<(dhcp::Lease, dhcp::Holder)> {
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
