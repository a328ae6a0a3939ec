//! A hypervisor host for the lab: a real libvirt daemon (QEMU driver) in a network
//! namespace of its own, on the lab bridge with its own address, and in a mount namespace
//! whose /run, /var and /etc/libvirt are folders of the test: two of them on one machine
//! know nothing of each other or of the machine's own libvirt. vdd reaches each over TCP
//! (`qemu+tcp://ADDRESS/system`, no authentication: for tests only, inside the lab).
//!
//! Drop kills everything in the host's namespace (the daemon and the QEMUs it started,
//! which outlive a killed daemon, as they do on a real host) and removes its folder; the
//! namespace itself goes with the lab.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::lab::{Lab, PREFIX};

/// libvirtd.conf: TCP on the host's address, no authentication (the lab only).
fn libvirtd_conf(addr: Ipv4Addr) -> String {
    format!(
        "listen_tls = 0\nlisten_tcp = 1\nlisten_addr = \"{addr}\"\nauth_tcp = \"none\"\n\
         log_outputs = \"3:stderr\"\n"
    )
}

/// qemu.conf: QEMU as root without cgroups, security labels or virtlogd (none of which a
/// test's private daemon has); its log a file in the host's /var/log.
const QEMU_CONF: &str = "user = \"root\"\ngroup = \"root\"\ndynamic_ownership = 0\n\
security_driver = \"none\"\ncgroup_controllers = [ ]\nremember_owner = 0\n\
stdio_handler = \"file\"\n";

/// Run inside `ip netns exec NS unshare -m`: the test's folders over /run, /var and
/// /etc/libvirt, then the daemon.
const START: &str = r#"set -e
D="$1"
mount --make-rprivate /
mount --bind "$D/run" /run
mount --bind "$D/var" /var
mount --bind "$D/etc" /etc/libvirt
exec libvirtd --listen --config /etc/libvirt/libvirtd.conf
"#;

pub struct Hypervisor {
    pub name: String,
    pub ns: String,
    pub addr: Ipv4Addr,
    /// The URI vdd uses.
    pub uri: String,
    pub dir: PathBuf,
    /// The storage pool's folder (pool "default"): the base images are copied there.
    pub pool: PathBuf,
    daemon: Option<std::process::Child>,
    /// Keep the host's folder (its daemon's and QEMUs' logs) after Drop: a failed run.
    pub keep_files: bool,
}

impl Hypervisor {
    /// Starts host `name` at `addr` on the lab bridge, its files under `dir`, with a
    /// storage pool "default" that holds copies of `images`.
    pub fn start(
        lab: &mut Lab,
        name: &str,
        addr: Ipv4Addr,
        dir: &Path,
        images: &[&Path],
    ) -> Result<Hypervisor> {
        let c = lab.add_client(None)?;
        crate::lab::ip([
            "-n",
            &c.ns,
            "addr",
            "add",
            &format!("{addr}/{PREFIX}"),
            "dev",
            "eth0",
        ])?;
        let _ = std::fs::remove_dir_all(dir);
        for d in [
            "etc",
            "run/lock",
            "var/lib/libvirt",
            "var/cache/libvirt",
            "var/log/libvirt",
            "var/tmp",
            "pool",
        ] {
            std::fs::create_dir_all(dir.join(d))?;
        }
        std::os::unix::fs::symlink("/run", dir.join("var/run"))?;
        std::os::unix::fs::symlink("/run/lock", dir.join("var/lock"))?;
        std::fs::write(dir.join("etc/libvirtd.conf"), libvirtd_conf(addr))?;
        std::fs::write(dir.join("etc/qemu.conf"), QEMU_CONF)?;
        std::fs::write(dir.join("start.sh"), START)?;
        let pool = dir.join("pool");
        for img in images {
            let name = img.file_name().context("an image without a file name")?;
            std::fs::copy(img, pool.join(name))
                .with_context(|| format!("copying {} into the pool", img.display()))?;
        }
        let log = std::fs::File::create(dir.join("libvirtd.log"))?;
        let daemon = Command::new("ip")
            .args(["netns", "exec", &c.ns, "unshare", "-m", "sh"])
            .arg(dir.join("start.sh"))
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting libvirtd")?;
        let mut hv = Hypervisor {
            name: name.to_string(),
            ns: c.ns,
            addr,
            uri: format!("qemu+tcp://{addr}/system"),
            dir: dir.to_path_buf(),
            pool,
            daemon: Some(daemon),
            keep_files: false,
        };
        // The daemon probes QEMU's capabilities before it listens: a few seconds.
        let end = Instant::now() + Duration::from_secs(60);
        while hv.virsh(lab, &["version"]).is_err() {
            if Instant::now() > end || !hv.daemon_running() {
                bail!(
                    "libvirtd of {name} did not come up: {}",
                    std::fs::read_to_string(dir.join("libvirtd.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        let target = hv.pool.display().to_string();
        hv.virsh(
            lab,
            &["pool-create-as", "default", "dir", "--target", &target],
        )?;
        Ok(hv)
    }

    /// Runs `virsh -c URI ARGS` from the lab's server namespace; its output.
    pub fn virsh(&self, lab: &Lab, args: &[&str]) -> Result<String> {
        crate::output(
            Lab::cmd(&lab.server_ns, "virsh")
                .args(["-c", &self.uri])
                .args(args),
            &format!("virsh {args:?} on {}", self.name),
        )
    }

    fn daemon_running(&mut self) -> bool {
        self.daemon
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILLs the daemon alone: its QEMUs run on, unreachable, as when a real host's
    /// libvirtd dies.
    pub fn kill_daemon(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The pids of QEMU processes in the host's namespace.
    pub fn qemu_pids(&self) -> Vec<u32> {
        pids_in(&self.ns)
            .into_iter()
            .filter(|p| {
                std::fs::read_to_string(format!("/proc/{p}/comm"))
                    .is_ok_and(|c| c.starts_with("qemu-system"))
            })
            .collect()
    }
}

/// Every pid in network namespace `ns`.
fn pids_in(ns: &str) -> Vec<u32> {
    Command::new("ip")
        .args(["netns", "pids", ns])
        .stderr(Stdio::null())
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

impl Drop for Hypervisor {
    fn drop(&mut self) {
        self.kill_daemon();
        // What the daemon started: only processes in this host's own namespace.
        for _ in 0..50 {
            let pids = pids_in(&self.ns);
            if pids.is_empty() {
                break;
            }
            for p in pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if !self.keep_files {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
