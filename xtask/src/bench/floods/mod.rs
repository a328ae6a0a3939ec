//! `cargo xtask bench floods`: vdd's memory (VmRSS, VmHWM of /proc/PID/status) under
//! floods from the LAN, one after another, and whether a well-behaved client is still
//! served during each. A measurement, not a test: nothing here is a timed assertion; the
//! run fails only when vdd dies or a control client is not served.
//!
//! The release vdd runs in a lab server namespace on br0 (10.77.0.1/16) with DHCP in full
//! mode, TFTP, HTTP and one NBD export; the file served is 64 MiB of random bytes. Flood
//! clients (a Python script, written to the scratch folder) run in one client namespace
//! whose eth0 holds `--sources` addresses 10.77.1.1 on; the control clients (atftp, curl,
//! python3-libnbd, busybox udhcpc) run in other client namespaces, so the per-address caps
//! that refuse the flood never refuse them. All traffic stays on the lab bridge: every
//! packet is addressed to the server's lab address or is a broadcast on the lab bridge.
//!
//! Each flood: 2 s of baseline, the flood (bounded in count, held `--hold` seconds), the
//! control client 2 s into it, then 5 s to settle. RSS is sampled every 100 ms
//! throughout. Ctrl-C (or SIGTERM) ends the run at the next step and removes everything:
//! the children run in their own process groups, so the terminal's signal reaches only
//! this process, which then tears down through Drop.

mod control;
mod plan;
mod watch;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::lab::{self, Lab, SERVER_IP};
use control::{run_control, show, Control};
use plan::plan;
use watch::{running, Sampler};

#[derive(clap::Args)]
pub struct Args {
    /// Source addresses the flood clients send from (10.77.1.1 on), at most 250.
    #[arg(long, default_value_t = 16)]
    sources: usize,
    /// Seconds each flood holds what it opened (at most 300).
    #[arg(long, default_value_t = 15)]
    hold: u64,
    /// RRQs of the TFTP window flood (the slot-holding flood sends twice as many).
    #[arg(long, default_value_t = 64)]
    rrqs: usize,
    /// Idle TCP connections of the HTTP flood, all from one address.
    #[arg(long, default_value_t = 1100)]
    http_conns: usize,
    /// Made-up MACs of each DHCP flood.
    #[arg(long, default_value_t = 1000)]
    dhcp_macs: usize,
    /// Only these floods (comma-separated keys of the table: tftp-window, tftp-hold, http,
    /// nbd, dhcp-request, dhcp-discover); default all.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Use this vdd binary instead of building target/release/vdd.
    #[arg(long)]
    vdd: Option<PathBuf>,
}

/// Size of the file served over TFTP and HTTP, and of the NBD export.
const BIG: usize = 64 << 20;
/// Size of the file the TFTP and HTTP control clients fetch, and of the NBD control read.
const CONTROL: usize = 1 << 20;
const POOL: (&str, &str) = ("10.77.0.10", "10.77.0.250");
/// The control clients' address (TFTP, HTTP, NBD), outside every flood's sources.
const CONTROL_IP: &str = "10.77.2.1";
/// Longest a control client may take before it counts as failed.
const CONTROL_LIMIT: Duration = Duration::from_secs(60);
const BASELINE: Duration = Duration::from_secs(2);
const SETTLE: Duration = Duration::from_secs(5);
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
const EXPORT: &str = "floods";

/// Set by SIGINT/SIGTERM; every wait of the run looks at it.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: i32) {
    STOP.store(true, Ordering::SeqCst);
}

/// Turns Ctrl-C into an orderly stop. The C library's `signal` is declared here instead
/// of adding a crate for one call (std links libc anyway).
fn catch_signals() {
    extern "C" {
        fn signal(signum: i32, handler: extern "C" fn(i32)) -> usize;
    }
    const SIGINT: i32 = 2;
    const SIGTERM: i32 = 15;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        signal(SIGINT, on_signal);
        signal(SIGTERM, on_signal);
    }
}

