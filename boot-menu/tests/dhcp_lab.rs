//! boot-menu's DHCP client (RFC 2131) and netlink set-up against real servers, busybox
//! udhcpd and dnsmasq, in a lab network namespace (xtask::lab): the client namespace's
//! eth0 must end up with the leased address and a default route via the lab server.
//!
//! These live in boot-menu/tests rather than the top-level tests/ because they run the
//! boot-menu binary (`CARGO_BIN_EXE_boot-menu` exists only for the package's own tests).

use std::process::Command;

use xtask::lab::{self, Lab};

/// Runs `boot-menu dhcp eth0 [renew]` in the client namespace and checks the result;
/// returns its stdout.
fn lease_in(ns: &str, renew: bool) -> String {
    let bin = env!("CARGO_BIN_EXE_boot-menu");
    // The client gives up by itself after 90 s; `timeout` is the backstop against a hang.
    let out = Command::new("timeout")
        .args(["150", "ip", "netns", "exec", ns, bin, "dhcp", "eth0"])
        .args(renew.then_some("renew"))
        .output()
        .expect("running boot-menu");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "boot-menu dhcp failed: {}\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    // "vdd-boot-menu: dhcp bound 10.77.0.1xx/24 router 10.77.0.1 server 10.77.0.1"
    let line = stdout
        .lines()
        .find(|l| l.starts_with("vdd-boot-menu: dhcp bound "))
        .unwrap_or_else(|| panic!("no bound line in {stdout}\n{stderr}"));
    let w: Vec<&str> = line.split_whitespace().collect();
    let (ip, prefix) = w[3].split_once('/').unwrap();
    let ip: std::net::Ipv4Addr = ip.parse().unwrap();
    assert_eq!(prefix, "24");
    assert_eq!(&ip.octets()[..3], &[10, 77, 0]);
    assert!(
        (100..=150).contains(&ip.octets()[3]),
        "{ip} outside the pool"
    );
    assert_eq!(w[5], lab::SERVER_IP.to_string());
    assert_eq!(w[7], lab::SERVER_IP.to_string());

    let addr = Command::new("ip")
        .args(["-n", ns, "-4", "-o", "addr", "show", "dev", "eth0"])
        .output()
        .unwrap();
    let addr = String::from_utf8_lossy(&addr.stdout);
    assert!(addr.contains(&format!("inet {ip}/24")), "{addr}");
    let route = Command::new("ip")
        .args(["-n", ns, "-4", "route", "show", "default"])
        .output()
        .unwrap();
    let route = String::from_utf8_lossy(&route.stdout);
    assert!(
        route.contains(&format!(
            "default via {} dev eth0 proto dhcp",
            lab::SERVER_IP
        )),
        "{route}"
    );
    // The address really works: the server answers a ping from it.
    let ping = Command::new("ip")
        .args(["netns", "exec", ns, "ping", "-c", "1", "-W", "10"])
        .arg(lab::SERVER_IP.to_string())
        .output()
        .unwrap();
    assert!(
        ping.status.success(),
        "{}",
        String::from_utf8_lossy(&ping.stdout)
    );
    stdout.into_owned()
}

#[test]
fn leases_and_renews_with_busybox_udhcpd() {
    if let Some(why) = lab::missing(&["busybox", "timeout", "ping"]) {
        eprintln!("skip: {why}");
        return;
    }
    let mut lab = Lab::new("bmudh").unwrap();
    let c = lab.add_client(None).unwrap();
    let dir = std::env::temp_dir().join(format!("bm-udhcpd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("udhcpd.conf");
    // An 8 s lease (udhcpd's floor is min_lease): T1 comes after 4 s, so the test also
    // sees a real RENEWING exchange.
    std::fs::write(
        &conf,
        format!(
            "start 10.77.0.100\nend 10.77.0.150\ninterface {}\nlease_file {}\npidfile {}\nmin_lease 8\noption subnet 255.255.255.0\noption router {}\noption lease 8\n",
            lab::BRIDGE,
            dir.join("leases").display(),
            dir.join("pid").display(),
            lab::SERVER_IP
        ),
    )
    .unwrap();
    std::fs::write(dir.join("leases"), b"").unwrap();
    let mut cmd = Lab::cmd(&lab.server_ns, "busybox");
    cmd.args(["udhcpd", "-f"]).arg(&conf);
    lab.spawn("udhcpd", cmd).unwrap();
    let out = lease_in(&c.ns, true);
    assert!(
        out.lines()
            .any(|l| l.starts_with("vdd-boot-menu: dhcp renewed 10.77.0.")),
        "{out}"
    );
    drop(lab);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn leases_from_dnsmasq() {
    if let Some(why) = lab::missing(&["dnsmasq", "timeout", "ping"]) {
        eprintln!("skip: {why}");
        return;
    }
    let mut lab = Lab::new("bmdnsm").unwrap();
    let c = lab.add_client(None).unwrap();
    let dir = std::env::temp_dir().join(format!("bm-dnsmasq-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut cmd = Lab::cmd(&lab.server_ns, "dnsmasq");
    cmd.args([
        "--no-daemon",
        "--conf-file=/dev/null",
        "--port=0",
        "--user=root",
        "--bind-interfaces",
        &format!("--interface={}", lab::BRIDGE),
        "--dhcp-range=10.77.0.100,10.77.0.150,255.255.255.0,10m",
        &format!("--dhcp-option=3,{}", lab::SERVER_IP),
        &format!("--dhcp-leasefile={}", dir.join("leases").display()),
        &format!("--pid-file={}", dir.join("pid").display()),
    ]);
    lab.spawn("dnsmasq", cmd).unwrap();
    lease_in(&c.ns, false);
    drop(lab);
    let _ = std::fs::remove_dir_all(&dir);
}
