//! `vdd serve`: every enabled service bound, then run until a signal; SIGHUP reloads.
//! With systemd's notifications and the open-file limit raised first.

use std::sync::Arc;

use anyhow::{Context, Result};
use futures_util::FutureExt;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use vdd::config::{Config, DhcpMode, Live};

/// Tells systemd the service's state; nothing when systemd did not start us.
fn notify(state: sd_notify::NotifyState) {
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        if let Err(e) = sd_notify::notify(false, &[state]) {
            warn!("telling systemd (NOTIFY_SOCKET): {e}");
        }
    }
}

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

/// Binds every enabled service first (a busy port stops start-up before anything is
/// served), then runs them until a signal.
pub(crate) async fn serve(
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
