//! The `vdd` binary's command line: `check` on good and bad configs (the repo's example and
//! the one the Debian package ships), `serve` without the interface.

use std::process::Command;

fn vdd(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vdd"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The config the Debian package ships as /etc/vdd/config.toml.
const PACKAGED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/debian/config.toml");

fn shipped() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml")).unwrap()
}

#[test]
fn check_passes_on_shipped_config_without_the_interface() {
    let (ok, out, err) = vdd(&[
        "check",
        "--config",
        concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml"),
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("is valid") && out.contains("pool 10.77.0.100-10.77.0.199"),
        "{out}"
    );
    assert!(err.contains("no such interface here"), "{err}");
}

#[test]
fn check_names_the_bad_key() {
    let dir = tempdir();
    for (from, to, expect) in [
        ("mode = \"full\"", "mode = \"fast\"", "dhcp.mode = \"fast\""),
        ("52:54:00:00:00:01", "52:54:00:00:01", "dhcp.host[0].mac"),
        ("10.77.0.50", "10.77.0.150", "inside dhcp.pool"),
        ("lease_time", "lease_tme", "unknown field `lease_tme`"),
        (
            "# address = \"10.77.0.1/24\"",
            "address = \"10.1.0.1/24\"",
            "dhcp.pool",
        ),
    ] {
        let text = shipped().replace(from, to);
        assert_ne!(text, shipped(), "{from} not in config.toml");
        let p = dir.join("bad.toml");
        std::fs::write(&p, text).unwrap();
        let (ok, _, err) = vdd(&["check", "--config", p.to_str().unwrap()]);
        assert!(!ok);
        assert!(
            err.contains("vdd: error:") && err.contains(expect),
            "{to}: {err}"
        );
        assert_eq!(
            err.lines().filter(|l| l.contains("error")).count(),
            1,
            "{err}"
        );
    }
}

#[test]
fn serve_refuses_without_the_interface() {
    let dir = tempdir();
    let p = dir.join("c.toml");
    std::fs::write(&p, shipped().replace("\"vdd0\"", "\"vddnone0\"")).unwrap();
    let (ok, _, err) = vdd(&["serve", "--config", p.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains("server.interface = \"vddnone0\": no such interface"),
        "{err}"
    );
}

/// A temporary folder, removed when dropped.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn join(&self, p: &str) -> std::path::PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir() -> TempDir {
    let d = std::env::temp_dir().join(format!(
        "vdd-cli-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&d).unwrap();
    TempDir(d)
}

/// Under systemd (`Type=notify`), `vdd serve` says READY=1 once every service listens,
/// and STOPPING=1 when it is told to stop; the journal gets no second timestamp.
#[test]
fn serve_tells_systemd_when_it_is_ready_and_when_it_stops() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempdir();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let p = dir.join("c.toml");
    std::fs::write(
        &p,
        format!(
            "[server]\ninterface = \"lo\"\naddress = \"127.0.0.1/8\"\nstate_dir = \"state\"\n\
             [dhcp]\nmode = \"off\"\n[boot]\nipv6_ra = false\n[tftp]\nenabled = false\n\
             [http]\nport = {port}\nadmin_token = \"status-token-0123456789\"\n[nbd]\nenabled = false\n"
        ),
    )
    .unwrap();
    let sock_path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_vdd"))
        .args(["serve", "--config", p.to_str().unwrap()])
        .env("NOTIFY_SOCKET", &sock_path)
        .env("JOURNAL_STREAM", "8:12345")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).expect("READY=1 within 30 s");
    assert_eq!(&buf[..n], b"READY=1\n");
    // Ready means listening; `vdd status` asks it for its summary with the config's token.
    let (ok, out, err) = vdd(&["status", "--config", p.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(
        out.contains("sessions   none (no [[guest]] configured)"),
        "{out}"
    );
    assert!(out.contains("leases     - active"), "{out}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let n = sock.recv(&mut buf).expect("STOPPING=1");
    assert_eq!(&buf[..n], b"STOPPING=1\n");
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    let first = log.lines().next().unwrap_or_default();
    assert!(
        first.starts_with(" INFO") || first.starts_with("INFO"),
        "a timestamp or colours in the journal's line: {first:?}"
    );
}

/// The packaged config is valid as it is, and `vdd serve` refuses it until the admin has
/// named the LAN interface, so an installed but unedited vdd never answers DHCP.
/// (`cargo xtask e2e deb` installs the package for real.)
#[test]
fn check_passes_on_the_packaged_config() {
    let (ok, out, err) = vdd(&["check", "--config", PACKAGED]);
    assert!(ok, "{err}");
    for want in [
        "is valid",
        "interface  EDIT-lan",
        "state      /var/lib/vdd",
        "/var/lib/vdd/thin-client/vmlinuz",
        "export   thin-client  /var/lib/vdd/thin-client/thin-client.squashfs",
        "guest    desktop",
    ] {
        assert!(out.contains(want), "{want:?} not in:\n{out}");
    }
    assert!(err.contains("no such interface here"), "{err}");
}

#[test]
fn serve_refuses_the_packaged_config_until_the_interface_is_named() {
    let (ok, _, err) = vdd(&["serve", "--config", PACKAGED]);
    assert!(!ok);
    assert!(
        err.contains("server.interface = \"EDIT-lan\": no such interface"),
        "{err}"
    );
}
