//! `cargo xtask bench bootmenu`: how fast the thin client gets going.
//!
//! 1. QEMU TCG boots of images/out (as `cargo xtask e2e initramfs`): median time from
//!    QEMU start to each stage.
//! 2. DHCP lease latency in a lab namespace against dnsmasq (RFC 2131 DISCOVER to ACK and
//!    address configured): boot-menu's client vs busybox udhcpc, each in a fresh client
//!    namespace per run; medians and their ratio.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::median;
use crate::lab::{self, Lab};

pub fn run(boots: usize, leases: usize) -> Result<()> {
    let boots = boots.min(10);
    let leases = leases.min(40);
    let root = crate::initramfs::root();
    let bin = crate::initramfs::build_boot_menu(&root)?;
    let out = root.join("images/out");

    if boots > 0 {
        let mut stages: Vec<(&'static str, Vec<f64>)> = Vec::new();
        for i in 0..boots {
            let marks = crate::e2e_initramfs::run(&out, Duration::from_secs(600), false)
                .with_context(|| format!("boot {}", i + 1))?;
            for (name, at) in marks {
                match stages.iter_mut().find(|(n, _)| *n == name) {
                    Some((_, v)) if v.len() <= i => v.push(at.as_secs_f64()),
                    Some(_) => {}
                    None => stages.push((name, vec![at.as_secs_f64()])),
                }
            }
            eprintln!("bench: boot {}/{boots} done", i + 1);
        }
        println!("QEMU TCG boot, {boots} runs, median seconds since QEMU start:");
        for (name, v) in stages {
            println!("  {:>8.2}  {name}", median(v));
        }
    }

    if leases > 0 {
        if let Some(why) = lab::missing(&["dnsmasq", "busybox"]) {
            println!("DHCP lease latency: skipped ({why})");
            return Ok(());
        }
        let mut lab = Lab::new("bmbench")?;
        let dir = std::env::temp_dir().join(format!("bm-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let mut cmd = Lab::cmd(&lab.server_ns, "dnsmasq");
        cmd.args([
            "--no-daemon",
            "--conf-file=/dev/null",
            "--port=0",
            "--user=root",
            "--bind-interfaces",
            "--no-ping",
            "--log-facility=/dev/null",
            &format!("--interface={}", lab::BRIDGE),
            "--dhcp-range=10.77.0.10,10.77.0.250,255.255.255.0,10m",
            &format!("--dhcp-option=3,{}", lab::SERVER_IP),
            &format!("--dhcp-leasefile={}", dir.join("leases").display()),
        ])
        .stderr(Stdio::null());
        lab.spawn("dnsmasq", cmd)?;
        // dnsmasq needs a moment to bind; the first run of each client would pay for it.
        std::thread::sleep(Duration::from_millis(500));
        // udhcpc's own default script may rewrite the host's /etc/resolv.conf; this one
        // does what boot-menu does (address and default route) and nothing else.
        let script = dir.join("udhcpc.sh");
        std::fs::write(
            &script,
            "#!/bin/sh\n[ \"$1\" = bound ] || exit 0\nip addr add \"$ip/$subnet\" dev \"$interface\"\n[ -n \"$router\" ] && ip route replace default via \"${router%% *}\" dev \"$interface\"\nexit 0\n",
        )?;
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        let mut ours = Vec::new();
        let mut udhcpc = Vec::new();
        let mut udhcpc_bare = Vec::new();
        for _ in 0..leases {
            let c = lab.add_client(None)?;
            ours.push(time(
                Lab::cmd(&c.ns, &bin).args(["dhcp", "eth0"]),
                "boot-menu dhcp",
            )?);
            let c = lab.add_client(None)?;
            // -q: exit once bound; -n: fail instead of retrying forever; the script
            // configures the address, as boot-menu does.
            udhcpc.push(time(
                Lab::cmd(&c.ns, "busybox")
                    .args([
                        "udhcpc", "-i", "eth0", "-n", "-q", "-f", "-t", "5", "-T", "3", "-s",
                    ])
                    .arg(&script),
                "udhcpc",
            )?);
            // The same without configuring anything: separates the script's cost
            // (a shell and two `ip` processes) from the protocol exchange.
            let c = lab.add_client(None)?;
            udhcpc_bare.push(time(
                Lab::cmd(&c.ns, "busybox").args([
                    "udhcpc",
                    "-i",
                    "eth0",
                    "-n",
                    "-q",
                    "-f",
                    "-t",
                    "5",
                    "-T",
                    "3",
                    "-s",
                    "/bin/true",
                ]),
                "udhcpc -s /bin/true",
            )?);
        }
        drop(lab);
        let _ = std::fs::remove_dir_all(&dir);
        let (a, b) = (
            median(ours.clone()) * 1000.0,
            median(udhcpc.clone()) * 1000.0,
        );
        println!("DHCP lease against dnsmasq in a lab namespace, {leases} runs each, median ms (process start to exit, address configured):");
        println!("  boot-menu dhcp  {a:>8.1}");
        println!("  busybox udhcpc  {b:>8.1}");
        println!(
            "  busybox udhcpc -s /bin/true (no address set)  {:>8.1}",
            median(udhcpc_bare.clone()) * 1000.0
        );
        println!("  ratio boot-menu/udhcpc  {:.2}", a / b);
    }
    Ok(())
}

/// Wall time of one bounded run of `cmd`.
fn time(cmd: &mut Command, what: &str) -> Result<f64> {
    let t0 = Instant::now();
    let out = Command::new("timeout")
        .arg("60")
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {what}"))?;
    let dt = t0.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "{what} failed: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(dt)
}
