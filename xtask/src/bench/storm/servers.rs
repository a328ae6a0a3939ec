//! The two boot stacks of the storm, each serving the same files from the same address
//! in the server's namespace: vdd, and the LTSP stack (dnsmasq for DHCP and TFTP as
//! LTSP's `ltsp dnsmasq` sets it up, nbd-server for the root image as LTSP 5 served it).

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::bench::cpu::CpuMeter;
use crate::lab::Lab;

/// The server's address, on a /16 so 300 seats and more find room in the pool.
pub const SERVER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
pub const CIDR: &str = "10.77.0.1/16";
/// The pool both servers hand out: 1024 addresses.
const POOL: (&str, &str) = ("10.77.1.0", "10.77.4.255");
/// The root image's export name on both.
pub const EXPORT: &str = "thin-client";

/// Which stack serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stack {
    Vdd,
    Ltsp,
}

/// How the LTSP stack is set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Peer {
    /// As `ltsp dnsmasq` writes dnsmasq's config: its defaults, the ping check of each
    /// new address (up to 3 s, during which dnsmasq answers nobody) and at most 50 TFTP
    /// transfers included.
    Ltsp,
    /// The same, tuned for a room booting at once: `--no-ping`, `--dhcp-authoritative`,
    /// `--tftp-max` of the seats.
    LtspTuned,
}

impl Stack {
    pub fn name(self) -> &'static str {
        match self {
            Stack::Vdd => "vdd",
            Stack::Ltsp => "ltsp",
        }
    }
}

/// The files both stacks serve, in `dir`.
pub struct Files {
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub root: PathBuf,
}

/// A running stack: its processes (the lab's children, stopped by the lab by pid, and
/// daemons that forked away, killed by the pid they wrote) and their CPU meters.
pub struct Running {
    pub pids: Vec<u32>,
    daemons: Vec<u32>,
    pub cpu: Vec<CpuMeter>,
    pub log: PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        for pid in &self.daemons {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
}

impl Running {
    /// CPU seconds of all its processes so far.
    pub fn cpu_seconds(&self) -> Option<f64> {
        self.cpu.iter().map(CpuMeter::seconds).sum()
    }

    /// Stops the lab's children; the daemons go when `self` is dropped here.
    pub fn stop(self, lab: &mut Lab) {
        for pid in &self.pids {
            let _ = lab.kill(*pid, "TERM");
        }
    }
}

/// What a stack is started with.
pub struct Setup<'a> {
    /// The run's folder (configs, logs, state).
    pub work: &'a Path,
    pub files: &'a Files,
    /// vdd's binary.
    pub vdd: &'a Path,
    pub seats: usize,
    pub peer: Peer,
}

/// Starts `stack` in namespace `ns` and waits until it answers on the NBD port.
pub fn start(stack: Stack, lab: &mut Lab, ns: &str, s: &Setup) -> Result<Running> {
    let run = match stack {
        Stack::Vdd => start_vdd(lab, ns, s.work, s.files, s.vdd)?,
        Stack::Ltsp => start_ltsp(lab, ns, s.work, s.files, s.seats, s.peer)?,
    };
    let nbd = SocketAddr::from((SERVER, 10809));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let up = crate::e2e::in_netns(ns, move || {
            Ok(TcpStream::connect_timeout(&nbd, Duration::from_millis(200)).is_ok())
        })?;
        if up {
            break;
        }
        if Instant::now() > deadline || !run.pids.iter().all(|p| lab.is_running(*p)) {
            let log = std::fs::read_to_string(&run.log).unwrap_or_default();
            run.stop(lab);
            bail!("{} did not start serving NBD:\n{log}", stack.name());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // dnsmasq has no port to poll for DHCP; it binds before it serves TFTP, and both come
    // up within its start, which the NBD wait above has given time.
    std::thread::sleep(Duration::from_millis(300));
    Ok(run)
}

fn start_vdd(lab: &mut Lab, ns: &str, work: &Path, f: &Files, vdd: &Path) -> Result<Running> {
    let state = work.join("vdd-state");
    let _ = std::fs::remove_dir_all(&state);
    let guest = work.join("guest.img");
    std::fs::write(&guest, [0u8; 512])?;
    let cfg = work.join("vdd.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"# the storm benchmark's vdd (cargo xtask bench storm)
[server]
interface = "eth0"
address = "{CIDR}"
state_dir = "{state}"

[dhcp]
mode = "full"
pool = "{pool0}-{pool1}"
lease_time = "1h"
router = "{SERVER}"

[boot]
kernel = "{kernel}"
initrd = "{initrd}"
cmdline = "console=ttyS0"
root = "{EXPORT}"

[tftp]
root = "{dir}"

[nbd]
port = 10809

[[nbd.export]]
name = "{EXPORT}"
path = "{root}"

[dispatch]
accel = "tcg"

[[guest]]
name = "demo"
label = "Demo guest (never started by the storm)"
image = "{guest}"
"#,
            state = state.display(),
            pool0 = POOL.0,
            pool1 = POOL.1,
            kernel = f.kernel.display(),
            initrd = f.initrd.display(),
            dir = f.dir.display(),
            root = f.root.display(),
            guest = guest.display(),
        ),
    )?;
    let log = work.join("vdd.log");
    let out = std::fs::File::create(&log)?;
    let mut cmd = Lab::cmd(ns, vdd);
    cmd.args(["serve", "--config"])
        .arg(&cfg)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    let pid = lab.spawn("vdd", cmd)?;
    Ok(Running {
        pids: vec![pid],
        daemons: Vec::new(),
        cpu: vec![CpuMeter::new("storm-vdd", pid)],
        log,
    })
}

