//! The `vdd` command: `serve`, `check`, `leases`, `status`, `reload`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use futures_util::FutureExt;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use vdd::config::{Config, DhcpMode, ExportMode, Live};

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

/// Tells systemd the service's state; nothing when systemd did not start us.
fn notify(state: sd_notify::NotifyState) {
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        if let Err(e) = sd_notify::notify(false, &[state]) {
            warn!("telling systemd (NOTIFY_SOCKET): {e}");
        }
    }
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

/// `vdd reload`: POST /api/v1/reload. The server validates the file itself and answers
/// with what changed, or with the error `vdd check` would print.
fn reload(cfg: &Config, out: &mut dyn std::io::Write) -> Result<()> {
    let v = admin_call(cfg, "POST", "/api/v1/reload", "reloading")?;
    let list = |k: &str| {
        v[k].as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default()
    };
    let changed = list("changed");
    writeln!(
        out,
        "reloaded {}: {}",
        cfg.path.display(),
        if changed.is_empty() {
            "nothing changed that runs".to_string()
        } else {
            format!("applied {changed}")
        }
    )?;
    for (k, what) in [
        ("guests_added", "guests added"),
        ("guests_removed", "guests removed (running sessions go on)"),
        ("guests_changed", "guests changed"),
        ("restart", "waiting for a restart"),
    ] {
        let l = list(k);
        if !l.is_empty() {
            writeln!(out, "  {what}: {l}")?;
        }
    }
    Ok(())
}

/// One request to the running vdd's admin API with `http.admin_token`: the JSON of a 200
/// answer, or an error with the server's message. A plain HTTP/1.1 request over a
/// TcpStream: one call to an IP literal needs no client library.
fn admin_call(cfg: &Config, method: &str, path: &str, what: &str) -> Result<serde_json::Value> {
    use std::io::Read;
    let Some(token) = &cfg.http.admin_token else {
        bail!("http.admin_token is not set in the config: {what} is for the admin; set it and restart vdd (`systemctl reload vdd` reloads without it)");
    };
    let ip = cfg.server_ip().context(
        "server.address: the config names no address to ask (and the interface has none)",
    )?;
    let addr = std::net::SocketAddr::from((ip, cfg.http.port));
    let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))
        .with_context(|| format!("connecting to vdd at {addr} (is it running?)"))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).context("reading vdd's answer")?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head.split_whitespace().nth(1).unwrap_or("?");
    let v: serde_json::Value = serde_json::from_str(body.trim())
        .with_context(|| format!("vdd answered {code} with no JSON: {body:?}"))?;
    if code != "200" {
        bail!("{}", v["error"].as_str().unwrap_or("?"));
    }
    Ok(v)
}

