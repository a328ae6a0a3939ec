//! Instant desktops against real QEMU (the demo guest, TCG): a warm pool is taken by a
//! pick, refills, gives way to a seat when the server is full and is rebuilt when the
//! guest's base image changes; a saved state is made once the guest is up, sessions and
//! resets resume from it, a restarted dispatcher uses it again, and a corrupt or missing
//! state file means a cold boot (and a new save), never a broken session. Whatever one
//! seat's guest wrote to its disk is not on the next seat's. What the guest shows is read
//! over VNC with the RFB client of xtask (the demo guest paints its screen magenta).
//!
//! Every wait is a poll with a deadline; times are printed, never asserted.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use vdd::config::{Config, Mac};
use vdd::dispatch::{Dispatcher, SessionInfo, Usage, Who};

fn skip() -> Option<String> {
    // The dispatcher's log lines (fallbacks, saves, refills) go with the test's output.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "vdd=info".into()),
        )
        .with_test_writer()
        .try_init();
    xtask::lab::missing(&[
        "qemu-system-x86_64",
        "qemu-img",
        "mkfs.vfat",
        "mcopy",
        "syslinux",
        "cpio",
    ])
}

#[path = "common/vmdir.rs"]
mod vmdir;
use vmdir::{vms_under, VmDir};

/// The test's folder (its VMs killed with it), with its own copy of the demo guest's
/// image: the tests change it.
fn test_dir(tag: &str) -> VmDir {
    let d = VmDir::new(tag);
    let img = xtask::image::guest_demo(false).expect("building the demo guest");
    std::fs::copy(img, d.join("demo.img")).unwrap();
    d
}

fn config(dir: &Path, guests: &str, max_vms: usize, ports: u16) -> Arc<Config> {
    let text = format!(
        r#"
[server]
interface = "lo"
address = "127.0.0.1/8"
state_dir = "{state}"
[dhcp]
mode = "off"
{guests}
[dispatch]
max_vms = {max_vms}
vnc_ports = "{ports}-{hi}"
shutdown_timeout = "3s"
"#,
        state = dir.join("state").display(),
        hi = ports + 9,
    );
    let text = text.replace("IMAGE", &dir.join("demo.img").display().to_string());
    Arc::new(Config::parse(&text, &dir.join("config.toml")).unwrap())
}

fn seat(n: u8) -> Mac {
    Mac([0x52, 0x54, 0, 0, 0xbb, n])
}

fn who(n: u8) -> Who<'static> {
    Who::Seat {
        mac: seat(n),
        key: None,
    }
}

