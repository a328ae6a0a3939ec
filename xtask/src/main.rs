//! `cargo xtask`: the one entry point for work beside the server itself: the lab network,
//! images, end-to-end boots and benchmarks.

use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "vdd's development tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a lab network (server namespace, bridge, one client) and print how to enter it;
    /// removes it when you press Enter.
    Lab,
    /// The README's test command: fmt, clippy, and every test of the workspace.
    Test,
    /// Build images/out/vmlinuz and images/out/initramfs.img (static boot-menu as /init).
    Initramfs {
        /// Kernel version under /lib/modules (default: the newest with a /boot/vmlinuz).
        #[arg(long)]
        kver: Option<String>,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: Bench,
    },
    /// End-to-end boots in QEMU.
    E2e {
        #[command(subcommand)]
        what: E2e,
    },
}

#[derive(Subcommand)]
enum Bench {
    /// Thin-client boot: QEMU stage medians, and DHCP lease latency vs busybox udhcpc.
    Bootmenu {
        /// QEMU boots to time (0 skips; at most 10).
        #[arg(long, default_value_t = 3)]
        boots: usize,
        /// DHCP leases per client (0 skips; at most 40).
        #[arg(long, default_value_t = 10)]
        leases: usize,
    },
}

#[derive(Subcommand)]
enum E2e {
    /// Boot the initramfs under QEMU TCG with user networking; wait for boot-menu's markers.
    Initramfs {
        /// Use the images already in images/out instead of building them.
        #[arg(long)]
        no_build: bool,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// Keep the serial log in images/out/e2e-initramfs.log even when all went well.
        #[arg(long)]
        log: bool,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Test => {
            run(cargo().args(["fmt", "--all", "--check"]))?;
            run(cargo().args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))?;
            run(cargo().args(["test", "--workspace"]))
        }
        Cmd::Initramfs { kver } => initramfs(kver.as_deref()).map(drop),
        Cmd::E2e {
            what:
                E2e::Initramfs {
                    no_build,
                    timeout,
                    log,
                },
        } => {
            if !no_build {
                initramfs(None)?;
            }
            let out = xtask::initramfs::root().join("images/out");
            let marks =
                xtask::e2e_initramfs::run(&out, std::time::Duration::from_secs(timeout), log)?;
            println!("e2e initramfs: all markers seen (QEMU TCG, times since QEMU start)");
            for (name, at) in marks {
                println!("  {:>8.2} s  {name}", at.as_secs_f64());
            }
            Ok(())
        }
        Cmd::Bench {
            what: Bench::Bootmenu { boots, leases },
        } => xtask::bench::bootmenu::run(boots, leases),
        Cmd::Lab => {
            let mut lab = xtask::lab::Lab::new("lab")?;
            let c = lab.add_client(None)?;
            println!(
                "server namespace: {}  (br0 {})",
                lab.server_ns,
                xtask::lab::SERVER_IP
            );
            println!("client namespace: {}  (eth0 {})", c.ns, c.mac);
            println!("enter one with: ip netns exec NAME bash   -- press Enter to tear down");
            let mut s = String::new();
            std::io::stdin().read_line(&mut s)?;
            Ok(())
        }
    }
}

fn initramfs(kver: Option<&str>) -> Result<xtask::initramfs::Built> {
    let b = xtask::initramfs::build(kver)?;
    let mib = |n: u64| n as f64 / (1024.0 * 1024.0);
    println!("kernel {}: {}", b.kver, b.vmlinuz.display());
    println!(
        "initramfs: {} ({:.2} MiB gzip, {:.2} MiB unpacked, {} modules)",
        b.initramfs.display(),
        mib(b.initramfs_bytes),
        mib(b.uncompressed_bytes),
        b.modules.len()
    );
    println!(
        "boot-menu (static, stripped): {:.2} MiB",
        mib(b.boot_menu_bytes)
    );
    Ok(b)
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Runs a command to the end, failing on a non-zero exit.
fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let st = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}
