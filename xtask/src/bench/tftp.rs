//! `cargo xtask bench tftp`: vdd's TFTP server (RFC 1350 lockstep, RFC 7440 windowsize)
//! against dnsmasq, tftpd-hpa and atftpd, in the same run.
//!
//! Everything runs inside one lab network namespace (servers on its 127.0.0.1, each on
//! its own port; dnsmasq has no TFTP port option, so it takes 69 there), so nothing
//! reaches a real interface. atftpd cannot be installed beside tftpd-hpa, so its Debian
//! package is fetched with `apt-get download` and unpacked with `dpkg -x` into
//! `target/bench-cache/atftpd` (kept for later runs). Clients are the atftp client (the one that speaks
//! windowsize), with blksize 1468 (a 1500-byte Ethernet frame). Every download is checked
//! by sha256. Scenarios: one client lockstep, one client windowsize 16, N concurrent
//! clients lockstep, N concurrent clients windowsize 16 (peers without windowsize fall
//! back to lockstep, as a real client would). MB/s is 10^6 bytes per second of wall time, the median of `--runs`.
//!
//! Wall time on a shared machine says little, so each run also measures CPU time per GB
//! served, which load barely moves: the server's (a cgroup of its own, which also sees
//! tftpd-hpa's per-transfer children; /proc/PID/stat where no cgroup can be made) and
//! the clients' (`getrusage(RUSAGE_CHILDREN)` across the run). The servers take turns
//! in a rotating order, so none always runs first after a scenario change.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::cpu::{children_cpu, loadavg, CpuMeter};
use crate::lab::{self, Lab};

#[derive(clap::Args)]
pub struct Args {
    /// Runs per scenario and server (the median is printed).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Size of the file downloaded, in MiB.
    #[arg(long, default_value_t = 64)]
    size_mib: usize,
    /// Concurrent clients in the concurrent scenario.
    #[arg(long, default_value_t = 20)]
    clients: usize,
    /// Use this vdd binary instead of building target/release/vdd.
    #[arg(long)]
    vdd: Option<PathBuf>,
}

/// A scratch folder removed on Drop (on every path, errors included).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One client process, killed and reaped on Drop unless it already ended.
struct ClientProc(Option<Child>);

