//! `cargo xtask`: the one entry point for work beside the server itself: the lab network,
//! images, end-to-end boots and benchmarks.

use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod bench;

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
    /// Build an image: `thin-client` (the NBD root of the thin clients), `guest-demo`.
    Image {
        /// Which image: thin-client
        name: String,
        /// Rebuild even when the recipe has not changed
        #[arg(long)]
        force: bool,
    },
    /// The README's test command: fmt, clippy, and every test of the workspace.
    Test,
    /// Benchmarks against peer servers (needs root and the peers' packages).
    Bench {
        #[command(subcommand)]
        what: bench::Bench,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Bench { what } => bench::run(what),
        Cmd::Image { name, force } => match name.as_str() {
            "thin-client" => xtask::image::thin_client(force).map(drop),
            "guest-demo" => xtask::image::guest_demo(force).map(drop),
            other => bail!("no image {other:?}; there are: thin-client, guest-demo"),
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
            run(cargo().args(["test", "--workspace"]))
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
