//! `vdd check`: the summary of what the config would serve.

use std::io::Write;
use std::path::Path;

use vdd::config::{Config, DhcpMode, ExportMode};

pub(crate) fn print_summary(cfg: &Config, out: &mut dyn Write) -> std::io::Result<()> {
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
