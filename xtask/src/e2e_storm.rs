//! `cargo xtask e2e storm`: a room switched on at once, with real firmware. N QEMU thin
//! clients on taps of one lab, powered on together, PXE-boot from vdd through their iPXE
//! ROMs, each picks the demo guest, and each one's own screen (QMP screendump) shows its
//! guest over VNC. Then: N distinct addresses, N sessions of N seats on N VNC ports, and
//! N one-time passwords of which each opens its own display and no other.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::e2e::{self, Served};
use crate::lab::SERVER_IP;
use crate::qemu::{Opts, Qemu};

/// What one storm measured, times since the seats were powered on.
pub struct Report {
    pub seats: usize,
    /// Per seat: the menu on its console, and its guest on its screen.
    pub menu: Vec<Duration>,
    pub guest: Vec<Duration>,
    pub addresses: Vec<String>,
    pub screenshots: Vec<PathBuf>,
}

/// The serial-console markers each seat passes, in order.
const MARKS: [&str; 3] = [
    "vdd-boot-menu: dhcp bound ",
    "vdd-boot-menu: menu:",
    "vdd-boot-menu: viewer: connecting",
];

/// How long a room of TCG thin clients on a shared 2-core machine may take.
fn deadline(seats: usize) -> Duration {
    Duration::from_secs(600 + 300 * seats as u64)
}

fn seat_mac(i: usize) -> String {
    format!("52:54:00:e2:e1:{:02x}", i & 0xff)
}

pub fn run(seats: usize) -> Result<Report> {
    if !(1..=16).contains(&seats) {
        bail!("--seats 1..=16 (each is a QEMU thin client plus a guest VM)");
    }
    crate::initramfs::build(None)?;
    crate::image::thin_client(false)?;
    crate::image::guest_demo(false)?;
    let mut s = e2e::serve(
        "e2estm",
        "console=ttyS0 vdd.autopick=demo",
        e2e::Starts::Cold,
    )?;
    let result = storm_in(&mut s, seats);
    s.finish(result)
}

