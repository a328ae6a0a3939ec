//! `cargo xtask e2e x11`: the thin client PXE-boots from the real vdd and autopicks the
//! X11 guest. vdd starts the guest's VM with a tap on the lab bridge and a MAC reserved
//! in its own DHCP, and waits for the guest's display manager (xdm) to answer XDMCP;
//! boot-menu then runs `Xorg -query GUEST` in its NBD root. The test's screenshot of the
//! thin client's own screen must show xdm's greeter, drawn by the guest: the guest's
//! Xsetup paints the root window #1e5aa0 (images/guest-x11/README.md) with the login
//! box in the middle. Then the test logs in as `guest` on the thin client's keyboard, sees
//! the guest's xterm, types `exit`: the X server ends with the session, the thin client
//! ends the session on vdd, the menu comes back, and the guest's tap is gone.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::e2e::{
    admin_api, boot_stages, follow_stages, serve, thin_client, BootPath, Stage, Starts,
};
use crate::image::repo_root;
use crate::qemu::Qemu;

/// The root window colour the guest's xdm paints (images/guest-x11).
pub const GREETER_RGB: [u8; 3] = [0x1e, 0x5a, 0xa0];

/// A decoded 8-bit P6 PPM: width, height and RGB bytes (`qemu_ctl::ppm`).
pub fn parse_ppm(ppm: &[u8]) -> Result<(usize, usize, &[u8])> {
    let i = qemu_ctl::ppm::parse(ppm)?;
    Ok((i.width, i.height, i.rgb))
}

/// What a screenshot shows of the greeter: the share of the screen in the guest's
/// root colour, and whether the middle of the screen (where xdm puts its login box) is
/// something else. Small tolerance: a 16-bit X server rounds colours.
pub fn greeter_on_screen(ppm: &[u8]) -> Result<(f64, bool)> {
    let (w, h, px) = parse_ppm(ppm)?;
    let near = |p: &[u8]| p.iter().zip(GREETER_RGB).all(|(a, b)| a.abs_diff(b) <= 8);
    let blue = px.chunks_exact(3).filter(|p| near(p)).count();
    let share = blue as f64 / (w * h).max(1) as f64;
    // A 9x9 grid around the centre: the login box covers it, the background does not.
    let mut boxed = 0;
    for dy in -4i64..=4 {
        for dx in -4i64..=4 {
            let x = (w as i64 / 2 + dx * 8).clamp(0, w as i64 - 1) as usize;
            let y = (h as i64 / 2 + dy * 8).clamp(0, h as i64 - 1) as usize;
            let o = (y * w + x) * 3;
            if !near(&px[o..o + 3]) {
                boxed += 1;
            }
        }
    }
    Ok((share, boxed >= 60))
}

/// What `cargo xtask e2e x11` measured.
pub struct X11Report {
    /// How vdd started the session's VM: "warm", "boot".
    pub start: String,
    pub stages: Vec<(String, Duration)>,
    /// From the pick on the thin client to the greeter on its screen.
    pub pick_to_greeter: Duration,
    /// From the pick to vdd's "ready" (XDMCP Willing), as boot-menu saw it.
    pub pick_to_ready: Duration,
    pub screenshot: PathBuf,
    /// The guest's desktop after the login, on the thin client's screen.
    pub desktop: PathBuf,
    /// From typing the user name to the xterm on the thin client's screen.
    pub login_to_desktop: Duration,
    /// From typing `exit` to the menu on the thin client again.
    pub logout_to_menu: Duration,
}

pub fn x11() -> Result<X11Report> {
    crate::initramfs::build(None)?;
    crate::image::thin_client(false)?;
    crate::image::guest_x11(false)?;
    let mut s = serve("e2ex", "console=ttyS0 vdd.autopick=x11", Starts::X11)?;
    let result = x11_in(&mut s);
    s.finish(result)
}

