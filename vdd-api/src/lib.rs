//! The types of vdd's HTTP API that both ends use: the server (`vdd`) writes them, the
//! thin client's PID 1 (`boot-menu`) reads them, and boot telemetry goes the other way.
//! One definition, so a state or a stage is an enum on both sides and never a string
//! compared here and spelled differently there.
//!
//! Only serde: boot-menu is linked statically into the initramfs of every thin client.

use serde::{Deserialize, Serialize};

/// How a session's display is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// A VNC viewer to `host:port` (the server) with the session's one-time password.
    Vnc,
    /// `X -query host`: the guest's display manager answers XDMCP on `host:177`.
    Xdmcp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Vnc => "vnc",
            Protocol::Xdmcp => "xdmcp",
        }
    }
}

/// Whether a session can be used yet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionState {
    /// The VM runs; an X11 guest's display manager has not answered XDMCP yet.
    Starting,
    /// Ready to connect to (a VNC session from the start). The default: a server older
    /// than session states sent none, and its sessions were ready.
    #[default]
    Ready,
    /// It did not come up; `error` says why; the VM is stopped.
    Failed,
}

impl SessionState {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Starting => "starting",
            SessionState::Ready => "ready",
            SessionState::Failed => "failed",
        }
    }
}

/// The DHCP vendor class (option 60) boot-menu's own DHCP client sends: how the server
/// tells the thin client's DHCP from its firmware's.
pub const DHCP_CLASS: &str = "vdd-boot-menu";

/// Where boot-menu reports the stages of its boot that only it sees.
pub const BOOT_REPORT_PATH: &str = "/api/v1/boot";

/// The most stages one report may carry (and so the most the server reads from it).
pub const MAX_REPORT_STAGES: usize = 16;

/// The firmware (or program) a seat's DHCP request came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    /// A legacy BIOS PXE ROM (option 93 arch 0).
    Bios,
    /// A UEFI PXE client (arch 6, 7, 9...).
    Uefi,
    /// iPXE (user class "iPXE", or option 175).
    Ipxe,
    /// boot-menu, the thin client's PID 1 ([`DHCP_CLASS`]).
    Client,
    /// Anything else that asked for an address.
    Other,
}

impl Firmware {
    pub fn as_str(self) -> &'static str {
        match self {
            Firmware::Bios => "bios",
            Firmware::Uefi => "uefi",
            Firmware::Ipxe => "ipxe",
            Firmware::Client => "client",
            Firmware::Other => "other",
        }
    }

    /// Whether this is a boot firmware (the start of a boot), not the booted system.
    pub fn is_boot_firmware(self) -> bool {
        matches!(self, Firmware::Bios | Firmware::Uefi | Firmware::Ipxe)
    }
}

/// A stage of a seat's boot, in the order a boot passes them. The server sees some
/// itself (DHCP, TFTP, HTTP, NBD, the session API); the thin client reports the others
/// ([`Stage::reported_by_client`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Seen by vdd: a DHCP DISCOVER (with the firmware that sent it).
    DhcpDiscover,
    /// Seen by vdd: a DHCP ACK (or a proxy ACK) sent.
    DhcpAck,
    /// Seen by vdd: the boot file (undionly.kpxe, ipxe.efi) sent over TFTP.
    TftpBootFile,
    /// Seen by vdd: the iPXE script sent over HTTP.
    HttpScript,
    /// Seen by vdd: the kernel sent over HTTP.
    HttpKernel,
    /// Seen by vdd: the initrd sent over HTTP.
    HttpInitrd,
    /// Reported: the kernel ran boot-menu as PID 1 (its uptime is the kernel's start).
    Pid1,
    /// Reported: the NIC and base modules are loaded.
    ModulesLoaded,
    /// Reported: the link is up (carrier).
    LinkUp,
    /// Reported: boot-menu's own DHCP lease is bound.
    ClientDhcp,
    /// Reported: the menu is on the screen.
    MenuShown,
    /// Seen by vdd: a session was started for the seat (the pick).
    SessionStarted,
    /// Seen by vdd: the root image's NBD connection opened.
    NbdConnected,
    /// Reported: the NBD root is attached (the kernel's NBD device is up).
    NbdAttached,
    /// Reported: the X server runs.
    XStarted,
    /// Seen by vdd: the session is ready (a VNC one at once, an X11 one when its display
    /// manager answers).
    SessionReady,
    /// Reported: the VNC viewer is connected, or the guest's display manager to the X
    /// server (X11).
    ViewerConnected,
    /// Seen by vdd: the session ended.
    SessionEnded,
}

impl Stage {
    /// Every stage, in boot order.
    pub const ALL: [Stage; 18] = [
        Stage::DhcpDiscover,
        Stage::DhcpAck,
        Stage::TftpBootFile,
        Stage::HttpScript,
        Stage::HttpKernel,
        Stage::HttpInitrd,
        Stage::Pid1,
        Stage::ModulesLoaded,
        Stage::LinkUp,
        Stage::ClientDhcp,
        Stage::MenuShown,
        Stage::SessionStarted,
        Stage::NbdConnected,
        Stage::NbdAttached,
        Stage::XStarted,
        Stage::SessionReady,
        Stage::ViewerConnected,
        Stage::SessionEnded,
    ];