/// `vdd status`: GET /api/v1/status from the server this config describes.
fn status(cfg: &Config, out: &mut dyn std::io::Write) -> Result<()> {
    let v = admin_call(cfg, "GET", "/api/v1/status", "the status")?;
    let n = |v: &serde_json::Value| v.as_u64().map_or("-".into(), |n| n.to_string());
    let s = &v["sessions"];
    writeln!(
        out,
        "vdd {} on {} ({})",
        v["version"].as_str().unwrap_or("?"),
        v["interface"].as_str().unwrap_or("?"),
        v["address"].as_str().unwrap_or("-")
    )?;
    if s.is_null() {
        writeln!(out, "  sessions   none (no [[guest]] configured)")?;
    } else {
        writeln!(
            out,
            "  sessions   {} VMs of at most {} ({} starting), {} seats",
            n(&s["vms"]),
            n(&s["max_vms"]),
            n(&s["starting"]),
            n(&s["seats"])
        )?;
        writeln!(
            out,
            "  memory     {} of {} MiB",
            n(&s["memory_mib"]),
            n(&s["memory_budget_mib"])
        )?;
        for h in s["hosts"].as_array().into_iter().flatten() {
            let state = match h["error"].as_str() {
                _ if h["up"] == true => "up".to_string(),
                Some(e) => format!("down: {e}"),
                None => "not answering yet".to_string(),
            };
            writeln!(
                out,
                "  host       {}  {} VMs, {} of {} MiB, CPU {:.0}% busy  {state}",
                h["name"].as_str().unwrap_or("?"),
                n(&h["vms"]),
                n(&h["memory_mib"]),
                n(&h["memory_limit_mib"]),
                h["cpu_busy"].as_f64().unwrap_or(0.0) * 100.0
            )?;
        }
    }
    writeln!(
        out,
        "  leases     {} active of a pool of {}",
        n(&v["leases"]["active"]),
        n(&v["leases"]["pool"])
    )?;
    writeln!(out, "  guests     {}", n(&v["guests"]))?;
    Ok(())
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

fn print_summary(cfg: &Config, out: &mut dyn Write) -> std::io::Result<()> {
    let server = cfg
        .server_ip()
        .map_or("(the interface's address)".to_string(), |ip| ip.to_string());
    writeln!(out, "config {} is valid", cfg.path.display())?;
    writeln!(
        out,
        "  interface  {}  address {server}",
        cfg.server.interface
    )?;
    if let Some(net) = cfg.server.subnet {
        writeln!(out, "  subnet     {net}")?;
    }
    writeln!(out, "  state      {}", cfg.server.state_dir.display())?;
    let d = &cfg.dhcp;
    match d.mode {
        DhcpMode::Off => writeln!(out, "  dhcp       off")?,
        DhcpMode::Proxy => writeln!(
            out,
            "  dhcp       proxy: boot information only, ports {} and {}",
            d.port, d.proxy_port
        )?,
        DhcpMode::Full => {
            let p = d.pool.expect("full mode has a pool");
            writeln!(
                out,
                "  dhcp       full on port {}: pool {}-{} ({} addresses), lease {}, router {}, dns {}",
                d.port,
                p.first,
                p.last,
                p.len(),
                humantime::format_duration(d.lease_time),
                d.router.map_or("-".into(), |r| r.to_string()),
                if d.dns.is_empty() {
                    "-".into()
                } else {
                    d.dns.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",")
                },
            )?;
        }
    }
    for h in d.hosts.values() {
        writeln!(
            out,
            "    host     {}  {}  {}",
            h.mac,
            h.address.map_or("-".into(), |a| a.to_string()),
            h.hostname.as_deref().unwrap_or("-")
        )?;
    }
    let b = &cfg.boot;
    writeln!(
        out,
        "  boot       bios {}  uefi {}  (iPXE folder {})",
        b.bios,
        b.uefi,
        b.ipxe_dir.display()
    )?;
    writeln!(
        out,
        "             iPXE -> http://{server}:{}/boot.ipxe: kernel {}  initrd {}",
        cfg.http.port,
        b.kernel
            .as_deref()
            .map_or("-".into(), |p| p.display().to_string()),
        b.initrd
            .as_deref()
            .map_or("-".into(), |p| p.display().to_string()),
    )?;
    let on = |e: bool| if e { "on" } else { "off" };
    writeln!(
        out,
        "  tftp       {} port {}  root {}  max {} transfers",
        on(cfg.tftp.enabled),
        cfg.tftp.port,
        cfg.tftp.root.display(),
        cfg.tftp.max_transfers
    )?;
    writeln!(
        out,
        "  http       {} port {}",
        on(cfg.http.enabled),
        cfg.http.port
    )?;
    writeln!(
        out,
        "  nbd        {} port {}",
        on(cfg.nbd.enabled),
        cfg.nbd.port
    )?;
    for e in &cfg.nbd.exports {
        let mode = match (e.mode, e.persist) {
            (ExportMode::ReadOnly, _) => "read-only",
            (ExportMode::Overlay, false) => "overlay (discarded)",
            (ExportMode::Overlay, true) => "overlay (kept)",
        };
        let missing = if e.path.exists() {
            ""
        } else {
            "  (file missing)"
        };
        writeln!(
            out,
            "    export   {}  {}  {mode}{missing}",
            e.name,
            e.path.display()
        )?;
    }
    if cfg.has_x11() {
        let lan = &cfg.server.interface;
        let bridge = match &cfg.server.bridge {
            Some(b) => format!("{b} (server.bridge)"),
            None if Path::new("/sys/class/net")
                .join(lan)
                .join("bridge")
                .exists() =>
            {
                format!("{lan} (the LAN interface is a bridge)")
            }
            None => format!(
                "{} (vdd serve creates it and moves {lan}'s addresses onto it)",
                vdd::config::DEFAULT_BRIDGE
            ),
        };
        writeln!(
            out,
            "  x11        bridge {bridge}; XDMCP answer within {}",
            humantime::format_duration(cfg.dispatch.x11_timeout)
        )?;
    }
    writeln!(out, "  guests     {}", cfg.guests.len())?;
    for g in &cfg.guests {
        // On hypervisor hosts the base image is each host's (in its storage pool).
        let missing = if g.image.exists() || !cfg.dispatch.hosts.is_empty() {
            ""
        } else {
            "  (image missing)"
        };
        writeln!(
            out,
            "    guest    {}  {:?}  {}  {} MiB  {} cpu  {}{missing}",
            g.name,
            g.label,
            g.display.as_str(),
            g.memory_mib,
            g.cpus,
            g.image.display()
        )?;
    }
    for h in &cfg.dispatch.hosts {
        writeln!(
            out,
            "  host       {}  {}  {} MiB  {} cpu  VNC on {}  pool {:?}{}",
            h.name,
            h.uri,
            h.memory_mib,
            h.cpus,
            h.address,
            h.pool,
            h.bridge
                .as_ref()
                .map(|b| format!("  bridge {b}"))
                .unwrap_or_default()
        )?;
    }
    Ok(())
}

