//! The config's validation, section by section, on literal files.

use super::types::parse_mib;
use super::*;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

const GOOD: &str = r#"
[server]
interface = "vdd0"
state_dir = "state"

[dhcp]
mode = "full"
pool = "10.77.0.100-10.77.0.199"
lease_time = "1h"
router = "10.77.0.1"
dns = ["10.77.0.1"]

[[dhcp.host]]
mac = "52:54:00:00:00:01"
address = "10.77.0.50"
hostname = "seat-01"

[boot]
bios = "undionly.kpxe"
uefi = "ipxe.efi"
"#;

fn parse(s: &str) -> Result<Config, ConfigError> {
    Config::parse(s, Path::new("/etc/vdd/config.toml"))
}

fn err(s: &str) -> String {
    parse(s).unwrap_err().to_string()
}

#[test]
fn good_config_parses_with_defaults() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.server.state_dir, Path::new("/etc/vdd/state"));
    assert_eq!(c.tftp.root, Path::new("/etc/vdd/state/tftp"));
    assert_eq!(c.dhcp.pool.unwrap().len(), 100);
    assert_eq!(c.dhcp.lease_time, Duration::from_secs(3600));
    let mac: Mac = "52:54:00:00:00:01".parse().unwrap();
    assert_eq!(
        c.host(&mac).unwrap().address,
        Some(Ipv4Addr::new(10, 77, 0, 50))
    );
    assert_eq!(c.dhcp.port, 67);
    assert_eq!(c.http.port, 80);
    assert!(!c.nbd.enabled);
}

#[test]
fn per_address_caps_default_and_refuse_zero() {
    let c = parse(GOOD).unwrap();
    assert_eq!(
        (
            c.tftp.max_per_address,
            c.http.max_per_address,
            c.nbd.max_per_address
        ),
        (4, 16, 4)
    );
    for (table, key) in [("tftp", "tftp"), ("http", "http"), ("nbd", "nbd")] {
        let e = err(&format!("{GOOD}\n[{table}]\nmax_per_address = 0\n"));
        assert!(
            e.starts_with(&format!("{key}.max_per_address = \"0\"")),
            "{e}"
        );
    }
}

#[test]
fn shipped_config_passes() {
    let text = include_str!("../../config.toml");
    parse(text).unwrap();
}

#[test]
fn unknown_key_is_named() {
    let e = err(&GOOD.replace("lease_time", "lease_tim"));
    assert!(e.contains("unknown field `lease_tim`"), "{e}");
}

#[test]
fn unknown_mode_is_named() {
    let e = err(&GOOD.replace("mode = \"full\"", "mode = \"fast\""));
    assert!(e.starts_with("dhcp.mode = \"fast\""), "{e}");
    assert!(e.contains("proxy"), "{e}");
}

#[test]
fn malformed_mac_is_named() {
    let e = err(&GOOD.replace("52:54:00:00:00:01", "52:54:00:00:01"));
    assert!(
        e.starts_with("dhcp.host[0].mac = \"52:54:00:00:01\""),
        "{e}"
    );
}

#[test]
fn reservation_inside_pool_is_refused() {
    let e = err(&GOOD.replace("10.77.0.50", "10.77.0.150"));
    assert!(
        e.contains("dhcp.host[0].address") && e.contains("inside dhcp.pool"),
        "{e}"
    );
}

#[test]
fn same_address_reserved_twice_is_refused() {
    let twice =
        format!("{GOOD}\n[[dhcp.host]]\nmac = \"52:54:00:00:00:02\"\naddress = \"10.77.0.50\"\n");
    // [boot] came after the first host; TOML puts the second host in dhcp.host anyway.
    let e = err(&twice);
    assert!(
        e.contains("dhcp.host[1].address") && e.contains("dhcp.host[0]"),
        "{e}"
    );
}

#[test]
fn pool_outside_subnet_is_refused() {
    let e = err(&GOOD.replace(
        "interface = \"vdd0\"",
        "interface = \"vdd0\"\naddress = \"10.78.0.1/24\"",
    ));
    assert!(
        e.starts_with("dhcp.pool") && e.contains("10.78.0.0/24"),
        "{e}"
    );
}

