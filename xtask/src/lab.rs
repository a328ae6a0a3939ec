//! The lab network shared by tests, benchmarks and end-to-end boots: network namespaces,
//! veth pairs, one bridge and tap devices, all removed again on Drop.
//!
//! Topology of one lab (addresses exist only inside its namespaces):
//!
//! ```text
//!   ns "<lab>-srv":  br0 10.77.0.1/24  <-- the server side (vdd, peers)
//!                     |-- veth to ns "<lab>-cN" (eth0 there, no address until DHCP)
//!                     |-- tapN (for QEMU thin clients, run inside the server ns)
//! ```
//!
//! Every namespace name carries the pid and a counter, so parallel tests never collide,
//! and deleting a namespace takes its links with it. Processes started through
//! [`Lab::spawn`] are killed and reaped on Drop before the namespaces go.

use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context, Result};

/// The server's address on the lab bridge.
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// Prefix length of the lab subnet 10.77.0.0/24.
pub const PREFIX: u8 = 24;
/// The bridge inside the server namespace.
pub const BRIDGE: &str = "br0";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Why a test that needs a lab cannot run here, or `None` when it can.
///
/// Checks for root and for each named tool on PATH. Under `CI=true` a missing requirement
/// is a failure, not a skip: CI installs everything, so a skip there would hide a broken
/// install step.
pub fn missing(tools: &[&str]) -> Option<String> {
    let mut why = Vec::new();
    if !is_root() {
        why.push("not root".to_string());
    }
    for t in ["ip"].iter().chain(tools) {
        if which(t).is_none() {
            why.push(format!("`{t}` not installed"));
        }
    }
    if why.is_empty() {
        return None;
    }
    let why = why.join(", ");
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI must provide everything this test needs, but: {why}");
    }
    Some(why)
}

/// Full path of a program on PATH (or in /usr/sbin, /sbin, which a non-login PATH may lack).
pub fn which(prog: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(Into::into))
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // Read from /proc so this helper needs no libc crate.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// `ip netns exec NS` bind-mounts the files of `/etc/netns/NS/` over `/etc/`.
const NETNS_ETC: &str = "/etc/netns";

/// Adds namespace `ns` with its own (empty) resolv.conf. DHCP clients' default scripts
/// (busybox udhcpc, dhclient) write /etc/resolv.conf; without this shield a client run in
/// a lab namespace would overwrite the host's and take its DNS away.
fn add_ns(ns: &str) -> Result<()> {
    let etc = Path::new(NETNS_ETC).join(ns);
    std::fs::create_dir_all(&etc).with_context(|| format!("creating {}", etc.display()))?;
    std::fs::write(etc.join("resolv.conf"), "")
        .with_context(|| format!("writing {}/resolv.conf", etc.display()))?;
    if let Err(e) = ip(["netns", "add", ns]) {
        let _ = std::fs::remove_dir_all(&etc);
        return Err(e);
    }
    Ok(())
}

/// Runs `ip ARGS...` and fails with its stderr.
pub fn ip<I, S>(args: I) -> Result<()>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    crate::output(Command::new("ip").args(&args), &format!("ip {args:?}"))?;
    Ok(())
}

/// Runs `ip [-n NS] -batch -` with `script` (one command a line) on its stdin.
pub fn ip_batch(ns: Option<&str>, script: &str) -> Result<()> {
    let mut c = Command::new("ip");
    if let Some(ns) = ns {
        c.args(["-n", ns]);
    }
    batch(c, script)
}

/// `ip -force -batch -`: every line is tried, failures or not.
fn ip_batch_forced(script: &str) -> Result<()> {
    let mut c = Command::new("ip");
    c.arg("-force");
    batch(c, script)
}

