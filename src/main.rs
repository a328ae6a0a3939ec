//! The `vdd` command: `serve`, `check`, `leases`, `status`, `reload`.

mod cli;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use tracing::{info, warn};

use vdd::config::Config;

use cli::admin::{reload, status};
use cli::check::print_summary;
use cli::serve::serve;

#[derive(Parser)]
#[command(
    name = "vdd",
    version,
    about = "Virtual Distro Dispatcher: network boot and guest VMs for diskless thin clients"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run every enabled service (DHCP, TFTP, HTTP, NBD) until SIGINT or SIGTERM.
    Serve {
        /// Config file [default: ./config.toml, then /etc/vdd/config.toml]
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate the config and print what would be served.
    Check {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Print the DHCP lease table from the state directory.
    Leases {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Ask the running server for its summary (sessions, VMs and memory, leases), through
    /// its admin API with the token from the config.
    Status {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Make the running server read its config file again (as SIGHUP does) and print what
    /// changed, or why the file was refused; through its admin API with the token.
    Reload {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

fn main() -> std::process::ExitCode {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Under systemd the journal stamps every line itself: no second timestamp, and no
    // terminal colours in it.
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let log = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(!journal);
    let log = if journal {
        log.without_time().with_filter(filter).boxed()
    } else {
        log.with_filter(filter).boxed()
    };
    // The panel's recent events: what the log says about seats and sessions, at `info`
    // and above whatever RUST_LOG asks of the log itself.
    let events = Arc::new(vdd::telemetry::events::Events::default());
    tracing_subscriber::registry()
        .with(log)
        .with(
            vdd::telemetry::events::EventLayer(events.clone())
                .with_filter(tracing_subscriber::filter::LevelFilter::INFO),
        )
        .init();
    match run(Cli::parse(), events) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vdd: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli, events: Arc<vdd::telemetry::events::Events>) -> Result<()> {
    match cli.cmd {
        Cmd::Serve { config } => {
            // As written, for a reload to tell what the admin changed.
            let file = Config::load(&Config::locate(config.as_deref())?)?;
            let mut cfg = file.clone();
            tokio::runtime::Runtime::new()
                .context("starting the tokio runtime")?
                .block_on(async {
                    // X11 guests' NICs join a bridge on the LAN, and every service serves
                    // on that bridge: it is set up before anything binds.
                    let bridge = if cfg.has_x11() {
                        let b = vdd::lan::prepare_bridge(&cfg).await.with_context(|| {
                            format!(
                                "setting up the LAN bridge of the X11 guests on server.interface = {:?}",
                                cfg.server.interface
                            )
                        })?;
                        if b != cfg.server.interface {
                            info!(interface = %cfg.server.interface, bridge = %b, "serving on the bridge of the LAN interface");
                        }
                        cfg.server.interface = b.clone();
                        Some(b)
                    } else {
                        None
                    };
                    bind_interface(&mut cfg, true)?;
                    serve(Arc::new(cfg), file, bridge, vdd::telemetry::Hub::new(events)).await
                })
        }
        Cmd::Check { config } => {
            let cfg = load_bound(config.as_deref(), false)?;
            print_summary(&cfg, &mut std::io::stdout().lock())?;
            Ok(())
        }
        Cmd::Leases { config } => {
            let cfg = Config::load(&Config::locate(config.as_deref())?)?;
            vdd::dhcp::print_leases(&cfg, &mut std::io::stdout().lock())?;
            Ok(())
        }
        Cmd::Status { config } => {
            let cfg = load_bound(config.as_deref(), false)?;
            status(&cfg, &mut std::io::stdout().lock())
        }
        Cmd::Reload { config } => {
            let cfg = load_bound(config.as_deref(), false)?;
            reload(&cfg, &mut std::io::stdout().lock())
        }
    }
}

/// Loads the config and checks it against the LAN interface. Without the interface,
/// `serve` refuses and `check` warns.
fn load_bound(given: Option<&Path>, serving: bool) -> Result<Config> {
    let path = Config::locate(given)?;
    let mut cfg = Config::load(&path)?;
    bind_interface(&mut cfg, serving)?;
    Ok(cfg)
}

fn bind_interface(cfg: &mut Config, serving: bool) -> Result<()> {
    let name = cfg.server.interface.clone();
    match vdd::netif::lookup(&name).with_context(|| format!("reading interface {name}"))? {
        Some(iface) => cfg.bind_interface(&iface)?,
        None if serving => bail!(
            "server.interface = {name:?}: no such interface on this machine; name the LAN interface (see `ip link`)"
        ),
        None => warn!(
            interface = %name,
            "no such interface here: checked everything else; `vdd serve` needs it"
        ),
    }
    Ok(())
}
