//! `cargo xtask e2e panel`: the admin's panel in a real browser (Debian's headless
//! Chromium through its WebDriver) against the real vdd in a lab namespace, while a real
//! QEMU thin client PXE-boots from it, autopicks the demo guest and shows it.
//!
//! One boot serves every check, in the order an admin would meet them: a wrong token
//! is refused; the panel's JSON is refused without the cookie and a POST without the
//! CSRF token; after the login the seat appears in the room and its boot's stages
//! arrive one by one (vdd's own and those the thin client reports); the session's
//! thumbnail shows the demo guest (its pixels are read back from the page); a reset
//! from the panel gives a new VM (in the API: a new session and a new QEMU pid); ending
//! it empties the seat's row. Screenshots of the Room, Seat and Sessions pages go to
//! `target/e2e/`, and `/metrics` after the boot goes through `promtool check metrics`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fantoccini::{Client, Locator};
use serde_json::{json, Value};

use crate::browser::{self, exists, js, js_async, until, Driver};
use crate::e2e::{
    admin_api, in_netns, serve, thin_client, BootPath, Served, Starts, ADMIN_TOKEN, CLIENT_MAC,
};
use crate::image::repo_root;
use crate::lab::SERVER_IP;

/// What the run saw.
pub struct PanelReport {
    /// When each boot stage first showed on the seat's page (since the login).
    pub stages: Vec<(String, Duration)>,
    /// The share of the thumbnail's pixels in the demo guest's magenta.
    pub thumb_magenta: f64,
    pub screenshots: Vec<PathBuf>,
    /// From the thin client's start to the end of the checks.
    pub total: Duration,
}

/// The stages the seat's page must show: vdd's own and the thin client's.
const WANTED: [&str; 14] = [
    "dhcp_discover",
    "dhcp_ack",
    "http_script",
    "http_kernel",
    "http_initrd",
    "pid1",
    "modules_loaded",
    "link_up",
    "client_dhcp",
    "menu_shown",
    "session_started",
    "nbd_attached",
    "x_started",
    "viewer_connected",
];

/// The share of an image's pixels in the demo guest's magenta, read from the page: the
/// image is drawn on a canvas and its pixels counted (-1 while it has not loaded).
const MAGENTA_JS: &str = r#"
const img = document.querySelector(arguments[0]);
if (!img || !img.complete || !img.naturalWidth) return -1;
const c = document.createElement('canvas');
c.width = img.naturalWidth; c.height = img.naturalHeight;
const g = c.getContext('2d');
g.drawImage(img, 0, 0);
const d = g.getImageData(0, 0, c.width, c.height).data;
let m = 0;
for (let i = 0; i < d.length; i += 4)
  if (d[i] >= 140 && d[i + 1] <= 60 && d[i + 2] >= 140 && Math.abs(d[i] - d[i + 2]) < 40) m++;
return m / (d.length / 4);
"#;

pub fn run() -> Result<PanelReport> {
    crate::initramfs::build(None)?;
    crate::image::thin_client(false)?;
    crate::image::guest_demo(false)?;
    let mut s = serve("e2epnl", "console=ttyS0 vdd.autopick=demo", Starts::Cold)?;
    let r = run_in(&mut s);
    s.finish(r)
}

fn run_in(s: &mut Served) -> Result<PanelReport> {
    let ns = s.lab.server_ns.clone();
    let driver = Driver::start(&ns, &s.dir)?;
    let out = repo_root().join("target/e2e");
    std::fs::create_dir_all(&out)?;
    let t0 = Instant::now();
    let q = thin_client(s, BootPath::Ipxe)?;
    eprintln!(
        "xtask e2e panel: thin client booting; serial console in {}",
        q.serial_log.display()
    );
    let state = s.dir.join("state/sessions");
    let result = in_netns(&ns.clone(), move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let c = driver.connect(1400, 1000).await?;
            let r = browse(&c, &ns, &out, &state).await;
            let _ = c.close().await;
            drop(driver);
            r
        })
    });
    let tail = q.serial();
    drop(q);
    let mut report = result.map_err(|e| {
        let lines: Vec<&str> = tail.lines().collect();
        let from = lines.len().saturating_sub(25);
        e.context(format!(
            "thin client's console, last lines:\n{}",
            lines[from..].join("\n")
        ))
    })?;
    metrics_check(&s.lab.server_ns)?;
    report.total = t0.elapsed();
    Ok(report)
}