fn check() -> Result<()> {
    if STOP.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps `d`, waking every 50 ms to notice Ctrl-C.
fn pause(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    loop {
        check()?;
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        std::thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

/// A scratch folder removed on Drop (on every path, errors included).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The flood clients, run with python3 inside the flood namespace.
const FLOOD_PY: &str = include_str!("flood.py");

struct Flood {
    key: &'static str,
    what: String,
    /// Arguments of flood.py, one process each.
    procs: Vec<Vec<String>>,
    control: Control,
}

struct Row {
    key: &'static str,
    kind: Control,
    what: String,
    base_kib: u64,
    peak_kib: u64,
    settled_kib: u64,
    hwm_kib: u64,
    control: Result<f64, String>,
    clients: Vec<String>,
    alive: bool,
}

/// Everything a flood step needs.
struct Ctx {
    vdd_pid: u32,
    flood_ns: String,
    control_ns: String,
    dir: PathBuf,
    python: PathBuf,
    libnbd_python: PathBuf,
    script: PathBuf,
    udhcpc_script: PathBuf,
    control_file: Vec<u8>,
}

pub fn run(a: Args) -> Result<()> {
    catch_signals();
    if let Some(why) = lab::missing(&["atftp", "curl", "busybox", "python3"]) {
        bail!("cannot run the flood benchmark here: {why}");
    }
    if !(1..=250).contains(&a.sources) || !(1..=300).contains(&a.hold) {
        bail!("--sources must be 1..=250 and --hold 1..=300");
    }
    if a.rrqs == 0 || a.rrqs > 1000 || a.http_conns > 5000 || a.dhcp_macs > 10000 {
        bail!("--rrqs must be 1..=1000, --http-conns at most 5000, --dhcp-macs at most 10000");
    }
    let keys = plan(&a, &["10.77.1.1".to_string()]);
    if let Some(k) = a.only.iter().find(|k| !keys.iter().any(|f| f.key == *k)) {
        let all: Vec<&str> = keys.iter().map(|f| f.key).collect();
        bail!("--only {k:?}: no such flood; there are {all:?}");
    }
    let python = lab::which("python3").context("python3")?;
    let libnbd_python = [PathBuf::from("/usr/bin/python3"), python.clone()]
        .into_iter()
        .find(|p| {
            Command::new(p)
                .args(["-c", "import nbd"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .context("no python3 with the libnbd module (Debian: python3-libnbd)")?;
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?
        .to_path_buf();
    let vdd = super::vdd_release(a.vdd.clone())?;
    check()?;

    // On disk, not tmpfs: the 64 MiB file then costs no RAM beside the page cache.
    let scratch =
        Scratch(std::env::temp_dir().join(format!("vdd-bench-floods-{}", std::process::id())));
    let dir = scratch.0.clone();
    let root = dir.join("root");
    std::fs::create_dir_all(&root)?;
    std::fs::create_dir_all(dir.join("state"))?;
    let big = root.join("big.bin");
    write_random(&big, BIG, 0x9e37_79b9_7f4a_7c15)?;
    let control_file = write_random(&root.join("control.bin"), CONTROL, 0x2545_f491_4f6c_dd1d)?;
    let script = dir.join("flood.py");
    std::fs::write(&script, FLOOD_PY)?;
    let udhcpc_script = dir.join("udhcpc.sh");
    // Configures nothing: the lease is the measurement, and the host's files stay as they are.
    std::fs::write(&udhcpc_script, "#!/bin/sh\nexit 0\n")?;
    std::fs::set_permissions(
        &udhcpc_script,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let cfg = dir.join("vdd.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\ninterface = \"{br}\"\nstate_dir = \"{state}\"\n\
             [dhcp]\nmode = \"full\"\npool = \"{p0}-{p1}\"\nlease_time = \"1h\"\nrouter = \"{SERVER_IP}\"\n\
             [tftp]\nroot = \"{root}\"\n[http]\nroot = \"{root}\"\n\
             [nbd]\n[[nbd.export]]\nname = \"{EXPORT}\"\npath = \"{big}\"\n",
            br = lab::BRIDGE,
            state = dir.join("state").display(),
            p0 = POOL.0,
            p1 = POOL.1,
            root = root.display(),
            big = big.display(),
        ),
    )?;

    // A /16, so flood sources (10.77.1.x) and the control client (10.77.2.1) are on-link.
    let mut lab = Lab::with_prefix("floods", 16)?;
    let flood = lab.add_client(None)?;
    let sources: Vec<String> = (1..=a.sources).map(|i| format!("10.77.1.{i}")).collect();
    for s in &sources {
        lab::ip([
            "-n",
            &flood.ns,
            "addr",
            "add",
            &format!("{s}/16"),
            "dev",
            "eth0",
        ])?;
    }
    let control = lab.add_client(None)?;
    lab::ip([
        "-n",
        &control.ns,
        "addr",
        "add",
        &format!("{CONTROL_IP}/16"),
        "dev",
        "eth0",
    ])?;
    // One fresh client per DHCP control, so each asks as a client vdd has never seen.
    let dhcp_idle = lab.add_client(None)?;
    let dhcp_blind = lab.add_client(None)?;
    let dhcp_discover = lab.add_client(None)?;

    let log = |name: &str| -> Result<Stdio> { Ok(std::fs::File::create(dir.join(name))?.into()) };
    let mut c = Lab::cmd(&lab.server_ns, &vdd);
    c.args(["serve", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log("vdd.log")?)
        .stderr(log("vdd-err.log")?)
        .process_group(0);
    let vdd_pid = lab.spawn("vdd", c)?;

    let mut ctx = Ctx {
        vdd_pid,
        flood_ns: flood.ns.clone(),
        control_ns: control.ns.clone(),
        dir: dir.clone(),
        python,
        libnbd_python,
        script,
        udhcpc_script,
        control_file,
    };
    let ready = Instant::now() + Duration::from_secs(30);
    loop {
        if !running(vdd_pid) {
            bail!("vdd exited at start:\n{}", tail(&dir.join("vdd-err.log")));
        }
        if run_control(&ctx, Control::Tftp, &control.ns, Duration::from_secs(5))?.is_ok() {
            break;
        }
        if Instant::now() > ready {
            bail!(
                "vdd did not serve TFTP within 30 s:\n{}",
                tail(&dir.join("vdd-err.log"))
            );
        }
        pause(Duration::from_millis(300))?;
    }
    let comm = std::fs::read_to_string(format!("/proc/{vdd_pid}/comm")).unwrap_or_default();
    if comm.trim() != "vdd" {
        bail!("pid {vdd_pid} is {comm:?}, not vdd: its memory cannot be read");
    }
    eprintln!(
        "bench: vdd pid {vdd_pid} in {}; floods from {} ({} addresses)",
        lab.server_ns, flood.ns, a.sources
    );
    let mut idle = Vec::new();
    for k in [Control::Tftp, Control::Http, Control::Nbd, Control::Dhcp] {
        let ns = if k == Control::Dhcp {
            &dhcp_idle.ns
        } else {
            &control.ns
        };
        let r = run_control(&ctx, k, ns, CONTROL_LIMIT)?;
        eprintln!("bench: control without a flood: {} {}", k.label(), show(&r));
        idle.push((k, r));
    }

    let sampler = Sampler::start(vdd_pid);
    let mut floods = plan(&a, &sources);
    floods.retain(|f| a.only.is_empty() || a.only.iter().any(|k| k == f.key));
    let mut rows = Vec::new();
    for f in &floods {
        ctx.control_ns = match f.key {
            "dhcp-request" => dhcp_blind.ns.clone(),
            "dhcp-discover" => dhcp_discover.ns.clone(),
            _ => control.ns.clone(),
        };
        eprintln!("bench: flood {}: {}", f.key, f.what);
        let row = one_flood(&mut lab, &ctx, &sampler, f, a.hold)?;
        eprintln!(
            "bench:   baseline {:.1} MiB, peak {:.1} MiB, settled {:.1} MiB, control {}; {}",
            mib(row.base_kib),
            mib(row.peak_kib),
            mib(row.settled_kib),
            show(&row.control),
            row.clients.join("; ")
        );
        let alive = row.alive;
        rows.push(row);
        if !alive {
            break;
        }
    }
    drop(sampler);

    println!();
    println!("vdd memory under floods from the LAN (VmRSS in MiB; HWM = VmHWM after the flood)");
    println!(
        "control without a flood: {}",
        idle.iter()
            .map(|(k, r)| format!("{} {}", k.label(), show(r)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "{:<15} {:>9} {:>8} {:>8} {:>8}  {:<28} flood",
        "flood", "baseline", "peak", "settled", "HWM", "control"
    );
    for r in &rows {
        println!(
            "{:<15} {:>9.1} {:>8.1} {:>8.1} {:>8.1}  {:<28} {}",
            r.key,
            mib(r.base_kib),
            mib(r.peak_kib),
            mib(r.settled_kib),
            mib(r.hwm_kib),
            format!("{} {}", r.kind.label(), show(&r.control)),
            r.what
        );
        println!("{:<15} {:>36}  {:<28} {}", "", "", "", r.clients.join("; "));
    }
    println!(
        "RESULT floods {}",
        rows.iter()
            .map(|r| format!("{}={:.1}MiB", r.key, mib(r.peak_kib)))
            .collect::<Vec<_>>()
            .join(" ")
    );

    let mut bad = Vec::new();
    for r in &rows {
        if !r.alive {
            bad.push(format!(
                "vdd exited during the {} flood; its log ends:\n{}",
                r.key,
                tail(&dir.join("vdd-err.log"))
            ));
        }
        if let Err(e) = &r.control {
            bad.push(format!(
                "the control client failed during the {} flood: {e}",
                r.key
            ));
        }
    }
    for (k, r) in &idle {
        if let Err(e) = r {
            bad.push(format!("{} failed without a flood: {e}", k.label()));
        }
    }
    drop(lab);
    if std::env::var_os("VDD_BENCH_KEEP").is_some() || !bad.is_empty() {
        for name in ["vdd.log", "vdd-err.log"] {
            let to = workspace.join("target").join(format!("floods-{name}"));
            if std::fs::copy(dir.join(name), &to).is_ok() {
                eprintln!("bench: vdd's log kept in {}", to.display());
            }
        }
    }
    drop(scratch);
    if !bad.is_empty() {
        bail!("{}", bad.join("\n"));
    }
    Ok(())
}

/// One flood: baseline, flood with the control client inside it, settle.
fn one_flood(lab: &mut Lab, ctx: &Ctx, sampler: &Sampler, f: &Flood, hold: u64) -> Result<Row> {
    let t0 = Instant::now();
    pause(BASELINE)?;
    let start = Instant::now();
    let base = sampler.between(t0, start);
    let base_kib = base.last().map_or(0, |s| s.rss_kib);
    let mut pids = Vec::new();
    let mut outs = Vec::new();
    for (i, args) in f.procs.iter().enumerate() {
        let out = ctx.dir.join(format!("{}-{i}.out", f.key));
        let mut c = Lab::cmd(&ctx.flood_ns, &ctx.python);
        c.arg(&ctx.script)
            .args(args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out)?)
            .stderr(std::fs::File::create(
                ctx.dir.join(format!("{}-{i}.err", f.key)),
            )?)
            .process_group(0);
        pids.push(lab.spawn(f.key, c)?);
        outs.push(out);
    }
    // Each flood client says "ready" once everything is sent or opened; wait at most 20 s.
    let ready_by = Instant::now() + Duration::from_secs(20);
    while Instant::now() < ready_by
        && !outs.iter().zip(&pids).all(|(o, &p)| {
            std::fs::read_to_string(o).is_ok_and(|s| s.starts_with("ready")) || !running(p)
        })
    {
        pause(Duration::from_millis(50))?;
    }
    pause(Duration::from_secs(2))?;
    let control = if running(ctx.vdd_pid) {
        run_control(ctx, f.control, &ctx.control_ns, CONTROL_LIMIT)?
    } else {
        Err("not run: vdd had exited".into())
    };
    // The clients end themselves after `hold` seconds; 20 s more, then they are killed.
    let end_by = start + Duration::from_secs(hold + 20);
    while Instant::now() < end_by && pids.iter().any(|&p| running(p)) {
        pause(Duration::from_millis(100))?;
    }
    for &p in &pids {
        // Kills a straggler, and reaps it or the zombie of one that ended.
        lab.kill(p, "KILL")?;
    }
    let clients = outs
        .iter()
        .map(|o| {
            std::fs::read_to_string(o)
                .unwrap_or_default()
                .lines()
                .last()
                .unwrap_or("(no summary)")
                .to_string()
        })
        .collect();
    pause(SETTLE)?;
    let end = Instant::now();
    let during = sampler.between(start, end);
    Ok(Row {
        key: f.key,
        kind: f.control,
        what: f.what.clone(),
        base_kib,
        peak_kib: during.iter().map(|s| s.rss_kib).max().unwrap_or(0),
        settled_kib: during.last().map_or(0, |s| s.rss_kib),
        hwm_kib: during.last().map_or(0, |s| s.hwm_kib),
        control,
        clients,
        alive: running(ctx.vdd_pid),
    })
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The last lines of a log, for a failure message.
fn tail(p: &Path) -> String {
    let s = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Pseudo-random content (see [`super::pseudo_random`]) written to `path`; returns it.
fn write_random(path: &Path, len: usize, seed: u64) -> Result<Vec<u8>> {
    let v = super::pseudo_random(len, seed);
    std::fs::write(path, &v).with_context(|| format!("writing {}", path.display()))?;
    Ok(v)
}
