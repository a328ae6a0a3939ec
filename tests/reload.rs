//! Live reload against the real `vdd` binary in a lab namespace, with real clients: an NBD
//! client (python3-libnbd) reads its export throughout reloads that replace the export's
//! file and never sees an error or a byte of the new file, while a new connection gets
//! the new file; a udhcpc keeps its lease across a reload that shrinks the pool past its
//! address (the renewal gets what is left of the lease) and a new client gets the new
//! pool; a running session survives a reload that removes its guest from the menu; an
//! invalid file, by `vdd reload` or by SIGHUP, changes nothing; restart-only keys are
//! named.
//!
//! No timing assertions: every wait is a poll with a deadline.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use xtask::lab::{self, Lab};

#[path = "common/udhcpc.rs"]
mod udhcpc;
#[path = "common/vmdir.rs"]
mod vmdir;

const TOKEN: &str = "reload-test-token-0123456789";
const PORT: u16 = 8080;
const SEAT: &str = "52:54:00:00:dd:01";
const PYTHON: &str = "/usr/bin/python3";
/// Size of each export image.
const IMAGE: usize = 4 << 20;

fn skip() -> Option<String> {
    let missing = lab::missing(&[
        "qemu-system-x86_64",
        "qemu-img",
        "mkfs.vfat",
        "mcopy",
        "syslinux",
        "cpio",
        "curl",
        "udhcpc",
    ]);
    let libnbd = Command::new(PYTHON)
        .args(["-c", "import nbd"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let why = match (missing, libnbd) {
        (None, true) => return None,
        (m, libnbd) => [
            m,
            (!libnbd).then(|| "python3-libnbd (import nbd) not installed".to_string()),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(", "),
    };
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI must provide: {why}");
    }
    Some(why)
}

/// The config file: `pool` and the export's `image`, the guests named in `guests`, and
/// `extra` appended as it is.
fn write_config(dir: &Path, pool: &str, image: &str, guests: &[&str], extra: &str) {
    let img = xtask::image::guest_demo(false).expect("building the demo guest");
    let mut text = format!(
        r#"
[server]
interface = "br0"
state_dir = "{state}"
[dhcp]
pool = "{pool}"
lease_time = "1h"
router = "10.77.0.1"
[tftp]
enabled = false
[http]
port = {PORT}
admin_token = "{TOKEN}"
[nbd]
port = 10809
[[nbd.export]]
name = "root"
path = "{image}"
[dispatch]
shutdown_timeout = "2s"
accel = "tcg"
{extra}
"#,
        state = dir.join("state").display(),
    );
    for g in guests {
        text.push_str(&format!(
            "[[guest]]\nname = \"{g}\"\nimage = \"{}\"\nmemory = \"128M\"\n",
            img.display()
        ));
    }
    std::fs::write(dir.join("config.toml"), text).unwrap();
}

/// An image whose every byte is `fill`, written beside and renamed over `path`, as an
/// admin replacing an image does (the old file lives on for whoever has it open).
fn write_image(path: &Path, fill: u8) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, vec![fill; IMAGE]).unwrap();
    std::fs::rename(&tmp, path).unwrap();
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

/// One API call as the admin, from the server namespace.
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
    let v = serde_json::from_str(body).unwrap_or(Value::Null);
    (code, v)
}

fn guest_names(ns: &str) -> Vec<String> {
    let (code, v) = api(ns, "GET", "/api/v1/guests", None);
    assert_eq!(code, 200, "{v}");
    v.as_array()
        .unwrap()
        .iter()
        .map(|g| g["name"].as_str().unwrap().to_string())
        .collect()
}

