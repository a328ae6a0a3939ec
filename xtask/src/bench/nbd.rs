//! `cargo xtask bench nbd`: vdd's NBD service against nbdkit, qemu-nbd and nbd-server in
//! one run, on one image on loopback (127.0.0.1, ports chosen free, never 10809).
//!
//! Four figures per server: sequential read (`nbdcopy URI null:`, which uses multi-conn
//! with one connection per core up to 4, 64 requests of 256 KiB in flight on each),
//! random 4 KiB reads on one connection at queue depth 1 and 32 (fio's nbd engine), and
//! 16 clients at depth 16 at once. Every server must first deliver the image with the right sha256; the page
//! cache is warmed again before each server's turn; the order of servers rotates per
//! round. Beside the rates, CPU seconds per GB of the sequential copy, of the server
//! (/proc/PID/stat) and of nbdcopy (rusage), which a busy shared machine disturbs far
//! less than wall time.
//! Every run is bounded in time; every server is killed (by its pid) and the temp
//! dir removed on every path.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::cpu::{children_cpu, loadavg};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Image size in MiB.
    #[arg(long, default_value_t = 1024)]
    pub size_mib: u64,
    /// Rounds; each measures every server once, and medians are reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Seconds per fio run.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Only these servers (comma-separated: vdd,vdd-before,nbdkit,qemu-nbd,nbd-server).
    #[arg(long)]
    pub only: Option<String>,
    /// Another vdd binary (a build of an earlier commit), measured in the same rounds as
    /// `vdd-before`: before and after a change, on the same machine at the same time.
    #[arg(long)]
    pub before: Option<PathBuf>,
}

/// A child process killed and reaped on Drop.
struct Proc {
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A daemon that forked away from us; we kill it by the pid it wrote.
struct PidFile {
    path: PathBuf,
}

impl Drop for PidFile {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(&self.path) {
            if let Ok(pid) = pid.trim().parse::<u32>() {
                let _ = Command::new("kill").arg(pid.to_string()).status();
            }
        }
    }
}

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn wait_port(port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing listens on 127.0.0.1:{port} after 20 s")
}

/// Fills the image with data that does not compress or dedupe trivially (no holes, so
/// nbdcopy cannot skip anything), fast enough in a debug build.
fn make_image(path: &Path, mib: u64) -> Result<()> {
    use std::io::Write;
    let mut block = vec![0u8; 1 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for c in block.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    for i in 0..mib {
        // Stamp every 4 KiB so no two blocks are equal.
        for (j, c) in block.chunks_exact_mut(4096).enumerate() {
            c[..16].copy_from_slice(&[i.to_le_bytes(), (j as u64).to_le_bytes()].concat());
        }
        f.write_all(&block)?;
    }
    f.flush()?;
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// One server under test.
struct Target {
    name: &'static str,
    uri: String,
    /// The serving process, for its CPU time (`None`: unknown).
    pid: Option<u32>,
    _guard: Box<dyn std::any::Any>,
}

fn spawn(name: &'static str, cmd: &mut Command, log: &Path) -> Result<Proc> {
    let log = std::fs::File::create(log)?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    Ok(Proc { child })
}

fn start_vdd(dir: &Path, image: &Path, name: &'static str, bin: &Path) -> Result<Target> {
    let port = free_port()?;
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "[server]\ninterface = \"lo\"\naddress = \"127.0.0.1\"\nstate_dir = \"{state}\"\n\
             [dhcp]\nmode = \"off\"\n[tftp]\nenabled = false\n[http]\nenabled = false\n\
             [nbd]\nport = {port}\nmax_per_address = 512\n[[nbd.export]]\nname = \"bench\"\npath = \"{img}\"\n",
            state = dir.join(format!("{name}-state")).display(),
            img = image.display()
        ),
    )?;
    let p = spawn(
        name,
        Command::new(bin)
            .env("RUST_LOG", "warn")
            .arg("serve")
            .arg("--config")
            .arg(&cfg),
        &dir.join(format!("{name}.log")),
    )?;
    wait_port(port)?;
    Ok(Target {
        name,
        uri: format!("nbd://127.0.0.1:{port}/bench"),
        pid: Some(p.child.id()),
        _guard: Box::new(p),
    })
}

