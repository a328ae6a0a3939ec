//! `[[dispatch.host]]` and `dispatch.placement`: the hypervisor hosts of the libvirt
//! backend. With no host the guests' VMs run on vdd's own machine (the QEMU backend).

use std::net::Ipv4Addr;

use serde::Deserialize;

use super::types::{parse_ip, parse_mib};
use super::{invalid, ConfigError};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WireHost {
    name: String,
    uri: String,
    memory: String,
    cpus: u32,
    address: String,
    pool: Option<String>,
    bridge: Option<String>,
    nwfilter: Option<String>,
}

/// One hypervisor host, reached over libvirt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HvHost {
    /// Short id, in logs, session records and volume names.
    pub name: String,
    /// The libvirt URI (`qemu+ssh://root@hv1/system`, `qemu+tls://hv1/system`).
    pub uri: String,
    /// MiB of guest memory vdd may give VMs on this host.
    pub memory_mib: u64,
    /// vCPUs vdd may give VMs on this host.
    pub cpus: u32,
    /// The host's LAN address: its VMs' VNC displays listen there.
    pub address: Ipv4Addr,
    /// The libvirt storage pool that holds the guests' base images (by file name) and
    /// gets the sessions' overlays.
    pub pool: String,
    /// The LAN bridge on the host that X11 guests' NICs join.
    pub bridge: Option<String>,
    /// A libvirt nwfilter for X11 guests' NICs (the tap filter of the QEMU backend is
    /// vdd's own machine's; on a host, libvirt's `clean-traffic` is the like).
    pub nwfilter: Option<String>,
}

/// How a new session's host is chosen among those with room.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// The least loaded host (memory and CPU, see `dispatch/placement.rs`).
    Spread,
    /// The first host in the file's order with room: later hosts take the overflow.
    Pack,
}

pub(super) fn placement(v: Option<&str>) -> Result<Placement, ConfigError> {
    match v.unwrap_or("spread") {
        "spread" => Ok(Placement::Spread),
        "pack" => Ok(Placement::Pack),
        other => Err(invalid(
            "dispatch.placement",
            other,
            "\"spread\" (the least loaded host) or \"pack\" (the first host with room, in the file's order)",
        )),
    }
}

pub(super) fn hosts(wire: Vec<WireHost>) -> Result<Vec<HvHost>, ConfigError> {
    let mut hosts: Vec<HvHost> = Vec::new();
    for (i, h) in wire.into_iter().enumerate() {
        let key = |k: &str| format!("dispatch.host[{i}].{k}");
        let ok_name = !h.name.is_empty()
            && h.name.len() <= 32
            && h.name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !ok_name || hosts.iter().any(|o| o.name == h.name) {
            return Err(invalid(
                key("name"),
                &h.name,
                "a unique short id: lower-case letters, digits, '-'",
            ));
        }
        if !h.uri.contains("://") {
            return Err(invalid(
                key("uri"),
                &h.uri,
                "a libvirt URI such as \"qemu+ssh://root@hv1/system\"",
            ));
        }
        let memory_mib = parse_mib(&h.memory)
            .filter(|m| *m >= 64)
            .ok_or_else(|| invalid(key("memory"), &h.memory, "a size such as \"32G\""))?;
        if h.cpus == 0 {
            return Err(invalid(key("cpus"), 0, "at least 1"));
        }
        let word = |k: &str, v: Option<String>| -> Result<Option<String>, ConfigError> {
            match v {
                Some(s)
                    if s.is_empty()
                        || s.chars().any(|c| c.is_whitespace() || "<>&'\"".contains(c)) =>
                {
                    Err(invalid(
                        key(k),
                        s,
                        "a libvirt name: no spaces, quotes or <>&",
                    ))
                }
                v => Ok(v),
            }
        };
        hosts.push(HvHost {
            address: parse_ip(&key("address"), &h.address)?,
            pool: word("pool", h.pool)?.unwrap_or_else(|| "default".into()),
            bridge: word("bridge", h.bridge)?,
            nwfilter: word("nwfilter", h.nwfilter)?,
            name: h.name,
            uri: h.uri,
            memory_mib,
            cpus: h.cpus,
        });
    }
    Ok(hosts)
}