#[test]
fn pool_checked_against_interface() {
    let mut c = parse(GOOD).unwrap();
    let iface = InterfaceInfo {
        name: "vdd0".into(),
        index: 3,
        addr: Some((
            Ipv4Addr::new(192, 168, 5, 1),
            "192.168.5.0/24".parse().unwrap(),
        )),
        mac: None,
    };
    let e = c.bind_interface(&iface).unwrap_err().to_string();
    assert!(e.contains("192.168.5.0/24"), "{e}");
    let mut c = parse(GOOD).unwrap();
    let iface = InterfaceInfo {
        addr: Some((Ipv4Addr::new(10, 77, 0, 1), "10.77.0.0/24".parse().unwrap())),
        ..iface
    };
    c.bind_interface(&iface).unwrap();
    assert_eq!(c.server_ip(), Some(Ipv4Addr::new(10, 77, 0, 1)));
}

#[test]
fn bad_values_are_named() {
    for (from, to, key) in [
        (
            "pool = \"10.77.0.100-10.77.0.199\"",
            "pool = \"10.77.0.199-10.77.0.100\"",
            "dhcp.pool",
        ),
        (
            "pool = \"10.77.0.100-10.77.0.199\"",
            "pool = \"lots\"",
            "dhcp.pool",
        ),
        (
            "lease_time = \"1h\"",
            "lease_time = \"forever\"",
            "dhcp.lease_time",
        ),
        (
            "lease_time = \"1h\"",
            "lease_time = \"5s\"",
            "dhcp.lease_time",
        ),
        (
            "router = \"10.77.0.1\"",
            "router = \"10.77.0\"",
            "dhcp.router",
        ),
        (
            "dns = [\"10.77.0.1\"]",
            "dns = [\"10.77.0.1\", \"x\"]",
            "dhcp.dns[1]",
        ),
        (
            "hostname = \"seat-01\"",
            "hostname = \"seat 01\"",
            "dhcp.host[0].hostname",
        ),
        (
            "interface = \"vdd0\"",
            "interface = \"\"",
            "server.interface",
        ),
    ] {
        let e = err(&GOOD.replace(from, to));
        assert!(e.starts_with(key), "{to}: {e}");
    }
}

#[test]
fn proxy_mode_needs_no_pool() {
    let s = GOOD
        .replace("mode = \"full\"", "mode = \"proxy\"")
        .replace("pool = \"10.77.0.100-10.77.0.199\"\n", "");
    let c = parse(&s).unwrap();
    assert_eq!(c.dhcp.mode, DhcpMode::Proxy);
    assert!(c.dhcp.pool.is_none());
    // Beside another DHCP server there may be a real IPv6 router: no RAs unless asked.
    assert!(!c.boot.ipv6_ra);
    assert!(parse(GOOD).unwrap().boot.ipv6_ra, "full mode answers RS");
    let off = parse(&GOOD.replace("[boot]\n", "[boot]\nipv6_ra = false\n")).unwrap();
    assert!(!off.boot.ipv6_ra);
}

#[test]
fn exports() {
    let s = format!(
        "{GOOD}\n[nbd]\nport = 10809\n[[nbd.export]]\nname = \"thin-client\"\npath = \"images/out/tc.squashfs\"\n[[nbd.export]]\nname = \"scratch\"\npath = \"/srv/s.img\"\nmode = \"overlay\"\npersist = true\n"
    );
    let c = parse(&s).unwrap();
    assert!(c.nbd.enabled);
    assert_eq!(
        c.nbd.exports[0].path,
        Path::new("/etc/vdd/images/out/tc.squashfs")
    );
    assert_eq!(c.nbd.exports[1].mode, ExportMode::Overlay);
    let e = err(&s.replace("mode = \"overlay\"", "mode = \"cow\""));
    assert!(e.starts_with("nbd.export[1].mode"), "{e}");
    let c = parse(&s.replace("[boot]", "[boot]\nroot = \"thin-client\"")).unwrap();
    assert_eq!(c.boot.root.as_deref(), Some("thin-client"));
    let e = err(&s.replace("[boot]", "[boot]\nroot = \"thin\""));
    assert!(
        e.starts_with("boot.root = \"thin\"") && e.contains("scratch"),
        "{e}"
    );
}

