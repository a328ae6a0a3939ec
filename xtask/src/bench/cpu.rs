//! CPU time of benchmark servers and clients: a measure that the other work on a shared
//! machine disturbs far less than wall time.

use std::path::{Path, PathBuf};

/// CPU time of one server with all its threads and children.
///
/// A cgroup of its own where the machine lets us make one (cgroup v1 `cpuacct` or v2):
/// tftpd-hpa forks a child per transfer and ignores SIGCHLD, so its children's time
/// never reaches /proc/PID/stat. Without a cgroup, /proc/PID/stat (utime, stime and
/// waited-for children) is read, and tftpd-hpa shows as n/a.
pub struct CpuMeter {
    pid: u32,
    cg: Option<Cgroup>,
}

impl CpuMeter {
    pub fn new(name: &str, pid: u32) -> CpuMeter {
        let cg = Cgroup::create(&format!("vdd-bench-{}-{name}", std::process::id()))
            .filter(|c| c.add(pid));
        CpuMeter { pid, cg }
    }

    /// CPU seconds so far; None when it cannot be known.
    pub fn seconds(&self) -> Option<f64> {
        if let Some(c) = &self.cg {
            return c.usage();
        }
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).ok()?;
        // Fields after the command name (which may hold spaces), from field 3 on.
        let rest = stat.rsplit_once(')')?.1;
        let f: Vec<f64> = rest
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        // utime, stime, cutime, cstime are fields 14..=17, i.e. 11..=14 here (0-based
        // from field 3).
        let ticks: f64 = f.get(11..15)?.iter().sum();
        // USER_HZ: the unit of /proc times, 100 on every Linux architecture we run on.
        Some(ticks / 100.0)
    }
}

/// A cgroup made for the benchmark, emptied into its parent and removed on Drop.
struct Cgroup {
    dir: PathBuf,
    v2: bool,
}

impl Cgroup {
    fn create(name: &str) -> Option<Cgroup> {
        let v1 = Path::new("/sys/fs/cgroup/cpuacct");
        let v2 = Path::new("/sys/fs/cgroup");
        let (dir, is_v2) = if v1.join("cpuacct.usage").is_file() {
            (v1.join(name), false)
        } else if v2.join("cgroup.controllers").is_file() {
            (v2.join(name), true)
        } else {
            return None;
        };
        std::fs::create_dir(&dir).ok()?;
        let c = Cgroup { dir, v2: is_v2 };
        c.usage().is_some().then_some(c)
    }

    fn add(&self, pid: u32) -> bool {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string()).is_ok()
    }

    fn usage(&self) -> Option<f64> {
        if self.v2 {
            let s = std::fs::read_to_string(self.dir.join("cpu.stat")).ok()?;
            let us: f64 = s
                .lines()
                .find_map(|l| l.strip_prefix("usage_usec "))?
                .trim()
                .parse()
                .ok()?;
            Some(us / 1e6)
        } else {
            let s = std::fs::read_to_string(self.dir.join("cpuacct.usage")).ok()?;
            Some(s.trim().parse::<f64>().ok()? / 1e9)
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let (Ok(procs), Some(parent)) = (
            std::fs::read_to_string(self.dir.join("cgroup.procs")),
            self.dir.parent(),
        ) {
            for pid in procs.lines() {
                let _ = std::fs::write(parent.join("cgroup.procs"), pid);
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// CPU seconds of this process's waited-for children (the clients) so far.
pub fn children_cpu() -> f64 {
    use nix::sys::resource::{getrusage, UsageWho};
    match getrusage(UsageWho::RUSAGE_CHILDREN) {
        Ok(u) => {
            let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
            t(u.user_time()) + t(u.system_time())
        }
        Err(_) => f64::NAN,
    }
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}