fn storm_in(s: &mut Served, n: usize) -> Result<Report> {
    let taps = (0..n)
        .map(|_| s.lab.add_tap())
        .collect::<Result<Vec<_>>>()?;
    // Every seat ready to go before the first one is switched on (the accelerator
    // probe, up to 5 s, comes before the first QEMU).
    crate::qemu::accel();
    let t0 = Instant::now();
    let mut qs = Vec::new();
    for (i, tap) in taps.into_iter().enumerate() {
        qs.push(Qemu::start(&Opts {
            netns: Some(s.lab.server_ns.clone()),
            tap: Some(tap),
            mac: Some(seat_mac(i)),
            memory_mib: 768,
            dir: s.dir.join(format!("seat{i}")),
            ..Opts::default()
        })?);
    }
    eprintln!(
        "xtask e2e storm: {n} thin clients switched on within {:.0} ms; consoles in {}/seat*/serial.log",
        t0.elapsed().as_secs_f64() * 1000.0,
        s.dir.display()
    );
    let end_by = t0 + deadline(n);
    // Each seat's markers, as they appear.
    let mut seen: Vec<Vec<Option<Duration>>> = vec![vec![None; MARKS.len()]; n];
    while seen.iter().any(|m| m.iter().any(Option::is_none)) {
        for (i, q) in qs.iter_mut().enumerate() {
            let console = q.serial();
            for (k, mark) in MARKS.iter().enumerate() {
                if seen[i][k].is_none() && console.contains(mark) {
                    seen[i][k] = Some(t0.elapsed());
                    eprintln!(
                        "xtask e2e storm: seat {i}: {:<36} at {:>6.1} s",
                        mark.trim_start_matches("vdd-boot-menu: ").trim(),
                        t0.elapsed().as_secs_f64()
                    );
                }
            }
            if !q.running() {
                bail!("seat {i}'s QEMU exited; its console:\n{}", tail(&console));
            }
        }
        if Instant::now() > end_by {
            let late: Vec<usize> = (0..n)
                .filter(|i| seen[*i].iter().any(Option::is_none))
                .collect();
            bail!(
                "seats {late:?} did not reach the viewer within {:?}; seat {}'s console:\n{}",
                deadline(n),
                late[0],
                tail(&qs[late[0]].serial())
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }

    // Each seat's own screen shows its guest (the demo guest's magenta screen).
    let shots = crate::image::repo_root().join("target/e2e");
    std::fs::create_dir_all(&shots)?;
    let mut guest: Vec<Option<Duration>> = vec![None; n];
    while guest.iter().any(Option::is_none) {
        for (i, q) in qs.iter().enumerate() {
            if guest[i].is_some() {
                continue;
            }
            let ppm = s.dir.join(format!("seat{i}/screen.ppm"));
            q.screendump(&ppm)?;
            if e2e::magenta_share(&std::fs::read(&ppm)?)? >= e2e::GUEST_SCREEN_SHARE {
                guest[i] = Some(t0.elapsed());
                eprintln!(
                    "xtask e2e storm: seat {i}: {:<36} at {:>6.1} s",
                    "guest on its screen",
                    t0.elapsed().as_secs_f64()
                );
            }
        }
        if Instant::now() > end_by {
            for (i, q) in qs.iter().enumerate().filter(|(i, _)| guest[*i].is_none()) {
                let _ = q.screendump(&shots.join(format!("storm-seat{i}-failed.png")));
            }
            bail!(
                "the guest never showed on seats {:?}; their screens are in {}",
                (0..n).filter(|i| guest[*i].is_none()).collect::<Vec<_>>(),
                shots.display()
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let mut screenshots = Vec::new();
    for (i, q) in qs.iter().enumerate() {
        let p = shots.join(format!("storm-seat{i}.png"));
        q.screendump(&p)?;
        screenshots.push(p);
    }

    // Distinct addresses, as each seat's boot-menu was bound.
    let addresses: Vec<String> = qs
        .iter()
        .map(|q| {
            let c = q.serial();
            let at = c.find(MARKS[0]).map(|p| p + MARKS[0].len()).unwrap_or(0);
            c[at..]
                .split(['/', ' ', '\n'])
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    distinct("address", &addresses)?;
    check_sessions(s, n)?;
    drop(qs);
    Ok(Report {
        seats: n,
        menu: seen.iter().map(|m| m[1].unwrap_or_default()).collect(),
        guest: guest.into_iter().map(Option::unwrap_or_default).collect(),
        addresses,
        screenshots,
    })
}

/// N sessions of N seats on N ports; N fresh passwords (the admin asks for them now, the
/// seats' viewers stay connected), each opening its own display and no other.
fn check_sessions(s: &Served, n: usize) -> Result<()> {
    let ns = s.lab.server_ns.clone();
    let (code, list) = e2e::admin_api(&ns, "GET", "/api/v1/sessions", None)?;
    let list = list.as_array().cloned().unwrap_or_default();
    if code != 200 || list.len() != n {
        bail!("the admin sees {} sessions ({code}), not {n}", list.len());
    }
    let field = |k: &str| -> Vec<String> { list.iter().map(|x| x[k].to_string()).collect() };
    distinct("session", &field("id"))?;
    distinct("seat", &field("seat"))?;
    distinct("VNC port", &field("port"))?;
    let mut displays = Vec::new();
    for x in &list {
        let id = x["id"].as_str().context("a session id")?;
        let (code, fresh) = e2e::admin_api(
            &ns,
            "POST",
            &format!("/api/v1/sessions/{id}/password"),
            Some("{}"),
        )?;
        let pw = fresh["password"].as_str().map(String::from);
        let port = x["port"].as_u64().context("a port")? as u16;
        match (code, pw) {
            (200, Some(pw)) => displays.push((SocketAddr::from((SERVER_IP, port)), pw)),
            _ => bail!("a fresh password for {id} answered {code}: {fresh}"),
        }
    }
    distinct(
        "password",
        &displays.iter().map(|d| d.1.clone()).collect::<Vec<_>>(),
    )?;
    for (i, (addr, _)) in displays.iter().enumerate() {
        for (j, (_, pw)) in displays.iter().enumerate() {
            let (addr, pw) = (*addr, pw.clone());
            let opened = e2e::in_netns(&ns, move || crate::rfb::vnc_auth(addr, Some(&pw)))?;
            if opened != (i == j) {
                bail!(
                    "session {j}'s password {} session {i}'s display",
                    if opened { "opened" } else { "did not open" }
                );
            }
        }
    }
    Ok(())
}

fn distinct(what: &str, v: &[String]) -> Result<()> {
    let mut u = v.to_vec();
    u.sort();
    u.dedup();
    if u.len() != v.len() || v.iter().any(|x| x.is_empty() || x == "null") {
        bail!(
            "the seats' {what}s are not {} distinct ones: {v:?}",
            v.len()
        );
    }
    Ok(())
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
