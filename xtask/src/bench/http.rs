//! `cargo xtask bench http`: N concurrent `curl` downloads of one large file, in rounds,
//! from vdd's HTTP service with sendfile, from the same service copying through user space
//! (`[http] sendfile = false`), and from `python3 -m http.server` as a peer for scale.
//!
//! Everything runs inside one lab server namespace (traffic to 10.77.0.1 on its bridge
//! never leaves it). Reported per server: median aggregate MB/s over the rounds, and the
//! server's CPU seconds (utime + stime from /proc/PID/stat) per GB served.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::lab::{self, Lab};
use anyhow::{bail, ensure, Context, Result};

/// What to run; the defaults are the issue's: 20 clients, 64 MiB, a fixed number of rounds.
#[derive(Clone, Debug)]
pub struct Opts {
    pub clients: usize,
    pub size_mib: usize,
    pub rounds: usize,
    /// Also measure `python3 -m http.server`.
    pub peer: bool,
    /// The vdd binary (a release build).
    pub vdd: PathBuf,
}

/// One server's figures.
#[derive(Clone, Debug)]
pub struct Figures {
    pub name: String,
    pub mb_per_s: Vec<f64>,
    pub cpu_s_per_gb: f64,
    pub bytes: u64,
}

const PORT_VDD: u16 = 8080;
const PORT_PEER: u16 = 8090;
/// The most one curl may take: bounds every round even if a server hangs.
const CURL_MAX_S: u64 = 300;

pub fn run(o: &Opts) -> Result<Vec<Figures>> {
    if let Some(why) = lab::missing(&["curl", "python3"]) {
        bail!("cannot run the http benchmark: {why}");
    }
    ensure!(
        o.clients >= 1 && o.clients <= 200 && o.rounds >= 1 && o.rounds <= 50,
        "clients 1..=200 and rounds 1..=50 keep the run bounded"
    );
    let work = Workdir::new()?;
    let root = work.0.join("root");
    std::fs::create_dir_all(&root)?;
    let file = root.join("big.bin");
    let sum = write_pattern(&file, o.size_mib * 1024 * 1024)?;

    let mut lab = Lab::new("bhttp")?;
    let ns = lab.server_ns.clone();
    // All servers run at once and the rounds alternate between them, so a burst of load
    // from elsewhere on the machine hits every server alike instead of one of them.
    let mut servers: Vec<(String, u32, String)> = Vec::new();
    for (name, sendfile, port) in [
        ("vdd (sendfile)", true, PORT_VDD),
        ("vdd (user-space copy)", false, PORT_VDD + 1),
    ] {
        let cfg = work.0.join(format!("vdd-{sendfile}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "[server]\ninterface = \"{}\"\nstate_dir = \"state\"\n[dhcp]\nmode = \"off\"\n\
                 [tftp]\nenabled = false\n[http]\nport = {port}\nroot = \"root\"\nsendfile = {sendfile}\nmax_per_address = 1024\n",
                lab::BRIDGE
            ),
        )?;
        let mut cmd = Lab::cmd(&ns, &o.vdd);
        cmd.args(["serve", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null());
        let pid = lab.spawn(name, cmd)?;
        let url = format!("http://{}:{port}/files/big.bin", lab::SERVER_IP);
        servers.push((name.to_string(), pid, url));
    }
    if o.peer {
        let name = "python3 -m http.server";
        let mut cmd = Lab::cmd(&ns, "python3");
        cmd.args(["-m", "http.server", &PORT_PEER.to_string(), "--bind"])
            .arg(lab::SERVER_IP.to_string())
            .arg("--directory")
            .arg(&root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .stdin(Stdio::null());
        let pid = lab.spawn(name, cmd)?;
        let url = format!("http://{}:{PORT_PEER}/big.bin", lab::SERVER_IP);
        servers.push((name.to_string(), pid, url));
    }
    for (name, pid, url) in &servers {
        ready(&mut lab, &ns, *pid, name, url, &sum, &work.0)?;
    }
    let cpu0 = servers
        .iter()
        .map(|(_, pid, _)| cpu_seconds(*pid))
        .collect::<Result<Vec<_>>>()?;
    let mut figs: Vec<Figures> = servers
        .iter()
        .map(|(name, _, _)| Figures {
            name: name.clone(),
            mb_per_s: Vec::new(),
            cpu_s_per_gb: 0.0,
            bytes: 0,
        })
        .collect();
    for round in 0..o.rounds {
        for ((name, _, url), f) in servers.iter().zip(&mut figs) {
            let (bytes, secs) = one_round(&ns, name, url, o, round)?;
            f.bytes += bytes;
            f.mb_per_s.push(bytes as f64 / 1e6 / secs);
        }
    }
    for (((_, pid, _), f), c0) in servers.iter().zip(&mut figs).zip(cpu0) {
        let cpu = cpu_seconds(*pid)? - c0;
        f.cpu_s_per_gb = cpu / (f.bytes as f64 / 1e9);
        lab.kill(*pid, "TERM")?;
    }
    Ok(figs)
}

/// Waits until a server answers, and checks that it serves the file's exact bytes (which
/// also puts the file in the page cache before any timing).
fn ready(
    lab: &mut Lab,
    ns: &str,
    pid: u32,
    name: &str,
    url: &str,
    sum: &str,
    work: &Path,
) -> Result<()> {
    let check = work.join("check.bin");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        ensure!(lab.is_running(pid), "{name} exited at start");
        let st = Lab::cmd(ns, "curl")
            .args(["-sf", "--max-time", "120", "-o"])
            .arg(&check)
            .arg(url)
            .status()?;
        if st.success() {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "{name} did not serve within 30 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    ensure!(
        file_sha256(&check)? == sum,
        "{name} served different bytes than the file"
    );
    let _ = std::fs::remove_file(&check);
    Ok(())
}

/// One round: `clients` curls at once; returns bytes received and wall seconds.
fn one_round(ns: &str, name: &str, url: &str, o: &Opts, round: usize) -> Result<(u64, f64)> {
    let size = (o.size_mib * 1024 * 1024) as u64;
    let t = Instant::now();
    let mut kids = Vec::new();
    for _ in 0..o.clients {
        let child = Lab::cmd(ns, "curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{size_download}"])
            .args(["--max-time", &CURL_MAX_S.to_string()])
            .arg(url)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting curl")?;
        kids.push(child);
    }
    let mut bytes = 0u64;
    let mut bad = 0;
    for k in kids {
        let out = k.wait_with_output()?;
        let got: u64 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0);
        if !out.status.success() || got != size {
            bad += 1;
        }
        bytes += got;
    }
    let secs = t.elapsed().as_secs_f64();
    ensure!(
        bad == 0,
        "{name}: {bad} of {} downloads failed in round {round}",
        o.clients
    );
    eprintln!(
        "bench http: {name}: round {round}: {:.0} MB/s ({secs:.2} s)",
        bytes as f64 / 1e6 / secs
    );
    Ok((bytes, secs))
}

