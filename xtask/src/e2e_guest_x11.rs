//! `cargo xtask e2e guest-x11`: the X11 guest image (images/guest-x11) booted the way vdd
//! runs guests (q35, its disk on AHCI, a virtio-net NIC on a tap of a lab bridge, its
//! address from a DHCP reservation by MAC), answered over XDMCP (X Display Manager
//! Control Protocol 1.1, section 10: Query, Willing), and its xdm greeter drawn on a real
//! X server that asked for it (`Xvfb -query`), checked by the greeter's colour #1e5aa0,
//! and a login as guest/guest (keystrokes through xdotool) that brings up its session.
//!
//! Only the guest is under test here: dnsmasq stands in for vdd's DHCP and Xvfb for the
//! thin client's Xorg.

use std::net::{Ipv4Addr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::image::repo_root;
use crate::lab::{Lab, BRIDGE};

/// The guest's MAC and the address its DHCP reservation gives it.
const GUEST_MAC: &str = "52:54:00:e2:e0:11";
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 50);
/// The root colour xdm's Xsetup paints behind the greeter (images/guest-x11/README.md).
pub const GREETER_ROOT_RGB: [u8; 3] = [0x1e, 0x5a, 0xa0];
/// xdm's login box background (`xlogin*background: grey`, X's grey is 190,190,190).
pub const GREETER_BOX_RGB: [u8; 3] = [190, 190, 190];

/// XDMCP opcodes (spec section 9) used here.
const OP_QUERY: u16 = 2;
const OP_WILLING: u16 = 5;

/// A Query with no authentication names: version 1, opcode 2, length 1, an empty
/// ARRAYofARRAY8 (the count byte 0). What `Xorg -query` sends first.
pub fn xdmcp_query() -> [u8; 7] {
    let mut q = [0u8; 7];
    q[0..2].copy_from_slice(&1u16.to_be_bytes());
    q[2..4].copy_from_slice(&OP_QUERY.to_be_bytes());
    q[4..6].copy_from_slice(&1u16.to_be_bytes());
    q
}

/// The fields of a Willing reply.
#[derive(Debug, PartialEq, Eq)]
pub struct Willing {
    pub authentication_name: Vec<u8>,
    pub hostname: Vec<u8>,
    pub status: Vec<u8>,
}

/// Parses a Willing packet: header (CARD16 version = 1, CARD16 opcode = 5, CARD16 length
/// of what follows), then ARRAY8 authentication-name, ARRAY8 hostname, ARRAY8 status,
/// each a CARD16 length and that many bytes, all big-endian.
pub fn parse_willing(b: &[u8]) -> Result<Willing> {
    let card16 = |at: usize| -> Result<u16> {
        b.get(at..at + 2)
            .map(|s| u16::from_be_bytes([s[0], s[1]]))
            .context("XDMCP packet too short")
    };
    let (version, opcode, length) = (card16(0)?, card16(2)?, card16(4)? as usize);
    if version != 1 || opcode != OP_WILLING {
        bail!("not an XDMCP 1 Willing: version {version}, opcode {opcode}");
    }
    if b.len() != 6 + length {
        bail!(
            "XDMCP length says {length} bytes follow the header, but {} do",
            b.len() - 6
        );
    }
    let mut at = 6;
    let mut array8 = || -> Result<Vec<u8>> {
        let n = card16(at)? as usize;
        let v = b
            .get(at + 2..at + 2 + n)
            .context("ARRAY8 runs past the packet")?
            .to_vec();
        at += 2 + n;
        Ok(v)
    };
    let w = Willing {
        authentication_name: array8()?,
        hostname: array8()?,
        status: array8()?,
    };
    if at != b.len() {
        bail!("{} bytes after the Willing's status", b.len() - at);
    }
    Ok(w)
}

/// What the run measured.
pub struct Report {
    /// From QEMU's start to the first Willing.
    pub willing_at: Duration,
    /// The Willing packet as received.
    pub willing: Vec<u8>,
    /// From QEMU's start to the greeter on Xvfb's screen.
    pub greeter_at: Duration,
    pub screenshot: PathBuf,
    /// From the password's Return to the session (an xterm) on the screen.
    pub login_to_session: Duration,
    pub session_shot: PathBuf,
}

