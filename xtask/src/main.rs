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
    /// Benchmarks of one service against real clients and peers (in a lab namespace).
    Bench {
        #[command(subcommand)]
        which: Bench,
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
