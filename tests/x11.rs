//! X11 guests against the real `vdd` binary in a lab namespace, with real QEMU: the
//! guest's tap joins the LAN bridge at session start and is gone at its end, on failure,
//! after DELETE, and after vdd is killed and restarted (adopted VM keeps it, then DELETE);
//! the guest's address is bound in vdd's DHCP before it asks (a client with the guest's
//! MAC running udhcpc gets exactly it); an X11 guest that never answers XDMCP fails with
//! a clear error; a plain LAN interface gets a bridge made by vdd. The demo guest is the
//! X11 guest here: it never answers XDMCP, which is what the failure path needs. For the
//! way to "ready", a real xdm answers at the guest's address, from a namespace whose NIC
//! has the guest's MAC and took the reserved address from vdd's DHCP.
//!
//! Every wait is a poll with a deadline; VMs left by a failing test are killed by pid.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use xtask::lab::{self, ClientNs, Lab};

#[path = "common/udhcpc.rs"]
mod udhcpc;
#[path = "common/vmdir.rs"]
mod vmdir;
#[path = "common/xdm.rs"]
mod xdm;

const TOKEN: &str = "x11-test-token-0123456789";
const SEAT: &str = "52:54:00:00:cc:01";
const PORT: u16 = 8080;

fn skip() -> Option<String> {
    lab::missing(&[
        "qemu-system-x86_64",
        "qemu-img",
        "mkfs.vfat",
        "mcopy",
        "syslinux",
        "cpio",
        "curl",
        "udhcpc",
        "nft",
    ])
}

/// The test's folder; on Drop, kills every VM under it (a VM whose vdd was killed is
/// nobody's child), then removes the folder.
type Dir = vmdir::VmDir;

fn vm_pids(dir: &Dir) -> Vec<u32> {
    vmdir::vms_under(dir)
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn config(dir: &Path, interface: &str, x11_timeout: &str) -> PathBuf {
    let img = xtask::image::guest_demo(false).expect("building the demo guest");
    let text = format!(
        r#"
[server]
interface = "{interface}"
state_dir = "{state}"
[dhcp]
pool = "10.77.0.100-10.77.0.199"
lease_time = "1h"
router = "10.77.0.1"
[tftp]
enabled = false
[http]
port = {PORT}
admin_token = "{TOKEN}"
[nbd]
enabled = false
[[guest]]
name = "desk"
label = "X11 desk"
display = "x11"
image = "{img}"
memory = "128M"
[dispatch]
x11_timeout = "{x11_timeout}"
shutdown_timeout = "2s"
accel = "tcg"
"#,
        state = dir.join("state").display(),
        img = img.display(),
    );
    let p = dir.join("config.toml");
    std::fs::write(&p, text).unwrap();
    p
}

/// Starts `vdd serve` in the server namespace and waits until it serves.
fn start_vdd(lab: &mut Lab, dir: &Path, run: u32) -> (u32, PathBuf) {
    let log = dir.join(format!("vdd-{run}.log"));
    let mut c = Lab::cmd(&lab.server_ns, env!("CARGO_BIN_EXE_vdd"));
    c.args(["serve", "--config"])
        .arg(dir.join("config.toml"))
        .env("RUST_LOG", "vdd=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let pid = lab.spawn("vdd", c).unwrap();
    assert!(
        wait_for(Duration::from_secs(60), || {
            assert!(lab.is_running(pid), "vdd exited:\n{}", read(&log));
            read(&log).contains("vdd serving")
        }),
        "vdd did not start:\n{}",
        read(&log)
    );
    (pid, log)
}

/// One API call from inside the server namespace, as the admin.
fn api(ns: &str, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    let mut c = Lab::cmd(ns, "curl");
    c.args(["-s", "-m", "120", "-X", method, "-w", "\n%{http_code}"])
        .arg("-H")
        .arg(format!("Authorization: Bearer {TOKEN}"));
    if let Some(b) = body {
        c.args(["-H", "Content-Type: application/json", "--data", b]);
    }
    c.arg(format!("http://10.77.0.1:{PORT}{path}"));
    let out = c.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    let code: u16 = code
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("curl: {text:?}"));
    let v = if body.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"))
    };
    (code, v)
}

