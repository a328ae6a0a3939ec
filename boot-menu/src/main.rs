//! boot-menu: `/init` of the thin-client initramfs (PID 1). Mounts the kernel file systems,
//! loads the NIC driver, gets an address by DHCP (RFC 2131), fetches the guest list from
//! the vdd server and shows the menu on /dev/tty1 and /dev/ttyS0 at once. A pick attaches
//! the thin-client root over NBD, mounts it under a tmpfs overlay and runs a check in it.
//!
//! PID 1 must never exit (the kernel panics when it does), so every failure, even a
//! panic, ends in a screen that shows the error and offers retry or reboot.
//!
//! Outside PID 1, `boot-menu dhcp IFACE` runs only the network steps; the lab integration
//! test uses it inside a network namespace.
//!
//! The binary's modules: `console` (the terminals and the kernel log), `init` (file
//! systems, reaper, modules, link, DHCP), `flow` (the boot attempt and the menu loop),
//! `runs` (a session after a pick). The pure parts are the library (`lib.rs`).

mod console;
mod flow;
mod init;
mod runs;

use std::time::Duration;

use anyhow::Result;
use boot_menu::{cmdline, net, report};
use vdd_api::Stage;

use console::{Console, PREFIX};
use flow::{boot, fatal};
use init::{mount_all, network, spawn_reaper};

pub const HTTP_TIMEOUT: Duration = Duration::from_secs(15);

/// `boot-menu dhcp IFACE [renew]`: the network steps alone, for tests in a network
/// namespace; with `renew`, also wait for the first renewal.
fn dhcp_probe(iface: &str, renew: bool) -> Result<()> {
    net::set_up(iface)?;
    let (lease, mut holder) = network(iface, &mut |m| eprintln!("{PREFIX} {m}"))?;
    println!(
        "{PREFIX} dhcp bound {}/{} router {} server {}",
        lease.ip,
        lease.prefix,
        lease.router.map(|r| r.to_string()).unwrap_or("-".into()),
        lease.server
    );
    if renew {
        let limit = Duration::from_secs(lease.lease_secs as u64 + 30);
        let l = holder.renew_once(limit, &mut |m| eprintln!("{PREFIX} {m}"))?;
        println!("{PREFIX} dhcp renewed {} for {}s", l.ip, l.lease_secs);
    }
    Ok(())
}

fn main() {
    let pid1 = nix::unistd::getpid().as_raw() == 1;
    if !pid1 {
        let argv: Vec<String> = std::env::args().collect();
        let r = match argv.get(1).map(String::as_str) {
            Some("dhcp") if argv.len() == 3 => dhcp_probe(&argv[2], false),
            Some("dhcp") if argv.len() == 4 && argv[3] == "renew" => dhcp_probe(&argv[2], true),
            _ => Err(anyhow::anyhow!(
                "this is the thin client's /init; outside PID 1 only `boot-menu dhcp IFACE [renew]` runs"
            )),
        };
        if let Err(e) = r {
            eprintln!("{PREFIX} error: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    let mut con = Console::open();
    mount_all(&mut con);
    // Reopen: /dev was a bare initramfs directory before devtmpfs was mounted.
    con = Console::open();
    spawn_reaper();
    con.say(&format!("started as PID 1 ({})", env!("CARGO_PKG_VERSION")));
    report::stage(Stage::Pid1, Some(env!("CARGO_PKG_VERSION").to_string()));
    let line = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let args = cmdline::parse(&line);
    for w in &args.warnings {
        con.say(w);
    }
    let mut autopick = args.autopick.clone();
    loop {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            boot(&mut con, &args, &mut autopick)
        }));
        let msg = match r {
            Ok(Ok(())) => "boot ended".to_string(),
            Ok(Err(e)) => format!("{e:#}"),
            Err(p) => format!(
                "internal error (panic): {}",
                p.downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_default()
            ),
        };
        fatal(&mut con, &msg);
    }
}