/// Binds every enabled service first (a busy port stops start-up before anything is
/// served), then runs them until a signal.
/// Raises the soft limit of open files to the hard one. Every TFTP transfer, HTTP and NBD
/// connection and VM holds descriptors; at the usual soft limit of 1024, 1100 HTTP
/// connections from one host left TFTP transfers unable to open sockets ("Too many open
/// files").
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => info!(from = soft, to = hard, "raised the open-file limit"),
            Err(e) => warn!(soft, hard, error = %e, "cannot raise the open-file limit"),
        },
        Ok(_) => {}
        Err(e) => warn!(error = %e, "cannot read the open-file limit"),
    }
}

async fn serve(
    cfg: Arc<Config>,
    file: Config,
    bridge: Option<String>,
    hub: vdd::telemetry::Hub,
) -> Result<()> {
    raise_fd_limit();
    // Every service takes the running config per request; a reload swaps it.
    let live = Live::new(cfg.clone());
    let reloader = Arc::new(vdd::reload::Reloader::new(
        cfg.path.clone(),
        file,
        live.clone(),
    ));
    std::fs::create_dir_all(&cfg.server.state_dir).with_context(|| {
        format!(
            "creating server.state_dir {}",
            cfg.server.state_dir.display()
        )
    })?;
    let shutdown = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();

    let mut leases = None;
    if cfg.dhcp.mode != DhcpMode::Off {
        let s = vdd::dhcp::Service::bind(live.clone())
            .await
            .context("starting DHCP")?
            .with_hub(hub.clone());
        leases = Some(s.leases());
        let t = shutdown.clone();
        tasks.spawn(async move { s.run(t).await.context("DHCP") });
    }
    if cfg.boot.ipv6_ra {
        let s = vdd::ndp::Service::bind(cfg.clone()).context(
            "answering IPv6 router solicitations (set boot.ipv6_ra = false to turn it off)",
        )?;
        let t = shutdown.clone();
        tasks.spawn(async move { s.run(t).await.context("IPv6 RA") });
    }
    if cfg.tftp.enabled {
        let s = vdd::tftp::Service::bind(live.clone())
            .await
            .context("starting TFTP")?
            .with_hub(hub.clone());
        let t = shutdown.clone();
        tasks.spawn(async move { s.run(t).await.context("TFTP") });
    }
    // The dispatcher runs the guests' VMs; without guests there is nothing to dispatch.
    let dispatcher = if cfg.guests.is_empty() {
        None
    } else {
        // The config allows X11 guests only with full DHCP, so both are there together.
        let lan = bridge
            .zip(leases.clone())
            .map(|(bridge, leases)| vdd::dispatch::LanSide { bridge, leases });
        let t = shutdown.clone();
        // With [[dispatch.host]], the VMs run on those hosts over libvirt; else here.
        let d: Arc<dyn vdd::dispatch::Sessions> = if cfg.dispatch.hosts.is_empty() {
            let d = vdd::dispatch::Dispatcher::with_lan(live.clone(), lan)
                .await
                .context("starting the dispatcher")?;
            tasks.spawn(d.clone().run(t).map(Ok));
            d
        } else {
            let d = vdd::dispatch::Dispatcher::on_hosts(live.clone(), lan)
                .await
                .context("starting the dispatcher on the [[dispatch.host]] hosts")?;
            tasks.spawn(d.clone().run(t).map(Ok));
            d
        };
        Some(d)
    };
    // Addresses no DHCP ACK of ours explains (proxy mode) are seats by the neighbour table.
    let seats: Arc<dyn vdd::http::api::SeatLookup> = Arc::new(vdd::http::api::Neighbours {
        interface: cfg.server.interface.clone(),
    });
    hub.set_neighbours(seats.clone());
    if cfg.http.enabled {
        let api = Arc::new(vdd::http::api::Api {
            cfg: live.clone(),
            dispatcher: dispatcher.clone(),
            leases: leases.clone(),
            seats: seats.clone(),
            reload: Some(reloader.clone()),
            hub: hub.clone(),
        });
        let s = vdd::http::Service::bind(live.clone())
            .await
            .context("starting HTTP")?
            .with_api(api);
        let t = shutdown.clone();
        tasks.spawn(async move { s.run(t).await.context("HTTP") });
    }
    if cfg.nbd.enabled {
        let s = vdd::nbd::Service::bind(live.clone())
            .await
            .context("starting NBD")?
            .with_hub(hub.clone());
        let t = shutdown.clone();
        tasks.spawn(async move { s.run(t).await.context("NBD") });
    }
    info!(
        interface = %cfg.server.interface,
        ip = %cfg.server_ip().map_or("-".into(), |i| i.to_string()),
        "vdd serving"
    );
    // Every service listens now: tell systemd (Type=notify), when it started us.
    notify(sd_notify::NotifyState::Ready);

    // SIGHUP (`systemctl reload vdd`) reads the config file again.
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let t = shutdown.clone();
    tasks.spawn(async move {
        loop {
            tokio::select! {
                _ = t.cancelled() => return Ok(()),
                _ = hup.recv() => {
                    notify(sd_notify::NotifyState::Reloading);
                    let r = reloader.clone();
                    let _ = tokio::task::spawn_blocking(move || r.reload_logged()).await;
                    notify(sd_notify::NotifyState::Ready);
                }
            }
        }
    });

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let result = tokio::select! {
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = term.recv() => Ok(()),
        // A service that ends on its own is a failure: stop the others too.
        Some(r) = tasks.join_next() => r.context("service task panicked").and_then(|r| r),
    };
    info!("shutting down");
    notify(sd_notify::NotifyState::Stopping);
    shutdown.cancel();
    while let Some(r) = tasks.join_next().await {
        if let Ok(Err(e)) = r {
            warn!("{e:#}");
        }
    }
    result
}
