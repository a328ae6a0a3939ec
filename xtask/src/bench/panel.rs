//! `cargo xtask bench panel`: what the admin's panel costs the server. vdd (release) in a
//! lab namespace runs N demo-guest sessions (started through the admin API for made-up
//! seats); vdd's CPU time is read from /proc over the same span with nobody looking,
//! with headless Chromium showing the Room (N thumbnails, 160 px), and with it showing
//! the Sessions page (N screens, 640 px), the window tall enough that every screen is
//! in view (the page refreshes only the screens in view). QEMU's CPU time is shown too:
//! a screendump is work for the VM's process as well.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use fantoccini::Locator;

use crate::browser::{exists, until, Driver};
use crate::e2e::{admin_api, in_netns, serve_with, Starts, ADMIN_TOKEN};
use crate::lab::SERVER_IP;

#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// Sessions (demo-guest VMs) on screen.
    #[arg(long, default_value_t = 10)]
    sessions: usize,
    /// Seconds each phase is measured (at most 600).
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// A vdd binary to measure instead of building the release one.
    #[arg(long)]
    vdd: Option<std::path::PathBuf>,
}

/// CPU seconds (user + system) of a process so far.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let f: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(vec![], |(_, r)| r.split_whitespace().collect());
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| f.get(i)?.parse::<f64>().ok())
        .sum();
    ticks / 100.0
}

/// The pids of the VMs this vdd started (its children; others' vdds run VMs too).
fn vm_pids(vdd: u32) -> Vec<u32> {
    let Ok(d) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    d.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|st| {
                st.lines()
                    .find_map(|l| l.strip_prefix("PPid:"))
                    .is_some_and(|p| p.trim() == vdd.to_string())
            })
        })
        .collect()
}

/// vdd's and the VMs' CPU seconds over `secs`.
fn measure(vdd: u32, vms: &[u32], secs: u64) -> (f64, f64) {
    let (v0, q0): (f64, f64) = (cpu_seconds(vdd), vms.iter().map(|p| cpu_seconds(*p)).sum());
    std::thread::sleep(Duration::from_secs(secs));
    let (v1, q1): (f64, f64) = (cpu_seconds(vdd), vms.iter().map(|p| cpu_seconds(*p)).sum());
    (v1 - v0, q1 - q0)
}

fn screenshots_taken(ns: &str) -> Result<f64> {
    let out = crate::lab::Lab::cmd(ns, "curl")
        .args(["-sf", "-m", "30", "-H"])
        .arg(format!("Authorization: Bearer {ADMIN_TOKEN}"))
        .arg(format!("http://{SERVER_IP}/metrics"))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix("vdd_panel_screenshots_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0))
}

pub fn run(a: Args) -> Result<()> {
    if a.sessions == 0 || a.sessions > 16 || a.seconds == 0 || a.seconds > 600 {
        bail!("--sessions 1..=16 and --seconds 1..=600");
    }
    crate::image::guest_demo(false)?;
    let vdd = super::vdd_release(a.vdd.clone())?;
    let mut s = serve_with("bpanel", "console=ttyS0", Starts::Cold, &vdd)?;
    let r = run_in(&mut s, &a);
    s.finish(r)
}

fn run_in(s: &mut crate::e2e::Served, a: &Args) -> Result<()> {
    let ns = s.lab.server_ns.clone();
    for i in 0..a.sessions {
        let body = format!(r#"{{"guest": "demo", "seat": "52:54:00:bb:00:{i:02x}"}}"#);
        let (code, v) = admin_api(&ns, "POST", "/api/v1/sessions", Some(&body))?;
        if code != 201 {
            bail!("starting session {i} answered {code}: {v}");
        }
    }
    let vms = vm_pids(s.vdd_pid);
    eprintln!(
        "bench panel: {} sessions running ({} VM processes); letting the guests boot for 20 s",
        a.sessions,
        vms.len()
    );
    std::thread::sleep(Duration::from_secs(20));
    let vdd_pid = s.vdd_pid;
    let secs = a.seconds;
    let idle = measure(vdd_pid, &vms, secs);
    let shots0 = screenshots_taken(&ns)?;
    let driver = Driver::start(&ns, &s.dir)?;
    let n = a.sessions;
    let ns2 = ns.clone();
    let (room, shots_room, large, shots_large) = in_netns(&ns.clone(), move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            // Tall enough for every screen of the Sessions page to be in view.
            let c = driver.connect(1500, 400 * n as u32 + 400).await?;
            c.goto(&format!("http://{SERVER_IP}/admin/")).await?;
            c.wait()
                .at_most(Duration::from_secs(15))
                .for_element(Locator::Css("#token"))
                .await?
                .send_keys(ADMIN_TOKEN)
                .await?;
            c.find(Locator::Css("#login-button")).await?.click().await?;
            let c = &c;
            until(
                "every thumbnail in the room",
                Duration::from_secs(30),
                Duration::from_millis(300),
                || async move {
                    let n_imgs = c.find_all(Locator::Css("img.screen.thumb")).await?.len();
                    Ok((n_imgs >= n).then_some(()))
                },
            )
            .await?;
            // Blocking this thread is fine: the browser runs on its own while we wait.
            let room = measure(vdd_pid, &vms, secs);
            let shots_room = screenshots_taken(&ns2)?;
            c.goto(&format!("http://{SERVER_IP}/admin/#/sessions"))
                .await?;
            until(
                "every screen on the sessions page",
                Duration::from_secs(30),
                Duration::from_millis(300),
                || async move { Ok(exists(c, "img.screen.large").await?.then_some(())) },
            )
            .await?;
            let large = measure(vdd_pid, &vms, secs);
            let shots_large = screenshots_taken(&ns2)?;
            let _ = c.clone().close().await;
            drop(driver);
            anyhow::Ok((room, shots_room, large, shots_large))
        })
    })
    .context("the browser's part")?;
    let pct = |cpu: f64| 100.0 * cpu / secs as f64;
    println!(
        "bench panel: {} demo-guest sessions, {secs} s per phase, vdd {}",
        a.sessions, vdd_pid
    );
    println!(
        "  {:<44} {:>12} {:>10} {:>14}",
        "phase", "vdd CPU", "VMs' CPU", "screens/s"
    );
    println!(
        "  {:<44} {:>9.2} s {:>8.1} s {:>14}",
        "nobody looking", idle.0, idle.1, "0"
    );
    println!(
        "  {:<44} {:>9.2} s {:>8.1} s {:>14.2}",
        format!("Room: {n} thumbnails (160 px)"),
        room.0,
        room.1,
        (shots_room - shots0) / secs as f64
    );
    println!(
        "  {:<44} {:>9.2} s {:>8.1} s {:>14.2}",
        format!("Sessions: {n} screens (640 px)"),
        large.0,
        large.1,
        (shots_large - shots_room) / secs as f64
    );
    println!(
        "  vdd's share of one core: nobody {:.2}%, room {:.2}%, sessions {:.2}%",
        pct(idle.0),
        pct(room.0),
        pct(large.0)
    );
    Ok(())
}