#[test]
fn warm_and_saved_starts() {
    let g = |extra: &str| {
        format!("{GOOD}\n[[guest]]\nname = \"demo\"\nimage = \"/srv/demo.img\"\n{extra}")
    };
    let c = parse(&g("")).unwrap();
    assert_eq!((c.guests[0].warm, c.guests[0].start), (0, Start::Boot));
    let c = parse(&g("warm = 2\nstart = \"saved\"\nscreen = \"1920x1080\"\n")).unwrap();
    assert_eq!((c.guests[0].warm, c.guests[0].start), (2, Start::Saved));
    assert_eq!(c.guests[0].screen, Some((1920, 1080)));
    for (extra, key, why) in [
        ("start = \"resume\"", "guest[0].start", "\"boot\""),
        ("warm = 65", "guest[0].warm", "between 0 and 64"),
        ("warm = 1\npersist = true", "guest[0].warm", "fresh disk"),
        (
            "start = \"saved\"\npersist = true",
            "guest[0].start",
            "kept one",
        ),
        (
            "display = \"x11\"\nstart = \"saved\"",
            "guest[0].start",
            "same ones on the LAN",
        ),
        (
            "warm = 3\n[dispatch]\nmax_vms = 2",
            "dispatch.max_vms",
            "3 warm VMs",
        ),
        ("screen = \"4000x3000\"", "guest[0].screen", "2560x1600"),
        ("screen = \"big\"", "guest[0].screen", "WIDTHxHEIGHT"),
        (
            "display = \"x11\"\nscreen = \"1024x768\"",
            "guest[0].screen",
            "VNC guests only",
        ),
    ] {
        let e = err(&g(extra));
        assert!(e.starts_with(key) && e.contains(why), "{extra}: {e}");
    }
}

#[test]
fn guests() {
    let s = format!(
        "{GOOD}\n[[guest]]\nname = \"debian\"\nlabel = \"Debian 12 desktop\"\ndisplay = \"vnc\"\nimage = \"/srv/vdd/guests/debian.qcow2\"\nmemory = \"2G\"\ncpus = 2\n[[guest]]\nname = \"demo\"\nimage = \"images/out/demo.img\"\n"
    );
    let c = parse(&s).unwrap();
    assert_eq!(c.guests.len(), 2);
    assert_eq!(c.guests[0].memory_mib, 2048);
    assert_eq!(c.guests[0].display, Display::Vnc);
    assert_eq!(c.guests[1].label, "demo");
    assert_eq!(c.guests[1].image, Path::new("/etc/vdd/images/out/demo.img"));
    assert!(
        !c.guests[0].nat,
        "a VNC guest has no way out unless nat = true"
    );
    let nat = parse(&s.replace("cpus = 2", "cpus = 2\nnat = true")).unwrap();
    assert!(nat.guests[0].nat);
    for (from, to, key) in [
        ("memory = \"2G\"", "memory = \"2 gigs\"", "guest[0].memory"),
        ("memory = \"2G\"", "memory = \"1M\"", "guest[0].memory"),
        ("display = \"vnc\"", "display = \"rdp\"", "guest[0].display"),
        ("name = \"demo\"", "name = \"debian\"", "guest[1].name"),
        ("name = \"demo\"", "name = \"Demo\"", "guest[1].name"),
        ("cpus = 2", "cpus = 0", "guest[0].cpus"),
    ] {
        let e = err(&s.replace(from, to));
        assert!(e.starts_with(key), "{to}: {e}");
    }
    let d = parse(&format!(
        "{s}\n[dispatch]\nmax_vms = 4\nvnc_ports = \"5901-5904\"\nmemory_budget = \"8G\"\n"
    ))
    .unwrap();
    assert_eq!(
        (
            d.dispatch.max_vms,
            d.dispatch.vnc_ports,
            d.dispatch.memory_budget_mib
        ),
        (4, (5901, 5904), Some(8192))
    );
    let e = err(&format!("{s}\n[dispatch]\nvnc_ports = \"80-90\"\n"));
    assert!(e.starts_with("dispatch.vnc_ports"), "{e}");
    assert_eq!(parse_mib("512M"), Some(512));
    assert_eq!(parse_mib("1024"), Some(1024));
    assert_eq!(parse_mib("1T"), Some(1 << 20));
}