/// An X11 guest's NIC joins the host's LAN bridge: with an X11 guest, each host names one.
pub(super) fn check_bridges(hosts: &[HvHost], guests: &[super::Guest]) -> Result<(), ConfigError> {
    let Some(g) = guests.iter().find(|g| g.display == super::Display::X11) else {
        return Ok(());
    };
    match hosts.iter().position(|h| h.bridge.is_none()) {
        None => Ok(()),
        Some(i) => Err(invalid(
            format!("dispatch.host[{i}].bridge"),
            "",
            format!(
                "X11 guest {:?} has its NIC on the LAN: name the host's bridge that joins the thin clients' LAN",
                g.name
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Config, Placement};

    const BASE: &str = r#"
[server]
interface = "vdd0"
address = "10.77.0.1/24"
[dhcp]
mode = "full"
pool = "10.77.0.100-10.77.0.199"
[[guest]]
name = "demo"
image = "/srv/demo.img"
"#;

    const HOST: &str = r#"
[[dispatch.host]]
name = "hv1"
uri = "qemu+ssh://root@hv1/system"
memory = "8G"
cpus = 4
address = "10.77.0.11"
"#;

    fn parse(s: &str) -> Result<Config, String> {
        Config::parse(s, std::path::Path::new("/etc/vdd/config.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn hosts_parse_with_defaults() {
        let c = parse(BASE).unwrap();
        assert!(c.dispatch.hosts.is_empty(), "no host: the QEMU backend");
        assert_eq!(c.dispatch.placement, Placement::Spread);
        let c = parse(&format!("{BASE}[dispatch]\nplacement = \"pack\"\n{HOST}")).unwrap();
        let h = &c.dispatch.hosts[0];
        assert_eq!(
            (h.name.as_str(), h.memory_mib, h.cpus, h.pool.as_str()),
            ("hv1", 8192, 4, "default")
        );
        assert_eq!(h.address, std::net::Ipv4Addr::new(10, 77, 0, 11));
        assert_eq!((h.bridge.as_deref(), h.nwfilter.as_deref()), (None, None));
        assert_eq!(c.dispatch.placement, Placement::Pack);
    }

    #[test]
    fn bad_hosts_name_the_key() {
        let cases = [
            (
                HOST.replace("hv1\"", "HV 1\""),
                "dispatch.host[0].name = \"HV 1\"",
            ),
            (
                HOST.replace("qemu+ssh://root@hv1/system", "hv1"),
                "dispatch.host[0].uri = \"hv1\"",
            ),
            (
                HOST.replace("8G", "lots"),
                "dispatch.host[0].memory = \"lots\"",
            ),
            (
                HOST.replace("cpus = 4", "cpus = 0"),
                "dispatch.host[0].cpus = \"0\"",
            ),
            (
                HOST.replace("10.77.0.11", "hv1.lan"),
                "dispatch.host[0].address = \"hv1.lan\"",
            ),
            (
                format!("{HOST}pool = \"my pool\"\n"),
                "dispatch.host[0].pool = \"my pool\"",
            ),
            (format!("{HOST}{HOST}"), "dispatch.host[1].name = \"hv1\""),
            (format!("{HOST}extra = 1\n"), "unknown field `extra`"),
        ];
        for (hosts, want) in cases {
            let e = parse(&format!("{BASE}{hosts}")).unwrap_err();
            assert!(e.contains(want), "{want}: {e}");
        }
        let e = parse(&format!("{BASE}[dispatch]\nplacement = \"random\"\n")).unwrap_err();
        assert!(e.starts_with("dispatch.placement = \"random\""), "{e}");
    }

    #[test]
    fn an_x11_guest_needs_a_bridge_on_every_host() {
        let x11 = "[[guest]]\nname = \"desk\"\ndisplay = \"x11\"\nimage = \"/srv/desk.qcow2\"\n";
        let e = parse(&format!("{BASE}{x11}{HOST}")).unwrap_err();
        assert!(
            e.starts_with("dispatch.host[0].bridge = \"\": X11 guest \"desk\""),
            "{e}"
        );
        let c = parse(&format!("{BASE}{x11}{HOST}bridge = \"br0\"\n")).unwrap();
        assert_eq!(c.dispatch.hosts[0].bridge.as_deref(), Some("br0"));
    }

    #[test]
    fn warm_and_saved_need_the_local_backend() {
        for (extra, want) in [
            (
                "warm = 1\n",
                "guest[0].warm = \"1\": warm pools run on vdd's own QEMU only",
            ),
            (
                "start = \"saved\"\n",
                "guest[0].start = \"saved\": saved-state starts run on vdd's own QEMU only",
            ),
        ] {
            let e = parse(&format!("{BASE}{extra}{HOST}")).unwrap_err();
            assert!(e.starts_with(want), "{extra}: {e}");
            parse(&format!("{BASE}{extra}")).unwrap();
        }
    }
}
