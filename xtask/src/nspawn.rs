//! A Debian system booted with systemd as PID 1, in a container (`systemd-nspawn -b`),
//! for the package's install test. Its root tree is made by mmdebstrap from this
//! machine's own apt sources and cached in `~/.cache/vdd`; each boot runs on a tmpfs
//! overlay of it (`--volatile=overlay`), so a run changes nothing of the cached tree. The
//! container joins a network namespace the caller made (a lab's server namespace) and is
//! halted on Drop.
//!
//! This machine's PID 1 is no systemd: nspawn runs without machined (`--register=no`)
//! and in its own cgroup (`--keep-unit`); commands reach the container through nsenter
//! into its init's namespaces, as `machinectl shell` would through machined.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::image::{apt_sources, cache_dir, prune_cache};

/// What the tree's layout code below adds to the package list's hash: change it when the
/// way the tree is made changes.
const TREE_LAYOUT: &str = "minbase + systemd-sysv, no docs; v1";

/// The cached root tree with `packages` installed (built on first use, ~4 minutes with
/// the downloads). Returns its folder.
pub fn tree(name: &str, packages: &[&str]) -> Result<PathBuf> {
    let (sources, suite) = apt_sources()?;
    let mut packages = packages.to_vec();
    packages.sort_unstable();
    packages.dedup();
    let mut h = Sha256::new();
    h.update(TREE_LAYOUT.as_bytes());
    h.update(suite.as_bytes());
    for p in &packages {
        h.update(p.as_bytes());
        h.update(b"\n");
    }
    let hash = format!("{:x}", h.finalize());
    let cache = cache_dir().context("no cache folder: neither XDG_CACHE_HOME nor HOME is set")?;
    std::fs::create_dir_all(&cache)?;
    let dir = cache.join(format!("{name}-{}.tree", &hash[..16]));
    if dir.join("usr/lib/os-release").is_file() {
        eprintln!("xtask: container root from the cache {}", dir.display());
        return Ok(dir);
    }
    if crate::lab::which("mmdebstrap").is_none() {
        bail!("`mmdebstrap` is missing: apt-get install -y mmdebstrap");
    }
    let work = cache.join(format!("{name}-{}.work", &hash[..16]));
    let _ = std::fs::remove_dir_all(&work);
    let t0 = Instant::now();
    eprintln!(
        "xtask: mmdebstrap {suite} minbase + systemd + {} into {} ...",
        packages.join(" "),
        work.display()
    );
    let mut args = vec![
        "--quiet".to_string(),
        format!("--include=systemd,systemd-sysv,{}", packages.join(",")),
    ];
    args.extend(crate::image::NO_DOCS.map(String::from));
    crate::image::mmdebstrap(&args, &suite, &work, &sources)?;
    // Renamed last, so an interrupted build is never taken for a tree.
    std::fs::rename(&work, &dir)?;
    prune_cache(&dir, &format!("{name}-"));
    eprintln!(
        "xtask: container root built in {:.0} s",
        t0.elapsed().as_secs_f64()
    );
    Ok(dir)
}

/// A booted container; halted (and, if it will not halt, killed) on Drop.
pub struct Container {
    pub name: String,
    nspawn: Child,
    /// The container's PID 1 (systemd), as this machine numbers it.
    pub leader: u32,
}

