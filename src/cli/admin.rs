//! `vdd status` and `vdd reload`: requests to the running server's admin API with the
//! config's `http.admin_token`, and what they print.

use std::io::Write;

use anyhow::{bail, Context, Result};

use vdd::config::Config;

/// `vdd reload`: POST /api/v1/reload. The server validates the file itself and answers
/// with what changed, or with the error `vdd check` would print.
pub(crate) fn reload(cfg: &Config, out: &mut dyn std::io::Write) -> Result<()> {
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
pub(crate) fn status(cfg: &Config, out: &mut dyn std::io::Write) -> Result<()> {
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
