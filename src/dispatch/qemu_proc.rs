//! The QEMU backend's VMs as Linux processes, read from /proc: alive or not, ours or a
//! recycled pid, their CPU time and memory; finding a session's VMs, and stopping one.
//! Apart from `qemu.rs` (the backend and its types), which was past 600 lines.

use std::time::Duration;

use tracing::warn;

use super::qemu::Vm;
use qemu_ctl::qmp::Qmp;

/// CPU time (utime + stime of /proc/PID/stat, in clock ticks) and VmRSS of a process.
pub fn usage(pid: u32) -> Option<super::backend::VmUsage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the ")" that closes the command name: state is the 1st, utime the
    // 12th, stime the 13th (proc(5) numbers them 3, 14, 15).
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|&h| h > 0)
        .unwrap_or(100) as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    Some(super::backend::VmUsage {
        cpu_seconds: ticks as f64 / hz,
        rss_bytes: rss_kib * 1024,
    })
}

/// Is a process with this pid alive (and not a zombie)?
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the field after the ")" that closes the command name.
        Ok(s) => s
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|st| st != "Z" && st != "X"),
        Err(_) => false,
    }
}

/// The VM's command line names its session; an adopted pid must still be that VM and not
/// a recycled pid of something else.
pub fn is_our_vm(pid: u32, session: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            let want = format!("vdd-{session}");
            c.split(|b| *b == 0)
                .any(|a| String::from_utf8_lossy(a).starts_with(&want))
        })
        .unwrap_or(false)
}

/// The pids of every running VM of this session (by its command line, as
/// [`is_our_vm`]): a VM whose record was never written, or was lost, is found this way.
pub fn vms_of(session: &str) -> Vec<u32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| alive(*pid) && is_our_vm(*pid, session))
        .collect()
}

/// Whether nothing listens on `addr:port` yet (a VM of another run, or another program,
/// may hold a port of `dispatch.vnc_ports` that vdd's records do not know of).
pub fn port_free(addr: std::net::Ipv4Addr, port: u16) -> bool {
    std::net::TcpListener::bind((addr, port)).is_ok()
}

/// Shuts the VM down: ACPI power button, then `quit`, then SIGKILL, each after `grace`.
/// A zero `grace` is for a VM whose disk is thrown away (a reset, a warm VM giving way, a
/// saved VM): `quit` at once, SIGKILL a second later.
pub async fn stop(vm: &mut Vm, grace: Duration) {
    let gone = |vm: &mut Vm| match vm.child.as_mut() {
        Some(c) => matches!(c.try_wait(), Ok(Some(_))),
        None => !alive(vm.pid),
    };
    async fn wait_gone(vm: &mut Vm, grace: Duration, gone: impl Fn(&mut Vm) -> bool) -> bool {
        let end = tokio::time::Instant::now() + grace;
        while tokio::time::Instant::now() < end {
            if gone(vm) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        gone(vm)
    }
    let (steps, wait): (&[&str], Duration) = if grace.is_zero() {
        (&["quit"], Duration::from_secs(1))
    } else {
        (&["system_powerdown", "quit"], grace)
    };
    for cmd in steps {
        if gone(vm) {
            return;
        }
        if let Ok(mut q) = Qmp::connect(&vm.qmp, Duration::from_secs(2)).await {
            let _ = q.execute(cmd, None).await;
        }
        if wait_gone(vm, wait, gone).await {
            return;
        }
    }
    warn!(
        pid = vm.pid,
        "VM ignored {}; killing it",
        steps.join(" and ")
    );
    if vm.pid > 0 {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(vm.pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    if let Some(c) = vm.child.as_mut() {
        let _ = c.wait().await;
    } else {
        wait_gone(vm, Duration::from_secs(5), gone).await;
    }
}
