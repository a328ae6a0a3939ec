//! `cargo xtask bench storm`: a room of thin clients switched on at once, against vdd and
//! against the LTSP stack, on the same files over the same shaped link.
//!
//! The lab: a bridge (the switch) in the lab's namespace; the server in a namespace of
//! its own, its veth to the bridge shaped with `tc` to `--link` Mbit/s in both
//! directions (the switch port of a real server); `--seats` namespaces, one veth each.
//! Every seat runs `seat.py` (see there): DHCP with busybox udhcpc, the boot script,
//! kernel and initrd with curl, the menu's GET /api/v1/guests, and the NBD reads of a
//! recorded boot through python3-libnbd (`trace.rs`, `trace.txt`). The seats are started
//! and waiting first; one signal then sets them off together (within 100 ms, or spread
//! over `--ramp` seconds).
//!
//! Per stack: the time until the last seat has all its bytes, per-stage p50/p95/max,
//! failed and retried seats, addresses held by two seats, bytes on the server's link,
//! the server's CPU seconds; then the ratios against the link limit (all payload bytes
//! over the link rate) and vdd against the peer, and the RESULT line.

mod report;
pub mod servers;
pub mod trace;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::lab::{self, Lab};
use report::{Outcome, SeatResult};
use servers::{Files, Stack, SERVER};

/// The seat program, written into the run's folder.
const SEAT_PY: &str = include_str!("seat.py");

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Thin clients switched on together.
    #[arg(long, default_value_t = 30)]
    pub seats: usize,
    /// The server's link in Mbit/s (tc on its veth, both directions).
    #[arg(long, default_value_t = 1000)]
    pub link: u32,
    /// Seconds over which the seats start (0: all within the same 100 ms).
    #[arg(long, default_value_t = 0.0)]
    pub ramp: f64,
    /// Fraction of each seat's bytes (kernel, initrd, root reads) to fetch: 300 seats in
    /// a shorter run with the same shape.
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    /// Only this stack: vdd or ltsp.
    #[arg(long)]
    pub only: Option<String>,
    /// How the LTSP peer is set up.
    #[arg(long, value_enum, default_value = "ltsp")]
    pub peer: servers::Peer,
    /// Runs per stack (alternating); the table shows the last, RESULT the medians.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Seconds a seat may take before it counts as failed.
    #[arg(long, default_value_t = 900)]
    pub deadline: u64,
    /// vdd binary to run (default: the workspace's release build, built now).
    #[arg(long)]
    pub vdd: Option<PathBuf>,
    /// Record the NBD read trace anew from a QEMU PXE boot through vdd, write the
    /// fixture xtask/src/bench/storm/trace.txt, and stop.
    #[arg(long)]
    pub record: bool,
}