/// Polls `f` every 250 ms until it gives `Some`, or fails after `limit` saying `what`.
async fn until<T>(limit: Duration, what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let end = Instant::now() + limit;
    loop {
        if let Some(t) = f().await {
            return t;
        }
        assert!(Instant::now() < end, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn usage(d: &Dispatcher) -> Usage {
    vdd::dispatch::Sessions::usage(d).await
}

/// Seconds until the session's VNC display shows the demo guest's magenta screen.
async fn shows_guest(s: &SessionInfo, limit: Duration) -> f64 {
    shows_guest_at(s, limit).await.0
}

/// [`shows_guest`], and the size of the screen.
async fn shows_guest_at(s: &SessionInfo, limit: Duration) -> (f64, usize, usize) {
    let addr = (std::net::Ipv4Addr::LOCALHOST, s.port).into();
    let pw = s.password.clone().expect("a VNC session's password");
    let t0 = Instant::now();
    let f = tokio::task::spawn_blocking(move || {
        xtask::rfb::watch(addr, &pw, limit, |f| f.magenta_share() > 0.5)
    })
    .await
    .unwrap()
    .expect("the guest's screen over VNC");
    (t0.elapsed().as_secs_f64(), f.width, f.height)
}

/// Writes a pattern to the session's disk through its VM's block layer (HMP `qemu-io`
/// on the guest's drive, then a flush), as the guest's own writes reach it.
async fn guest_writes(dir: &Path, id: &str) {
    let qmp = dir.join("state/sessions").join(id).join("qmp.sock");
    let mut q = qemu_ctl::qmp::Qmp::connect(&qmp, Duration::from_secs(10))
        .await
        .unwrap();
    for cmd in ["write -P 0x5a 0 64k", "flush"] {
        q.execute(
            "human-monitor-command",
            Some(serde_json::json!({"command-line": format!("qemu-io ide0-hd0 \"{cmd}\"")})),
        )
        .await
        .unwrap();
    }
}

/// Whether the disk a session sees (its overlay and what is under it) holds the pattern,
/// read by `qemu-io` beside the running VM (`-U`: shared, read-only).
fn disk_has_pattern(dir: &Path, id: &str) -> bool {
    let overlay = dir.join("state/sessions").join(id).join("overlay.qcow2");
    let out = std::process::Command::new("qemu-io")
        .args(["-r", "-U", "-c", "read -P 0x5a 0 64k"])
        .arg(&overlay)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("read 65536/65536"), "qemu-io: {text}");
    !text.contains("Pattern verification failed")
}

/// Seat `a`'s session writes to its disk and ends; seat `b`'s next session (of the pool
/// or the saved state) must not see it.
async fn writes_stay_with_their_seat(
    dir: &Path,
    d: &Dispatcher,
    a: &SessionInfo,
    b: u8,
    guest: &str,
) -> SessionInfo {
    guest_writes(dir, &a.id).await;
    assert!(
        disk_has_pattern(dir, &a.id),
        "the write did not reach the session's disk"
    );
    d.end(&a.id, Who::Admin).await.unwrap();
    let next = d.create(seat(b), guest, who(b)).await.unwrap();
    assert!(
        !disk_has_pattern(dir, &next.id),
        "the next seat's disk has what the last seat's guest wrote"
    );
    next
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_pool_refills_gives_way_and_is_rebuilt() {
    if let Some(why) = skip() {
        eprintln!("skipping: {why}");
        return;
    }
    let dir = test_dir("instant-warm");
    let base = 6300 + (std::process::id() % 40) as u16 * 10;
    let guests = r#"
[[guest]]
name = "demo"
image = "IMAGE"
memory = "128M"
warm = 1
[[guest]]
name = "other"
image = "IMAGE"
memory = "128M"
"#;
    let cfg = config(&dir, guests, 2, base);
    let image_before = std::fs::read(dir.join("demo.img")).unwrap();
    let d = Dispatcher::new(cfg).await.unwrap();
    let token = CancellationToken::new();
    let run = tokio::spawn(d.clone().run(token.clone()));
    let warm_ids = || {
        let mut v: Vec<String> = std::fs::read_dir(dir.join("state/sessions"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("session.json")).ok())
            .filter_map(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .filter(|v| v["warm"] == true)
            .filter_map(|v| Some(v["id"].as_str()?.to_string()))
            .collect();
        v.sort();
        v
    };

    // The pool fills; no seat sees its VM.
    let t0 = Instant::now();
    until(Duration::from_secs(120), "a warm VM", async || {
        (usage(&d).await.warm == 1).then_some(())
    })
    .await;
    eprintln!(
        "warm VM started {:.1} s after the dispatcher",
        t0.elapsed().as_secs_f64()
    );
    assert!(d.list(None).await.is_empty(), "a warm VM is listed");
    let first = warm_ids();
    assert_eq!(first.len(), 1);
    // Its display takes no password at all until a seat picks it.
    let port = std::fs::read(
        dir.join("state/sessions")
            .join(&first[0])
            .join("session.json"),
    )
    .ok()
    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
    .and_then(|v| v["port"].as_u64())
    .expect("the warm VM's port") as u16;
    let addr = (std::net::Ipv4Addr::LOCALHOST, port).into();
    for pw in [None, Some(""), Some("AbCd2345")] {
        let took = tokio::task::spawn_blocking(move || xtask::rfb::vnc_auth(addr, pw))
            .await
            .unwrap()
            .unwrap();
        assert!(!took, "a warm VM's display took the password {pw:?}");
    }

    // A pick takes it: same VM, now the seat's, behind the seat's password.
    let t = Instant::now();
    let a = d.create(seat(1), "demo", who(1)).await.unwrap();
    eprintln!("warm pick answered in {:.3} s", t.elapsed().as_secs_f64());
    assert_eq!((a.start.as_str(), &a.id), ("warm", &first[0]));
    eprintln!(
        "warm pick to the guest's screen: {:.1} s",
        shows_guest(&a, Duration::from_secs(120)).await
    );
    let u = usage(&d).await;
    assert_eq!(
        (u.starts["demo"].warm_hits, u.starts["demo"].warm_misses),
        (1, 0)
    );

    // The pool refills in the background.
    until(Duration::from_secs(120), "the pool's refill", async || {
        let w = warm_ids();
        (w.len() == 1 && w != first).then_some(())
    })
    .await;
    assert_eq!(usage(&d).await.vms, 2);

    // Full (2 of 2): a seat's pick of another guest stops the warm VM instead of failing.
    let b = d.create(seat(2), "other", who(2)).await.unwrap();
    assert_eq!(b.start, "boot");
    let u = usage(&d).await;
    assert_eq!((u.vms, u.warm), (2, 0), "{u:?}");
    // With no warm VM left to stop, the next seat is refused.
    let refused = d.create(seat(3), "other", who(3)).await;
    assert!(
        matches!(refused, Err(vdd::dispatch::Error::Full(_))),
        "{refused:?}"
    );
    d.end(&b.id, Who::Admin).await.unwrap();
    until(
        Duration::from_secs(120),
        "the refill after a seat left",
        async || (usage(&d).await.warm == 1).then_some(()),
    )
    .await;

    // What seat 1 wrote is not on the disk of seat 4's warm VM.
    let c = writes_stay_with_their_seat(&dir, &d, &a, 4, "demo").await;
    assert_eq!(c.start, "warm");
    d.end(&c.id, Who::Admin).await.unwrap();

    // A changed base image: the warm VM is replaced by one on the new image.
    let before = until(Duration::from_secs(120), "a warm VM", async || {
        let w = warm_ids();
        (w.len() == 1).then_some(w)
    })
    .await;
    let img = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("demo.img"))
        .unwrap();
    img.set_modified(std::time::SystemTime::now() + Duration::from_secs(5))
        .unwrap();
    drop(img);
    until(
        Duration::from_secs(120),
        "a warm VM on the new image",
        async || {
            let w = warm_ids();
            (w.len() == 1 && w != before).then_some(())
        },
    )
    .await;

    // A seat with another screen: its guest starts at that size (a miss), and the pool
    // is rebuilt for it.
    let screen = vdd::dispatch::ScreenSize {
        width: 1280,
        height: 720,
    };
    let before = warm_ids();
    let e = d
        .create_at(seat(5), "demo", who(5), Some(screen))
        .await
        .unwrap();
    assert_eq!((e.start.as_str(), e.screen), ("boot", Some(screen)));
    let (secs, w, h) = shows_guest_at(&e, Duration::from_secs(120)).await;
    eprintln!("cold boot at 1280x720 to the guest's screen: {secs:.1} s");
    assert_eq!(
        (w, h),
        (1280, 720),
        "the guest did not take the seat's screen size"
    );
    d.end(&e.id, Who::Admin).await.unwrap();
    until(
        Duration::from_secs(120),
        "a warm VM for the new screen",
        async || {
            let w = warm_ids();
            (w.len() == 1 && w != before).then_some(())
        },
    )
    .await;
    let f = d
        .create_at(seat(6), "demo", who(6), Some(screen))
        .await
        .unwrap();
    assert_eq!(f.start, "warm");
    assert_eq!(shows_guest_at(&f, Duration::from_secs(120)).await.1, 1280);

    token.cancel();
    run.await.unwrap();
    assert!(vms_under(&dir).is_empty(), "VMs outlived the dispatcher");
    assert_eq!(
        std::fs::read(dir.join("demo.img")).unwrap(),
        image_before,
        "the base image was written"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saved_state_starts_restarts_and_falls_back() {
    if let Some(why) = skip() {
        eprintln!("skipping: {why}");
        return;
    }
    let dir = test_dir("instant-saved");
    let base = 6700 + (std::process::id() % 40) as u16 * 10;
    let guests = r#"
[[guest]]
name = "demo"
image = "IMAGE"
memory = "128M"
start = "saved"
"#;
    let cfg = config(&dir, guests, 4, base);
    let d = Dispatcher::new(cfg.clone()).await.unwrap();
    let token = CancellationToken::new();
    let run = tokio::spawn(d.clone().run(token.clone()));

    // Saved once the guest is up; nothing of the save runs afterwards.
    let t0 = Instant::now();
    let saved = until(Duration::from_secs(300), "the saved state", async || {
        usage(&d).await.saved.first().cloned()
    })
    .await;
    eprintln!(
        "saved after {:.1} s: boot {:.1} s, save {:.1} s, state {:.1} MiB, frozen disk {:.2} MiB",
        t0.elapsed().as_secs_f64(),
        saved.boot_secs,
        saved.save_secs,
        saved.state_mib,
        saved.disk_mib
    );
    assert_eq!(usage(&d).await.vms, 0);
    let saved_dir = std::fs::read_dir(dir.join("state/saved/demo"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .next()
        .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(saved_dir.join("disk.qcow2"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o400, "the frozen disk is not read-only");
    }

    // A pick resumes from it; so does a reset.
    let t = Instant::now();
    let a = d.create(seat(1), "demo", who(1)).await.unwrap();
    eprintln!("saved pick answered in {:.3} s", t.elapsed().as_secs_f64());
    assert_eq!(a.start, "saved");
    eprintln!(
        "saved pick to the guest's screen: {:.1} s",
        shows_guest(&a, Duration::from_secs(60)).await
    );
    let key = a.key.clone().unwrap();
    let mine = Who::Seat {
        mac: seat(1),
        key: Some(&key),
    };
    let t = Instant::now();
    let r = d.reset(&a.id, mine).await.unwrap();
    assert_eq!(r.start, "saved");
    eprintln!(
        "reset to the guest's screen: {:.1} s",
        t.elapsed().as_secs_f64() + shows_guest(&r, Duration::from_secs(60)).await
    );
    // What seat 1 wrote is not on seat 2's disk, which sits on the same frozen one.
    let b = writes_stay_with_their_seat(&dir, &d, &r, 2, "demo").await;
    assert_eq!(b.start, "saved");
    d.end(&b.id, Who::Admin).await.unwrap();

    // vdd restarts: the next dispatcher starts from the same state, without saving anew.
    token.cancel();
    run.await.unwrap();
    drop(d);
    let d = Dispatcher::new(cfg.clone()).await.unwrap();
    let token = CancellationToken::new();
    let run = tokio::spawn(d.clone().run(token.clone()));
    let c = d.create(seat(3), "demo", who(3)).await.unwrap();
    assert_eq!(
        c.start, "saved",
        "the restarted dispatcher did not use the saved state"
    );
    shows_guest(&c, Duration::from_secs(60)).await;
    assert!(saved_dir.join("state").exists());
    d.end(&c.id, Who::Admin).await.unwrap();

    // A corrupt state file: a cold boot that works, and the state is saved again.
    let state = saved_dir.join("state");
    let mut bytes = std::fs::read(&state).unwrap();
    let mid = bytes.len() / 2;
    bytes.truncate(mid);
    bytes.extend(std::iter::repeat_n(0xa5u8, 4096));
    std::fs::write(&state, &bytes).unwrap();
    let e = d.create(seat(4), "demo", who(4)).await.unwrap();
    assert_eq!(e.start, "boot");
    eprintln!(
        "cold boot (corrupt state) to the guest's screen: {:.1} s",
        shows_guest(&e, Duration::from_secs(120)).await
    );
    assert_eq!(usage(&d).await.starts["demo"].saved_fallbacks, 1);
    d.end(&e.id, Who::Admin).await.unwrap();
    until(
        Duration::from_secs(300),
        "the state saved again",
        async || (!usage(&d).await.saved.is_empty()).then_some(()),
    )
    .await;
    let f = d.create(seat(5), "demo", who(5)).await.unwrap();
    assert_eq!(f.start, "saved");
    d.end(&f.id, Who::Admin).await.unwrap();

    // A missing one: the same.
    let saved_dir = std::fs::read_dir(dir.join("state/saved/demo"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .next()
        .unwrap();
    std::fs::remove_file(saved_dir.join("state")).unwrap();
    let g = d.create(seat(6), "demo", who(6)).await.unwrap();
    assert_eq!(g.start, "boot");
    shows_guest(&g, Duration::from_secs(120)).await;
    d.end(&g.id, Who::Admin).await.unwrap();

    token.cancel();
    run.await.unwrap();
    assert!(vms_under(&dir).is_empty(), "VMs outlived the dispatcher");
}
