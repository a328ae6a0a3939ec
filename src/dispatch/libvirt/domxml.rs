//! The XML vdd writes to libvirt (a session's domain, its overlay volume, a new VNC
//! password) and reads back from it (a volume's format, vdd's metadata on a domain, a
//! domain's VNC port). Pure, tested on strings; libvirt's formats are at
//! libvirt.org/formatdomain.html and formatstorage.html.

use std::net::Ipv4Addr;

use crate::config::Mac;

/// The XML namespace of vdd's element in a domain's `<metadata>`.
pub const META_NS: &str = "urn:x-vdd:session:1";

/// `s` safe inside an XML attribute or text.
fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '\'' => o.push_str("&apos;"),
            '"' => o.push_str("&quot;"),
            c => o.push(c),
        }
    }
    o
}

/// What vdd writes into a domain's metadata: whose session it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meta {
    /// The session id.
    pub id: String,
    /// The vdd it belongs to (`STATE_DIR/libvirt-owner`): another vdd's domains on a
    /// shared host are never touched.
    pub owner: String,
    pub guest: String,
}

/// How the guest is seen: VNC on the host's address, or a NIC on the host's LAN bridge.
#[derive(Clone, Debug)]
pub enum Screen {
    Vnc {
        listen: Ipv4Addr,
        port: u16,
        password: String,
        /// `passwdValidTo`: UTC, `YYYY-MM-DDTHH:MM:SS`.
        valid_to: String,
        /// A user-mode NIC (NAT out, nothing in), for `nat = true` guests.
        nat: bool,
    },
    Lan {
        bridge: String,
        mac: Mac,
        tap: String,
        nwfilter: Option<String>,
    },
}

/// A session's transient domain.
#[derive(Clone, Debug)]
pub struct Domain<'a> {
    pub name: &'a str,
    pub meta: &'a Meta,
    /// `kvm` or `qemu` (TCG).
    pub kind: &'a str,
    pub memory_mib: u64,
    pub cpus: u32,
    pub pool: &'a str,
    pub volume: &'a str,
    pub screen: &'a Screen,
}

/// The domain's XML. Like the QEMU backend's VM: q35, the overlay on SATA (QEMU's `if=ide`
/// on q35), standard VGA. A VNC guest has no NIC unless `nat` (the QEMU backend's is a
/// user-mode NIC with `restrict=on`, equally without a way out); an X11 guest has a virtio
/// NIC on the bridge and no display.
pub fn domain(d: &Domain<'_>) -> String {
    let devices = match d.screen {
        Screen::Vnc {
            listen,
            port,
            password,
            valid_to,
            nat,
        } => {
            let nic = if *nat {
                "<interface type='user'><model type='e1000'/></interface>"
            } else {
                ""
            };
            format!(
                "<graphics type='vnc' port='{port}' autoport='no' passwd='{}' passwdValidTo='{}'><listen type='address' address='{listen}'/></graphics>{nic}",
                esc(password),
                esc(valid_to)
            )
        }
        Screen::Lan {
            bridge,
            mac,
            tap,
            nwfilter,
        } => {
            let filter = nwfilter
                .as_deref()
                .map(|f| format!("<filterref filter='{}'/>", esc(f)))
                .unwrap_or_default();
            format!(
                "<interface type='bridge'><source bridge='{}'/><mac address='{mac}'/><model type='virtio'/><target dev='{}'/>{filter}</interface>",
                esc(bridge),
                esc(tap)
            )
        }
    };
    format!(
        "<domain type='{kind}'>\
<name>{name}</name>\
<metadata><vdd:session xmlns:vdd='{META_NS}' id='{id}' owner='{owner}' guest='{guest}'/></metadata>\
<memory unit='MiB'>{mem}</memory><vcpu>{cpus}</vcpu>\
<os><type arch='x86_64' machine='q35'>hvm</type><boot dev='hd'/></os>\
<features><acpi/></features>\
<on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>\
<devices>\
<disk type='volume' device='disk'><driver name='qemu' type='qcow2'/><source pool='{pool}' volume='{volume}'/><target dev='sda' bus='sata'/></disk>\
{devices}<video><model type='vga'/></video>\
</devices></domain>",
        kind = esc(d.kind),
        name = esc(d.name),
        id = esc(&d.meta.id),
        owner = esc(&d.meta.owner),
        guest = esc(&d.meta.guest),
        mem = d.memory_mib,
        cpus = d.cpus,
        pool = esc(d.pool),
        volume = esc(d.volume),
    )
}