fn create(ns: &str) -> (u16, Value) {
    api(
        ns,
        "POST",
        "/api/v1/sessions",
        Some(&format!(r#"{{"guest": "desk", "seat": "{SEAT}"}}"#)),
    )
}

/// `ip -o link` of the namespace: one line per link.
fn links(ns: &str) -> String {
    let out = Command::new("ip")
        .args(["-n", ns, "-o", "link", "show"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn taps(ns: &str) -> Vec<String> {
    links(ns)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter(|n| n.starts_with("vdt-"))
        .collect()
}

fn tap_of(id: &str) -> String {
    format!("vdt-{}", &id[..11])
}

fn link_line(ns: &str, name: &str) -> Option<String> {
    links(ns)
        .lines()
        .find(|l| {
            l.split(": ")
                .nth(1)
                .is_some_and(|n| n.split('@').next() == Some(name))
        })
        .map(str::to_string)
}

/// `vdd leases`: the lease table as the journal has it.
fn leases(dir: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_vdd"))
        .args(["leases", "--config"])
        .arg(dir.join("config.toml"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn lease_line(dir: &Path, mac: &str) -> Option<String> {
    leases(dir)
        .lines()
        .find(|l| l.contains(mac))
        .map(str::to_string)
}

const UDHCPC_SCRIPT: &str = r#"#!/bin/sh
# Records the lease; touches no resolv.conf and no address.
[ "$1" = bound ] && env | sort > "$OUT/bound"
exit 0
"#;

/// One udhcpc DORA in `c`; the address it was given.
fn udhcpc(dir: &Path, c: &ClientNs) -> String {
    let script = udhcpc::script(dir, UDHCPC_SCRIPT);
    udhcpc::once(dir, c, &script, &[])["ip"].clone()
}

fn in_pool(ip: &str) -> bool {
    let ip: std::net::Ipv4Addr = ip.parse().unwrap();
    let o = ip.octets();
    o[..3] == [10, 77, 0] && (100..=199).contains(&o[3])
}

#[test]
fn x11_session_tap_and_address_lifecycle() {
    if let Some(why) = skip() {
        eprintln!("skipping: {why}");
        return;
    }
    let t0 = Instant::now();
    let mut lab = Lab::new("x11").unwrap();
    // Declared after the lab, so dropped first: VMs die before their namespace.
    let dir = Dir::new("x11-life");
    let ns = lab.server_ns.clone();
    config(&dir, "br0", "15s");
    // A tap a crashed vdd left behind, which no VM holds: the start-up sweep removes it.
    lab::ip([
        "-n",
        &ns,
        "tuntap",
        "add",
        "dev",
        "vdt-stale",
        "mode",
        "tap",
    ])
    .unwrap();
    let (vdd, log) = start_vdd(&mut lab, &dir, 0);
    assert!(taps(&ns).is_empty(), "stale tap kept: {:?}", taps(&ns));

    // POST: 201 at once, starting, the guest's reserved address, XDMCP port, its MAC.
    let (st, s) = create(&ns);
    eprintln!("POST -> {st} {s}");
    assert_eq!(st, 201, "{s}");
    let id = s["id"].as_str().unwrap().to_string();
    assert_eq!(s["protocol"], "xdmcp");
    assert_eq!(s["state"], "starting");
    assert_eq!(s["port"], 177);
    assert!(
        s.get("password").is_none() && s.get("error").is_none(),
        "{s}"
    );
    let host = s["host"].as_str().unwrap().to_string();
    assert!(in_pool(&host), "{s}");
    let mac = s["mac"].as_str().unwrap().to_string();
    assert!(mac.starts_with("0a:"), "{mac}");
    // The tap is there and in the bridge, right after POST.
    let tap = tap_of(&id);
    let line = link_line(&ns, &tap).unwrap_or_else(|| panic!("no {tap}: {}", links(&ns)));
    assert!(line.contains("master br0"), "{line}");
    // The address is bound to the guest's MAC in vdd's lease table (journaled).
    assert!(
        wait_for(Duration::from_secs(10), || lease_line(&dir, &mac)
            .is_some_and(|l| l.contains(&host) && l.contains("bound"))),
        "{}",
        leases(&dir)
    );
    // An X11 session has no VNC password to hand out: 409 with the reason.
    let (st, p) = api(
        &ns,
        "POST",
        &format!("/api/v1/sessions/{id}/password"),
        None,
    );
    assert_eq!(st, 409, "{p}");
    assert!(p["error"].as_str().unwrap().contains("X11 session"), "{p}");
    // GET tells the same; a second POST is the same session.
    let (st, g) = api(&ns, "GET", &format!("/api/v1/sessions/{id}"), None);
    assert_eq!((st, &g["id"], &g["state"]), (200, &s["id"], &s["state"]));
    assert_eq!(g["host"], s["host"]);
    let (st, again) = create(&ns);
    assert_eq!((st, &again["id"]), (200, &s["id"]));

    // The DHCP side: a client with the guest's MAC gets exactly the reserved address.
    let c = lab.add_client(Some(&mac)).unwrap();
    assert_eq!(udhcpc(&dir, &c), host);

    // The demo guest never answers XDMCP: failed, with the error, and the tap is gone.
    let mut failed = Value::Null;
    assert!(
        wait_for(Duration::from_secs(60), || {
            failed = api(&ns, "GET", &format!("/api/v1/sessions/{id}"), None).1;
            failed["state"] == "failed"
        }),
        "{failed}\n{}",
        read(&log)
    );
    eprintln!("GET (failed) -> {failed}");
    let err = failed["error"].as_str().unwrap();
    assert_eq!(
        err,
        format!("the guest's display manager did not answer XDMCP at {host}:177 within 15s")
    );
    assert!(
        wait_for(Duration::from_secs(20), || link_line(&ns, &tap).is_none()),
        "tap {tap} outlived the failed session: {}",
        links(&ns)
    );
    assert!(
        wait_for(Duration::from_secs(10), || lease_line(&dir, &mac)
            .is_some_and(|l| l.contains("expired"))),
        "address not released: {}",
        leases(&dir)
    );
    assert!(read(&log).contains("X11 session failed"), "{}", read(&log));
    // Still readable until DELETE; then gone.
    assert_eq!(
        api(&ns, "GET", &format!("/api/v1/sessions/{id}"), None).0,
        200
    );
    assert_eq!(
        api(&ns, "DELETE", &format!("/api/v1/sessions/{id}"), None).0,
        204
    );
    assert_eq!(
        api(&ns, "GET", &format!("/api/v1/sessions/{id}"), None).0,
        404
    );

    // DELETE of a starting session: its tap goes with its VM.
    let (st, s2) = create(&ns);
    assert_eq!(st, 201, "{s2}");
    let id2 = s2["id"].as_str().unwrap().to_string();
    let tap2 = tap_of(&id2);
    assert!(link_line(&ns, &tap2).is_some());
    assert_ne!(s2["mac"], s["mac"], "the MAC is made per session");
    assert_eq!(
        api(&ns, "DELETE", &format!("/api/v1/sessions/{id2}"), None).0,
        204
    );
    assert!(
        wait_for(Duration::from_secs(10), || link_line(&ns, &tap2).is_none()),
        "tap {tap2} outlived DELETE"
    );

    // kill -9 of vdd with a running X11 session: the VM keeps its tap; the next vdd
    // adopts it (address restored, probed again), and DELETE then takes the tap away.
    let (st, s3) = create(&ns);
    assert_eq!(st, 201, "{s3}");
    let id3 = s3["id"].as_str().unwrap().to_string();
    let tap3 = tap_of(&id3);
    lab.kill(vdd, "KILL").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        link_line(&ns, &tap3).is_some(),
        "the VM's tap went with vdd"
    );
    let (_vdd2, log2) = start_vdd(&mut lab, &dir, 1);
    assert!(read(&log2).contains("adopted the VM"), "{}", read(&log2));
    let line = link_line(&ns, &tap3).expect("the adopted VM's tap");
    assert!(line.contains("master br0"), "{line}");
    let (st, g3) = api(&ns, "GET", &format!("/api/v1/sessions/{id3}"), None);
    assert_eq!(
        (st, &g3["state"], &g3["host"]),
        (200, &"starting".into(), &s3["host"])
    );
    assert!(
        lease_line(&dir, s3["mac"].as_str().unwrap()).is_some_and(|l| l.contains("bound")),
        "{}",
        leases(&dir)
    );
    assert_eq!(
        api(&ns, "DELETE", &format!("/api/v1/sessions/{id3}"), None).0,
        204
    );
    assert!(
        wait_for(Duration::from_secs(10), || link_line(&ns, &tap3).is_none()),
        "tap {tap3} outlived DELETE after adoption"
    );
    assert!(taps(&ns).is_empty(), "left behind: {:?}", taps(&ns));
    assert!(vm_pids(&dir).is_empty(), "VMs left: {:?}", vm_pids(&dir));
    eprintln!("x11 lifecycle: {:.1}s", t0.elapsed().as_secs_f32());
}

/// A LAN interface that is no bridge: vdd makes `vddbr0` with the interface's MAC, moves
/// the address and the default route onto it, enslaves the interface, and serves DHCP on the bridge; a restart
/// finds everything in place. A graceful stop with a running X11 session leaves no tap.
#[test]
fn plain_lan_interface_gets_a_bridge() {
    if let Some(why) = skip() {
        eprintln!("skipping: {why}");
        return;
    }
    let mut lab = Lab::new("x11br").unwrap();
    let dir = Dir::new("x11-bridge");
    let ns = lab.server_ns.clone();
    // The client's veth end in the server namespace becomes a plain LAN interface.
    let c = lab.add_client(None).unwrap();
    lab::ip(["-n", &ns, "link", "set", "vc0", "nomaster"]).unwrap();
    lab::ip(["-n", &ns, "addr", "flush", "dev", "br0"]).unwrap();
    lab::ip(["-n", &ns, "addr", "add", "10.77.0.1/24", "dev", "vc0"]).unwrap();
    lab::ip([
        "-n",
        &ns,
        "route",
        "add",
        "default",
        "via",
        "10.77.0.254",
        "dev",
        "vc0",
    ])
    .unwrap();
    let vc0_mac = link_line(&ns, "vc0")
        .and_then(|l| {
            l.split_whitespace()
                .skip_while(|w| *w != "link/ether")
                .nth(1)
                .map(str::to_string)
        })
        .unwrap();
    config(&dir, "vc0", "1h");

    for run in 0..2 {
        let (vdd, log) = start_vdd(&mut lab, &dir, run);
        let br = link_line(&ns, "vddbr0").unwrap_or_else(|| panic!("no vddbr0: {}", links(&ns)));
        assert!(
            br.contains(&vc0_mac),
            "the bridge has not the LAN's MAC: {br}"
        );
        let vc0 = link_line(&ns, "vc0").unwrap();
        assert!(vc0.contains("master vddbr0"), "{vc0}");
        let addrs = String::from_utf8_lossy(
            &Command::new("ip")
                .args(["-n", &ns, "-o", "-4", "addr", "show"])
                .output()
                .unwrap()
                .stdout,
        )
        .to_string();
        assert!(
            addrs
                .lines()
                .any(|l| l.contains("vddbr0") && l.contains("10.77.0.1/24")),
            "{addrs}"
        );
        assert!(!addrs.lines().any(|l| l.contains(" vc0 ")), "{addrs}");
        let routes = String::from_utf8_lossy(
            &Command::new("ip")
                .args(["-n", &ns, "-4", "route", "show", "default"])
                .output()
                .unwrap()
                .stdout,
        )
        .to_string();
        assert_eq!(
            routes.trim(),
            "default via 10.77.0.254 dev vddbr0",
            "{routes}"
        );
        assert!(
            read(&log)
                .lines()
                .any(|l| l.contains("dhcp bound") && l.contains("vddbr0")),
            "{}",
            read(&log)
        );
        // DHCP answers on the bridge.
        let ip = udhcpc(&dir, &c);
        assert!(in_pool(&ip), "{ip}");
        // A session's tap joins vddbr0; a graceful stop ends the VM and so the tap.
        let (st, s) = create(&ns);
        assert_eq!(st, 201, "{s}");
        let tap = tap_of(s["id"].as_str().unwrap());
        let line = link_line(&ns, &tap).unwrap_or_else(|| panic!("no {tap}: {}", links(&ns)));
        assert!(line.contains("master vddbr0"), "{line}");
        lab.kill(vdd, "TERM").unwrap();
        assert!(taps(&ns).is_empty(), "left behind: {:?}", taps(&ns));
        assert!(vm_pids(&dir).is_empty());
    }
}

/// The way to "ready": vdd's XDMCP probe reaches a real display manager (Debian's xdm) at
/// the address vdd reserved for the guest's MAC. The xdm runs in a namespace whose NIC has
/// that MAC and got that address from vdd's DHCP (the demo VM itself has no XDMCP), so
/// everything from the reservation to the probe is the real path.
#[test]
fn x11_session_is_ready_when_the_display_manager_answers() {
    if let Some(why) = skip().or_else(xdm::skip) {
        eprintln!("skipping: {why}");
        return;
    }
    let mut lab = Lab::new("x11rdy").unwrap();
    let dir = Dir::new("x11-ready");
    let ns = lab.server_ns.clone();
    config(&dir, "br0", "90s");
    let (_vdd, log) = start_vdd(&mut lab, &dir, 0);
    let (st, s) = create(&ns);
    assert_eq!(st, 201, "{s}");
    let id = s["id"].as_str().unwrap().to_string();
    let (host, mac) = (s["host"].as_str().unwrap(), s["mac"].as_str().unwrap());

    let guest = lab.add_client(Some(mac)).unwrap();
    assert_eq!(udhcpc(&dir, &guest), host);
    lab::ip([
        "-n",
        &guest.ns,
        "addr",
        "add",
        &format!("{host}/24"),
        "dev",
        "eth0",
    ])
    .unwrap();
    xdm::start(&mut lab, &guest.ns, &dir.join("xdm"), "*\n");

    let mut ready = Value::Null;
    assert!(
        wait_for(Duration::from_secs(60), || {
            ready = api(&ns, "GET", &format!("/api/v1/sessions/{id}"), None).1;
            ready["state"] != "starting"
        }),
        "{ready}\n{}",
        read(&log)
    );
    eprintln!("GET (ready) -> {ready}");
    assert_eq!(ready["state"], "ready", "{ready}\n{}", read(&log));
    assert!(ready.get("error").is_none());
    assert_eq!((&ready["host"], &ready["port"]), (&s["host"], &s["port"]));
    assert!(read(&log).contains("X11 guest ready"), "{}", read(&log));
    // The guest is in the server's neighbour table like a seat, but is none: an API call
    // from its MAC and address starts nothing (finding 9 of the hardening audit).
    for (method, body) in [("GET", None), ("POST", Some(r#"{"guest": "desk"}"#))] {
        let mut c = Lab::cmd(&guest.ns, "curl");
        c.args(["-s", "-m", "30", "-X", method, "-w", "\n%{http_code}"]);
        if let Some(b) = body {
            c.args(["-H", "Content-Type: application/json", "--data", b]);
        }
        let out = c
            .arg(format!("http://10.77.0.1:{PORT}/api/v1/sessions"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(text.ends_with("\n403"), "{method} from the guest: {text:?}");
        assert!(text.contains("is a guest VM of this server"), "{text}");
    }
    // It stays ready (no timeout later), in the list too.
    let (_, all) = api(&ns, "GET", "/api/v1/sessions", None);
    assert_eq!(all[0]["state"], "ready", "{all}");
    assert_eq!(
        api(&ns, "DELETE", &format!("/api/v1/sessions/{id}"), None).0,
        204
    );
    assert!(
        wait_for(Duration::from_secs(10), || taps(&ns).is_empty()),
        "left behind: {:?}",
        taps(&ns)
    );
}