fn x11_in(s: &mut crate::e2e::Served) -> Result<X11Report> {
    let mut q = thin_client(s, BootPath::Ipxe)?;
    eprintln!(
        "xtask e2e: x11 boot started; serial console in {}",
        q.serial_log.display()
    );
    let st = |name, marker, secs| Stage {
        name,
        marker,
        timeout: Duration::from_secs(secs),
    };
    let mut stages = boot_stages(BootPath::Ipxe);
    stages.push(st(
        "guest's xdm answers XDMCP",
        "vdd-boot-menu: x11: x11 is ready at",
        300,
    ));
    stages.push(st("Xorg -query started", "vdd-boot-menu: x11: asking", 30));
    let times = follow_stages(&mut q, &stages)?;
    let at = |prefix: &str| {
        times
            .iter()
            .find(|(n, _)| n.starts_with(prefix))
            .map(|(_, t)| *t)
            .unwrap_or_default()
    };
    let picked = at("guest picked");
    let ready = at("guest's xdm");

    // The session as the admin sees it: an XDMCP session at the guest's own address,
    // with the guest's tap on the lab bridge.
    let ns = s.lab.server_ns.clone();
    let (code, list) = admin_api(&ns, "GET", "/api/v1/sessions", None)?;
    let first = list.get(0).cloned().context("no session listed")?;
    if code != 200 || first["protocol"] != "xdmcp" || first["state"] != "ready" {
        bail!("unexpected session list ({code}): {list}");
    }
    let id = first["id"].as_str().context("no id")?.to_string();
    let guest_ip = first["host"]
        .as_str()
        .context("no guest address")?
        .to_string();
    // The session's tap (vdd's `lan::tap_name`: the prefix and the id's first 11
    // characters); the warm pool's VMs have taps of their own.
    let tap = format!("vdt-{}", &id[..id.len().min(11)]);
    let on_bridge = crate::lab::vdd_taps(&ns)?;
    if !on_bridge.contains(&tap) {
        bail!("want the session's tap {tap} on the bridge, found {on_bridge:?}");
    }
    eprintln!(
        "xtask e2e: session {id} ({} start): guest at {guest_ip}, tap {tap} on {}",
        first["start"].as_str().unwrap_or("?"),
        crate::lab::BRIDGE
    );
    let start = first["start"].as_str().unwrap_or("?").to_string();

    let (greeter_at, screenshot) = wait_for_greeter(&q, &s.dir)?;

    // Log in on the thin client's own keyboard: the guest's session (twm and an xterm)
    // draws on the thin client's screen.
    let t0 = Instant::now();
    q.type_text("guest\n")?;
    std::thread::sleep(Duration::from_secs(1));
    q.type_text("guest\n")?;
    let desktop = wait_for_desktop(&q, &s.dir)?;
    let login_to_desktop = t0.elapsed();

    // Log out: `exit` in the xterm ends the session (twm focuses the window under the
    // pointer, which X put in the middle of the screen, inside the xterm). The X server
    // (-once) ends with the session, the thin client ends the session on vdd, and the
    // menu is back.
    let t0 = Instant::now();
    q.type_text("exit\n")?;
    if let Err(e) = q.wait_for(
        "vdd-boot-menu: x11: X server ended",
        Duration::from_secs(90),
    ) {
        let failed = repo_root().join("target/e2e/x11-logout-failed.png");
        let _ = q.screendump(&failed);
        return Err(e).context(format!(
            "the thin client's X server did not end after the logout; its screen: {}",
            failed.display()
        ));
    }
    q.wait_for(
        &format!("vdd-boot-menu: session {id} ended"),
        Duration::from_secs(30),
    )
    .context("the thin client did not end its session")?;
    q.wait_for("back to the menu", Duration::from_secs(30))
        .context("the menu did not come back")?;
    let logout_to_menu = t0.elapsed();
    let (code, list) = admin_api(&ns, "GET", "/api/v1/sessions", None)?;
    if code != 200 || list.as_array().is_none_or(|a| !a.is_empty()) {
        bail!("sessions left after the logout ({code}): {list}");
    }
    let left = crate::lab::vdd_taps(&ns)?;
    if left.contains(&tap) {
        bail!("the session's tap {tap} is still on the bridge after it ended: {left:?}");
    }
    drop(q);
    Ok(X11Report {
        start,
        stages: times,
        pick_to_greeter: greeter_at.saturating_sub(picked),
        pick_to_ready: ready.saturating_sub(picked),
        screenshot,
        desktop,
        login_to_desktop,
        logout_to_menu,
    })
}

