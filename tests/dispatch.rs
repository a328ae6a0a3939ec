//! The dispatcher against real QEMU: the demo guest boots on an overlay, its VNC server
//! takes only the session's current password (checked with an RFB client written here),
//! sessions are per seat, limits answer clearly, and a VM left by a "crashed" dispatcher
//! is adopted by the next one and stopped without a leak.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vdd::config::{Config, Mac};
use vdd::dispatch::{Dispatcher, Error, Who};

#[path = "common/vmdir.rs"]
mod vmdir;
use vmdir::VmDir;

fn skip() -> Option<String> {
    let mut why = Vec::new();
    for t in [
        "qemu-system-x86_64",
        "qemu-img",
        "mkfs.vfat",
        "mcopy",
        "syslinux",
        "cpio",
    ] {
        if xtask::lab::which(t).is_none() {
            why.push(format!("`{t}` not installed"));
        }
    }
    if why.is_empty() {
        return None;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI must provide: {}", why.join(", "));
    }
    Some(why.join(", "))
}

fn config(dir: &Path, ports: (u16, u16), max_vms: usize) -> Arc<Config> {
    config_with(dir, ports, max_vms, "")
}

/// [`config`] with more `[dispatch]` lines.
fn config_with(dir: &Path, ports: (u16, u16), max_vms: usize, dispatch: &str) -> Arc<Config> {
    let img = xtask::image::guest_demo(false).expect("building the demo guest");
    let text = format!(
        r#"
[server]
interface = "lo"
address = "127.0.0.1/8"
state_dir = "{state}"
[dhcp]
mode = "off"
[[guest]]
name = "demo"
label = "Demo"
image = "{img}"
memory = "128M"
[[guest]]
name = "missing"
image = "{state}/nope.img"
memory = "128M"
[dispatch]
max_vms = {max_vms}
vnc_ports = "{lo}-{hi}"
shutdown_timeout = "3s"
{dispatch}
"#,
        state = dir.display(),
        img = img.display(),
        lo = ports.0,
        hi = ports.1,
    );
    Arc::new(Config::parse(&text, &dir.join("config.toml")).unwrap())
}

/// Two free neighbouring ports on loopback in `lo..=hi`, from a place of this process's
/// own: the VMs of other test runs on this machine may hold some of the range.
fn free_pair(lo: u16, hi: u16) -> u16 {
    let span = (hi - lo) / 2;
    let start = (std::process::id() % u32::from(span)) as u16;
    (0..span)
        .map(|i| lo + ((start + i) % span) * 2)
        .find(|&p| {
            std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()
                && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok()
        })
        .expect("no two free ports for the test's VMs")
}

/// RFB authentication against the session's VNC server on loopback.
fn vnc_auth(port: u16, password: Option<&str>) -> std::io::Result<bool> {
    xtask::rfb::vnc_auth(([127, 0, 0, 1], port).into(), password).map_err(std::io::Error::other)
}