async fn browse(
    c: &Client,
    ns: &str,
    out: &std::path::Path,
    state: &std::path::Path,
) -> Result<PanelReport> {
    let base = format!("http://{SERVER_IP}");
    let say = |m: &str| eprintln!("xtask e2e panel: {m}");

    // A wrong token is refused, and no session cookie is set.
    c.goto(&format!("{base}/admin/")).await?;
    login(c, "not-the-admin-token").await?;
    let problem = c
        .wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css("#problem"))
        .await
        .context("the login page's answer to a wrong token")?
        .text()
        .await?;
    if !problem.contains("wrong admin token") {
        bail!("a wrong token got {problem:?}");
    }
    if c.get_all_cookies()
        .await?
        .iter()
        .any(|k| k.name() == "vdd_admin")
    {
        bail!("a wrong token got a session cookie");
    }
    say("wrong token refused");
    // The address waits 2 s after a failure before its next try is looked at.
    tokio::time::sleep(Duration::from_millis(2300)).await;
    c.goto(&format!("{base}/admin/")).await?;
    login(c, ADMIN_TOKEN).await?;
    until(
        "the room after the login",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || async move { Ok(exists(c, "#view[data-page=room]").await?.then_some(())) },
    )
    .await?;
    let logged_in = Instant::now();
    say("logged in");

    // Without the cookie the JSON is refused; a POST without the CSRF token too.
    let status = js_async(
        c,
        "fetch('/admin/api/state', {credentials: 'omit'}).then(r => arguments[0](r.status))",
    )
    .await?;
    if status != json!(401) {
        bail!("the panel's JSON without the cookie answered {status}");
    }
    let status = js_async(
        c,
        "fetch('/admin/api/sessions', {method: 'POST', body: '{}', headers: {'Content-Type': 'application/json'}}).then(r => arguments[0](r.status))",
    )
    .await?;
    if status != json!(403) {
        bail!("a POST without the CSRF token answered {status}");
    }
    say("JSON without cookie: 401; POST without CSRF token: 403");

    // The seat appears in the room as it boots.
    let row = &format!("tr[data-mac='{CLIENT_MAC}']");
    until(
        "the seat's row in the room",
        Duration::from_secs(240),
        Duration::from_millis(500),
        || async move { Ok(exists(c, row).await?.then_some(())) },
    )
    .await?;
    say(&format!(
        "seat {CLIENT_MAC} in the room after {:.1} s",
        logged_in.elapsed().as_secs_f64()
    ));

    // Its boot's stages arrive on its page, one poll after another.
    c.goto(&format!("{base}/admin/#/seat/{CLIENT_MAC}")).await?;
    let mut seen: BTreeMap<String, Duration> = BTreeMap::new();
    let mut growth = Vec::new();
    let t_stages = Instant::now();
    while !WANTED.iter().all(|w| seen.contains_key(*w)) {
        if t_stages.elapsed() > Duration::from_secs(420) {
            bail!(
                "the boot's stages on the seat's page: only {:?} within 420 s",
                seen.keys().collect::<Vec<_>>()
            );
        }
        let v = js(
            c,
            "return [...document.querySelectorAll('#boot-current li[data-stage]')].map(l => l.dataset.stage)",
            vec![],
        )
        .await?;
        let now: Vec<String> = serde_json::from_value(v).unwrap_or_default();
        for st in &now {
            seen.entry(st.clone())
                .or_insert_with(|| logged_in.elapsed());
        }
        if growth.last() != Some(&now.len()) {
            growth.push(now.len());
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    if growth.len() < 3 {
        bail!("the stages did not arrive as the seat booted, but all at once: {growth:?}");
    }
    say(&format!(
        "{} stages arrived in {} steps: {growth:?}",
        seen.len(),
        growth.len()
    ));
    let seat_png = out.join("panel-seat.png");
    browser::screenshot(c, &seat_png).await?;

    // The room: the session's thumbnail shows the demo guest.
    c.goto(&format!("{base}/admin/#/room")).await?;
    let thumb = &format!("{row} img.screen");
    let magenta = until(
        "the demo guest on the room's thumbnail",
        Duration::from_secs(240),
        Duration::from_secs(1),
        || async move {
            let v = js(c, MAGENTA_JS, vec![json!(thumb)]).await?;
            let share = v.as_f64().unwrap_or(-1.0);
            Ok((share >= 0.6).then_some(share))
        },
    )
    .await?;
    say(&format!(
        "thumbnail shows the demo guest ({:.0}% magenta)",
        magenta * 100.0
    ));
    let room_png = out.join("panel-room.png");
    browser::screenshot(c, &room_png).await?;

    // Sessions: the larger screen, memory and CPU of the VM.
    c.goto(&format!("{base}/admin/#/sessions")).await?;
    let (id, pid) = session_of_seat(ns, state)?.context("no session of the seat in the API")?;
    let large = &format!("tr[data-session='{id}'] img.screen.large");
    let id = &id;
    until(
        "the demo guest on the sessions page",
        Duration::from_secs(60),
        Duration::from_secs(1),
        || async move {
            let v = js(c, MAGENTA_JS, vec![json!(large)]).await?;
            Ok((v.as_f64().unwrap_or(-1.0) >= 0.6).then_some(()))
        },
    )
    .await?;
    until(
        "the VM's CPU and memory",
        Duration::from_secs(20),
        Duration::from_millis(500),
        || async move {
            let cpu = c
                .find(Locator::Css(&format!("tr[data-session='{id}'] .cpu")))
                .await?
                .text()
                .await?;
            let mem = c
                .find(Locator::Css(&format!("tr[data-session='{id}'] .mem")))
                .await?
                .text()
                .await?;
            Ok((cpu.ends_with('%') && mem.contains("MiB / ") && !mem.ends_with('—')).then_some(()))
        },
    )
    .await?;
    let sessions_png = out.join("panel-sessions.png");
    browser::screenshot(c, &sessions_png).await?;

    // Reset from the panel: a new VM, as the API sees it.
    c.find(Locator::Css(&format!("button.reset[data-session='{id}']")))
        .await?
        .click()
        .await?;
    let (new_id, new_pid) = until(
        "a new VM after the reset",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || async move { Ok(session_of_seat(ns, state)?.filter(|(i, _)| i != id)) },
    )
    .await?;
    if new_pid == pid || new_pid == 0 {
        bail!("the reset session {new_id} runs on pid {new_pid}, the old one on {pid}");
    }
    say(&format!(
        "reset: session {id} (pid {pid}) is now {new_id} (pid {new_pid})"
    ));

    // End it from the seat's page; the room's row empties.
    c.goto(&format!("{base}/admin/#/seat/{CLIENT_MAC}")).await?;
    let end = &format!("button.end[data-session='{new_id}']");
    until(
        "the new session on the seat's page",
        Duration::from_secs(20),
        Duration::from_millis(300),
        || async move { Ok(exists(c, end).await?.then_some(())) },
    )
    .await?;
    c.find(Locator::Css(end)).await?.click().await?;
    c.goto(&format!("{base}/admin/#/room")).await?;
    until(
        "the seat's row without sessions",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || async move {
            let tiles = c.find_all(Locator::Css(&format!("{row} .tile"))).await?;
            let listed = exists(c, row).await?;
            Ok((listed && tiles.is_empty()).then_some(()))
        },
    )
    .await?;
    if session_of_seat(ns, state)?.is_some() {
        bail!("the API still lists a session of the seat after the panel ended it");
    }
    say("ended from the panel; the seat's row updated");

    // Logout: back to the login page, and the cookie is no longer a key.
    c.find(Locator::Css("#logout")).await?.click().await?;
    c.wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css("#token"))
        .await
        .context("the login page after logging out")?;
    let mut stages: Vec<(String, Duration)> = seen.into_iter().collect();
    stages.sort_by_key(|(_, at)| *at);
    Ok(PanelReport {
        stages,
        thumb_magenta: magenta,
        screenshots: vec![room_png, seat_png, sessions_png],
        total: Duration::ZERO,
    })
}