/// A qcow2 overlay volume on `base` (a path on the host, of `format`); the base is only
/// read. 0600: what the guest writes is the seat's.
pub fn overlay_volume(name: &str, base: &str, format: &str) -> String {
    format!(
        "<volume><name>{}</name><capacity unit='bytes'>0</capacity>\
<target><format type='qcow2'/><permissions><mode>0600</mode></permissions></target>\
<backingStore><path>{}</path><format type='{}'/></backingStore></volume>",
        esc(name),
        esc(base),
        esc(format)
    )
}

/// The graphics device with a new password, for `virDomainUpdateDeviceFlags`: libvirt
/// wants its port and listen address unchanged.
pub fn vnc_password(listen: Ipv4Addr, port: u16, password: &str, valid_to: &str) -> String {
    format!(
        "<graphics type='vnc' port='{port}' autoport='no' passwd='{}' passwdValidTo='{}'><listen type='address' address='{listen}'/></graphics>",
        esc(password),
        esc(valid_to)
    )
}

/// `passwdValidTo` for `secs` from `now`: UTC, seconds.
pub fn valid_to(now: std::time::SystemTime, secs: u64) -> String {
    let t = now + std::time::Duration::from_secs(secs);
    let s = humantime::format_rfc3339_seconds(t).to_string();
    s.trim_end_matches('Z').to_string()
}

/// vdd's element from a domain's metadata, as `virDomainGetMetadata` returns it.
pub fn parse_meta(xml: &str) -> Option<Meta> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    let e = doc.root_element();
    (e.tag_name().name() == "session").then(|| Meta {
        id: e.attribute("id").unwrap_or_default().to_string(),
        owner: e.attribute("owner").unwrap_or_default().to_string(),
        guest: e.attribute("guest").unwrap_or_default().to_string(),
    })
}

/// A volume's path and format, from its XML.
pub fn volume_target(xml: &str) -> Option<(String, String)> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    let target = doc
        .root_element()
        .children()
        .find(|n| n.has_tag_name("target"))?;
    let path = target.children().find(|n| n.has_tag_name("path"))?.text()?;
    let format = target
        .children()
        .find(|n| n.has_tag_name("format"))
        .and_then(|f| f.attribute("type"))
        .unwrap_or("raw");
    Some((path.trim().to_string(), format.to_string()))
}

