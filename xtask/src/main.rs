//! `cargo xtask`: the one entry point for work beside the server itself: the lab network,
//! images, end-to-end boots and benchmarks.

use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use xtask::run;

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
    /// Build an image: `thin-client` (the NBD root of the thin clients), `guest-demo`,
    /// `guest-x11` (a Debian guest whose xdm serves the thin clients over XDMCP).
    Image {
        /// Which image: thin-client, guest-demo, guest-x11
        name: String,
        /// Rebuild even when the recipe has not changed
        #[arg(long)]
        force: bool,
    },
    /// The README's test command: fmt, clippy, every test of the workspace, and the QEMU
    /// end-to-end boots (e2e boot through UEFI's PXE, e2e session, e2e storm with 2 seats,
    /// e2e panel, e2e hosts, e2e x11), then the package's install test (e2e deb).
    Test,
    /// Build images/out/vmlinuz and images/out/initramfs.img (static boot-menu as /init).
    Initramfs {
        /// Kernel version under /lib/modules (default: the newest with a /boot/vmlinuz).
        #[arg(long)]
        kver: Option<String>,
    },
    /// The README's demo: a lab network, vdd, and a QEMU thin client that PXE-boots from it.
    Demo,
    /// Build the Debian package target/debian/vdd_VERSION_amd64.deb (cargo-deb, installed
    /// from crates.io when missing) and list its files.
    Deb,
    /// Install the Debian packages (xtask/debian-packages.txt) that a command needs and this
    /// machine lacks; not as root, print the command that would.
    Deps {
        #[arg(value_enum, default_value = "test")]
        purpose: xtask::deps::Purpose,
    },
    /// End-to-end boots in QEMU.
    E2e {
        #[command(subcommand)]
        what: E2e,
    },
    /// Benchmarks of one service against real clients and peers (in a lab namespace).
    Bench {
        #[command(subcommand)]
        which: Bench,
    },
    /// Build the cargo-fuzz targets of fuzz/ and run each for a while, one at a time
    /// (installs cargo-fuzz when missing); fails naming the input of any crash.
    Fuzz {
        /// How long each target runs.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Which compiler builds them: auto picks nightly when installed, else stable
        /// with RUSTC_BOOTSTRAP=1.
        #[arg(long, value_enum, default_value = "auto")]
        toolchain: xtask::fuzz::Toolchain,
        /// An unoptimised build: quicker to make, slower to run (CI's brief runs).
        #[arg(long)]
        dev: bool,
        /// Targets to run (default: all).
        targets: Vec<String>,
    },
}

#[derive(Subcommand)]
enum Bench {
    /// Concurrent curl downloads from vdd's HTTP service (sendfile and copy) and python3.
    Http {
        #[arg(long, default_value_t = 20)]
        clients: usize,
        #[arg(long, default_value_t = 64)]
        size_mib: usize,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Leave out the python3 -m http.server peer.
        #[arg(long)]
        no_peer: bool,
    },
    /// NBD: vdd vs nbdkit, qemu-nbd, nbd-server (sequential; random 4 KiB on one connection
    /// at QD1 and QD32; 16 clients).
    Nbd(xtask::bench::nbd::Args),
    /// TFTP: vdd vs dnsmasq, tftpd-hpa and atftpd; 1 and N clients, lockstep and windowsize.
    Tftp(xtask::bench::tftp::Args),
    /// vdd's memory (VmRSS, VmHWM) under floods from the LAN (TFTP, HTTP, NBD, DHCP), and
    /// whether a well-behaved client is still served during each.
    Floods(xtask::bench::floods::Args),
    /// What the admin panel costs: vdd's CPU while Chromium shows N sessions' screens.
    Panel(xtask::bench::panel::Args),
    /// DHCP: perfdhcp against vdd, kea-dhcp4 and dnsmasq at stepped rates (DORA/s, drops).
    Dhcp {
        /// Shorter steps (3 s instead of 10 s).
        #[arg(long)]
        quick: bool,
        /// Runs per step; the table shows the median.
        #[arg(long, default_value_t = 1)]
        repeat: u32,
        /// Offered rates, comma-separated (default 2000,4000,8000,12000,16000).
        #[arg(long, value_delimiter = ',')]
        rates: Option<Vec<u32>>,
    },
    /// A room of thin clients switched on at once (DHCP, kernel + initrd, menu, NBD root
    /// reads), against vdd and the LTSP stack (dnsmasq + nbd-server) over a shaped link.
    Storm(xtask::bench::storm::Args),
    /// Pick to the guest's first frame on a VNC client (cold boot, warm pool, saved
    /// state; reset) and to the X11 guest's greeter, through the real API in a lab.
    Pick(xtask::bench::pick::Args),
    /// Thin-client boot: QEMU stage medians, DHCP lease latency vs busybox udhcpc, and the
    /// root image in each compression (bytes over NBD, stage times of a PXE boot).
    Bootmenu {
        /// QEMU boots to time (0 skips; at most 10).
        #[arg(long, default_value_t = 3)]
        boots: usize,
        /// DHCP leases per client (0 skips; at most 40).
        #[arg(long, default_value_t = 10)]
        leases: usize,
        /// Root image compressions to compare (comma-separated: xz, zstd, lz4, gzip).
        #[arg(long, value_delimiter = ',', default_value = "xz,zstd,lz4")]
        roots: Vec<String>,
        /// PXE boots through vdd per root compression (0 skips; at most 5).
        #[arg(long, default_value_t = 2)]
        root_boots: usize,
    },
}