    /// Whether only the thin client sees this stage (and so may report it); the server
    /// refuses reports of the stages it sees itself.
    pub fn reported_by_client(self) -> bool {
        matches!(
            self,
            Stage::Pid1
                | Stage::ModulesLoaded
                | Stage::LinkUp
                | Stage::ClientDhcp
                | Stage::MenuShown
                | Stage::NbdAttached
                | Stage::XStarted
                | Stage::ViewerConnected
        )
    }

    /// The name in the API, the metrics' `stage` label and the panel.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::DhcpDiscover => "dhcp_discover",
            Stage::DhcpAck => "dhcp_ack",
            Stage::TftpBootFile => "tftp_boot_file",
            Stage::HttpScript => "http_script",
            Stage::HttpKernel => "http_kernel",
            Stage::HttpInitrd => "http_initrd",
            Stage::Pid1 => "pid1",
            Stage::ModulesLoaded => "modules_loaded",
            Stage::LinkUp => "link_up",
            Stage::ClientDhcp => "client_dhcp",
            Stage::MenuShown => "menu_shown",
            Stage::SessionStarted => "session_started",
            Stage::NbdConnected => "nbd_connected",
            Stage::NbdAttached => "nbd_attached",
            Stage::XStarted => "x_started",
            Stage::SessionReady => "session_ready",
            Stage::ViewerConnected => "viewer_connected",
            Stage::SessionEnded => "session_ended",
        }
    }

    /// What the panel's timeline shows.
    pub fn label(self) -> &'static str {
        match self {
            Stage::DhcpDiscover => "DHCP discover",
            Stage::DhcpAck => "DHCP ack",
            Stage::TftpBootFile => "boot file over TFTP",
            Stage::HttpScript => "iPXE script over HTTP",
            Stage::HttpKernel => "kernel over HTTP",
            Stage::HttpInitrd => "initrd over HTTP",
            Stage::Pid1 => "kernel started PID 1",
            Stage::ModulesLoaded => "modules loaded",
            Stage::LinkUp => "link up",
            Stage::ClientDhcp => "thin client's DHCP bound",
            Stage::MenuShown => "menu shown",
            Stage::SessionStarted => "guest picked, session started",
            Stage::NbdConnected => "NBD connection opened",
            Stage::NbdAttached => "NBD root attached",
            Stage::XStarted => "X server started",
            Stage::SessionReady => "session ready",
            Stage::ViewerConnected => "viewer / X connected",
            Stage::SessionEnded => "session ended",
        }
    }
}

/// One stage as the thin client saw it: when, on its own clock (`/proc/uptime`, ms since
/// its kernel started), with an optional short detail ("eth0", "10.77.0.50", "demo").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportedStage {
    pub stage: Stage,
    pub uptime_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// `POST /api/v1/boot`: the stages boot-menu saw since its last report, and its uptime
/// when it sent them, so the server places each stage on its own clock (the thin
/// client's clock is not set; its uptime is all it has).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootReport {
    pub uptime_ms: u64,
    pub stages: Vec<ReportedStage>,
}

/// Each prints as it is spelled on the wire.
macro_rules! display_as_str {
    ($($t:ty),*) => {$(
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    )*};
}
display_as_str!(Protocol, SessionState, Firmware, Stage);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_on_the_wire() {
        for s in Stage::ALL {
            let j = serde_json::to_string(&s).unwrap();
            assert_eq!(j, format!("\"{}\"", s.as_str()));
            assert_eq!(serde_json::from_str::<Stage>(&j).unwrap(), s);
        }
        let mut sorted = Stage::ALL;
        sorted.sort();
        assert_eq!(sorted, Stage::ALL, "ALL is in boot order");
        assert_eq!(
            serde_json::to_string(&SessionState::Starting).unwrap(),
            "\"starting\""
        );
        assert_eq!(
            serde_json::to_string(&Protocol::Xdmcp).unwrap(),
            "\"xdmcp\""
        );
        assert_eq!(serde_json::to_string(&Firmware::Uefi).unwrap(), "\"uefi\"");
    }

    #[test]
    fn reports_round_trip_and_refuse_unknown_fields() {
        let r = BootReport {
            uptime_ms: 5200,
            stages: vec![ReportedStage {
                stage: Stage::Pid1,
                uptime_ms: 1800,
                detail: None,
            }],
        };
        let j = serde_json::to_string(&r).unwrap();
        assert_eq!(
            j,
            r#"{"uptime_ms":5200,"stages":[{"stage":"pid1","uptime_ms":1800}]}"#
        );
        assert_eq!(serde_json::from_str::<BootReport>(&j).unwrap(), r);
        assert!(
            serde_json::from_str::<BootReport>(r#"{"uptime_ms":1,"stages":[],"x":1}"#).is_err()
        );
        assert!(serde_json::from_str::<BootReport>(
            r#"{"uptime_ms":1,"stages":[{"stage":"warp_drive","uptime_ms":1}]}"#
        )
        .is_err());
    }
}