/// The VNC display of a running domain: its listen address and port.
pub fn vnc_display(xml: &str) -> Option<(Ipv4Addr, u16)> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    let g = doc
        .descendants()
        .find(|n| n.has_tag_name("graphics") && n.attribute("type") == Some("vnc"))?;
    let port = g.attribute("port")?.parse().ok()?;
    let listen = g
        .attribute("listen")
        .or_else(|| {
            g.children()
                .find(|n| n.has_tag_name("listen"))
                .and_then(|l| l.attribute("address"))
        })?
        .parse()
        .ok()?;
    Some((listen, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Meta {
        Meta {
            id: "0a1b2c3d4e5f".into(),
            owner: "1234abcd".into(),
            guest: "demo".into(),
        }
    }

    #[test]
    fn a_vnc_domain_names_its_session_and_screen() {
        let m = meta();
        let screen = Screen::Vnc {
            listen: Ipv4Addr::new(10, 77, 0, 11),
            port: 5910,
            password: "a'b<c>&d".into(),
            valid_to: "2026-12-03T16:56:08".into(),
            nat: false,
        };
        let x = domain(&Domain {
            name: "vdd-0a1b2c3d4e5f",
            meta: &m,
            kind: "qemu",
            memory_mib: 256,
            cpus: 2,
            pool: "default",
            volume: "vdd-1234abcd-0a1b2c3d4e5f.qcow2",
            screen: &screen,
        });
        let doc = roxmltree::Document::parse(&x).unwrap();
        let root = doc.root_element();
        assert_eq!(root.attribute("type"), Some("qemu"));
        let s = doc
            .descendants()
            .find(|n| n.tag_name().namespace() == Some(META_NS))
            .unwrap();
        assert_eq!(
            (s.attribute("id"), s.attribute("owner")),
            (Some("0a1b2c3d4e5f"), Some("1234abcd"))
        );
        let g = doc
            .descendants()
            .find(|n| n.has_tag_name("graphics"))
            .unwrap();
        // The password survives quoting as it was.
        assert_eq!(g.attribute("passwd"), Some("a'b<c>&d"));
        assert_eq!(vnc_display(&x), Some((Ipv4Addr::new(10, 77, 0, 11), 5910)));
        assert!(
            !x.contains("<interface"),
            "a VNC guest without nat has no NIC"
        );
        assert!(x.contains("<memory unit='MiB'>256</memory><vcpu>2</vcpu>"));
        assert!(x.contains("volume='vdd-1234abcd-0a1b2c3d4e5f.qcow2'"));
    }

    #[test]
    fn an_x11_domain_has_its_nic_on_the_bridge_and_no_screen() {
        let m = meta();
        let screen = Screen::Lan {
            bridge: "br0".into(),
            mac: "0a:01:02:03:04:05".parse().unwrap(),
            tap: "vdt-0a1b2c3d4e5".into(),
            nwfilter: Some("clean-traffic".into()),
        };
        let x = domain(&Domain {
            name: "vdd-0a1b2c3d4e5f",
            meta: &m,
            kind: "kvm",
            memory_mib: 1024,
            cpus: 1,
            pool: "default",
            volume: "v.qcow2",
            screen: &screen,
        });
        assert!(x.contains("<interface type='bridge'><source bridge='br0'/><mac address='0a:01:02:03:04:05'/><model type='virtio'/><target dev='vdt-0a1b2c3d4e5'/><filterref filter='clean-traffic'/></interface>"), "{x}");
        assert!(!x.contains("graphics"));
        assert_eq!(vnc_display(&x), None);
    }

    #[test]
    fn what_libvirt_answers_is_read() {
        // As virDomainGetMetadata returns vdd's element: without its prefix.
        let m =
            parse_meta(r#"<session id="s1" owner="abc" seat="52:54:00:00:00:01" guest="demo"/>"#)
                .unwrap();
        assert_eq!((m.id.as_str(), m.owner.as_str()), ("s1", "abc"));
        assert_eq!(parse_meta("<other/>"), None);
        assert_eq!(parse_meta("not xml"), None);
        let vol = "<volume type='file'><name>guest-demo.img</name><key>/p/guest-demo.img</key>\
<target><path>/p/guest-demo.img</path><format type='raw'/><permissions><mode>0644</mode></permissions></target></volume>";
        assert_eq!(
            volume_target(vol),
            Some(("/p/guest-demo.img".into(), "raw".into()))
        );
        // libvirt's live XML puts the address in both places.
        let live = "<domain><devices><graphics type='vnc' port='5911' autoport='no' listen='10.0.0.2'><listen type='address' address='10.0.0.2'/></graphics></devices></domain>";
        assert_eq!(vnc_display(live), Some((Ipv4Addr::new(10, 0, 0, 2), 5911)));
        let t = valid_to(std::time::UNIX_EPOCH, 60);
        assert_eq!(t, "1970-01-01T00:01:00");
        let v = overlay_volume("vdd-x.qcow2", "/p/guest demo.img", "raw");
        assert!(v.contains("<backingStore><path>/p/guest demo.img</path><format type='raw'/>"));
    }
}