fn wait_serial(dir: &Path, id: &str, marker: &str) {
    let log = dir.join("sessions").join(id).join("serial.log");
    let end = Instant::now() + Duration::from_secs(120);
    while Instant::now() < end {
        if std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains(marker)
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!(
        "no {marker:?} from the guest: {:?}",
        std::fs::read_to_string(&log)
    );
}

fn seat(n: u8) -> Mac {
    Mac([0x52, 0x54, 0, 0, 0xaa, n])
}

/// Seat `n` asking with no key (a new session needs none).
fn fresh_seat(n: u8) -> Who<'static> {
    Who::Seat {
        mac: seat(n),
        key: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_boot_the_guest_behind_a_vnc_password() {
    if let Some(why) = skip() {
        eprintln!("skipping: {why}");
        return;
    }
    let dir = VmDir::new("dispatch");
    let base = free_pair(5960, 5999);
    let cfg = config(&dir, (base, base + 1), 2);
    let image = cfg.guests[0].image.clone();
    let image_sum = std::fs::read(&image).unwrap();
    let d = Dispatcher::new(cfg.clone()).await.unwrap();

    assert!(matches!(
        d.create(seat(1), "nope", fresh_seat(1)).await,
        Err(Error::UnknownGuest(_))
    ));
    assert!(matches!(
        d.create(seat(1), "missing", fresh_seat(1)).await,
        Err(Error::MissingImage { .. })
    ));

    let s = d.create(seat(1), "demo", fresh_seat(1)).await.unwrap();
    assert_eq!((s.protocol.as_str(), s.port), ("vnc", base));
    let pw = s.password.clone().unwrap();
    // QEMU's VNC server is up when create returns; the password lives 60 s from then, and
    // a guest booting under TCG on a loaded machine can take longer than that to draw.
    assert!(!vnc_auth(s.port, None).unwrap(), "no password accepted");
    assert!(
        !vnc_auth(s.port, Some("wrongpw1")).unwrap(),
        "a wrong password accepted"
    );
    assert!(
        vnc_auth(s.port, Some(&pw)).unwrap(),
        "the session's password refused"
    );
    wait_serial(&dir, &s.id, "banner drawn");
    // The session's folder (overlay, logs, the record with its key) is vdd's alone.
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let folder = dir.join("sessions").join(&s.id);
        assert_eq!(mode(&dir.join("sessions")), 0o700);
        assert_eq!(mode(&folder), 0o700);
        for f in ["session.json", "qemu.log"] {
            assert_eq!(mode(&folder.join(f)), 0o600, "{f}");
        }
        for e in std::fs::read_dir(&folder).unwrap().flatten() {
            if e.path().extension().is_some_and(|x| x == "qcow2") {
                assert_eq!(mode(&e.path()), 0o600, "{}", e.path().display());
            }
        }
    }

    // Per seat: another seat neither sees nor ends it; the same seat reattaches.
    assert!(d.list(Some(seat(2))).await.is_empty());
    assert_eq!(d.list(Some(seat(1))).await.len(), 1);
    let key = s.key.clone().expect("a new session comes with its key");
    let mine = Who::Seat {
        mac: seat(1),
        key: Some(&key),
    };
    // Seat 2 showing seat 1's key: still not its session.
    let theirs = Who::Seat {
        mac: seat(2),
        key: Some(&key),
    };
    assert!(matches!(
        d.end(&s.id, theirs).await,
        Err(Error::NotYours(_))
    ));
    // Issue 17, finding 1: a LAN host that clones seat 1's MAC has no key; it can
    // neither reattach (and so re-set the password), nor read, end or reset the session.
    let clone = fresh_seat(1);
    let wrong = Who::Seat {
        mac: seat(1),
        key: Some("00000000000000000000000000000000"),
    };
    for who in [clone, wrong] {
        assert!(matches!(
            d.create(seat(1), "demo", who).await,
            Err(Error::WrongKey(_))
        ));
        assert!(matches!(d.get(&s.id, who).await, Err(Error::WrongKey(_))));
        assert!(matches!(
            d.password(&s.id, who).await,
            Err(Error::WrongKey(_))
        ));
        assert!(matches!(d.end(&s.id, who).await, Err(Error::WrongKey(_))));
        assert!(matches!(d.reset(&s.id, who).await, Err(Error::WrongKey(_))));
    }
    assert!(
        vnc_auth(s.port, Some(&pw)).unwrap(),
        "a refused impersonator changed the password"
    );
    assert_eq!(
        d.get(&s.id, mine).await.unwrap().key,
        None,
        "GET shows the key"
    );
    let again = d.create(seat(1), "demo", mine).await.unwrap();
    assert_eq!(again.id, s.id);
    let pw2 = again.password.unwrap();
    assert_ne!(pw2, pw);
    assert!(
        !vnc_auth(s.port, Some(&pw)).unwrap(),
        "the old password still works"
    );
    assert!(vnc_auth(s.port, Some(&pw2)).unwrap());

    // Right before its viewer connects, the seat asks for a fresh password: it works, the
    // one before stops working, and only the session's own seat may ask.
    let fresh = d.password(&s.id, mine).await.unwrap();
    assert_eq!((fresh.id.as_str(), fresh.port), (s.id.as_str(), s.port));
    let pw3 = fresh.password.unwrap();
    assert!(![pw.as_str(), pw2.as_str()].contains(&pw3.as_str()));
    assert!(
        vnc_auth(s.port, Some(&pw3)).unwrap(),
        "the fresh password refused"
    );
    assert!(
        !vnc_auth(s.port, Some(&pw2)).unwrap(),
        "the password before the fresh one still works"
    );
    assert!(matches!(
        d.password(&s.id, theirs).await,
        Err(Error::NotYours(_))
    ));
    assert!(matches!(
        d.password("nope", mine).await,
        Err(Error::NotFound(_))
    ));

    // A second seat's session gets its own port and password; a third VM is over max_vms.
    let other = d.create(seat(2), "demo", fresh_seat(2)).await.unwrap();
    assert_eq!(other.port, base + 1);
    assert!(
        !vnc_auth(other.port, Some(&pw2)).unwrap(),
        "another session's password accepted"
    );
    match d.create(seat(3), "demo", fresh_seat(3)).await {
        Err(Error::Full(why)) => assert!(why.contains("max_vms"), "{why}"),
        r => panic!("expected Full, got {r:?}"),
    }

    // End: the VM and the session folder are gone; the base image is untouched.
    let pid =
        std::fs::read_to_string(dir.join("sessions").join(&s.id).join("session.json")).unwrap();
    d.end(&s.id, mine).await.unwrap();
    assert!(!dir.join("sessions").join(&s.id).exists());
    assert!(matches!(
        d.end(&s.id, Who::Admin).await,
        Err(Error::NotFound(_))
    ));
    assert!(pid.contains("\"pid\""));

    // "Crash": drop the dispatcher with a VM running; the next one adopts and stops it.
    drop(d);
    let d2 = Dispatcher::new(cfg.clone()).await.unwrap();
    let adopted = d2.list(None).await;
    assert_eq!(adopted.len(), 1, "{adopted:?}");
    assert_eq!(adopted[0].id, other.id);
    let rec =
        std::fs::read_to_string(dir.join("sessions").join(&other.id).join("session.json")).unwrap();
    let vm_pid: u32 = serde_json::from_str::<serde_json::Value>(&rec).unwrap()["pid"]
        .as_u64()
        .unwrap() as u32;
    d2.end(&other.id, Who::Admin).await.unwrap();
    assert!(
        !Path::new(&format!("/proc/{vm_pid}")).exists() || {
            let st = std::fs::read_to_string(format!("/proc/{vm_pid}/stat")).unwrap_or_default();
            st.contains(") Z")
        }
    );

    // Issue 17, finding 7: vdd killed after QEMU started but before the record: the
    // orphan kept its VNC port, and every new session failed with "Address already in
    // use". Now the next dispatcher stops a record-less VM of its folder.
    let lost = d2.create(seat(3), "demo", fresh_seat(3)).await.unwrap();
    let lost_dir = dir.join("sessions").join(&lost.id);
    let rec = std::fs::read_to_string(lost_dir.join("session.json")).unwrap();
    let lost_pid = serde_json::from_str::<serde_json::Value>(&rec).unwrap()["pid"]
        .as_u64()
        .unwrap() as u32;
    std::fs::remove_file(lost_dir.join("session.json")).unwrap();
    drop(d2);
    let d3 = Dispatcher::new(cfg.clone()).await.unwrap();
    assert!(d3.list(None).await.is_empty());
    assert!(
        vdd::dispatch::qemu::vms_of(&lost.id).is_empty(),
        "the record-less VM {lost_pid} still runs"
    );
    assert!(!lost_dir.exists());
    // A port something else holds is skipped, not handed to QEMU to fail on.
    // (Another run's VM may have taken it since the start: then it is held all the same.)
    let squatter = std::net::TcpListener::bind(("127.0.0.1", base)).ok();
    let s4 = d3.create(seat(4), "demo", fresh_seat(4)).await.unwrap();
    assert_eq!(s4.port, base + 1, "the taken port {base} was given out");
    drop(squatter);
    d3.end(&s4.id, Who::Admin).await.unwrap();

    assert_eq!(
        std::fs::read(&image).unwrap(),
        image_sum,
        "the base image was written"
    );
}

/// A slow seat (an old PC mounting its root and starting X for minutes): the password of
/// its pick has expired when its viewer is up, and the one it asks for right then opens
/// the display, however old the session; each is one-time (the next replaces it) and
/// expires unused. `password_lifetime` is 3 s here, so that nothing waits a minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_asked_for_late_opens_a_session_created_long_before() {
    if let Some(why) = skip() {
        eprintln!("skipping: {why}");
        return;
    }
    let dir = VmDir::new("dispatch-late");
    let base = free_pair(5960, 5999);
    let lifetime = Duration::from_secs(3);
    let cfg = config_with(&dir, (base, base + 1), 1, "password_lifetime = \"3s\"");
    let d = Dispatcher::new(cfg).await.unwrap();
    let s = d.create(seat(3), "demo", fresh_seat(3)).await.unwrap();
    let key = s.key.clone().unwrap();
    let mine = Who::Seat {
        mac: seat(3),
        key: Some(&key),
    };
    let at_pick = s.password.clone().unwrap();

    // The seat takes longer than the lifetime to get to its viewer.
    tokio::time::sleep(lifetime + Duration::from_secs(1)).await;
    assert!(
        !vnc_auth(s.port, Some(&at_pick)).unwrap(),
        "the pick's password still opens the display after its lifetime"
    );
    let fresh = d.password(&s.id, mine).await.unwrap().password.unwrap();
    assert!(
        vnc_auth(s.port, Some(&fresh)).unwrap(),
        "the password asked for right before the viewer was refused"
    );

    // One-time: the next one replaces it; unused, that one expires in its turn.
    let next = d.password(&s.id, mine).await.unwrap().password.unwrap();
    assert!(
        !vnc_auth(s.port, Some(&fresh)).unwrap(),
        "a replaced password still opens the display"
    );
    tokio::time::sleep(lifetime + Duration::from_secs(1)).await;
    assert!(
        !vnc_auth(s.port, Some(&next)).unwrap(),
        "an unused password opens the display after its lifetime"
    );
    d.end(&s.id, mine).await.unwrap();
}