impl Container {
    /// Boots `tree` in network namespace `netns` (a name under /run/netns), with each
    /// `(host folder, container path)` of `binds` mounted read-only, and waits until
    /// systemd has finished booting. nspawn's own output goes to `log`.
    pub fn boot(
        tree: &Path,
        netns: &str,
        binds: &[(&Path, &str)],
        log: &Path,
    ) -> Result<Container> {
        for tool in ["systemd-nspawn", "nsenter"] {
            if crate::lab::which(tool).is_none() {
                bail!("`{tool}` is missing: apt-get install -y systemd-container util-linux");
            }
        }
        // The namespace's name is unique per process and lab, and a valid machine name.
        let name = netns.to_string();
        let out =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = Command::new("systemd-nspawn");
        cmd.arg("--quiet")
            .arg("--boot")
            .arg("--directory")
            .arg(tree)
            .arg(format!("--machine={name}"))
            .arg("--volatile=overlay")
            .args(["--register=no", "--keep-unit"])
            .arg(format!("--network-namespace-path=/run/netns/{netns}"))
            // nspawn leaves CAP_NET_ADMIN out of a container on a network it did not make
            // itself; this one owns its namespace (vdd makes taps and nftables there).
            .arg("--capability=CAP_NET_ADMIN")
            .args(["--console=pipe", "--link-journal=no", "--timezone=off"])
            .arg("--resolv-conf=off");
        for (host, inside) in binds {
            cmd.arg(format!("--bind-ro={}:{inside}", host.display()));
        }
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let nspawn = cmd.spawn().context("starting systemd-nspawn")?;
        let mut c = Container {
            name,
            leader: 0,
            nspawn,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        // nspawn is the child subreaper of the container's init: its child in another
        // pid namespace is PID 1 there.
        while c.leader == 0 {
            if let Ok(Some(st)) = c.nspawn.try_wait() {
                bail!(
                    "systemd-nspawn ended ({st}) before the container booted: {}",
                    std::fs::read_to_string(log).unwrap_or_default().trim()
                );
            }
            if Instant::now() > deadline {
                bail!("no container init under systemd-nspawn after 60 s");
            }
            c.leader = init_of(c.nspawn.id()).unwrap_or(0);
            std::thread::sleep(Duration::from_millis(100));
        }
        // Until its systemd listens, systemctl fails at once ("offline", or no bus);
        // then --wait waits for the boot's end. "degraded" is a booted system too (a
        // container lacks some units' hardware).
        loop {
            let out = c
                .cmd("systemctl is-system-running --wait 2>&1")
                .output()
                .context("running nsenter")?;
            let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
            match state.as_str() {
                "running" | "degraded" => return Ok(c),
                "starting" | "initializing" => {}
                _ if Instant::now() > deadline => {
                    bail!("the container's systemd says {state:?} after booting")
                }
                _ => {}
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A command that runs `script` with /bin/sh as root inside the container, in all of
    /// its init's namespaces, with a clean environment.
    pub fn cmd(&self, script: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["--target", &self.leader.to_string(), "--all"])
            .args(["env", "-i"])
            .args([
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "LANG=C.UTF-8",
                "DEBIAN_FRONTEND=noninteractive",
                "SYSTEMD_PAGER=",
                "HOME=/root",
            ])
            .args(["/bin/sh", "-c", script])
            .current_dir("/")
            .stdin(Stdio::null());
        c
    }

    /// Runs `script` in the container; its stdout, or an error with both outputs.
    pub fn sh_output(&self, script: &str) -> Result<String> {
        let out = self
            .cmd(script)
            .output()
            .with_context(|| format!("running nsenter for {script:?}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "in the container, `{script}` failed ({}):\n{}{}",
                out.status,
                stdout,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(stdout)
    }

    /// Runs `script` in the container and says whether it exited 0 (its output is dropped).
    pub fn sh_ok(&self, script: &str) -> Result<bool> {
        let st = self
            .cmd(script)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .with_context(|| format!("running nsenter for {script:?}"))?;
        Ok(st.success())
    }

    /// The pids (as this machine numbers them) of the container's processes whose
    /// program (argv[0], without its folder) starts with `prog`. Not the command name:
    /// QEMU renames itself (`-name ...,process=vdd-SESSION`).
    pub fn processes(&self, prog: &str) -> Vec<u32> {
        let Ok(ns) = std::fs::read_link(format!("/proc/{}/ns/pid", self.leader)) else {
            return Vec::new();
        };
        let Ok(rd) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        let runs = |pid: u32| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let argv0 = c.split(|b| *b == 0).next().unwrap_or_default();
                let name = argv0.rsplit(|b| *b == b'/').next().unwrap_or_default();
                name.starts_with(prog.as_bytes())
            })
        };
        rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read_link(format!("/proc/{pid}/ns/pid")).is_ok_and(|n| n == ns)
                    && runs(*pid)
            })
            .collect()
    }
}

/// The child of `parent` that lives in another pid namespace, if there is one yet.
fn init_of(parent: u32) -> Option<u32> {
    let own = std::fs::read_link("/proc/self/ns/pid").ok()?;
    let children =
        std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children")).ok()?;
    children
        .split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
        .find(|pid| std::fs::read_link(format!("/proc/{pid}/ns/pid")).is_ok_and(|n| n != own))
}

impl Drop for Container {
    fn drop(&mut self) {
        // SIGTERM to nspawn halts the container (its systemd stops every unit); a second
        // signal, or SIGKILL after 60 s, ends it at once.
        if matches!(self.nspawn.try_wait(), Ok(None)) {
            let _ = Command::new("kill")
                .args(["-TERM", &self.nspawn.id().to_string()])
                .stderr(Stdio::null())
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while matches!(self.nspawn.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if matches!(self.nspawn.try_wait(), Ok(None)) && self.leader != 0 {
            // Killing a pid namespace's init kills every process in it. (Never `kill 0`:
            // that is our own process group.)
            let _ = Command::new("kill")
                .args(["-KILL", &self.leader.to_string()])
                .stderr(Stdio::null())
                .status();
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
    }
}