/// dnsmasq with LTSP's own settings (ltsp/server/dnsmasq/ltsp-dnsmasq.conf of LTSP:
/// no DNS, TFTP on, the boot file for iPXE clients, dnsmasq's defaults otherwise), or
/// tuned (see [`Peer`]). nbd-server serves the root read-only, as LTSP 5's did.
fn start_ltsp(
    lab: &mut Lab,
    ns: &str,
    work: &Path,
    f: &Files,
    seats: usize,
    peer: Peer,
) -> Result<Running> {
    std::fs::write(
        f.dir.join("ltsp.ipxe"),
        format!(
            "#!ipxe\nkernel tftp://{SERVER}/{k} initrd={i}\ninitrd tftp://{SERVER}/{i}\nboot\n",
            k = name(&f.kernel)?,
            i = name(&f.initrd)?,
        ),
    )?;
    let log = work.join("ltsp.log");
    let leases = work.join("dnsmasq.leases");
    let _ = std::fs::remove_file(&leases);
    let mut d = Lab::cmd(ns, crate::lab::which("dnsmasq").context("dnsmasq")?);
    d.args([
        "--no-daemon",
        "--conf-file=/dev/null",
        "--port=0",
        "--user=root",
        "--pid-file=",
        "--interface=eth0",
        "--except-interface=lo",
        "--bind-interfaces",
        "--enable-tftp",
        "--dhcp-boot=ltsp.ipxe",
    ])
    .arg(format!("--dhcp-range={},{},255.255.0.0,1h", POOL.0, POOL.1))
    .arg(format!("--dhcp-option=3,{SERVER}"))
    .arg(format!("--tftp-root={}", f.dir.display()));
    if peer == Peer::LtspTuned {
        d.args(["--no-ping", "--dhcp-authoritative"])
            .arg(format!("--tftp-max={}", seats.max(50)));
    }
    if std::env::var("XTASK_KEEP_LOGS").as_deref() == Ok("1") {
        d.arg("--log-dhcp");
    }
    d.arg(format!("--dhcp-leasefile={}", leases.display()))
        .arg(format!(
            "--log-facility={}",
            work.join("dnsmasq.log").display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?);
    let dnsmasq = lab.spawn("dnsmasq", d)?;

    let conf = work.join("nbd-server.conf");
    std::fs::write(
        &conf,
        format!(
            "[generic]\nlistenaddr = {SERVER}\nport = 10809\nuser = root\ngroup = root\n\
             [{EXPORT}]\nexportname = {}\nreadonly = true\n",
            f.root.display()
        ),
    )?;
    // nbd-server forks a child per client only as a daemon (its -d mode serves one
    // client at a time), so it runs as one and is stopped by the pid it writes.
    let pidfile = work.join("nbd-server.pid");
    let _ = std::fs::remove_file(&pidfile);
    let mut running = Running {
        pids: vec![dnsmasq],
        daemons: Vec::new(),
        cpu: vec![CpuMeter::new("storm-dnsmasq", dnsmasq)],
        log,
    };
    let st = Lab::cmd(ns, "nbd-server")
        .arg("-C")
        .arg(&conf)
        .arg("-p")
        .arg(&pidfile)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(work.join("nbd-server.log"))?)
        .status()
        .context("starting nbd-server")?;
    if !st.success() {
        running.stop(lab);
        bail!("nbd-server exited with {st}");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let pid = loop {
        if let Some(p) = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
        {
            break p;
        }
        if Instant::now() > deadline {
            running.stop(lab);
            bail!("nbd-server wrote no pid file");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    running.daemons.push(pid);
    running.cpu.push(CpuMeter::new("storm-nbd-server", pid));
    Ok(running)
}

fn name(p: &Path) -> Result<String> {
    Ok(p.file_name()
        .context("a file name")?
        .to_string_lossy()
        .into_owned())
}