/// A VM that dies ends its session (the watchdog sees it within seconds, logs it, and
/// removes the session's folder and overlay); a graceful stop of the dispatcher stops
/// every VM it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_vm_ends_its_session_and_shutdown_stops_the_rest() {
    if let Some(why) = skip() {
        eprintln!("skipping: {why}");
        return;
    }
    let dir = VmDir::new("dispatch-dead");
    let base = free_pair(5980, 5999);
    let cfg = config(&dir, (base, base + 1), 2);
    let d = Dispatcher::new(cfg).await.unwrap();
    let token = tokio_util::sync::CancellationToken::new();
    let watchdog = tokio::spawn(d.clone().run(token.clone()));

    let a = d.create(seat(1), "demo", fresh_seat(1)).await.unwrap();
    let b = d.create(seat(2), "demo", fresh_seat(2)).await.unwrap();
    let pid_of = |id: &str| -> u32 {
        let rec =
            std::fs::read_to_string(dir.join("sessions").join(id).join("session.json")).unwrap();
        serde_json::from_str::<serde_json::Value>(&rec).unwrap()["pid"]
            .as_u64()
            .unwrap() as u32
    };
    let (pa, pb) = (pid_of(&a.id), pid_of(&b.id));
    // The VM of `a` dies under us.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pa as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let end = Instant::now() + Duration::from_secs(30);
    while d.list(None).await.iter().any(|s| s.id == a.id) {
        assert!(
            Instant::now() < end,
            "the dead VM's session is still listed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!dir.join("sessions").join(&a.id).exists());
    assert_eq!(d.list(None).await.len(), 1);

    // Shutdown stops `b`'s VM (the demo guest ignores ACPI; quit ends it).
    token.cancel();
    watchdog.await.unwrap();
    let gone = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| s.contains(") Z"))
    };
    assert!(gone(pb), "the VM outlived the dispatcher's shutdown");
    assert!(!dir.join("sessions").join(&b.id).exists());
}