fn batch(mut c: Command, script: &str) -> Result<()> {
    use std::io::Write;
    let mut child = c
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running `ip -batch`")?;
    child
        .stdin
        .take()
        .context("ip's stdin")?
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "ip -batch failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// One lab: a server namespace with a bridge, and client namespaces / taps on it.
pub struct Lab {
    /// Prefix of every namespace of this lab.
    pub name: String,
    /// The namespace vdd and the peers run in.
    pub server_ns: String,
    clients: Vec<String>,
    taps: u32,
    children: Vec<(String, Child)>,
}

/// A client namespace: one `eth0` on the lab bridge, no address until a DHCP client runs.
#[derive(Clone, Debug)]
pub struct ClientNs {
    pub ns: String,
    /// The MAC of its eth0, lower-case with colons.
    pub mac: String,
}

impl Lab {
    /// Creates the server namespace with `br0` at 10.77.0.1/24 and loopback up.
    pub fn new(tag: &str) -> Result<Lab> {
        Lab::with_prefix(tag, PREFIX)
    }

    /// Like [`Lab::new`], with `br0` at 10.77.0.1/`prefix`: benchmarks that need more
    /// addresses than a /24 (tens of thousands of simulated DHCP clients) use a /16.
    pub fn with_prefix(tag: &str, prefix: u8) -> Result<Lab> {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        // Namespace names end up in /run/netns; keep them short and unique per process.
        let name = format!("vdd{}-{}-{}", short(tag), std::process::id(), n);
        let server_ns = format!("{name}-s");
        add_ns(&server_ns)?;
        let lab = Lab {
            name,
            server_ns,
            clients: Vec::new(),
            taps: 0,
            children: Vec::new(),
        };
        let s = lab.server_ns.clone();
        ip(["-n", &s, "link", "set", "lo", "up"])?;
        ip(["-n", &s, "link", "add", BRIDGE, "type", "bridge"])?;
        // No STP and no forwarding delay: a DHCP client must be heard at once.
        ip([
            "-n",
            &s,
            "link",
            "set",
            BRIDGE,
            "type",
            "bridge",
            "forward_delay",
            "0",
            "stp_state",
            "0",
        ])?;
        ip([
            "-n",
            &s,
            "addr",
            "add",
            &format!("{SERVER_IP}/{prefix}"),
            "dev",
            BRIDGE,
        ])?;
        ip(["-n", &s, "link", "set", BRIDGE, "up"])?;
        Ok(lab)
    }

    /// Adds a client namespace with a veth whose far end sits on the bridge.
    /// `mac` sets the client's MAC (e.g. for reservations); `None` keeps the random one.
    pub fn add_client(&mut self, mac: Option<&str>) -> Result<ClientNs> {
        let idx = self.clients.len();
        let ns = format!("{}-c{}", self.name, idx);
        add_ns(&ns)?;
        self.clients.push(ns.clone());
        let peer = format!("vc{idx}");
        ip([
            "-n",
            &self.server_ns,
            "link",
            "add",
            &peer,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &ns,
        ])?;
        ip([
            "-n",
            &self.server_ns,
            "link",
            "set",
            &peer,
            "master",
            BRIDGE,
        ])?;
        ip(["-n", &self.server_ns, "link", "set", &peer, "up"])?;
        if let Some(mac) = mac {
            ip(["-n", &ns, "link", "set", "eth0", "address", mac])?;
        }
        ip(["-n", &ns, "link", "set", "lo", "up"])?;
        ip(["-n", &ns, "link", "set", "eth0", "up"])?;
        let mac = link_mac(&ns, "eth0")?;
        Ok(ClientNs { ns, mac })
    }

    /// Adds `n` client namespaces like [`Lab::add_client`], with the MACs `mac(i)`, in a
    /// few `ip -batch` runs: a storm of 300 seats would otherwise take thousands of `ip`
    /// processes. Their loopback stays down (nothing of a seat listens on it).
    pub fn add_clients(
        &mut self,
        n: usize,
        mac: impl Fn(usize) -> String,
    ) -> Result<Vec<ClientNs>> {
        let first = self.clients.len();
        let seats: Vec<ClientNs> = (first..first + n)
            .map(|i| ClientNs {
                ns: format!("{}-c{i}", self.name),
                mac: mac(i - first),
            })
            .collect();
        for c in &seats {
            let etc = Path::new(NETNS_ETC).join(&c.ns);
            std::fs::create_dir_all(&etc)?;
            std::fs::write(etc.join("resolv.conf"), "")?;
        }
        // Registered before they exist, so Drop removes whatever part was made.
        self.clients.extend(seats.iter().map(|c| c.ns.clone()));
        let adds: String = seats
            .iter()
            .map(|c| format!("netns add {}\n", c.ns))
            .collect();
        ip_batch(None, &adds)?;
        let mut links = String::new();
        for (i, c) in (first..).zip(&seats) {
            links.push_str(&format!(
                "link add vc{i} type veth peer name eth0 address {} netns {}\nlink set vc{i} master {BRIDGE} up\n",
                c.mac, c.ns
            ));
        }
        ip_batch(Some(&self.server_ns), &links)?;
        let ups: String = seats
            .iter()
            .map(|c| format!("netns exec {} ip link set eth0 up\n", c.ns))
            .collect();
        ip_batch(None, &ups)?;
        Ok(seats)
    }

    /// Adds a namespace for a server host: its `eth0` at `cidr` (e.g. "10.77.0.1/16") on
    /// the bridge. Returns the namespace and the bridge-side end of its veth (`vhN`), on
    /// which a benchmark can shape the host's traffic towards the clients.
    pub fn add_host(&mut self, cidr: &str) -> Result<(String, String)> {
        let idx = self.clients.len();
        let ns = format!("{}-h{idx}", self.name);
        add_ns(&ns)?;
        self.clients.push(ns.clone());
        let peer = format!("vh{idx}");
        let s = self.server_ns.clone();
        ip([
            "-n", &s, "link", "add", &peer, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        ip(["-n", &s, "link", "set", &peer, "master", BRIDGE, "up"])?;
        ip(["-n", &ns, "addr", "add", cidr, "dev", "eth0"])?;
        ip(["-n", &ns, "link", "set", "lo", "up"])?;
        ip(["-n", &ns, "link", "set", "eth0", "up"])?;
        Ok((ns, peer))
    }

    /// Adds a tap device on the bridge for a QEMU thin client started inside the server
    /// namespace; returns its name.
    pub fn add_tap(&mut self) -> Result<String> {
        let tap = format!("tap{}", self.taps);
        self.taps += 1;
        ip([
            "-n",
            &self.server_ns,
            "tuntap",
            "add",
            "dev",
            &tap,
            "mode",
            "tap",
        ])?;
        ip(["-n", &self.server_ns, "link", "set", &tap, "master", BRIDGE])?;
        ip(["-n", &self.server_ns, "link", "set", &tap, "up"])?;
        Ok(tap)
    }

    /// A command that runs `prog` inside namespace `ns`.
    pub fn cmd(ns: &str, prog: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(prog);
        c
    }

    /// Starts `cmd` (built with [`Lab::cmd`]) and keeps it, so Drop kills it.
    /// Returns its pid.
    pub fn spawn(&mut self, label: &str, mut cmd: Command) -> Result<u32> {
        let child = cmd.spawn().with_context(|| format!("starting {label}"))?;
        let pid = child.id();
        self.children.push((label.to_string(), child));
        Ok(pid)
    }

    /// Kills one child started by [`Lab::spawn`] with `signal` and reaps it.
    pub fn kill(&mut self, pid: u32, signal: &str) -> Result<()> {
        if let Some(i) = self.children.iter().position(|(_, c)| c.id() == pid) {
            let (_, mut child) = self.children.remove(i);
            if matches!(child.try_wait(), Ok(None)) {
                let _ = Command::new("kill")
                    .args([&format!("-{signal}"), &pid.to_string()])
                    .status();
            }
            let _ = child.wait();
        }
        Ok(())
    }

    /// True while the child with this pid has not exited.
    pub fn is_running(&mut self, pid: u32) -> bool {
        self.children
            .iter_mut()
            .find(|(_, c)| c.id() == pid)
            .is_some_and(|(_, c)| matches!(c.try_wait(), Ok(None)))
    }
}

/// Names of the lab bridge's `vdt-*` ports (vdd's taps of X11 guests, `TAP_PREFIX` in
/// src/lan.rs) in namespace `ns`.
pub fn vdd_taps(ns: &str) -> Result<Vec<String>> {
    let out = Command::new("ip")
        .args(["-n", ns, "-o", "link", "show", "master", BRIDGE])
        .output()
        .context("ip link show")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter(|n| n.starts_with("vdt-"))
        .collect())
}

fn link_mac(ns: &str, dev: &str) -> Result<String> {
    let out = Command::new("ip")
        .args(["-n", ns, "-o", "link", "show", dev])
        .output()?;
    let s = String::from_utf8_lossy(&out.stdout);
    s.split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .map(str::to_string)
        .with_context(|| format!("no MAC on {dev} in {ns}"))
}

fn short(tag: &str) -> String {
    tag.chars()
        .filter(char::is_ascii_alphanumeric)
        .take(6)
        .collect()
}

impl Drop for Lab {
    fn drop(&mut self) {
        // SIGTERM first: a server gets to stop what it started (vdd stops its guest VMs,
        // which run in their own process group); SIGKILL whatever is left after 15 s.
        for (_, child) in &mut self.children {
            // Only a child not reaped yet: once `is_running` has collected it, its pid may
            // be another process's.
            if matches!(child.try_wait(), Ok(None)) {
                let _ = Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .stderr(Stdio::null())
                    .status();
            }
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        for (_, child) in &mut self.children {
            while matches!(child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // One `ip` for all (a storm has hundreds); -force goes on past a namespace that
        // was never made.
        let all: Vec<&String> = self
            .clients
            .iter()
            .chain(std::iter::once(&self.server_ns))
            .collect();
        let dels: String = all.iter().map(|ns| format!("netns del {ns}\n")).collect();
        let _ = ip_batch_forced(&dels);
        for ns in all {
            let _ = std::fs::remove_dir_all(Path::new(NETNS_ETC).join(ns));
        }
    }
}
