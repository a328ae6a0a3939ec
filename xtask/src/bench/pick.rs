//! `cargo xtask bench pick`: how soon a clean guest is on the seat's screen after the
//! pick. A measurement, not a test: nothing here is a timed assertion.
//!
//! The release vdd serves a lab (server namespace, bridge 10.77.0.1/24, full DHCP); one
//! seat is a client namespace with a fixed MAC and address. From inside it, pick after
//! pick goes through the real API (`POST /api/v1/sessions` with the seat's screen, as
//! boot-menu sends it), and a VNC client of our own (`rfb.rs`) watches the session's
//! display until the guest's desktop is there: the demo guest's magenta covering most of
//! the screen. Three guests on the same image, one per way to start:
//!
//! - `cold`: booted at the pick;
//! - `warm`: one warm VM waits for the pick (`warm = 1`), refilled from a saved state;
//! - `saved`: resumed from the saved state (`start = "saved"`), no VM kept running.
//!
//! Each pick is followed by a reset (warm and saved: `POST .../reset`, to the new VM's
//! first frame) and an end; before the next pick the bench waits until the pool is full
//! again (the refill time) or the state is saved. With `images/out/guest-x11.qcow2`, an
//! X11 guest with `warm = 1` too: POST to the greeter on `Xvfb -query GUEST` in the seat's
//! namespace (the thin client's part, as `e2e guest-x11` plays it). The memory the server
//! holds for a way is vdd's RSS plus that guest's VMs' (warm, in session, being saved),
//! sampled right before each pick (the cost of waiting ready) and at its highest.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::lab::{self, Lab, SERVER_IP};

#[derive(clap::Args)]
pub struct Args {
    /// Picks per way to start (at least 10 for a p95 worth the name; at most 50).
    #[arg(long, default_value_t = 10)]
    picks: usize,
    /// Picks of the X11 guest (0 skips it; it needs images/out/guest-x11.qcow2).
    #[arg(long, default_value_t = 10)]
    x11_picks: usize,
    /// Only these ways (comma-separated: cold, warm, saved, x11); default all.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Use this vdd binary instead of building target/release/vdd.
    #[arg(long)]
    vdd: Option<PathBuf>,
}

const TOKEN: &str = "bench-pick-admin-token-0123";
const SEAT_MAC: &str = "52:54:00:be:be:01";
const SEAT_IP: &str = "10.77.0.50";
/// The seat's monitor: the size its guests start at.
const SCREEN: (u32, u32) = (1920, 1080);
/// Longest one pick (or one refill) may take before the run fails.
const LIMIT: Duration = Duration::from_secs(300);

/// One way to start, measured.
#[derive(Default)]
struct Row {
    name: String,
    how: String,
    answer: Vec<f64>,
    frame: Vec<f64>,
    reset: Vec<f64>,
    refill: Vec<f64>,
    rss_ready: Vec<f64>,
    rss_max: f64,
}