fn start_nbdkit(dir: &Path, image: &Path) -> Result<Target> {
    let port = free_port()?;
    let p = spawn(
        "nbdkit",
        Command::new("nbdkit")
            .args([
                "-f",
                "-r",
                "-i",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "file",
            ])
            .arg(image),
        &dir.join("nbdkit.log"),
    )?;
    wait_port(port)?;
    Ok(Target {
        name: "nbdkit",
        uri: format!("nbd://127.0.0.1:{port}/"),
        pid: Some(p.child.id()),
        _guard: Box::new(p),
    })
}

fn start_qemu_nbd(dir: &Path, image: &Path) -> Result<Target> {
    let port = free_port()?;
    let p = spawn(
        "qemu-nbd",
        Command::new("qemu-nbd")
            .args([
                "-r",
                "-f",
                "raw",
                "-b",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .args(["-x", "bench", "--persistent", "--shared=32"])
            .args(["--cache=writeback", "--aio=threads"])
            .arg(image),
        &dir.join("qemu-nbd.log"),
    )?;
    wait_port(port)?;
    Ok(Target {
        name: "qemu-nbd",
        uri: format!("nbd://127.0.0.1:{port}/bench"),
        pid: Some(p.child.id()),
        _guard: Box::new(p),
    })
}

fn start_nbd_server(dir: &Path, image: &Path) -> Result<Target> {
    let port = free_port()?;
    let conf = dir.join("nbd-server.conf");
    std::fs::write(
        &conf,
        format!(
            "[generic]\nlistenaddr = 127.0.0.1\nport = {port}\nuser = root\ngroup = root\n\
             [bench]\nexportname = {}\nreadonly = true\n",
            image.display()
        ),
    )?;
    let pid = dir.join("nbd-server.pid");
    // nbd-server forks into the background (its -d mode serves one client only), so it
    // is stopped by the pid it writes.
    let guard = PidFile { path: pid.clone() };
    let st = Command::new("nbd-server")
        .arg("-C")
        .arg(&conf)
        .arg("-p")
        .arg(&pid)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("starting nbd-server")?;
    if !st.success() {
        bail!("nbd-server exited with {st}");
    }
    wait_port(port)?;
    let pid = std::fs::read_to_string(&pid)
        .ok()
        .and_then(|p| p.trim().parse().ok());
    Ok(Target {
        name: "nbd-server",
        uri: format!("nbd://127.0.0.1:{port}/bench"),
        pid,
        _guard: Box::new(guard),
    })
}

/// Export size as the server announces it (a server that gets it wrong is not compared).
fn size_of(uri: &str) -> Result<u64> {
    let out = Command::new("nbdinfo")
        .args(["--size", uri])
        .output()
        .context("nbdinfo")?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .with_context(|| {
            format!(
                "nbdinfo --size {uri}: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

/// sha256 (hex) of what `cmd` writes to stdout, by the system's sha256sum (SHA-NI fast;
/// this xtask is a debug build).
fn sha256_of_stdout(cmd: &mut Command) -> Result<String> {
    let mut src = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("{cmd:?}"))?;
    let out = Command::new("sha256sum")
        .stdin(src.stdout.take().context("no stdout")?)
        .output()
        .context("sha256sum")?;
    let st = src.wait()?;
    if !st.success() || !out.status.success() {
        bail!("{cmd:?} | sha256sum failed: {st}");
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// Reads the image through the page cache so it is all there before a server is measured
/// (the machine is shared: something else may have pushed pages out since last time).
fn warm(image: &Path) -> Result<()> {
    std::io::copy(&mut std::fs::File::open(image)?, &mut std::io::sink())?;
    Ok(())
}

/// CPU seconds a server has used so far, its reaped children included (nbd-server forks
/// one per connection): a measure the other engineers' load on this machine hardly moves.
fn cpu_secs(pid: u32, tick: f64) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // After the command: state ppid ... utime(11) stime(12) cutime(13) cstime(14).
    let t: Option<Vec<f64>> = f.get(11..15)?.iter().map(|x| x.parse().ok()).collect();
    Some(t?.iter().sum::<f64>() / tick)
}

fn clock_tick() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// Seconds for one `nbdcopy URI null:`.
fn seq_once(uri: &str) -> Result<f64> {
    let t = Instant::now();
    let st = Command::new("timeout")
        .args(["300", "nbdcopy", uri, "null:"])
        .status()
        .context("nbdcopy")?;
    if !st.success() {
        bail!("nbdcopy {uri} null: failed: {st}");
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Total read IOPS of fio's nbd engine: `jobs` connections, 4 KiB random reads, `depth`
/// requests in flight on each.
fn fio_iops(uri: &str, jobs: u32, depth: u32, seconds: u64) -> Result<f64> {
    let out = Command::new("timeout")
        .arg((seconds + 60).to_string())
        .args([
            "fio",
            "--name=rand",
            "--ioengine=nbd",
            "--rw=randread",
            "--bs=4k",
        ])
        .arg(format!("--uri={uri}"))
        .arg(format!("--iodepth={depth}"))
        .args(["--group_reporting", "--time_based"])
        .arg(format!("--numjobs={jobs}"))
        .arg(format!("--runtime={seconds}"))
        .args(["--output-format=terse", "--terse-version=3"])
        .output()
        .context("fio")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "fio against {uri} failed: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Terse v3: version;fio;jobname;groupid;error;read_kb;read_bw;read_iops;...
    let line = text
        .lines()
        .find(|l| l.starts_with("3;"))
        .context("no terse line from fio")?;
    let f: Vec<&str> = line.split(';').collect();
    let err: u64 = f.get(4).and_then(|s| s.parse().ok()).unwrap_or(1);
    if err != 0 {
        bail!("fio reported error {err} against {uri}");
    }
    f.get(7)
        .and_then(|s| s.parse().ok())
        .context("fio terse line without read iops")
}

struct Row {
    name: &'static str,
    seq_mbs: f64,
    seq_cpu: Option<f64>,
    seq_client_cpu: f64,
    qd1_iops: f64,
    qd32_iops: f64,
    multi_iops: f64,
    /// Server CPU microseconds per 4 KiB read at QD 1 and QD 32.
    qd1_cpu: Option<f64>,
    qd32_cpu: Option<f64>,
}

/// One server's samples over the rounds.
#[derive(Default)]
struct Samples {
    seq: Vec<f64>,
    seq_cpu: Vec<f64>,
    seq_client: Vec<f64>,
    qd1: Vec<f64>,
    qd32: Vec<f64>,
    multi: Vec<f64>,
    qd1_cpu: Vec<f64>,
    qd32_cpu: Vec<f64>,
}

/// fio at one depth on one connection: IOPS, and the server's CPU microseconds per read.
fn rand_run(t: &Target, depth: u32, seconds: u64, tick: f64) -> Result<(f64, Option<f64>)> {
    let cpu0 = t.pid.and_then(|p| cpu_secs(p, tick));
    let iops = fio_iops(&t.uri, 1, depth, seconds)?;
    let cpu = cpu0
        .zip(t.pid.and_then(|p| cpu_secs(p, tick)))
        .map(|(a, b)| (b - a) * 1e6 / (iops * seconds as f64));
    Ok((iops, cpu))
}

pub fn run(args: Args) -> Result<()> {
    for tool in ["nbdcopy", "nbdinfo", "fio", "timeout", "sha256sum"] {
        if crate::lab::which(tool).is_none() {
            bail!("{tool} is not installed (apt-get install libnbd-bin fio)");
        }
    }
    let dir = std::env::temp_dir().join(format!("vdd-bench-nbd-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let tmp = TempDir(dir.clone());
    let image = dir.join("bench.img");
    eprintln!("bench nbd: writing a {} MiB image", args.size_mib);
    make_image(&image, args.size_mib)?;
    let want_sha = sha256_of_stdout(Command::new("cat").arg(&image))?;
    warm(&image)?;
    let size = args.size_mib << 20;
    let want = |n: &str| match args.only.as_deref() {
        None => true,
        Some(o) => o.split(',').any(|x| x.trim() == n),
    };

    type Starter = Box<dyn Fn(&Path, &Path) -> Result<Target>>;
    let vdd = super::vdd_release(None)?;
    let mut starters: Vec<(&str, &str, Starter)> = vec![(
        "vdd",
        "cargo",
        Box::new(move |d: &Path, i: &Path| start_vdd(d, i, "vdd", &vdd)),
    )];
    if let Some(before) = args.before.clone() {
        starters.push((
            "vdd-before",
            "cargo",
            Box::new(move |d: &Path, i: &Path| start_vdd(d, i, "vdd-before", &before)),
        ));
    }
    starters.push(("nbdkit", "nbdkit", Box::new(start_nbdkit)));
    starters.push(("qemu-nbd", "qemu-nbd", Box::new(start_qemu_nbd)));
    starters.push(("nbd-server", "nbd-server", Box::new(start_nbd_server)));
    // All servers start first and stay up (an idle server costs nothing); then each
    // round measures every server once, so a busy phase of this shared machine hits all
    // of them alike instead of whichever one happened to run then. Medians over rounds.
    let mut targets = Vec::new();
    for (name, tool, start) in starters {
        if !want(name) {
            continue;
        }
        if crate::lab::which(tool).is_none() {
            eprintln!("bench nbd: {name}: not installed, skipped");
            continue;
        }
        let t = match start(&dir, &image) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("bench nbd: {name}: {e:#}; skipped");
                continue;
            }
        };
        match size_of(&t.uri) {
            Ok(s) if s == size => {}
            Ok(s) => {
                eprintln!("bench nbd: {name} announces {s} bytes instead of {size}; skipped");
                continue;
            }
            Err(e) => {
                eprintln!("bench nbd: {name}: {e:#}; skipped");
                continue;
            }
        }
        // Fast is worth nothing if the bytes are wrong: every server must deliver the
        // image exactly (checked once, untimed; the timed copies go to null:).
        match sha256_of_stdout(
            Command::new("timeout")
                .args(["300", "nbdcopy", &t.uri, "-"])
                .stdin(Stdio::null()),
        ) {
            Ok(h) if h == want_sha => targets.push(t),
            Ok(h) => {
                eprintln!("bench nbd: {name} serves data with sha256 {h}, not {want_sha}; skipped")
            }
            Err(e) => eprintln!("bench nbd: {name}: {e:#}; skipped"),
        }
    }
    if let Some(t) = targets.first() {
        // What nbdcopy chose (connections follow the cores and CAN_MULTI_CONN), so the
        // numbers can be compared with a run on another machine.
        if let Ok(o) = Command::new("nbdcopy")
            .args(["--verbose", &t.uri, "null:"])
            .output()
        {
            for l in String::from_utf8_lossy(&o.stderr).lines() {
                if l.starts_with("nbdcopy: connections=") {
                    eprintln!("bench nbd: {l}, request size 256 KiB (nbdcopy's default)");
                }
            }
        }
    }
    let load_before = loadavg();
    let mut samples: Vec<Samples> = targets.iter().map(|_| Samples::default()).collect();
    let tick = clock_tick();
    for round in 0..args.runs.max(1) {
        // Each round starts with a different server, so none is always measured first
        // or always right after the same neighbour's 16-client run.
        let n = targets.len();
        for i in (0..n).map(|i| (i + round) % n) {
            let (t, s) = (&targets[i], &mut samples[i]);
            warm(&image)?;
            let cpu0 = t.pid.and_then(|p| cpu_secs(p, tick));
            let client0 = children_cpu();
            let seq = size as f64 / 1e6 / seq_once(&t.uri)?;
            let client = (children_cpu() - client0) / (size as f64 / 1e9);
            // A forking server reaps its connection's child a moment after it ends.
            std::thread::sleep(Duration::from_millis(100));
            let cpu = cpu0
                .zip(t.pid.and_then(|p| cpu_secs(p, tick)))
                .map(|(a, b)| (b - a) / (size as f64 / 1e9));
            let (qd1, qd1_cpu) = rand_run(t, 1, args.seconds, tick)?;
            let (qd32, qd32_cpu) = rand_run(t, 32, args.seconds, tick)?;
            let multi = fio_iops(&t.uri, 16, 16, args.seconds)?;
            let us = |c: Option<f64>| c.map_or("?".into(), |c| format!("{c:.1}"));
            eprintln!(
                "bench nbd: round {round} {:<10} seq {seq:>7.0} MB/s (CPU s/GB: server {}, nbdcopy {client:.3})  QD1 {qd1:>7.0} IOPS ({} us CPU each)  QD32 {qd32:>7.0} IOPS ({} us)  16 clients {multi:>8.0} IOPS",
                t.name,
                cpu.map_or("?".into(), |c| format!("{c:.3}")),
                us(qd1_cpu),
                us(qd32_cpu),
            );
            s.seq.push(seq);
            s.seq_cpu.extend(cpu);
            s.seq_client.push(client);
            s.qd1.push(qd1);
            s.qd32.push(qd32);
            s.multi.push(multi);
            s.qd1_cpu.extend(qd1_cpu);
            s.qd32_cpu.extend(qd32_cpu);
        }
    }
    let opt = |v: Vec<f64>| (!v.is_empty()).then(|| median(v));
    let rows: Vec<Row> = targets
        .iter()
        .zip(samples)
        .map(|(t, s)| Row {
            name: t.name,
            seq_mbs: median(s.seq),
            seq_cpu: opt(s.seq_cpu),
            seq_client_cpu: median(s.seq_client),
            qd1_iops: median(s.qd1),
            qd32_iops: median(s.qd32),
            multi_iops: median(s.multi),
            qd1_cpu: opt(s.qd1_cpu),
            qd32_cpu: opt(s.qd32_cpu),
        })
        .collect();
    drop(targets);
    drop(tmp);

    let base = rows.iter().find(|r| r.name == "nbdkit");
    println!(
        "\nNBD read benchmark: {} MiB image in the page cache, loopback; medians of {} interleaved rounds; seq = nbdcopy to null: (CPU/GB = CPU seconds per GB of it, of the server process and of nbdcopy: on loopback TCP work lands on either side, so read them together); QD1, QD32 = fio nbd 4 KiB random reads on one connection with 1 and 32 in flight for {} s each (us = the server's CPU microseconds per read, steadier than IOPS on a shared machine); 16cl = 16 connections at QD16; every server's data checked by sha256; load average {} before, {} after",
        args.size_mib, args.runs, args.seconds, load_before, loadavg()
    );
    println!(
        "{:<11} {:>8} {:>8} {:>8} {:>9} {:>5} {:>9} {:>5} {:>9} {:>8} {:>8} {:>8} {:>10}",
        "server",
        "seq MB/s",
        "seq/kit",
        "QD1 IOPS",
        "QD1/kit",
        "us",
        "QD32 IOPS",
        "us",
        "QD32/kit",
        "16cl",
        "16cl/kit",
        "CPU/GB",
        "nbdcopy"
    );
    for r in &rows {
        let ratio =
            |a: f64, b: Option<f64>| b.map_or("-".to_string(), |b| format!("{:.2}x", a / b));
        let us = |c: Option<f64>| c.map_or("-".into(), |c| format!("{c:.1}"));
        println!(
            "{:<11} {:>8.0} {:>8} {:>8.0} {:>9} {:>5} {:>9.0} {:>5} {:>9} {:>8.0} {:>8} {:>8} {:>10.3}",
            r.name,
            r.seq_mbs,
            ratio(r.seq_mbs, base.map(|b| b.seq_mbs)),
            r.qd1_iops,
            ratio(r.qd1_iops, base.map(|b| b.qd1_iops)),
            us(r.qd1_cpu),
            r.qd32_iops,
            us(r.qd32_cpu),
            ratio(r.qd32_iops, base.map(|b| b.qd32_iops)),
            r.multi_iops,
            ratio(r.multi_iops, base.map(|b| b.multi_iops)),
            r.seq_cpu.map_or("-".into(), |c| format!("{c:.3}")),
            r.seq_client_cpu,
        );
    }
    Ok(())
}