/// The run's folder, removed on every path (kept with XTASK_KEEP_LOGS=1, as e2e runs).
struct Work(PathBuf);
impl Drop for Work {
    fn drop(&mut self) {
        if std::env::var("XTASK_KEEP_LOGS").as_deref() == Ok("1") {
            // Only the logs: the files are large and made again in a second.
            let _ = std::fs::remove_dir_all(self.0.join("files"));
            eprintln!("bench storm: logs kept in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// MAC of seat `i`: locally administered, distinct for up to 2^24 seats.
fn seat_mac(i: usize) -> String {
    format!(
        "52:54:01:{:02x}:{:02x}:{:02x}",
        (i >> 16) & 0xff,
        (i >> 8) & 0xff,
        i & 0xff
    )
}

pub fn run(a: Args) -> Result<()> {
    if a.record {
        let p = trace::record()?;
        println!("bench storm: wrote the trace {}", p.display());
        return Ok(());
    }
    if let Some(why) = lab::missing(&["tc", "busybox", "curl", "dnsmasq", "nbd-server"]) {
        bail!("cannot run the storm benchmark here: {why}");
    }
    if !Path::new("/usr/bin/python3").is_file()
        || !std::process::Command::new("/usr/bin/python3")
            .args(["-c", "import nbd"])
            .status()?
            .success()
    {
        bail!("python3-libnbd is missing (apt-get install python3-libnbd)");
    }
    if a.seats == 0 || a.seats > 1000 || !(a.scale > 0.0 && a.scale <= 1.0) || a.link == 0 {
        bail!("--seats 1..=1000, --scale in (0, 1], --link > 0");
    }
    let stacks: Vec<Stack> = [Stack::Vdd, Stack::Ltsp]
        .into_iter()
        .filter(|s| a.only.as_deref().is_none_or(|o| o == s.name()))
        .collect();
    if stacks.is_empty() {
        bail!("--only is vdd or ltsp");
    }
    let vdd = super::vdd_release(a.vdd.clone())?;
    let full = trace::Trace::parse(trace::FIXTURE)?;
    let t = full.scaled(a.scale);

    let work = Work(std::env::temp_dir().join(format!("vdd-storm-{}", std::process::id())));
    let files = make_files(&work.0, &t)?;
    let trace_file = work.0.join("trace");
    std::fs::write(
        &trace_file,
        t.reads
            .iter()
            .map(|(o, l, d)| format!("{o} {l} {d}\n"))
            .collect::<String>(),
    )?;
    std::fs::write(work.0.join("seat.py"), SEAT_PY)?;
    let udhcpc = work.0.join("udhcpc.sh");
    // What iPXE does with an answer: the address on the NIC. Plus what the seat needs
    // to know of it. Nothing else (the host's resolv.conf is not touched).
    std::fs::write(
        &udhcpc,
        "#!/bin/sh\n[ \"$1\" = bound ] || exit 0\nip addr add \"$ip/$subnet\" dev \"$interface\"\n\
         printf 'ip=%s\\nboot_file=%s\\nsiaddr=%s\\nserverid=%s\\n' \"$ip\" \"$boot_file\" \"$siaddr\" \"$serverid\" > \"$SEAT_LEASE\"\n",
    )?;
    std::fs::set_permissions(&udhcpc, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;

    eprintln!("bench storm: building the lab ({} seats)", a.seats);
    let mut lab = Lab::with_prefix("storm", 16)?;
    // The bridge is the switch: the server is a host on it, with a link of its own.
    lab::ip([
        "-n",
        &lab.server_ns.clone(),
        "addr",
        "flush",
        "dev",
        lab::BRIDGE,
    ])?;
    let (host, port) = lab.add_host(servers::CIDR)?;
    shape(&host, "eth0", a.link)?;
    shape(&lab.server_ns.clone(), &port, a.link)?;
    let seats = lab.add_clients(a.seats, seat_mac)?;

    let mut outcomes: Vec<Outcome> = Vec::new();
    for round in 0..a.rounds.max(1) {
        for &stack in &stacks {
            eprintln!(
                "bench storm: round {}: {} seats against {}",
                round + 1,
                a.seats,
                stack.name()
            );
            let o = storm(
                &a, stack, &mut lab, &host, &seats, &work.0, &files, &vdd, &t,
            )
            .with_context(|| format!("the storm against {}", stack.name()))?;
            report::brief(&o);
            outcomes.push(o);
        }
    }
    drop(lab);
    report::print(&a, &t, &outcomes);
    Ok(())
}

/// Pseudo-random files of the trace's sizes (content does not matter on the wire, but
/// nothing in them compresses or repeats), in the page cache before any stack runs.
fn make_files(dir: &Path, t: &trace::Trace) -> Result<Files> {
    let files = dir.join("files");
    std::fs::create_dir_all(&files)?;
    let f = Files {
        kernel: files.join("vmlinuz"),
        initrd: files.join("initrd.img"),
        root: files.join("root.img"),
        dir: files,
    };
    for (p, len, seed) in [
        (&f.kernel, t.kernel_bytes, 1),
        (&f.initrd, t.initrd_bytes, 2),
        (&f.root, t.image_bytes, 3),
    ] {
        std::fs::write(p, super::pseudo_random(len as usize, seed))?;
    }
    // The peers read as nobody: everything world-readable.
    for d in [dir, f.dir.as_path()] {
        std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    }
    Ok(f)
}

/// A link of `mbit` at `dev`'s egress, queued as a NIC queues by default: tbf for the
/// wire's rate, with the kernel's default qdisc below it (pfifo_fast: three bands by
/// packet priority, 1000 packets each; fq_codel, which some distributions default to,
/// is not built into every kernel). tbf's bucket is smaller than a 64 KiB GSO packet, so
/// those are cut to frames before they queue: the queue holds at most 1000 frames a
/// band, about 12 ms at 1 Gbit/s, as a NIC with TSO sees it.
fn shape(ns: &str, dev: &str, mbit: u32) -> Result<()> {
    let tc = |args: &[&str]| -> Result<()> {
        let st = std::process::Command::new("tc")
            .args(["-n", ns])
            .args(args)
            .status()
            .context("running tc")?;
        if !st.success() {
            bail!("tc {args:?} failed in {ns}");
        }
        Ok(())
    };
    tc(&[
        "qdisc",
        "replace",
        "dev",
        dev,
        "root",
        "handle",
        "1:",
        "tbf",
        "rate",
        &format!("{mbit}mbit"),
        "burst",
        "30000",
        "latency",
        "20ms",
    ])?;
    tc(&[
        "qdisc",
        "add",
        "dev",
        dev,
        "parent",
        "1:1",
        "handle",
        "10:",
        "pfifo_fast",
    ])
}

/// Packets this machine's per-CPU input backlog dropped so far (/proc/net/softnet_stat,
/// second column): every frame crosses it twice between two namespaces, and a software
/// bridge copies a broadcast into it once per seat. A real switch has no such queue; a
/// count here means the lab itself lost packets.
fn backlog_drops() -> u64 {
    std::fs::read_to_string("/proc/net/softnet_stat")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| u64::from_str_radix(l.split_whitespace().nth(1)?, 16).ok())
        .sum()
}

/// Packets the link's queue dropped so far (the pfifo_fast below tbf).
fn link_drops(ns: &str, dev: &str) -> u64 {
    let out = std::process::Command::new("tc")
        .args(["-s", "-n", ns, "qdisc", "show", "dev", dev])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    out.split("qdisc ")
        .filter(|q| q.starts_with("pfifo_fast"))
        .filter_map(|q| {
            let at = q.find("(dropped ")? + "(dropped ".len();
            q[at..].split(',').next()?.trim().parse::<u64>().ok()
        })
        .sum()
}

/// rx and tx bytes of `dev` in `ns`.
fn link_bytes(ns: &str, dev: &str) -> Result<(u64, u64)> {
    let read = |what: &str| -> Result<u64> {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", ns, "cat"])
            .arg(format!("/sys/class/net/{dev}/statistics/{what}"))
            .output()?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .with_context(|| format!("{what} of {dev} in {ns}"))
    };
    Ok((read("rx_bytes")?, read("tx_bytes")?))
}

fn monotonic() -> f64 {
    // The clock of the seats' time.clock_gettime(CLOCK_MONOTONIC): one for the machine.
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map_or(0.0, |t| t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9)
}

/// One storm against one stack.
#[allow(clippy::too_many_arguments)]
fn storm(
    a: &Args,
    stack: Stack,
    lab: &mut Lab,
    host: &str,
    seats: &[lab::ClientNs],
    work: &Path,
    files: &Files,
    vdd: &Path,
    t: &trace::Trace,
) -> Result<Outcome> {
    let run_dir = work.join(format!("run-{}", stack.name()));
    let _ = std::fs::remove_dir_all(&run_dir);
    std::fs::create_dir_all(&run_dir)?;
    // Every seat starts with no address, as a switched-on PC.
    let flush: String = seats
        .iter()
        .map(|c| format!("netns exec {} ip addr flush dev eth0\n", c.ns))
        .collect();
    lab::ip_batch(None, &flush)?;
    // Warm: the files come from the page cache for either stack.
    for p in [&files.kernel, &files.initrd, &files.root] {
        std::io::copy(&mut std::fs::File::open(p)?, &mut std::io::sink())?;
    }
    let setup = servers::Setup {
        work,
        files,
        vdd,
        seats: seats.len(),
        peer: a.peer,
    };
    let server = servers::start(stack, lab, host, &setup)?;
    let result = (|| -> Result<Outcome> {
        let file_bytes = t.kernel_bytes + t.initrd_bytes;
        let mut pids = Vec::new();
        for (i, c) in seats.iter().enumerate() {
            let offset = if seats.len() > 1 {
                a.ramp * i as f64 / (seats.len() - 1) as f64
            } else {
                0.0
            };
            let log = std::fs::File::create(run_dir.join(format!("seat-{i}.log")))?;
            let mut cmd = Lab::cmd(&c.ns, "/usr/bin/python3");
            cmd.arg(work.join("seat.py"))
                .args(["--seat", &i.to_string(), "--mode", stack.name()])
                .args(["--server", &SERVER.to_string(), "--mac", &c.mac])
                .arg("--work")
                .arg(&run_dir)
                .arg("--trace")
                .arg(work.join("trace"))
                .arg("--image")
                .arg(&files.root)
                .args(["--export", servers::EXPORT])
                .args(["--file-bytes", &file_bytes.to_string()])
                .arg("--udhcpc-script")
                .arg(work.join("udhcpc.sh"))
                .args(["--offset", &format!("{offset:.4}")])
                .args(["--deadline", &a.deadline.to_string()])
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log);
            pids.push(lab.spawn(&format!("seat {i}"), cmd)?);
        }
        // All seats loaded and waiting (python and libnbd imported, trace read).
        let ready_by = Instant::now() + Duration::from_secs(60 + seats.len() as u64 / 2);
        loop {
            let ready = (0..seats.len())
                .filter(|i| run_dir.join(format!("ready-{i}")).exists())
                .count();
            if ready == seats.len() {
                break;
            }
            if Instant::now() > ready_by {
                bail!("only {ready} of {} seats got ready", seats.len());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let cpu0 = server.cpu_seconds();
        let (rx0, tx0) = link_bytes(host, "eth0")?;
        let drops0 = link_drops(host, "eth0");
        let backlog0 = backlog_drops();
        let start = monotonic() + 0.2;
        std::fs::write(run_dir.join("go"), format!("{start:.6}"))?;
        for pid in &pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid as i32),
                nix::sys::signal::Signal::SIGUSR1,
            );
        }
        let end_by = Instant::now() + Duration::from_secs(a.deadline + 30) + secs(a.ramp);
        let mut last_note = Instant::now();
        loop {
            let left = pids.iter().filter(|p| lab.is_running(**p)).count();
            if left == 0 {
                break;
            }
            if Instant::now() > end_by {
                eprintln!("bench storm: {left} seats still running at the deadline; killed");
                for p in &pids {
                    let _ = lab.kill(*p, "KILL");
                }
                break;
            }
            if last_note.elapsed() > Duration::from_secs(30) {
                eprintln!(
                    "bench storm: {} {left} seats running, {:.0} s in",
                    stack.name(),
                    monotonic() - start
                );
                last_note = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // A forking server reaps its children a moment after their clients leave.
        std::thread::sleep(Duration::from_millis(500));
        let (rx1, tx1) = link_bytes(host, "eth0")?;
        let drops = link_drops(host, "eth0") - drops0;
        let backlog = backlog_drops().saturating_sub(backlog0);
        let cpu = server.cpu_seconds().zip(cpu0).map(|(b, a)| b - a);
        let mut results = Vec::new();
        for i in 0..seats.len() {
            let p = run_dir.join(format!("result-{i}.json"));
            let r = std::fs::read_to_string(&p)
                .ok()
                .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok());
            results.push(SeatResult::from_json(i, r.as_ref(), start));
        }
        let failed: Vec<&SeatResult> = results.iter().filter(|r| r.error.is_some()).collect();
        for r in failed.iter().take(5) {
            let log = std::fs::read_to_string(run_dir.join(format!("seat-{}.log", r.seat)))
                .unwrap_or_default();
            eprintln!(
                "bench storm: {} seat {} failed: {} {}",
                stack.name(),
                r.seat,
                r.error.as_deref().unwrap_or(""),
                log.trim()
            );
        }
        Ok(Outcome {
            stack,
            label: match (stack, a.peer) {
                (Stack::Vdd, _) => "vdd",
                (Stack::Ltsp, servers::Peer::Ltsp) => "ltsp",
                (Stack::Ltsp, servers::Peer::LtspTuned) => "ltsp-tuned",
            },
            seats: results,
            wire_bytes: (rx1 - rx0) + (tx1 - tx0),
            drops,
            backlog,
            cpu_seconds: cpu,
        })
    })();
    server.stop(lab);
    result
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}