impl Drop for ClientProc {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            if matches!(c.try_wait(), Ok(None)) {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

/// Longest a single download may take before the run counts as failed.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(300);

struct Peer {
    name: &'static str,
    port: u16,
    /// Whether it implements RFC 7440 windowsize.
    windowsize: bool,
    cpu: CpuMeter,
}

/// One run's figures.
#[derive(Clone, Copy)]
struct RunResult {
    mbps: f64,
    /// CPU seconds per GB (10^9 bytes) delivered, of the server and of all clients.
    server_s_per_gb: f64,
    client_s_per_gb: f64,
}

#[derive(Clone, Copy, PartialEq)]
enum Scenario {
    Lockstep,
    Window16,
    ConcurrentLockstep,
    Concurrent,
}

impl Scenario {
    fn label(self, clients: usize) -> String {
        match self {
            Scenario::Lockstep => "1 client, lockstep".into(),
            Scenario::Window16 => "1 client, windowsize 16".into(),
            Scenario::ConcurrentLockstep => format!("{clients} clients, lockstep (aggregate)"),
            Scenario::Concurrent => format!("{clients} clients, windowsize 16 (aggregate)"),
        }
    }
}

pub fn run(a: Args) -> Result<()> {
    if let Some(why) = lab::missing(&["atftp", "dnsmasq", "in.tftpd", "sha256sum", "dpkg"]) {
        bail!("cannot run the TFTP benchmark here: {why}");
    }
    if a.runs == 0 || a.clients == 0 || a.size_mib == 0 {
        bail!("--runs, --clients and --size-mib must be at least 1");
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?
        .to_path_buf();
    let vdd = super::vdd_release(a.vdd.clone())?;

    // tmpfs, so 20 clients writing 64 MiB each measure the network path, not the disk.
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let scratch = Scratch(base.join(format!("vdd-bench-tftp-{}", std::process::id())));
    let dir = scratch.0.clone();
    let root = dir.join("root");
    let out = dir.join("out");
    std::fs::create_dir_all(&root)?;
    std::fs::create_dir_all(&out)?;
    std::fs::create_dir_all(dir.join("state"))?;
    // Peers drop privileges to nobody: everything must be world-readable.
    chmod(&dir, 0o755)?;
    chmod(&root, 0o755)?;
    let size = a.size_mib << 20;
    let big = root.join("big.bin");
    write_random(&big, size)?;
    std::fs::write(root.join("probe.txt"), b"probe\n")?;
    let want = sha256(&big)?;

    let atftpd = fetch_atftpd(&workspace.join("target/bench-cache"))?;

    let mut lab = Lab::new("tftpb")?;
    let ns = lab.server_ns.clone();
    let log = |name: &str| -> Result<Stdio> {
        Ok(std::fs::File::create(dir.join(format!("{name}.log")))?.into())
    };

    let cfg = dir.join("vdd.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\ninterface = \"lo\"\nstate_dir = \"{}\"\n[dhcp]\nmode = \"off\"\n[tftp]\nroot = \"{}\"\nport = 6901\nmax_transfers = 256\nmax_per_address = 256\n[http]\nenabled = false\n[nbd]\nenabled = false\n",
            dir.join("state").display(),
            root.display()
        ),
    )?;
    let mut peers = Vec::new();

    let mut c = Lab::cmd(&ns, &vdd);
    c.args(["serve", "--config"]).arg(&cfg);
    c.env("RUST_LOG", "info")
        .stdout(log("vdd")?)
        .stderr(log("vdd-err")?);
    let pid = lab.spawn("vdd", c)?;
    peers.push(Peer {
        name: "vdd",
        port: 6901,
        windowsize: true,
        cpu: CpuMeter::new("vdd", pid),
    });

    let mut c = Lab::cmd(&ns, lab::which("dnsmasq").context("dnsmasq")?);
    c.args([
        "--no-daemon",
        "--conf-file=/dev/null",
        "--port=0",
        "--enable-tftp",
        "--listen-address=127.0.0.1",
        "--bind-interfaces",
        "--tftp-max=100",
        "--user=root",
        "--pid-file=",
    ])
    .arg(format!("--tftp-root={}", root.display()))
    .stdout(log("dnsmasq")?)
    .stderr(log("dnsmasq-err")?);
    let pid = lab.spawn("dnsmasq", c)?;
    peers.push(Peer {
        name: "dnsmasq",
        port: 69,
        windowsize: false,
        cpu: CpuMeter::new("dnsmasq", pid),
    });

    let mut c = Lab::cmd(&ns, lab::which("in.tftpd").context("in.tftpd")?);
    c.args(["-L", "-u", "root", "-s"])
        .arg(&root)
        .args(["-a", "127.0.0.1:6902"])
        .stdout(log("tftpd-hpa")?)
        .stderr(log("tftpd-hpa-err")?);
    let pid = lab.spawn("tftpd-hpa", c)?;
    peers.push(Peer {
        name: "tftpd-hpa",
        port: 6902,
        windowsize: false,
        cpu: CpuMeter::new("tftpd-hpa", pid),
    });

    let mut c = Lab::cmd(&ns, &atftpd);
    c.args([
        "--daemon",
        "--no-fork",
        "--port",
        "6903",
        "--bind-address",
        "127.0.0.1",
        "--user",
        "root.root",
        "--maxthread",
        "100",
        "--logfile",
    ])
    .arg(dir.join("atftpd.log"))
    .arg(&root)
    .stdout(log("atftpd-out")?)
    .stderr(log("atftpd-err")?);
    let pid = lab.spawn("atftpd", c)?;
    peers.push(Peer {
        name: "atftpd",
        port: 6903,
        windowsize: true,
        cpu: CpuMeter::new("atftpd", pid),
    });

    for p in &peers {
        wait_ready(&ns, p, &out).with_context(|| {
            format!(
                "{} did not serve; see its logs in {}",
                p.name,
                dir.display()
            )
        })?;
    }
    let load_start = loadavg();
    eprintln!(
        "bench: {} MiB file, {} runs per cell, servers in namespace {ns}, load average {load_start}",
        a.size_mib, a.runs
    );

    let scenarios = [
        Scenario::Lockstep,
        Scenario::Window16,
        Scenario::ConcurrentLockstep,
        Scenario::Concurrent,
    ];
    // results[scenario][peer] = figures of each run
    let mut results: Vec<Vec<Vec<RunResult>>> =
        vec![vec![Vec::new(); peers.len()]; scenarios.len()];
    for (si, &s) in scenarios.iter().enumerate() {
        let clients = match s {
            Scenario::Concurrent | Scenario::ConcurrentLockstep => a.clients,
            _ => 1,
        };
        // Interleave the servers run by run, so a noisy moment on the shared machine
        // hits all of them alike, and rotate who goes first.
        for r in 0..a.runs {
            for k in 0..peers.len() {
                let pi = (r + k) % peers.len();
                let p = &peers[pi];
                let res = one_run(&ns, p, s, clients, &out, size, &want)
                    .with_context(|| format!("{} / {} / run {r}", p.name, s.label(clients)))?;
                eprintln!(
                    "bench: {:<28} {:<10} run {r}: {:8.1} MB/s, CPU s/GB server {:5.2} clients {:5.2}",
                    s.label(clients),
                    p.name,
                    res.mbps,
                    res.server_s_per_gb,
                    res.client_s_per_gb
                );
                results[si][pi].push(res);
            }
        }
    }

    println!();
    println!(
        "TFTP download of {} MiB, blksize 1468, atftp client, median of {} runs, MB/s",
        a.size_mib, a.runs
    );
    print!("{:<42}", "scenario");
    for p in &peers {
        print!("{:>11}", p.name);
    }
    println!("{:>16}{:>14}", "vdd/best peer", "vdd/atftpd");
    for (si, &s) in scenarios.iter().enumerate() {
        let med: Vec<f64> = results[si]
            .iter()
            .map(|v| super::median(v.iter().map(|r| r.mbps).collect()))
            .collect();
        print!("{:<42}", s.label(a.clients));
        for (pi, m) in med.iter().enumerate() {
            let windowed = matches!(s, Scenario::Window16 | Scenario::Concurrent);
            let mark = if windowed && !peers[pi].windowsize {
                "*"
            } else {
                " "
            };
            print!("{m:>10.1}{mark}");
        }
        let best_peer = med[1..].iter().cloned().fold(0.0, f64::max);
        let atftpd = med[peers.iter().position(|p| p.name == "atftpd").unwrap_or(0)];
        println!("{:>15.2}x{:>13.2}x", med[0] / best_peer, med[0] / atftpd);
    }
    println!("* no windowsize support: the client fell back to lockstep");
    println!();
    println!(
        "CPU seconds per GB delivered, median of {} runs: server / clients",
        a.runs
    );
    print!("{:<42}", "scenario");
    for p in &peers {
        print!("{:>14}", p.name);
    }
    println!();
    for (si, &s) in scenarios.iter().enumerate() {
        print!("{:<42}", s.label(a.clients));
        for v in &results[si] {
            let sv = super::median(v.iter().map(|r| r.server_s_per_gb).collect());
            let cl = super::median(v.iter().map(|r| r.client_s_per_gb).collect());
            let cell = if sv.is_nan() {
                format!("n/a / {cl:.2}")
            } else {
                format!("{sv:.2} / {cl:.2}")
            };
            print!("{cell:>14}");
        }
        println!();
    }
    println!("load average at start {load_start}, at end {}", loadavg());
    drop(lab);
    if std::env::var_os("VDD_BENCH_KEEP").is_some() {
        // Kept for a look at the servers' logs; the caller removes it.
        eprintln!("bench: logs kept in {}", scratch.0.display());
        std::mem::forget(scratch);
    }
    Ok(())
}

fn chmod(p: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", p.display()))
}

/// Pseudo-random content (see [`super::pseudo_random`]), world-readable.
fn write_random(path: &Path, len: usize) -> Result<()> {
    let v = super::pseudo_random(len, 0x9e37_79b9_7f4a_7c15);
    std::fs::write(path, v).with_context(|| format!("writing {}", path.display()))?;
    chmod(path, 0o644)
}

fn sha256(path: &Path) -> Result<String> {
    let o = Command::new("sha256sum").arg(path).output()?;
    if !o.status.success() {
        bail!("sha256sum {} failed", path.display());
    }
    Ok(String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// atftpd conflicts with tftpd-hpa in apt, so unpack its package privately, into a
/// cache under target/ that later runs reuse (a mirror hiccup then costs nothing).
fn fetch_atftpd(cache: &Path) -> Result<PathBuf> {
    let bin = cache.join("atftpd/usr/sbin/atftpd");
    if bin.is_file() {
        return Ok(bin);
    }
    let _ = std::fs::remove_dir_all(cache.join("atftpd-deb"));
    let dl = cache.join("atftpd-deb");
    std::fs::create_dir_all(&dl)?;
    // _apt must be able to write the download folder.
    chmod(&dl, 0o777)?;
    let st = Command::new("apt-get")
        .args(["download", "-q", "atftpd"])
        .current_dir(&dl)
        .status()
        .context("running apt-get download atftpd")?;
    if !st.success() {
        bail!("apt-get download atftpd failed (is a Debian mirror reachable?)");
    }
    let deb = std::fs::read_dir(&dl)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("no atftpd .deb downloaded")?;
    let x = cache.join("atftpd");
    let st = Command::new("dpkg").arg("-x").arg(&deb).arg(&x).status()?;
    if !st.success() {
        let _ = std::fs::remove_dir_all(&x);
        bail!("dpkg -x {} failed", deb.display());
    }
    let _ = std::fs::remove_dir_all(&dl);
    Ok(bin)
}

fn atftp(ns: &str, port: u16, remote: &str, local: &Path, window: bool) -> Command {
    let mut c = Lab::cmd(ns, "atftp");
    c.args(["--option", "blksize 1468"]);
    if window {
        c.args(["--option", "windowsize 16"]);
    }
    c.args(["-g", "-r", remote, "-l"])
        .arg(local)
        .args(["127.0.0.1", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

/// Waits until `c` exits, at most `limit`; true when it exited with success.
fn wait_bounded(c: &mut ClientProc, limit: Duration) -> Result<bool> {
    let end = Instant::now() + limit;
    let child = c.0.as_mut().context("no child")?;
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(st.success());
        }
        if Instant::now() > end {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn wait_ready(ns: &str, p: &Peer, out: &Path) -> Result<()> {
    let local = out.join(format!("probe-{}", p.name));
    for _ in 0..40 {
        let mut c = ClientProc(Some(atftp(ns, p.port, "probe.txt", &local, false).spawn()?));
        if wait_bounded(&mut c, Duration::from_secs(10))?
            && std::fs::read(&local).is_ok_and(|b| b == b"probe\n")
        {
            let _ = std::fs::remove_file(&local);
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    bail!("no answer on 127.0.0.1:{}", p.port)
}

fn one_run(
    ns: &str,
    p: &Peer,
    s: Scenario,
    clients: usize,
    out: &Path,
    size: usize,
    want: &str,
) -> Result<RunResult> {
    let window = matches!(s, Scenario::Window16 | Scenario::Concurrent);
    let files: Vec<PathBuf> = (0..clients)
        .map(|i| out.join(format!("{}-{i}", p.name)))
        .collect();
    let server0 = p.cpu.seconds();
    let clients0 = children_cpu();
    let start = Instant::now();
    let mut procs = Vec::new();
    for f in &files {
        procs.push(ClientProc(Some(
            atftp(ns, p.port, "big.bin", f, window).spawn()?,
        )));
    }
    let mut ok = true;
    for c in &mut procs {
        ok &= wait_bounded(c, CLIENT_TIMEOUT.saturating_sub(start.elapsed()))?;
    }
    let secs = start.elapsed().as_secs_f64();
    drop(procs);
    // Every client is reaped now (Drop waits), and sha256sum has not run yet.
    let client_cpu = children_cpu() - clients0;
    let server_cpu = match (server0, p.cpu.seconds()) {
        (Some(a), Some(b)) => b - a,
        _ => f64::NAN,
    };
    if !ok {
        bail!("a client failed or timed out");
    }
    for f in &files {
        let got = sha256(f)?;
        let _ = std::fs::remove_file(f);
        if got != want {
            bail!("{} differs from the source (sha256 {got})", f.display());
        }
    }
    let bytes = (size * clients) as f64;
    Ok(RunResult {
        mbps: bytes / 1e6 / secs,
        server_s_per_gb: server_cpu / (bytes / 1e9),
        client_s_per_gb: client_cpu / (bytes / 1e9),
    })
}
