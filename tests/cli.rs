//! The `vdd` binary's command line: `check` on good and bad configs, `serve` without the
//! interface.

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