/// utime + stime of a process, in seconds (fields 14 and 15 of /proc/PID/stat).
fn cpu_seconds(pid: u32) -> Result<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) may contain spaces; fields resume after its ')'.
    let rest = &s[s.rfind(')').context("odd /proc stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    Ok(ticks / clk_tck())
}

fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// Writes `len` pseudo-random bytes and returns their sha256.
fn write_pattern(path: &Path, len: usize) -> Result<String> {
    let v = super::pseudo_random(len, 0x9e37_79b9_7f4a_7c15);
    std::fs::write(path, &v).with_context(|| format!("writing {}", path.display()))?;
    file_sha256(path)
}

/// `sha256sum` (coreutils) rather than a crate: xtask stays free of hashing deps.
fn file_sha256(path: &Path) -> Result<String> {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .context("running sha256sum")?;
    ensure!(out.status.success(), "sha256sum {} failed", path.display());
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// A scratch folder removed on Drop.
struct Workdir(PathBuf);

impl Workdir {
    fn new() -> Result<Workdir> {
        let p = std::env::temp_dir().join(format!("vdd-bench-http-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p)?;
        Ok(Workdir(p))
    }
}

impl Drop for Workdir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The report: one line per server, ratios against vdd with sendfile.
pub fn print(figs: &[Figures], o: &Opts) {
    println!(
        "http bench: {} concurrent curl x {} MiB, {} rounds (lab namespace, bridge address)",
        o.clients, o.size_mib, o.rounds
    );
    let base = figs
        .first()
        .map(|f| (super::median(f.mb_per_s.clone()), f.cpu_s_per_gb));
    for f in figs {
        let med = super::median(f.mb_per_s.clone());
        let (rb, cb) = base.unwrap_or((med, f.cpu_s_per_gb));
        println!(
            "  {:<26} median {:>7.0} MB/s ({:.2}x)   {:>6.3} CPU-s/GB ({:.2}x)   {:.1} GB served",
            f.name,
            med,
            med / rb,
            f.cpu_s_per_gb,
            f.cpu_s_per_gb / cb,
            f.bytes as f64 / 1e9
        );
    }
}