/// `vdd reload` run in the server namespace: (success, stdout, stderr).
fn vdd_reload(ns: &str, dir: &Path) -> (bool, String, String) {
    let out = Lab::cmd(ns, env!("CARGO_BIN_EXE_vdd"))
        .args(["reload", "--config"])
        .arg(dir.join("config.toml"))
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Reads the export `root` over one connection, again and again, until `STOP` exists (or
/// 5 minutes): every byte must be `FILL`. Writes how it went to `RESULT`.
const READER: &str = r#"
import json, os, sys, time
import nbd
stop, result, fill = sys.argv[1], sys.argv[2], int(sys.argv[3])
h = nbd.NBD()
h.set_export_name("root")
h.connect_tcp("10.77.0.1", "10809")
size = h.get_size()
want = bytes([fill]) * 65536
passes, reads, bad, err = 0, 0, 0, None
open(result + ".connected", "w").close()
end = time.time() + 300
try:
    while not os.path.exists(stop) and time.time() < end:
        for off in range(0, size, 65536):
            if h.pread(65536, off) != want:
                bad += 1
            reads += 1
        passes += 1
except Exception as e:
    err = str(e)
json.dump({"passes": passes, "reads": reads, "bad": bad, "error": err}, open(result, "w"))
"#;

/// The first byte of export `root` over a new connection (nbdcopy to stdout).
fn first_byte(ns: &str) -> u8 {
    let out = Lab::cmd(ns, "nbdcopy")
        .args(["nbd://10.77.0.1:10809/root", "-"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout[0]
}

const UDHCPC_SCRIPT: &str = r#"#!/bin/sh
env | sort > "$OUT/$1.tmp" && mv "$OUT/$1.tmp" "$OUT/$1"
case "$1" in
  bound|renew) ip addr flush dev "$interface"; ip addr add "$ip/$subnet" dev "$interface" ;;
  deconfig) ip addr flush dev "$interface" ;;
esac
exit 0
"#;

#[test]
fn reload_changes_what_runs_and_drops_nothing() {
    if let Some(why) = skip() {
        eprintln!("skipping: {why}");
        return;
    }
    let dir = vmdir::VmDir::new("reload");
    let (img_a, img_b) = (dir.join("root-a.img"), dir.join("root-b.img"));
    write_image(&img_a, 0xaa);
    write_image(&img_b, 0xbb);
    let img_a_text = img_a.display().to_string();
    write_config(
        &dir,
        "10.77.0.100-10.77.0.199",
        &img_a_text,
        &["demo", "other"],
        "",
    );
    let mut lab = Lab::new("reload").unwrap();
    let ns = lab.server_ns.clone();
    let log = dir.join("vdd.log");
    let mut c = Lab::cmd(&ns, env!("CARGO_BIN_EXE_vdd"));
    c.args(["serve", "--config"])
        .arg(dir.join("config.toml"))
        .env("RUST_LOG", "vdd=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let vdd = lab.spawn("vdd", c).unwrap();
    assert!(
        wait_for(Duration::from_secs(60), || {
            assert!(lab.is_running(vdd), "vdd exited:\n{}", read(&log));
            read(&log).contains("vdd serving")
        }),
        "vdd did not start:\n{}",
        read(&log)
    );

    // A DHCP client that stays: its first lease comes from the first pool.
    let client = lab.add_client(None).unwrap();
    let out = dir.join("udhcpc");
    std::fs::create_dir_all(&out).unwrap();
    let mut u = Lab::cmd(&client.ns, "udhcpc");
    u.args(["-f", "-t", "6", "-T", "2", "-i", "eth0", "-s"])
        .arg(udhcpc::script(&dir, UDHCPC_SCRIPT))
        .env("OUT", &out)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let udhcpc = lab.spawn("udhcpc", u).unwrap();
    assert!(wait_for(Duration::from_secs(30), || out
        .join("bound")
        .exists()));
    let bound = udhcpc::env_file(&out.join("bound")).unwrap();
    let leased = bound["ip"].clone();
    assert!(leased.starts_with("10.77.0.1"), "{bound:?}");

    // An NBD client reading the root export over one connection, throughout.
    let reader_ns = lab.add_client(None).unwrap();
    lab::ip([
        "-n",
        &reader_ns.ns,
        "addr",
        "add",
        "10.77.0.20/24",
        "dev",
        "eth0",
    ])
    .unwrap();
    let script = dir.join("reader.py");
    std::fs::write(&script, READER).unwrap();
    let (stop, result) = (dir.join("stop"), dir.join("reader.json"));
    let mut r = Lab::cmd(&reader_ns.ns, PYTHON);
    r.arg(&script)
        .arg(&stop)
        .arg(&result)
        .arg(0xaa.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("reader.err")).unwrap());
    let reader = lab.spawn("nbd reader", r).unwrap();
    assert!(
        wait_for(Duration::from_secs(30), || dir
            .join("reader.json.connected")
            .exists()),
        "the NBD reader did not connect: {}",
        read(&dir.join("reader.err"))
    );

    // A running session of the guest the reload will take off the menu.
    let (code, s) = api(
        &ns,
        "POST",
        "/api/v1/sessions",
        Some(&format!(r#"{{"guest": "demo", "seat": "{SEAT}"}}"#)),
    );
    assert_eq!(code, 201, "{s}");
    let id = s["id"].as_str().unwrap().to_string();

    // Reload: the pool shrinks past the client's address, the demo guest goes and
    // another comes, the export's file is another, and a restart-only key changes.
    let img_b_text = img_b.display().to_string();
    let reloaded = |dispatch: &str| {
        write_config(
            &dir,
            "10.77.0.150-10.77.0.199",
            &img_b_text,
            &["other", "fresh"],
            dispatch,
        );
        let text = read(&dir.join("config.toml"))
            .replace("port = 10809", "port = 10809\nmax_connections = 64");
        std::fs::write(dir.join("config.toml"), text).unwrap();
    };
    // (A key vdd does not know is refused as `vdd check` refuses it, before anything
    // changes.)
    reloaded("max_vms = 8\nbogus = 1\n");
    let (ok, _, err) = vdd_reload(&ns, &dir);
    assert!(!ok, "a config with an unknown key was taken");
    assert!(err.contains("unknown field `bogus`"), "{err}");
    assert_eq!(guest_names(&ns), ["demo", "other"]);
    reloaded("max_vms = 8\n");
    let (ok, stdout, err) = vdd_reload(&ns, &dir);
    assert!(ok, "vdd reload failed: {err}\n{}", read(&log));
    assert!(
        stdout.contains("applied dhcp, nbd, guests, dispatch"),
        "{stdout}"
    );
    assert!(stdout.contains("guests added: fresh"), "{stdout}");
    assert!(
        stdout.contains("guests removed (running sessions go on): demo"),
        "{stdout}"
    );
    assert!(
        stdout.contains("waiting for a restart: nbd.max_connections"),
        "{stdout}"
    );

    // The menu is the new one; the removed guest's session runs on.
    assert_eq!(guest_names(&ns), ["other", "fresh"]);
    let (code, got) = api(&ns, "GET", &format!("/api/v1/sessions/{id}"), None);
    assert_eq!(code, 200, "{got}");
    assert_eq!(got["state"], "ready", "{got}");
    assert!(
        !vmdir::vms_under(&dir).is_empty(),
        "the session's VM is gone"
    );

    // The client renews into a pool that no longer holds its address: it keeps it for
    // what is left of its lease.
    Command::new("kill")
        .args(["-USR1", &udhcpc.to_string()])
        .status()
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(30), || out.join("renew").exists()),
        "no renewal:\n{}",
        read(&log)
    );
    let renew = udhcpc::env_file(&out.join("renew")).unwrap();
    assert_eq!(renew["ip"], leased, "the lease was not kept");
    let left: u64 = renew["lease"].parse().unwrap();
    assert!(left <= 3600 && left > 0, "{renew:?}");
    lab.kill(udhcpc, "TERM").unwrap();
    // A new client gets an address of the new pool.
    let fresh = lab.add_client(None).unwrap();
    let script = udhcpc::script(&dir, UDHCPC_SCRIPT);
    let e = udhcpc::once(&dir, &fresh, &script, &[]);
    let last: u8 = e["ip"].rsplit('.').next().unwrap().parse().unwrap();
    assert!((150..=199).contains(&last), "{e:?}");

    // A new NBD connection reads the new file; the reader still reads the old one.
    assert_eq!(first_byte(&reader_ns.ns), 0xbb);
    // Replacing the file under its name changes what new connections get, not open ones.
    write_image(&img_b, 0xcc);
    assert_eq!(first_byte(&reader_ns.ns), 0xcc);

    // SIGHUP with an invalid file: refused with `vdd check`'s message, nothing changes.
    let good = read(&dir.join("config.toml"));
    std::fs::write(
        dir.join("config.toml"),
        good.replace("[dhcp]\n", "[dhcp]\nmode = \"fast\"\n"),
    )
    .unwrap();
    Command::new("kill")
        .args(["-HUP", &vdd.to_string()])
        .status()
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(30), || read(&log).contains(
            "config reload refused, the running config stays: dhcp.mode = \"fast\""
        )),
        "{}",
        read(&log)
    );
    assert_eq!(guest_names(&ns), ["other", "fresh"]);
    // SIGHUP with a good file applies it.
    std::fs::write(
        dir.join("config.toml"),
        good.replace("name = \"fresh\"", "name = \"demo\""),
    )
    .unwrap();
    Command::new("kill")
        .args(["-HUP", &vdd.to_string()])
        .status()
        .unwrap();
    assert!(wait_for(Duration::from_secs(30), || guest_names(&ns)
        == ["other", "demo"]));

    // The reader read only the old file, without an error, before and after it all.
    std::fs::write(&stop, b"").unwrap();
    assert!(wait_for(Duration::from_secs(60), || result.exists()));
    lab.kill(reader, "TERM").unwrap();
    let res: Value = serde_json::from_str(&read(&result)).unwrap();
    assert_eq!(
        res["error"],
        Value::Null,
        "{res} {}",
        read(&dir.join("reader.err"))
    );
    assert_eq!(res["bad"], 0, "{res}");
    assert!(res["passes"].as_u64().unwrap() >= 1, "{res}");

    let (code, v) = api(&ns, "DELETE", &format!("/api/v1/sessions/{id}"), None);
    assert_eq!(code, 204, "{v}");
    assert!(!read(&log).contains("panicked"), "{}", read(&log));
}