/// Boots the guest, waits for its Willing and its greeter, and saves the screen as
/// `target/guest-x11-greeter.png`.
pub fn run() -> Result<Report> {
    if let Some(why) = crate::lab::missing(&[
        "qemu-system-x86_64",
        "qemu-img",
        "dnsmasq",
        "Xvfb",
        "xwd",
        "xwdtopnm",
        "pnmtopng",
        "xdotool",
    ]) {
        bail!("cannot run: {why} (apt-get install -y qemu-system-x86 qemu-utils dnsmasq-base xvfb x11-apps netpbm xdotool)");
    }
    let image = crate::image::guest_x11(false)?;
    let work = repo_root().join(format!("target/e2e/guest-x11-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let r = run_in(&image, &work);
    match &r {
        Ok(_) => {
            let _ = std::fs::remove_dir_all(&work);
        }
        Err(_) => {
            // Keep the serial console, dnsmasq's and Xvfb's logs; drop the disk overlay.
            let _ = std::fs::remove_file(work.join("disk.qcow2"));
            eprintln!("xtask e2e guest-x11: logs kept in {}", work.display());
        }
    }
    r
}

fn run_in(image: &Path, work: &Path) -> Result<Report> {
    let mut lab = Lab::new("gx11")?;
    let tap = lab.add_tap()?;
    let ns = lab.server_ns.clone();

    let log = |name: &str| -> Result<std::fs::File> { Ok(std::fs::File::create(work.join(name))?) };
    let mut dnsmasq = Lab::cmd(&ns, "dnsmasq");
    dnsmasq
        .args(["--keep-in-foreground", "--conf-file=/dev/null", "--port=0"])
        .arg(format!("--interface={BRIDGE}"))
        .args(["--bind-interfaces", "--log-dhcp", "--log-facility=-"])
        .arg("--dhcp-range=10.77.0.100,10.77.0.150,1h")
        .arg(format!("--dhcp-host={GUEST_MAC},{GUEST_IP}"))
        .arg(format!(
            "--dhcp-leasefile={}",
            work.join("dnsmasq.leases").display()
        ))
        .arg(format!("--pid-file={}", work.join("dnsmasq.pid").display()))
        .stdin(Stdio::null());
    let f = log("dnsmasq.log")?;
    dnsmasq.stdout(f.try_clone()?).stderr(f);
    lab.spawn("dnsmasq", dnsmasq)?;

    let overlay = work.join("disk.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(image)
        .arg(&overlay)
        .status()?;
    if !st.success() {
        bail!("qemu-img create failed");
    }
    // As vdd's dispatcher runs a guest: q35, the disk on the AHCI bus, virtio-net.
    let mut qemu = Lab::cmd(&ns, "qemu-system-x86_64");
    qemu.args(["-accel", crate::qemu::accel(), "-M", "q35", "-m", "512"])
        .args(["-display", "none", "-nodefaults", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", work.join("serial.log").display()))
        .arg("-drive")
        .arg(format!("file={},format=qcow2,if=ide", overlay.display()))
        .arg("-netdev")
        .arg(format!("tap,id=n0,ifname={tap},script=no,downscript=no"))
        .arg("-device")
        .arg(format!("virtio-net-pci,netdev=n0,mac={GUEST_MAC}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log("qemu.stderr")?);
    let t0 = Instant::now();
    let qemu_pid = lab.spawn("qemu", qemu)?;
    eprintln!(
        "xtask e2e guest-x11: QEMU started ({}); waiting for XDMCP Willing from {GUEST_IP} ...",
        crate::qemu::accel()
    );

    // Query until Willing; every second, as an X server does, for at most 4 minutes.
    let willing = {
        let deadline = t0 + Duration::from_secs(240);
        let mut got = None;
        while got.is_none() {
            if !lab.is_running(qemu_pid) {
                bail!("QEMU exited before xdm answered; {}", serial_tail(work));
            }
            if Instant::now() > deadline {
                bail!(
                    "no XDMCP Willing from {GUEST_IP} in 240 s; {}",
                    serial_tail(work)
                );
            }
            got = crate::e2e::in_netns(&ns, || {
                let s = UdpSocket::bind("0.0.0.0:0")?;
                s.set_read_timeout(Some(Duration::from_secs(1)))?;
                s.send_to(&xdmcp_query(), (GUEST_IP, 177))?;
                let mut buf = [0u8; 1024];
                Ok(match s.recv_from(&mut buf) {
                    Ok((n, _)) => Some(buf[..n].to_vec()),
                    Err(_) => None,
                })
            })
            .unwrap_or(None);
            if got.is_none() {
                std::thread::sleep(Duration::from_millis(500));
            }
        }
        got.expect("loop ends with a reply")
    };
    let willing_at = t0.elapsed();
    let w = parse_willing(&willing)?;
    eprintln!(
        "xtask e2e guest-x11: Willing at {:.1} s from {:?} ({:?})",
        willing_at.as_secs_f64(),
        String::from_utf8_lossy(&w.hostname),
        String::from_utf8_lossy(&w.status)
    );
    if w.hostname != b"vdd-guest-x11" {
        bail!(
            "the Willing names host {:?}, not vdd-guest-x11",
            String::from_utf8_lossy(&w.hostname)
        );
    }

    // The thin client's part, played by Xvfb: ask the guest for a greeter.
    let display = free_display()?;
    let mut xvfb = Lab::cmd(&ns, "Xvfb");
    xvfb.arg(format!(":{display}"))
        .args(["-query", &GUEST_IP.to_string(), "-listen", "tcp", "-ac"])
        .args(["-screen", "0", "1024x768x24", "-once"])
        // Only the server's built-in fonts, as on the thin client (its root has no X core
        // fonts): the greeter and the xterm draw client-side with Xft, twm with "fixed".
        .args(["-fp", "built-ins"])
        .stdin(Stdio::null());
    let f = log("xvfb.log")?;
    xvfb.stdout(f.try_clone()?).stderr(f);
    lab.spawn("Xvfb", xvfb)?;
    let ppm = work.join("screen.ppm");
    let deadline = Instant::now() + Duration::from_secs(120);
    let greeter_at = loop {
        std::thread::sleep(Duration::from_secs(1));
        if screenshot_ppm(&ns, display, &ppm).is_ok() {
            let px = std::fs::read(&ppm)?;
            let (root, boxed, all) = (
                count_rgb(&px, GREETER_ROOT_RGB)?,
                count_rgb(&px, GREETER_BOX_RGB)?,
                1024 * 768,
            );
            // The blue root around, and the grey login box on it.
            if root * 4 >= all && boxed * 20 >= all {
                break t0.elapsed();
            }
        }
        if Instant::now() > deadline {
            bail!(
                "no greeter (#1e5aa0 root and a grey login box) on Xvfb :{display} within 120 s of the Willing; last screen in {}",
                ppm.display()
            );
        }
    };
    // Once more, a moment later, so the box is fully drawn in the saved picture.
    std::thread::sleep(Duration::from_secs(2));
    screenshot_ppm(&ns, display, &ppm)?;
    let screenshot = repo_root().join("target/guest-x11-greeter.png");
    to_png(&ppm, &screenshot)?;
    eprintln!(
        "xtask e2e guest-x11: greeter on Xvfb at {:.1} s; screenshot {}",
        greeter_at.as_secs_f64(),
        screenshot.display()
    );

    // Log in as guest/guest with keystrokes (XTEST) on the display; the session is twm
    // and an xterm, and the grey login box is gone.
    for keys in [
        &["type", "--delay", "150", "guest"][..],
        &["key", "Return"],
        &["type", "--delay", "150", "guest"],
        &["key", "Return"],
    ] {
        let st = Lab::cmd(&ns, "xdotool")
            .env("DISPLAY", format!(":{display}"))
            .args(keys)
            .status()
            .context("running xdotool")?;
        if !st.success() {
            bail!("xdotool {keys:?} failed");
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let typed = Instant::now();
    let deadline = typed + Duration::from_secs(120);
    let login_to_session = loop {
        std::thread::sleep(Duration::from_secs(1));
        if screenshot_ppm(&ns, display, &ppm).is_ok() {
            let px = std::fs::read(&ppm)?;
            let all = 1024 * 768;
            let (root, boxed) = (
                count_rgb(&px, GREETER_ROOT_RGB)?,
                count_rgb(&px, GREETER_BOX_RGB)?,
            );
            // Still this guest's display (the blue root around), the grey box gone, and a
            // big window (the xterm, about 900x600) over the root.
            if root * 10 >= all && boxed * 100 < all && (all - root) * 10 >= all * 4 {
                break typed.elapsed();
            }
        }
        if Instant::now() > deadline {
            bail!(
                "no session (an xterm, the login box gone) within 120 s of logging in as guest; last screen in {}",
                ppm.display()
            );
        }
    };
    std::thread::sleep(Duration::from_secs(2));
    screenshot_ppm(&ns, display, &ppm)?;
    let session_shot = repo_root().join("target/guest-x11-session.png");
    to_png(&ppm, &session_shot)?;
    eprintln!(
        "xtask e2e guest-x11: guest's session (twm + xterm) {:.1} s after the password; screenshot {}",
        login_to_session.as_secs_f64(),
        session_shot.display()
    );
    Ok(Report {
        willing_at,
        willing,
        greeter_at,
        screenshot,
        login_to_session,
        session_shot,
    })
}

/// Converts a PPM to PNG with netpbm's pnmtopng.
fn to_png(ppm: &Path, png: &Path) -> Result<()> {
    let out = Command::new("pnmtopng")
        .arg(ppm)
        .stderr(Stdio::null())
        .output()
        .context("running pnmtopng")?;
    if !out.status.success() {
        bail!("pnmtopng failed");
    }
    std::fs::write(png, out.stdout)?;
    Ok(())
}

/// A display number no X server on this machine holds (their lock files are in /tmp,
/// shared by every namespace).
pub fn free_display() -> Result<u32> {
    (40..100)
        .find(|n| {
            !Path::new(&format!("/tmp/.X{n}-lock")).exists()
                && !Path::new(&format!("/tmp/.X11-unix/X{n}")).exists()
        })
        .context("no free X display number in 40..100")
}

/// `xwd -root` of the display (from inside the namespace: Xvfb's abstract socket is
/// per network namespace), converted to PPM by netpbm.
pub fn screenshot_ppm(ns: &str, display: u32, ppm: &Path) -> Result<()> {
    xwd_ppm(ns, &format!(":{display}"), ppm)
}

/// [`screenshot_ppm`] of any X display name (`127.0.0.1:0` reaches the one in `ns` over
/// TCP, whatever X server `:0` the machine's /tmp may hold).
pub fn xwd_ppm(ns: &str, display: &str, ppm: &Path) -> Result<()> {
    let xwd = Lab::cmd(ns, "xwd")
        .args(["-display", display, "-root", "-silent"])
        .stderr(Stdio::null())
        .output()?;
    if !xwd.status.success() || xwd.stdout.is_empty() {
        bail!("xwd failed");
    }
    let mut conv = Command::new("xwdtopnm")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut stdin = conv.stdin.take().expect("piped");
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        let _ = stdin.write_all(&xwd.stdout);
    });
    let out = conv.wait_with_output()?;
    let _ = writer.join();
    if !out.status.success() {
        bail!("xwdtopnm failed");
    }
    std::fs::write(ppm, out.stdout)?;
    Ok(())
}

/// Pixels of exactly `rgb` in an 8-bit binary PPM (P6).
pub fn count_rgb(ppm: &[u8], rgb: [u8; 3]) -> Result<usize> {
    Ok(qemu_ctl::ppm::parse(ppm)?.count(|p| p == rgb))
}

fn serial_tail(work: &Path) -> String {
    let s = std::fs::read(work.join("serial.log")).unwrap_or_default();
    let s = String::from_utf8_lossy(&s);
    let lines: Vec<&str> = s.lines().collect();
    format!(
        "serial console tail:\n{}",
        lines[lines.len().saturating_sub(20)..].join("\n")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Willing xdm 1.1.11 (Debian 12, images/guest-x11) sent to a Query, captured.
    const WILLING_XDM: &str =
        "0001000500240000000d7664642d67756573742d783131001157696c6c696e6720746f206d616e616765";

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn query_is_version_1_opcode_2_no_auth_names() {
        assert_eq!(xdmcp_query(), [0, 1, 0, 2, 0, 1, 0]);
    }

    #[test]
    fn parses_xdms_willing() {
        let w = parse_willing(&unhex(WILLING_XDM)).unwrap();
        assert_eq!(w.authentication_name, b"");
        assert_eq!(w.hostname, b"vdd-guest-x11");
        assert_eq!(w.status, b"Willing to manage");
    }

    #[test]
    fn refuses_short_long_and_other_opcodes() {
        let good = unhex(WILLING_XDM);
        assert!(parse_willing(&good[..good.len() - 1]).is_err());
        let mut long = good.clone();
        long.push(0);
        assert!(parse_willing(&long).is_err());
        let mut unwilling = good.clone();
        unwilling[3] = 6;
        assert!(parse_willing(&unwilling).is_err());
        assert!(parse_willing(&[0, 1, 0]).is_err());
    }

    #[test]
    fn counts_one_colour_in_a_ppm() {
        let mut ppm = b"P6\n2 2\n255\n".to_vec();
        ppm.extend_from_slice(&[0x1e, 0x5a, 0xa0, 0, 0, 0, 0x1e, 0x5a, 0xa0, 1, 2, 3]);
        assert_eq!(count_rgb(&ppm, GREETER_ROOT_RGB).unwrap(), 2);
        assert!(count_rgb(b"P5\n1 1\n255\n\0", GREETER_ROOT_RGB).is_err());
    }
}