pub fn run(a: Args) -> Result<()> {
    let picks = a.picks.clamp(1, 50);
    let want = |w: &str| a.only.is_empty() || a.only.iter().any(|o| o == w);
    if let Some(why) = lab::missing(&["qemu-system-x86_64", "qemu-img"]) {
        bail!("bench pick needs: {why}");
    }
    let vdd = super::vdd_release(a.vdd)?;
    let demo = crate::image::guest_demo(false)?;
    let x11_image = crate::image::repo_root().join("images/out/guest-x11.qcow2");
    let x11 = want("x11") && a.x11_picks > 0 && x11_image.is_file();
    if want("x11") && a.x11_picks > 0 && !x11 {
        eprintln!("bench: no X11 guest (cargo xtask image guest-x11 builds it); skipping it");
    }
    if x11 {
        if let Some(why) = lab::missing(&["Xvfb", "xwd", "xwdtopnm"]) {
            bail!("the X11 picks need: {why} (cargo xtask deps bench)");
        }
    }

    let mut lab = Lab::new("pick")?;
    let dir = std::env::temp_dir().join(format!("{}-work", lab.name));
    std::fs::create_dir_all(&dir)?;
    let seat = lab.add_client(Some(SEAT_MAC))?;
    lab::ip([
        "-n",
        &seat.ns,
        "addr",
        "add",
        &format!("{SEAT_IP}/24"),
        "dev",
        "eth0",
    ])?;
    let cfg = dir.join("config.toml");
    std::fs::write(
        &cfg,
        config(&dir, &demo, x11.then_some(x11_image.as_path())),
    )?;
    let log = std::fs::File::create(dir.join("vdd.log"))?;
    let mut cmd = Lab::cmd(&lab.server_ns, &vdd);
    cmd.args(["serve", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let vdd_pid = lab.spawn("vdd", cmd)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(dir.join("vdd.log"))
        .unwrap_or_default()
        .contains("vdd serving")
    {
        if !lab.is_running(vdd_pid) || Instant::now() > deadline {
            bail!(
                "vdd did not start: {}",
                std::fs::read_to_string(dir.join("vdd.log")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let state = dir.join("state");
    let ns = seat.ns.clone();
    let ways: Vec<(&str, &str)> = [
        ("cold", "cold boot at the pick"),
        ("warm", "warm pool hit (warm = 1)"),
        ("saved", "saved state (start = \"saved\")"),
    ]
    .into_iter()
    .filter(|(name, _)| want(name))
    .collect();
    let x11_picks_n = a.x11_picks.clamp(1, 50);
    // A way that fails is reported with the others' figures; its logs are kept.
    let result = crate::e2e::in_netns(&ns.clone(), move || {
        let mut rows = Vec::new();
        let mut failed = Vec::new();
        for (name, how) in ways {
            match vnc_picks(name, name, how, picks, vdd_pid, &state) {
                Ok(r) => rows.push(r),
                Err(e) => failed.push(format!("{how}: {e:#}")),
            }
        }
        if x11 {
            match x11_picks(&ns, x11_picks_n, vdd_pid, &state) {
                Ok(r) => rows.push(r),
                Err(e) => failed.push(format!("X11: {e:#}")),
            }
        }
        Ok((rows, failed))
    });
    let (rows, failed) = result?;
    let status = crate::e2e::in_netns(&seat.ns, || api("GET", "/api/v1/status", None, None)).ok();
    drop(lab);
    report(&rows, status.as_ref().map(|s| &s.1));
    if failed.is_empty() {
        let _ = std::fs::remove_dir_all(&dir);
        return Ok(());
    }
    for f in &failed {
        eprintln!("bench: failed: {f}");
    }
    bail!(
        "{} of the ways failed; vdd's log is in {}",
        failed.len(),
        dir.display()
    )
}

/// vdd's config: three VNC guests on the demo image, and the X11 guest.
fn config(dir: &Path, demo: &Path, x11: Option<&Path>) -> String {
    let mut c = format!(
        r#"[server]
interface = "br0"
address = "{SERVER_IP}/24"
state_dir = "{state}"
[dhcp]
pool = "10.77.0.100-10.77.0.199"
[tftp]
root = "{dir}"
[http]
admin_token = "{TOKEN}"
[nbd]
enabled = false
[dispatch]
shutdown_timeout = "3s"
max_vms = 8
"#,
        state = dir.join("state").display(),
        dir = dir.display(),
    );
    for (name, extra) in [
        ("cold", ""),
        ("warm", "warm = 1\nstart = \"saved\"\n"),
        ("saved", "start = \"saved\"\n"),
    ] {
        c.push_str(&format!(
            "[[guest]]\nname = \"{name}\"\nimage = \"{}\"\nmemory = \"256M\"\nscreen = \"{}x{}\"\n{extra}",
            demo.display(),
            SCREEN.0,
            SCREEN.1
        ));
    }
    if let Some(img) = x11 {
        c.push_str(&format!(
            "[[guest]]\nname = \"x11\"\ndisplay = \"x11\"\nimage = \"{}\"\nmemory = \"512M\"\nwarm = 1\n",
            img.display()
        ));
    }
    c
}

/// One HTTP/1.1 request to vdd's API from this thread's namespace (the seat's): the
/// status and the JSON body. Seats' requests about a session carry its `key`.
fn api(method: &str, path: &str, body: Option<&Value>, key: Option<&str>) -> Result<(u16, Value)> {
    let mut s =
        TcpStream::connect_timeout(&SocketAddr::from((SERVER_IP, 80)), Duration::from_secs(10))
            .context("connecting to vdd's API")?;
    s.set_read_timeout(Some(LIMIT))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {SERVER_IP}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if path.ends_with("/status") {
        req.push_str(&format!("Authorization: Bearer {TOKEN}\r\n"));
    }
    if let Some(k) = key {
        req.push_str(&format!("X-Vdd-Session-Key: {k}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(&body);
    s.write_all(req.as_bytes())?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    let text = String::from_utf8_lossy(&out);
    let (head, json) = text.split_once("\r\n\r\n").context("no HTTP header")?;
    let code: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no HTTP status")?;
    let v = if json.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(json).with_context(|| format!("not JSON: {json}"))?
    };
    Ok((code, v))
}

fn post_session(guest: &str) -> Result<Value> {
    let body = json!({"guest": guest, "screen": {"width": SCREEN.0, "height": SCREEN.1}});
    let (code, v) = api("POST", "/api/v1/sessions", Some(&body), None)?;
    if code != 201 {
        bail!("POST of {guest} answered {code}: {v}");
    }
    Ok(v)
}

/// Seconds until the session's display shows the demo guest covering most of it.
fn first_frame(s: &Value, t0: Instant) -> Result<f64> {
    let port = s["port"].as_u64().context("no port")? as u16;
    let pw = s["password"].as_str().context("no password")?;
    crate::rfb::watch((SERVER_IP, port).into(), pw, LIMIT, |f| {
        f.magenta_share() > 0.8
    })?;
    Ok(t0.elapsed().as_secs_f64())
}

/// Waits until `ready(status)` holds; returns how long that took.
fn wait_status(what: &str, ready: impl Fn(&Value) -> bool) -> Result<f64> {
    let t0 = Instant::now();
    loop {
        let (_, s) = api("GET", "/api/v1/status", None, None)?;
        if ready(&s["sessions"]) {
            return Ok(t0.elapsed().as_secs_f64());
        }
        if t0.elapsed() > LIMIT {
            bail!("{what}: not within {LIMIT:?}; status {s}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The guest is ready for the next pick: its warm VM up, its state saved.
fn ready_for(guest: &str) -> impl Fn(&Value) -> bool + '_ {
    move |s: &Value| {
        let saved = |g: &str| {
            s["saved"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x["guest"] == g))
        };
        match guest {
            "warm" => saved(guest) && s["warm_up"].as_u64() >= Some(1) && s["starting"] == 0,
            "saved" => saved(guest),
            // Every warm VM up (the demo guests' when measured, and the X11 guest's), and
            // the demo guests' states saved: the saves are boots too, and a pick beside
            // them measured the shared CPU, not the pick.
            "x11" => {
                saved("warm")
                    && saved("saved")
                    && s["warm_up"] == s["warm"]
                    && s["warm"].as_u64() >= Some(1)
                    && s["starting"] == 0
            }
            _ => true,
        }
    }
}

fn vnc_picks(
    name: &str,
    guest: &str,
    how: &str,
    picks: usize,
    vdd: u32,
    state: &Path,
) -> Result<Row> {
    let mut row = Row {
        name: name.into(),
        how: how.into(),
        ..Row::default()
    };
    eprintln!("bench: {how}: waiting until it is ready");
    wait_status(guest, ready_for(guest))?;
    let sampler = Sampler::start(vdd, state, guest);
    for i in 0..picks {
        row.rss_ready.push(rss_mib(vdd, state, guest));
        let t0 = Instant::now();
        let s = post_session(guest)?;
        row.answer.push(t0.elapsed().as_secs_f64());
        if s["start"] != name && !(name == "cold" && s["start"] == "boot") {
            eprintln!(
                "bench: pick {} of {guest} started {} (not a {name} start)",
                i + 1,
                s["start"]
            );
        }
        row.frame.push(first_frame(&s, t0)?);
        let id = s["id"].as_str().context("no id")?.to_string();
        let key = s["key"].as_str().context("no key")?.to_string();
        if name != "cold" {
            // A reset: the next warm VM or the saved state again, to its first frame.
            if name == "warm" {
                row.refill
                    .push(wait_status("the refill", ready_for(guest))?);
            }
            let t0 = Instant::now();
            let (code, r) = api(
                "POST",
                &format!("/api/v1/sessions/{id}/reset"),
                None,
                Some(&key),
            )?;
            if code != 200 && code != 201 {
                bail!("reset answered {code}: {r}");
            }
            row.reset.push(first_frame(&r, t0)?);
            let rid = r["id"].as_str().context("no id")?.to_string();
            api(
                "DELETE",
                &format!("/api/v1/sessions/{rid}"),
                None,
                Some(&key),
            )?;
        } else {
            api(
                "DELETE",
                &format!("/api/v1/sessions/{id}"),
                None,
                Some(&key),
            )?;
        }
        wait_status("ready again", ready_for(guest))?;
        eprintln!(
            "bench: {name} pick {}/{picks}: first frame {:.2} s{}",
            i + 1,
            row.frame.last().unwrap_or(&0.0),
            row.reset
                .last()
                .map(|r| format!(", reset {r:.2} s"))
                .unwrap_or_default()
        );
    }
    row.rss_max = sampler.stop();
    Ok(row)
}

fn x11_picks(ns: &str, picks: usize, vdd: u32, state: &Path) -> Result<Row> {
    use crate::e2e_guest_x11::{count_rgb, xwd_ppm, GREETER_BOX_RGB, GREETER_ROOT_RGB};
    let mut row = Row {
        name: "x11".into(),
        how: "X11 greeter, warm pool hit (warm = 1)".into(),
        ..Row::default()
    };
    eprintln!("bench: {}: waiting until it is ready", row.how);
    wait_status("x11", ready_for("x11"))?;
    let sampler = Sampler::start(vdd, state, "x11");
    let ppm = std::env::temp_dir().join(format!("bench-pick-{}.ppm", std::process::id()));
    for i in 0..picks {
        row.rss_ready.push(rss_mib(vdd, state, "x11"));
        let t0 = Instant::now();
        let s = post_session("x11")?;
        row.answer.push(t0.elapsed().as_secs_f64());
        let id = s["id"].as_str().context("no id")?.to_string();
        let key = s["key"].as_str().context("no key")?.to_string();
        let mut s = s;
        while s["state"] != "ready" {
            if s["state"] == "failed" || t0.elapsed() > LIMIT {
                bail!("the X11 session did not become ready: {s}");
            }
            std::thread::sleep(Duration::from_millis(100));
            s = api("GET", &format!("/api/v1/sessions/{id}"), None, Some(&key))?.1;
        }
        let host = s["host"].as_str().context("no guest address")?.to_string();
        // Display :0, as on a thin client: the guests' tap filter lets X11 through to
        // TCP 6000 only. Its lock and socket files go to a /tmp of its own (a private
        // mount namespace), so an X server :0 elsewhere on this machine is no obstacle;
        // the screenshots reach it over TCP. No -once: the screenshot's own connection
        // ending before the greeter's would end the server.
        let display = 0;
        let xlog = state.with_file_name("xvfb.log");
        let mut xvfb = std::process::Command::new("unshare")
            .args(["--mount", "sh", "-c"])
            .arg(format!(
                "mount -t tmpfs vdd-bench /tmp && exec Xvfb :{display} -query {host} -listen tcp -ac \
                 -screen 0 1024x768x24 -fp built-ins"
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&xlog)?)
            .spawn()
            .context("starting Xvfb")?;
        let greeter = loop {
            if xwd_ppm(ns, "127.0.0.1:0", &ppm).is_ok() {
                let px = std::fs::read(&ppm)?;
                let all = 1024 * 768;
                if count_rgb(&px, GREETER_ROOT_RGB)? * 4 >= all
                    && count_rgb(&px, GREETER_BOX_RGB)? * 20 >= all
                {
                    break t0.elapsed().as_secs_f64();
                }
            }
            let ended = xvfb.try_wait()?;
            if t0.elapsed() > LIMIT || ended.is_some() {
                let _ = xvfb.kill();
                let _ = xvfb.wait();
                let said = std::fs::read_to_string(&xlog).unwrap_or_default();
                let tail: Vec<&str> = said.lines().rev().take(8).collect();
                bail!(
                    "no greeter on Xvfb within {:.0} s (Xvfb {}); it said: {}",
                    t0.elapsed().as_secs_f64(),
                    ended.map_or("still running".to_string(), |e| format!("ended: {e}")),
                    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let _ = xvfb.kill();
        let _ = xvfb.wait();
        row.frame.push(greeter);
        api(
            "DELETE",
            &format!("/api/v1/sessions/{id}"),
            None,
            Some(&key),
        )?;
        row.refill
            .push(wait_status("the X11 refill", ready_for("x11"))?);
        eprintln!("bench: x11 pick {}/{picks}: greeter {greeter:.2} s", i + 1);
    }
    let _ = std::fs::remove_file(&ppm);
    row.rss_max = sampler.stop();
    Ok(row)
}

/// MiB of RSS of process `pid`.
fn rss_of(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// MiB of RSS of vdd and of `guest`'s VMs: its sessions' and warm ones (by their records
/// in the state folder) and one booted to be saved (its command line names the guest's
/// folder of saved states). The other guests' VMs are another way's cost.
fn rss_mib(vdd: u32, state: &Path, guest: &str) -> f64 {
    let sessions: f64 = std::fs::read_dir(state.join("sessions"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("session.json")).ok())
        .filter_map(|b| serde_json::from_slice::<Value>(&b).ok())
        .filter(|r| r["guest"] == guest)
        .filter_map(|r| r["pid"].as_u64())
        .map(|pid| rss_of(pid as u32))
        .sum();
    let saving = state.join("saved").join(guest).join("new-");
    let saving = saving.display().to_string();
    let savers: f64 = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&saving))
        })
        .map(rss_of)
        .sum();
    rss_of(vdd) + sessions + savers
}

/// Samples [`rss_mib`] every 200 ms on a thread of its own, keeping the highest.
struct Sampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<f64>,
}

impl Sampler {
    fn start(vdd: u32, state: &Path, guest: &str) -> Sampler {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (s, state, guest) = (stop.clone(), state.to_path_buf(), guest.to_string());
        let thread = std::thread::spawn(move || {
            let mut max: f64 = 0.0;
            while !s.load(std::sync::atomic::Ordering::SeqCst) {
                max = max.max(rss_mib(vdd, &state, &guest));
                std::thread::sleep(Duration::from_millis(200));
            }
            max
        });
        Sampler { stop, thread }
    }

    fn stop(self) -> f64 {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.join().unwrap_or(0.0)
    }
}

/// The `p`th percentile (nearest rank).
fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

fn report(rows: &[Row], status: Option<&Value>) {
    println!(
        "\nbench pick: seat screen {}x{}, seconds (p50 / p95); memory = MiB RSS of vdd and the way's VMs",
        SCREEN.0, SCREEN.1
    );
    println!(
        "{:<40} {:>15} {:>17} {:>15} {:>15} {:>13} {:>10}",
        "start",
        "POST answered",
        "to first frame",
        "reset to frame",
        "refill",
        "MiB waiting",
        "MiB max"
    );
    let two = |v: &[f64]| {
        if v.is_empty() {
            "-".to_string()
        } else {
            format!("{:.2} / {:.2}", pct(v, 50.0), pct(v, 95.0))
        }
    };
    for r in rows {
        println!(
            "{:<40} {:>5} {:>15} {:>17} {:>15} {:>15} {:>9.0} {:>9.0}",
            r.how,
            r.frame.len(),
            two(&r.answer),
            two(&r.frame),
            two(&r.reset),
            two(&r.refill),
            pct(&r.rss_ready, 50.0),
            r.rss_max
        );
    }
    if let Some(cold) = rows.iter().find(|r| r.name == "cold") {
        for r in rows
            .iter()
            .filter(|r| r.name == "warm" || r.name == "saved")
        {
            println!(
                "  {}: first frame {:.1}x sooner than a cold boot (p50)",
                r.name,
                pct(&cold.frame, 50.0) / pct(&r.frame, 50.0)
            );
        }
    }
    if let Some(saved) = status.and_then(|s| s["sessions"]["saved"].as_array()) {
        for s in saved {
            println!(
                "  saved state of {}: {:.0} MiB RAM and devices + {:.1} MiB frozen disk; booted in {:.1} s, saved in {:.1} s",
                s["guest"].as_str().unwrap_or("?"),
                s["state_mib"].as_f64().unwrap_or(0.0),
                s["disk_mib"].as_f64().unwrap_or(0.0),
                s["boot_secs"].as_f64().unwrap_or(0.0),
                s["save_secs"].as_f64().unwrap_or(0.0)
            );
        }
    }
}
