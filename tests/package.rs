//! The config the Debian package ships as /etc/vdd/config.toml (debian/config.toml):
//! `vdd check` passes on it as it is, and `vdd serve` refuses it until the admin has
//! named the LAN interface, so an installed but unedited vdd never answers DHCP.
//! (`cargo xtask e2e deb` installs the package for real.)

use std::process::Command;

const SHIPPED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/debian/config.toml");

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

#[test]
fn check_passes_on_the_packaged_config() {
    let (ok, out, err) = vdd(&["check", "--config", SHIPPED]);
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
    let (ok, _, err) = vdd(&["serve", "--config", SHIPPED]);
    assert!(!ok);
    assert!(
        err.contains("server.interface = \"EDIT-lan\": no such interface"),
        "{err}"
    );
}