/// Waits until the thin client's screen shows the greeter; saves
/// `target/e2e/x11-screenshot.png`. Returns when it appeared (since QEMU started).
fn wait_for_greeter(q: &Qemu, work: &std::path::Path) -> Result<(Duration, PathBuf)> {
    let out = repo_root().join("target/e2e");
    std::fs::create_dir_all(&out)?;
    let ppm = work.join("screen.ppm");
    let deadline = Instant::now() + Duration::from_secs(120);
    let (at, share) = loop {
        q.screendump(&ppm)?;
        let (share, boxed) = greeter_on_screen(&std::fs::read(&ppm)?)?;
        if share >= 0.5 && boxed {
            break (q.elapsed(), share);
        }
        if Instant::now() > deadline {
            let failed = out.join("x11-failed.png");
            let _ = q.screendump(&failed);
            bail!(
                "the greeter never showed on the thin client ({:.0}% of the screen in #1e5aa0, login box {}); its screen: {}",
                share * 100.0,
                if boxed { "seen" } else { "not seen" },
                failed.display()
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    let screenshot = out.join("x11-screenshot.png");
    q.screendump(&screenshot)?;
    eprintln!(
        "xtask e2e: xdm greeter on the thin client at {:.1} s ({:.0}% of the screen in the guest's colour); screenshot {}",
        at.as_secs_f64(),
        share * 100.0,
        screenshot.display()
    );
    Ok((at, screenshot))
}

/// The share of a screenshot in black: the xterm of the guest's session (white on
/// black), which the greeter and the blue root have none of.
pub fn black_share(ppm: &[u8]) -> Result<f64> {
    let (w, h, px) = parse_ppm(ppm)?;
    let black = px
        .chunks_exact(3)
        .filter(|p| p.iter().all(|c| *c <= 16))
        .count();
    Ok(black as f64 / (w * h).max(1) as f64)
}

/// Waits until the guest's session shows on the thin client (its xterm: at least 10% of
/// the screen black); saves `target/e2e/x11-desktop.png`.
fn wait_for_desktop(q: &Qemu, work: &std::path::Path) -> Result<PathBuf> {
    let out = repo_root().join("target/e2e");
    let ppm = work.join("screen.ppm");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        q.screendump(&ppm)?;
        let dark = black_share(&std::fs::read(&ppm)?)?;
        if dark >= 0.10 {
            let png = out.join("x11-desktop.png");
            q.screendump(&png)?;
            eprintln!(
                "xtask e2e: the guest's desktop (xterm) on the thin client at {:.1} s; screenshot {}",
                q.elapsed().as_secs_f64(),
                png.display()
            );
            return Ok(png);
        }
        if Instant::now() > deadline {
            let failed = out.join("x11-login-failed.png");
            let _ = q.screendump(&failed);
            bail!(
                "no desktop after the login ({:.1}% of the screen black); the screen: {}",
                dark * 100.0,
                failed.display()
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ppm(w: usize, h: usize, f: impl Fn(usize, usize) -> [u8; 3]) -> Vec<u8> {
        let mut v = format!("P6\n{w} {h}\n255\n").into_bytes();
        for y in 0..h {
            for x in 0..w {
                v.extend_from_slice(&f(x, y));
            }
        }
        v
    }

    #[test]
    fn greeter_is_the_colour_with_a_box_in_the_middle() {
        let bg = GREETER_RGB;
        let greeter = ppm(320, 240, |x, y| {
            if (100..220).contains(&x) && (80..160).contains(&y) {
                [0xd0, 0xd0, 0xd0]
            } else {
                bg
            }
        });
        let (share, boxed) = greeter_on_screen(&greeter).unwrap();
        assert!(share > 0.8 && boxed, "{share} {boxed}");
        // The background alone (xdm not drawn yet) is not the greeter.
        let bare = ppm(320, 240, |_, _| [0x1f, 0x5b, 0x9e]);
        assert!(!greeter_on_screen(&bare).unwrap().1);
        // Nor is a black screen.
        let black = ppm(320, 240, |_, _| [0, 0, 0]);
        assert!(greeter_on_screen(&black).unwrap().0 < 0.01);
        assert!(parse_ppm(b"P5\n1 1\n255\n\0").is_err());
        assert!(parse_ppm(b"P6\n4 4\n255\n\0\0\0").is_err());
    }
}
