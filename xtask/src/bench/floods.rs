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

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::lab::{self, Lab, SERVER_IP};

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

/// A control client, killed and reaped on Drop unless it already ended.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

#[derive(Clone, Copy)]
struct Sample {
    at: Instant,
    rss_kib: u64,
    hwm_kib: u64,
}

/// Whether a child of ours still runs. Unlike [`Lab::is_running`] this does not reap it:
/// until [`Lab::kill`] or the Lab's Drop waits for it, its pid stays ours (a zombie),
/// so signalling it then can never reach a process that reused the pid.
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .is_some_and(|zombie| !zombie)
}

/// VmRSS and VmHWM of `pid` in KiB.
fn mem_of(pid: u32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        s.lines()
            .find_map(|l| l.strip_prefix(name))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Reads vdd's memory every 100 ms on a thread of its own, so a blocking step of the run
/// leaves no gap in the samples.
struct Sampler {
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Sampler {
    fn start(pid: u32) -> Sampler {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (samples.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                if let Some((rss_kib, hwm_kib)) = mem_of(pid) {
                    s.lock().unwrap().push(Sample {
                        at: Instant::now(),
                        rss_kib,
                        hwm_kib,
                    });
                }
                std::thread::sleep(SAMPLE_EVERY);
            }
        });
        Sampler {
            samples,
            stop,
            thread: Some(thread),
        }
    }

    fn between(&self, from: Instant, to: Instant) -> Vec<Sample> {
        let v = self.samples.lock().unwrap();
        v.iter()
            .filter(|s| s.at >= from && s.at <= to)
            .copied()
            .collect()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The flood clients, run with python3 inside the flood namespace.
const FLOOD_PY: &str = r##""""Flood clients of `cargo xtask bench floods`: each mode sends a bounded number of
requests to one server address, holds what it opened for a bounded time, never
acknowledges, then prints one summary line and exits (closing everything)."""
import os, random, resource, select, socket, struct, sys, time


def tftp(server, port, fname, n, secs, sources, window):
    socks = []
    for i in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((sources[i % len(sources)], 0))
        s.setblocking(False)
        if window:
            mode, opts = b"netascii", [b"blksize", b"65464", b"windowsize", b"65535"]
        else:
            mode, opts = b"octet", [b"timeout", b"255"]
        pkt = b"\x00\x01" + fname.encode() + b"\0" + mode + b"\0" + b"".join(o + b"\0" for o in opts)
        s.sendto(pkt, (server, port))
        socks.append(s)
    print("ready", flush=True)
    oack = err = data = 0
    acked = set()
    end = time.monotonic() + secs
    while time.monotonic() < end:
        r, _, _ = select.select(socks, [], [], 0.2)
        for s in r:
            try:
                b, peer = s.recvfrom(65536)
            except OSError:
                continue
            if b[:2] == b"\x00\x06":
                oack += 1
                # Acknowledge the OACK only: the server then sends its first window, and
                # nothing more is ever acknowledged.
                if window and s not in acked:
                    s.sendto(b"\x00\x04\x00\x00", peer)
                    acked.add(s)
            elif b[:2] == b"\x00\x03":
                data += len(b) - 4
            elif b[:2] == b"\x00\x05":
                err += 1
    print(f"rrq={n} oack={oack} error={err} data_bytes={data}")


def raise_nofile(n):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 64), hard))


def hold(socks, secs, events):
    """Polls until `secs` pass; counts connections the server closed."""
    p = select.poll()
    fds = {}
    for s in socks:
        p.register(s, events)
        fds[s.fileno()] = s
    closed = 0
    end = time.monotonic() + secs
    while time.monotonic() < end and fds:
        for fd, ev in p.poll(200):
            s = fds.get(fd)
            if s is None:
                continue
            gone = ev & (select.POLLERR | select.POLLHUP | select.POLLRDHUP)
            if not gone and ev & select.POLLIN:
                try:
                    gone = s.recv(65536) == b""
                except OSError:
                    gone = True
            if gone:
                closed += 1
                p.unregister(fd)
                del fds[fd]
    return closed, len(fds)


def tcp_idle(server, port, n, secs, sources):
    raise_nofile(n)
    socks, failed = [], 0
    for i in range(n):
        s = socket.socket()
        s.bind((sources[i % len(sources)], 0))
        s.setblocking(False)
        try:
            s.connect((server, port))
        except BlockingIOError:
            pass
        except OSError:
            failed += 1
            s.close()
            continue
        socks.append(s)
    print("ready", flush=True)
    closed, still = hold(socks, secs, select.POLLIN | select.POLLRDHUP)
    print(f"connects={n} failed={failed} closed_by_server={closed + failed} open_at_end={still}")


def http_slow(server, port, path, secs, src):
    s = socket.socket()
    # A small receive buffer, so the server's sends stall instead of filling our memory.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.bind((src, 0))
    s.settimeout(5)
    s.connect((server, port))
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: {server}\r\n\r\n".encode())
    print("ready", flush=True)
    got, closed = 0, False
    end = time.monotonic() + secs
    while time.monotonic() < end:
        try:
            b = s.recv(1)
        except socket.timeout:
            continue
        except OSError:
            closed = True
            break
        if not b:
            closed = True
            break
        got += 1
        time.sleep(1)
    print(f"slow_reader_bytes={got} server_closed={closed}")


def recvn(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise OSError("closed")
        b += c
    return b


def nbd_noread(server, port, export, n, reads, length, size, secs, sources):
    socks, ok, refused, sent = [], 0, 0, 0
    for i in range(n):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.bind((sources[i % len(sources)], 0))
        s.settimeout(5)
        try:
            s.connect((server, port))
            recvn(s, 18)  # NBDMAGIC, IHAVEOPT, handshake flags
            s.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
            name = export.encode()
            data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
            s.sendall(b"IHAVEOPT" + struct.pack(">II", 7, len(data)) + data)  # NBD_OPT_GO
            while True:
                _, _, rtype, rlen = struct.unpack(">QIII", recvn(s, 20))
                recvn(s, rlen)
                if rtype & 0x80000000:
                    raise OSError("option refused")
                if rtype == 1:  # NBD_REP_ACK: transmission phase
                    break
        except OSError:
            refused += 1
            s.close()
            continue
        ok += 1
        s.settimeout(2)
        try:
            for j in range(reads):
                off = (j * length) % max(size - length, 1)
                s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, j, off, length))
                sent += 1
        except OSError:
            pass
        socks.append(s)
    print("ready", flush=True)
    closed, still = hold(socks, secs, select.POLLRDHUP)
    print(f"conns={n} handshakes={ok} refused={refused} reads_sent={sent} closed_by_server={closed} open_at_end={still}")


def dhcp(n, kind, first, last):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"eth0")
    s.bind(("0.0.0.0", 68))
    lo, hi = int.from_bytes(socket.inet_aton(first), "big"), int.from_bytes(socket.inet_aton(last), "big")
    print("ready", flush=True)
    rnd = random.Random(0x5eed)
    for i in range(n):
        h = bytearray(236)
        h[0], h[1], h[2] = 1, 1, 6
        h[4:8] = struct.pack(">I", rnd.getrandbits(32))
        h[10] = 0x80  # broadcast flag: replies need no ARP for an address never taken
        h[28:34] = bytes([0x02] + [rnd.getrandbits(8) for _ in range(5)])
        if kind == "request":
            # INIT-REBOOT: requested address, no server identifier, no ciaddr.
            want = rnd.randint(lo, hi).to_bytes(4, "big")
            opts = b"\x35\x01\x03" + b"\x32\x04" + want + b"\xff"
        else:
            opts = b"\x35\x01\x01\xff"
        s.sendto(bytes(h) + b"\x63\x82\x53\x63" + opts, ("255.255.255.255", 67))
        time.sleep(0.005)
    print(f"{kind}s_sent={n}")


def main():
    a = sys.argv[1:]
    m = a[0]
    if m in ("tftp-window", "tftp-hold"):
        tftp(a[1], int(a[2]), a[3], int(a[4]), float(a[5]), a[6].split(","), m == "tftp-window")
    elif m == "tcp-idle":
        tcp_idle(a[1], int(a[2]), int(a[3]), float(a[4]), a[5].split(","))
    elif m == "http-slow":
        http_slow(a[1], int(a[2]), a[3], float(a[4]), a[5])
    elif m == "nbd-noread":
        nbd_noread(a[1], int(a[2]), a[3], int(a[4]), int(a[5]), int(a[6]), int(a[7]), float(a[8]), a[9].split(","))
    elif m in ("dhcp-request", "dhcp-discover"):
        dhcp(int(a[1]), m[5:], a[2], a[3])
    else:
        sys.exit(f"unknown mode {m}")


main()
"##;

/// Which well-behaved client checks that the service still serves during a flood.
#[derive(Clone, Copy, PartialEq)]
enum Control {
    Tftp,
    Http,
    Nbd,
    Dhcp,
}

impl Control {
    fn label(self) -> &'static str {
        match self {
            Control::Tftp => "atftp 1 MiB",
            Control::Http => "curl 1 MiB",
            Control::Nbd => "libnbd read 1 MiB",
            Control::Dhcp => "udhcpc lease",
        }
    }
}

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

/// The floods, in the order they run.
fn plan(a: &Args, sources: &[String]) -> Vec<Flood> {
    let server = SERVER_IP.to_string();
    let secs = a.hold.to_string();
    let all = sources.join(",");
    let one = sources[0].clone();
    let other = sources.get(1).unwrap_or(&sources[0]).clone();
    let half = sources.len().div_ceil(2);
    let (idle_src, noread_src) = if sources.len() > 1 {
        (sources[..half].join(","), sources[half..].join(","))
    } else {
        (all.clone(), all.clone())
    };
    let n_idle = half * 8;
    let n_noread = (sources.len() - half).max(1) * 4;
    let (reads, len) = (32usize, 4usize << 20);
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    vec![
        Flood {
            key: "tftp-window",
            what: format!(
                "{} netascii RRQs, blksize 65464 windowsize 65535, OACK acked, no DATA acked, from {} addresses",
                a.rrqs,
                sources.len()
            ),
            procs: vec![s(&["tftp-window", &server, "69", "big.bin", &a.rrqs.to_string(), &secs, &all])],
            control: Control::Tftp,
        },
        Flood {
            key: "tftp-hold",
            what: format!(
                "{} octet RRQs with timeout=255, never acknowledged, from {} addresses",
                2 * a.rrqs,
                sources.len()
            ),
            procs: vec![s(&["tftp-hold", &server, "69", "big.bin", &(2 * a.rrqs).to_string(), &secs, &all])],
            control: Control::Tftp,
        },
        Flood {
            key: "http",
            what: format!(
                "{} idle TCP connections from {one}, and a reader of /files/big.bin at 1 byte/s from {other}",
                a.http_conns
            ),
            procs: vec![
                s(&["tcp-idle", &server, "80", &a.http_conns.to_string(), &secs, &one]),
                s(&["http-slow", &server, "80", "/files/big.bin", &secs, &other]),
            ],
            control: Control::Http,
        },
        Flood {
            key: "nbd",
            what: format!(
                "{n_idle} idle connections (no handshake), and {n_noread} that negotiate, send {reads} reads of {} MiB each and never read a reply",
                len >> 20
            ),
            procs: vec![
                s(&["tcp-idle", &server, "10809", &n_idle.to_string(), &secs, &idle_src]),
                s(&[
                    "nbd-noread",
                    &server,
                    "10809",
                    EXPORT,
                    &n_noread.to_string(),
                    &reads.to_string(),
                    &len.to_string(),
                    &BIG.to_string(),
                    &secs,
                    &noread_src,
                ]),
            ],
            control: Control::Nbd,
        },
        Flood {
            key: "dhcp-request",
            what: format!(
                "{} blind INIT-REBOOT REQUESTs (option 50, no server id), random MACs",
                a.dhcp_macs
            ),
            procs: vec![s(&["dhcp-request", &a.dhcp_macs.to_string(), POOL.0, POOL.1])],
            control: Control::Dhcp,
        },
        Flood {
            key: "dhcp-discover",
            what: format!("{} DISCOVERs, random MACs", a.dhcp_macs),
            procs: vec![s(&["dhcp-discover", &a.dhcp_macs.to_string(), POOL.0, POOL.1])],
            control: Control::Dhcp,
        },
    ]
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

/// Runs one control client in `ns`; Ok(seconds) when it was served correctly.
fn run_control(ctx: &Ctx, kind: Control, ns: &str, limit: Duration) -> Result<Result<f64, String>> {
    let out = ctx.dir.join("control.out");
    let _ = std::fs::remove_file(&out);
    let server = SERVER_IP.to_string();
    let mut c = match kind {
        Control::Tftp => {
            let mut c = Lab::cmd(ns, "atftp");
            c.args(["--option", "blksize 1468", "--option", "windowsize 16"])
                .args(["-g", "-r", "control.bin", "-l"])
                .arg(&out)
                .args([server.as_str(), "69"]);
            c
        }
        Control::Http => {
            let mut c = Lab::cmd(ns, "curl");
            c.args(["-sS", "-f", "--max-time", "50", "-o"])
                .arg(&out)
                .arg(format!("http://{server}/files/control.bin"));
            c
        }
        Control::Nbd => {
            let mut c = Lab::cmd(ns, &ctx.libnbd_python);
            c.args([
                "-c",
                "import nbd, sys\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\nopen(sys.argv[2], 'wb').write(h.pread(int(sys.argv[3]), 0))\nh.shutdown()",
                &format!("nbd://{server}/{EXPORT}"),
            ])
            .arg(&out)
            .arg(CONTROL.to_string());
            c
        }
        Control::Dhcp => {
            let mut c = Lab::cmd(ns, "busybox");
            // -n: fail instead of retrying forever; -q: exit once bound; 5 DISCOVERs 2 s apart.
            c.args([
                "udhcpc", "-i", "eth0", "-n", "-q", "-f", "-t", "5", "-T", "2", "-s",
            ])
            .arg(&ctx.udhcpc_script);
            c
        }
    };
    let err = ctx.dir.join("control.err");
    c.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err)?)
        .process_group(0);
    let t = Instant::now();
    let mut p = Proc(
        c.spawn()
            .with_context(|| format!("starting {}", kind.label()))?,
    );
    let status = loop {
        if let Some(st) = p.0.try_wait()? {
            break Some(st);
        }
        if t.elapsed() > limit {
            break None;
        }
        pause(Duration::from_millis(10))?;
    };
    let secs = t.elapsed().as_secs_f64();
    drop(p);
    let why = |s: &str| {
        let e = std::fs::read_to_string(&err).unwrap_or_default();
        let e = e.trim().lines().last().unwrap_or("").to_string();
        Err(if e.is_empty() {
            s.to_string()
        } else {
            format!("{s}: {e}")
        })
    };
    Ok(match status {
        None => why(&format!("no answer within {} s", limit.as_secs())),
        Some(st) if !st.success() => why(&format!("failed ({st}) after {secs:.1} s")),
        Some(_) => match kind {
            Control::Dhcp => Ok(secs),
            Control::Nbd => match std::fs::read(&out) {
                Ok(b) if b.len() == CONTROL => Ok(secs),
                _ => why("short read"),
            },
            Control::Tftp | Control::Http => match std::fs::read(&out) {
                Ok(b) if b == ctx.control_file => Ok(secs),
                _ => why("the file differs from the one served"),
            },
        },
    })
}

fn show(r: &Result<f64, String>) -> String {
    match r {
        Ok(s) => format!("ok {s:.2} s"),
        Err(e) => format!("FAILED ({e})"),
    }
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