#[test]
fn x11_keys() {
    let x11 = "\n[[guest]]\nname = \"desk\"\ndisplay = \"x11\"\nimage = \"/srv/desk.qcow2\"\n";
    let e = err(&format!("{GOOD}{x11}nat = true\n"));
    assert!(e.starts_with("guest[0].nat"), "{e}");
    let c = parse(&format!("{GOOD}{x11}")).unwrap();
    assert!(c.has_x11());
    assert_eq!(c.server.bridge, None);
    assert_eq!(c.dispatch.x11_timeout, Duration::from_secs(180));
    let with = GOOD.replace(
        "state_dir = \"state\"",
        "state_dir = \"state\"\nbridge = \"br0\"",
    );
    let c = parse(&format!("{with}{x11}\n[dispatch]\nx11_timeout = \"20s\"\n")).unwrap();
    assert_eq!(c.server.bridge.as_deref(), Some("br0"));
    assert_eq!(c.dispatch.x11_timeout, Duration::from_secs(20));
    assert!(!parse(GOOD).unwrap().has_x11());

    for (bridge, why) in [
        ("a-name-longer-than-15", "1-15"),
        ("", "1-15"),
        ("br/0", "1-15"),
        ("vdt-x", "taps"),
    ] {
        let e = err(&GOOD.replace(
            "state_dir = \"state\"",
            &format!("state_dir = \"state\"\nbridge = \"{bridge}\""),
        ));
        assert!(
            e.starts_with(&format!("server.bridge = {bridge:?}")) && e.contains(why),
            "{e}"
        );
    }
    for t in ["0s", "2h", "soon"] {
        let e = err(&format!("{GOOD}{x11}\n[dispatch]\nx11_timeout = \"{t}\"\n"));
        assert!(
            e.starts_with(&format!("dispatch.x11_timeout = {t:?}")),
            "{e}"
        );
    }
    // The one-time VNC password's lifetime, from when the seat is handed it.
    assert_eq!(
        parse(GOOD).unwrap().dispatch.password_lifetime,
        Duration::from_secs(60)
    );
    let c = parse(&format!("{GOOD}\n[dispatch]\npassword_lifetime = \"5s\"\n")).unwrap();
    assert_eq!(c.dispatch.password_lifetime, Duration::from_secs(5));
    for t in ["0s", "1h", "soon"] {
        let e = err(&format!(
            "{GOOD}\n[dispatch]\npassword_lifetime = \"{t}\"\n"
        ));
        assert!(
            e.starts_with(&format!("dispatch.password_lifetime = {t:?}")),
            "{e}"
        );
    }
    // vdd must hand out the guest's address itself to know it.
    for mode in ["proxy", "off"] {
        let s = GOOD
            .replace("mode = \"full\"", &format!("mode = \"{mode}\""))
            .replace("pool = \"10.77.0.100-10.77.0.199\"\n", "");
        let e = err(&format!("{s}{x11}"));
        assert!(
            e.starts_with("guest[0].display = \"x11\"")
                && e.contains("dhcp.mode = \"full\"")
                && e.contains(mode),
            "{e}"
        );
    }
}

#[test]
fn http_sendfile_key() {
    assert!(parse(GOOD).unwrap().http.sendfile);
    let c = parse(&format!("{GOOD}\n[http]\nsendfile = false\n")).unwrap();
    assert!(!c.http.sendfile);
}

#[test]
fn mac_round_trip() {
    let m: Mac = "52:54:00:AB:cd:0f".parse().unwrap();
    assert_eq!(m.to_string(), "52:54:00:ab:cd:0f");
    assert!("52:54:00:ab:cd".parse::<Mac>().is_err());
    assert!("52:54:00:ab:cd:0g".parse::<Mac>().is_err());
}