async fn login(c: &Client, token: &str) -> Result<()> {
    let field = c
        .wait()
        .at_most(Duration::from_secs(15))
        .for_element(Locator::Css("#token"))
        .await
        .context("the login form")?;
    field.send_keys(token).await?;
    c.find(Locator::Css("#login-button")).await?.click().await?;
    Ok(())
}

/// The seat's running session in the admin API, and its VM's pid (from its record).
fn session_of_seat(ns: &str, state: &std::path::Path) -> Result<Option<(String, u64)>> {
    let (code, list) = admin_api(ns, "GET", "/api/v1/sessions", None)?;
    if code != 200 {
        bail!("listing sessions answered {code}: {list}");
    }
    let Some(s) = list
        .as_array()
        .and_then(|l| l.iter().find(|s| s["seat"] == CLIENT_MAC))
    else {
        return Ok(None);
    };
    let id = s["id"].as_str().unwrap_or_default().to_string();
    let rec = std::fs::read_to_string(state.join(&id).join("session.json")).unwrap_or_default();
    let pid = serde_json::from_str::<Value>(&rec)
        .ok()
        .and_then(|v| v["pid"].as_u64())
        .unwrap_or(0);
    Ok(Some((id, pid)))
}

/// `/metrics` after the boot, read by Prometheus' own parser and linter.
fn metrics_check(ns: &str) -> Result<()> {
    let text = crate::e2e::metrics(ns)?;
    let mut p = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("promtool (Debian's prometheus package)")?;
    {
        use std::io::Write;
        p.stdin
            .take()
            .context("promtool's stdin")?
            .write_all(text.as_bytes())?;
    }
    let r = p.wait_with_output()?;
    if !r.status.success() {
        bail!(
            "promtool check metrics refused /metrics: {}{}",
            String::from_utf8_lossy(&r.stdout),
            String::from_utf8_lossy(&r.stderr)
        );
    }
    for want in [
        "vdd_boot_stage_duration_seconds_count{stage=\"pid1\"}",
        "vdd_boot_stage_duration_seconds_count{stage=\"viewer_connected\"}",
        "vdd_dhcp_acks_total",
        "vdd_http_sent_bytes_total",
        "vdd_nbd_read_bytes_total",
        "vdd_api_requests_total{route=\"/api/v1/sessions\",status=\"201\"}",
        "vdd_guest_memory_budget_bytes",
    ] {
        if !text.lines().any(|l| l.starts_with(want)) {
            bail!("/metrics has no {want}:\n{text}");
        }
    }
    eprintln!(
        "xtask e2e panel: /metrics ({} series) passes promtool check metrics",
        text.lines().filter(|l| !l.starts_with('#')).count()
    );
    Ok(())
}