#[derive(Subcommand)]
enum E2e {
    /// PXE-boot a thin client, autopick the demo guest, and check that the thin client's
    /// screen shows the guest over VNC (and that wrong passwords are refused).
    Session,
    /// PXE-boot a thin client, autopick the X11 guest, and check that the thin client's
    /// screen shows the guest's xdm greeter (XDMCP); then end the session from the API.
    X11,
    /// Two libvirt hypervisor hosts in the lab: sessions fill host 1, then host 2 (the
    /// thin client's guest runs there); kill -9 of vdd adopts them; host 1's daemon killed
    /// fails its sessions and new ones go to host 2.
    Hosts,
    /// The admin panel in headless Chromium while a thin client boots: login, the seat's
    /// stages arriving, the guest's thumbnail, reset and end from the panel, the refusals;
    /// screenshots in target/e2e/panel-*.png; /metrics through promtool.
    Panel,
    /// Power on N QEMU thin clients together: each PXE-boots through its iPXE ROM, picks
    /// the demo guest, and shows it on its own screen; distinct addresses, sessions, VNC
    /// ports and passwords.
    Storm {
        /// Thin clients (each with its guest VM: about 1 GiB of memory per seat).
        #[arg(long, default_value_t = 4)]
        seats: usize,
    },
    /// PXE-boot a QEMU thin client from vdd in a lab network to the check command in its
    /// NBD root, through the iPXE ROM and through OVMF's own UEFI PXE (TFTP chain).
    Boot {
        /// Only this firmware path (default: both).
        #[arg(long, value_enum)]
        path: Option<xtask::e2e::BootPath>,
    },
    /// Boot images/out/guest-x11.qcow2 as vdd runs guests (q35, AHCI, virtio-net on a lab
    /// tap, DHCP by MAC), time its XDMCP Willing, and check that its greeter draws on
    /// `Xvfb -query` (screenshot: target/guest-x11-greeter.png), then log in as guest.
    GuestX11,
    /// Install the .deb into a Debian 12 container booted with systemd (systemd-nspawn) on a
    /// lab network and run vdd as a service: start, a DHCP lease, an NBD read, two VMs,
    /// reload, stop, purge.
    Deb,
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
    use xtask::deps::{ensure, Purpose};
    let cli = Cli::parse();
    // What each command needs from Debian comes first, so that a fresh machine needs no
    // set-up beyond the command itself.
    match &cli.cmd {
        Cmd::Test => ensure(Purpose::Test)?,
        Cmd::Demo | Cmd::Image { .. } | Cmd::Initramfs { .. } | Cmd::Lab => ensure(Purpose::Demo)?,
        Cmd::E2e {
            what: E2e::GuestX11,
        } => ensure(Purpose::GuestX11)?,
        Cmd::E2e { what: E2e::Panel } => ensure(Purpose::Test)?,
        Cmd::E2e { what: E2e::Deb } => ensure(Purpose::Test)?,
        Cmd::E2e { .. } => ensure(Purpose::Demo)?,
        Cmd::Bench {
            which: Bench::Panel(_),
        } => ensure(Purpose::Test)?,
        Cmd::Bench { .. } => ensure(Purpose::Bench)?,
        Cmd::Deps { .. } | Cmd::Fuzz { .. } | Cmd::Deb => {}
    }
    match cli.cmd {
        Cmd::Deps { purpose } => ensure(purpose),
        Cmd::Fuzz {
            seconds,
            toolchain,
            dev,
            targets,
        } => xtask::fuzz::run(seconds, &targets, toolchain, dev),
        Cmd::Image { name, force } => match name.as_str() {
            "thin-client" => xtask::image::thin_client(force).map(drop),
            "guest-demo" => xtask::image::guest_demo(force).map(drop),
            "guest-x11" => xtask::image::guest_x11(force).map(drop),
            other => bail!("no image {other:?}; there are: thin-client, guest-demo, guest-x11"),
        },
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
            run(cargo().args(["test", "--workspace"]))?;
            // The end-to-end boots need root, network namespaces and QEMU; elsewhere they
            // are skipped with the reason (under CI=true, `missing` fails instead).
            let tools = [
                "qemu-system-x86_64",
                "mmdebstrap",
                "mksquashfs",
                "mkfs.vfat",
                "syslinux",
                "curl",
                "chromium",
                "chromedriver",
                "promtool",
                "libvirtd",
                "virsh",
            ];
            if let Some(why) = xtask::lab::missing(&tools) {
                eprintln!("xtask test: skipping the QEMU end-to-end boots: {why}");
                return Ok(());
            }
            // The iPXE path's boot stages are the first stages of e2e session (and of
            // panel, storm, x11): only UEFI's own PXE needs a run of its own.
            let p = xtask::e2e::BootPath::UefiPxe;
            let times = once_more(&format!("e2e boot ({p:?})"), || xtask::e2e::boot(p))?;
            println!(
                "e2e boot ({p:?}): passed in {:.1} s",
                times.last().map_or(0.0, |t| t.1.as_secs_f64())
            );
            let r = once_more("e2e session", xtask::e2e::session)?;
            println!(
                "e2e session: passed; guest ({} start) on the thin client's screen {:.1} s after the pick; screenshot {}",
                r.start,
                r.pick_to_frame.as_secs_f64(),
                r.screenshot.display()
            );
            let r = once_more("e2e storm", || xtask::e2e_storm::run(CI_STORM_SEATS))?;
            print_storm(&r);
            let r = once_more("e2e panel", xtask::e2e_panel::run)?;
            println!(
                "e2e panel: passed in {:.0} s; screenshots {}",
                r.total.as_secs_f64(),
                r.screenshots
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            let r = once_more("e2e hosts", xtask::e2e_hosts::hosts)?;
            println!(
                "e2e hosts: passed in {:.0} s; host 1 down to its sessions failed {:.1} s; screenshot {}",
                r.total.as_secs_f64(),
                r.host_down_to_failed.as_secs_f64(),
                r.screenshot.display()
            );
            let r = once_more("e2e x11", xtask::e2e_x11::x11)?;
            println!(
                "e2e x11: passed; the guest's greeter ({} start) on the thin client's screen {:.1} s after the pick; screenshot {}",
                r.start,
                r.pick_to_greeter.as_secs_f64(),
                r.screenshot.display()
            );
            if let Some(why) = xtask::lab::missing(E2E_DEB_TOOLS) {
                eprintln!("xtask test: skipping the package's install test: {why}");
                return Ok(());
            }
            let r = xtask::e2e_deb::run()?;
            println!(
                "e2e deb: passed in {:.0} s; {}",
                r.steps.iter().map(|s| s.1.as_secs_f64()).sum::<f64>(),
                r.exposure
            );
            Ok(())
        }
        Cmd::Deb => {
            let b = xtask::deb::build()?;
            print!("{}", xtask::deb::contents(&b.deb)?);
            println!("{}", b.deb.display());
            Ok(())
        }
        Cmd::E2e { what: E2e::Deb } => {
            if let Some(why) = xtask::lab::missing(E2E_DEB_TOOLS) {
                bail!("cannot run the package's install test: {why}");
            }
            let r = xtask::e2e_deb::run()?;
            println!("e2e deb: passed; {}", r.exposure);
            println!(
                "  package {} ({:.1} MiB)",
                r.deb.display(),
                r.deb_bytes as f64 / 1048576.0
            );
            for (name, took) in &r.steps {
                println!("  {:>7.1} s  {name}", took.as_secs_f64());
            }
            println!(
                "  {:>7.1} s  in all",
                r.steps.iter().map(|s| s.1.as_secs_f64()).sum::<f64>()
            );
            if !r.reloaded {
                println!("  (the reload step was skipped: this vdd has no `vdd reload` yet)");
            }
            Ok(())
        }
        Cmd::Demo => xtask::e2e::demo(),
        Cmd::Initramfs { kver } => initramfs(kver.as_deref()).map(drop),
        Cmd::E2e { what: E2e::X11 } => {
            let r = xtask::e2e_x11::x11()?;
            println!("e2e x11: passed; times since QEMU start:");
            for (name, at) in &r.stages {
                println!("  {:>7.1} s  {name}", at.as_secs_f64());
            }
            println!("  the session's VM: {} start", r.start);
            println!(
                "  pick to the guest's display manager answering XDMCP: {:.1} s",
                r.pick_to_ready.as_secs_f64()
            );
            println!(
                "  pick to the greeter on the thin client's screen: {:.1} s",
                r.pick_to_greeter.as_secs_f64()
            );
            println!(
                "  login typed to the guest's xterm on the thin client: {:.1} s",
                r.login_to_desktop.as_secs_f64()
            );
            println!(
                "  `exit` typed to the menu on the thin client: {:.1} s",
                r.logout_to_menu.as_secs_f64()
            );
            println!(
                "  screenshots: {} {}",
                r.screenshot.display(),
                r.desktop.display()
            );
            Ok(())
        }
        Cmd::E2e { what: E2e::Panel } => {
            let r = xtask::e2e_panel::run()?;
            println!("e2e panel: passed; each boot stage on the seat's page, since the login:");
            for (name, at) in &r.stages {
                println!("  {:>7.1} s  {name}", at.as_secs_f64());
            }
            println!(
                "  the thumbnail's pixels: {:.0}% the demo guest's magenta",
                r.thumb_magenta * 100.0
            );
            println!(
                "  from the thin client's start: {:.0} s",
                r.total.as_secs_f64()
            );
            for p in &r.screenshots {
                println!("  screenshot: {}", p.display());
            }
            Ok(())
        }
        Cmd::E2e { what: E2e::Hosts } => {
            let r = xtask::e2e_hosts::hosts()?;
            println!("e2e hosts: passed; times since the thin client's QEMU start:");
            for (name, at) in &r.stages {
                println!("  {:>7.1} s  {name}", at.as_secs_f64());
            }
            println!(
                "  VM start on a host (POST to answer): {:.2} s",
                r.vm_start.as_secs_f64()
            );
            println!(
                "  vdd restarted after kill -9 to its sessions adopted: {:.1} s",
                r.restart_to_adopted.as_secs_f64()
            );
            println!(
                "  host 1's daemon killed to its sessions failed: {:.1} s",
                r.host_down_to_failed.as_secs_f64()
            );
            println!(
                "  idle_timeout 15 s to the end of a session without a viewer: {:.1} s",
                r.idle_end.as_secs_f64()
            );
            println!(
                "  whole run (builds included): {:.0} s",
                r.total.as_secs_f64()
            );
            println!("  screenshot: {}", r.screenshot.display());
            Ok(())
        }
        Cmd::E2e {
            what: E2e::Storm { seats },
        } => {
            let r = xtask::e2e_storm::run(seats)?;
            print_storm(&r);
            Ok(())
        }
        Cmd::E2e { what: E2e::Session } => {
            let r = xtask::e2e::session()?;
            println!("e2e session: passed; times since QEMU start:");
            for (name, at) in &r.stages {
                println!("  {:>7.1} s  {name}", at.as_secs_f64());
            }
            println!(
                "  pick to the guest covering the thin client's screen: {:.1} s ({} start)",
                r.pick_to_frame.as_secs_f64(),
                r.start
            );
            println!(
                "  VM start (POST to VNC password set, second session): {:.2} s ({} start)",
                r.vm_start.as_secs_f64(),
                r.second_start
            );
            println!(
                "  memory of an idle session's VM (RSS): {:.0} MiB",
                r.idle_rss_mib
            );
            println!("  screenshot: {}", r.screenshot.display());
            Ok(())
        }
        Cmd::E2e {
            what: E2e::GuestX11,
        } => {
            let r = xtask::e2e_guest_x11::run()?;
            println!("e2e guest-x11: passed; times since QEMU start:");
            println!(
                "  {:>7.1} s  XDMCP Willing ({} bytes: {})",
                r.willing_at.as_secs_f64(),
                r.willing.len(),
                r.willing
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
            );
            println!(
                "  {:>7.1} s  greeter (#1e5aa0 root, login box) on Xvfb -query",
                r.greeter_at.as_secs_f64()
            );
            println!(
                "  {:>7.1} s  from the password's Return to the session (twm + xterm)",
                r.login_to_session.as_secs_f64()
            );
            println!("  screenshots: {}", r.screenshot.display());
            println!("               {}", r.session_shot.display());
            Ok(())
        }
        Cmd::E2e {
            what: E2e::Boot { path },
        } => {
            let paths = match path {
                Some(p) => vec![p],
                None => vec![xtask::e2e::BootPath::Ipxe, xtask::e2e::BootPath::UefiPxe],
            };
            for p in paths {
                let times = xtask::e2e::boot(p)?;
                println!("e2e boot ({p:?}): passed; times since QEMU start:");
                for (name, at) in times {
                    println!("  {:>7.1} s  {name}", at.as_secs_f64());
                }
            }
            Ok(())
        }
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
            which:
                Bench::Http {
                    clients,
                    size_mib,
                    rounds,
                    no_peer,
                },
        } => {
            run(cargo().args(["build", "--release", "-p", "vdd", "--bin", "vdd"]))?;
            let o = xtask::bench::http::Opts {
                clients,
                size_mib,
                rounds,
                peer: !no_peer,
                vdd: release_bin("vdd")?,
            };
            let figs = xtask::bench::http::run(&o)?;
            xtask::bench::http::print(&figs, &o);
            Ok(())
        }
        Cmd::Bench {
            which: Bench::Nbd(a),
        } => xtask::bench::nbd::run(a),
        Cmd::Bench {
            which: Bench::Tftp(a),
        } => xtask::bench::tftp::run(a),
        Cmd::Bench {
            which: Bench::Floods(a),
        } => xtask::bench::floods::run(a),
        Cmd::Bench {
            which: Bench::Panel(a),
        } => xtask::bench::panel::run(a),
        Cmd::Bench {
            which: Bench::Storm(a),
        } => xtask::bench::storm::run(a),
        Cmd::Bench {
            which: Bench::Pick(a),
        } => xtask::bench::pick::run(a),
        Cmd::Bench {
            which:
                Bench::Dhcp {
                    quick,
                    repeat,
                    rates,
                },
        } => xtask::bench::dhcp::run(quick, repeat, rates),
        Cmd::Bench {
            which:
                Bench::Bootmenu {
                    boots,
                    leases,
                    roots,
                    root_boots,
                },
        } => {
            xtask::bench::bootmenu::run(boots, leases)?;
            if root_boots > 0 {
                xtask::bench::rootcomp::run(&roots, root_boots.min(5))?;
            }
            Ok(())
        }
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

/// What `cargo xtask e2e deb` runs on this machine (inside the container, the package's
/// own dependencies).
const E2E_DEB_TOOLS: &[&str] = &[
    "systemd-nspawn",
    "nsenter",
    "mmdebstrap",
    "dpkg-deb",
    "udhcpc",
    "nbdcopy",
    "curl",
    "mkfs.vfat",
    "syslinux",
];

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

/// The closing note of `e2e storm`.
/// Thin clients in `cargo xtask test`'s e2e storm: each is a TCG QEMU beside its guest's
/// on two cores; two show the room's races (addresses, sessions, passwords) in CI's time.
const CI_STORM_SEATS: usize = 2;

fn print_storm(r: &xtask::e2e_storm::Report) {
    let last = |v: &[std::time::Duration]| v.iter().max().copied().unwrap_or_default();
    println!(
        "e2e storm: passed; {} thin clients powered on together, each PXE-booted, picked the demo guest and shows it ({})",
        r.seats,
        r.addresses.join(", ")
    );
    println!(
        "  last seat's menu at {:.1} s, last seat's guest at {:.1} s after power-on (first: {:.1} s, {:.1} s)",
        last(&r.menu).as_secs_f64(),
        last(&r.guest).as_secs_f64(),
        r.menu.iter().min().copied().unwrap_or_default().as_secs_f64(),
        r.guest.iter().min().copied().unwrap_or_default().as_secs_f64()
    );
    println!(
        "  screenshots: {}",
        r.screenshots
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(" ")
    );
}

/// A binary of the release build, in the workspace's target folder.
fn release_bin(name: &str) -> Result<std::path::PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("target")
        });
    let p = target.join("release").join(name);
    if !p.is_file() {
        bail!("{} missing after the release build", p.display());
    }
    Ok(p.canonicalize()?)
}

/// Runs an end-to-end boot, and once more if it fails: under TCG on a loaded machine a
/// firmware can miss its DHCP window (seen once: OVMF reported no valid offer while vdd's
/// log shows four). Both failures are reported; only a second failure fails the run.
fn once_more<T>(what: &str, f: impl Fn() -> Result<T>) -> Result<T> {
    match f() {
        Ok(t) => Ok(t),
        Err(e) => {
            eprintln!("xtask test: {what} failed once, trying again: {e:#}");
            f().with_context(|| format!("{what} failed twice"))
        }
    }
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}
