//! `[dispatch]`: the limits and tools of the guests' VMs.

use std::time::Duration;

use serde::Deserialize;

use super::types::{at_least_one, parse_duration, parse_mib};
use super::{invalid, ConfigError};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WireDispatch {
    max_vms: Option<usize>,
    memory_budget: Option<String>,
    disk_reserve: Option<String>,
    vnc_ports: Option<String>,
    idle_timeout: Option<String>,
    accel: Option<String>,
    qemu: Option<String>,
    shutdown_timeout: Option<String>,
    x11_timeout: Option<String>,
    password_lifetime: Option<String>,
    placement: Option<String>,
    #[serde(default)]
    host: Vec<super::hosts::WireHost>,
}

/// Which accelerator guest VMs get.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccelChoice {
    /// KVM where a probe shows it really runs guests, TCG otherwise (with a warning).
    Auto,
    Kvm,
    Tcg,
}

/// Limits and tools of the dispatcher (guest VMs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dispatch {
    pub max_vms: usize,
    /// MiB of guest memory all sessions together may use; `None`: 80% of the machine's.
    pub memory_budget_mib: Option<u64>,
    /// MiB that must stay free on the state disk for a new VM to start: overlays grow
    /// there, beside the lease journal (`dispatch.disk_reserve`).
    pub disk_reserve_mib: u64,
    /// TCP ports for the VMs' VNC servers, inclusive.
    pub vnc_ports: (u16, u16),
    /// A seat whose client has not been seen this long gets its VMs stopped.
    pub idle_timeout: Duration,
    pub accel: AccelChoice,
    pub qemu: String,
    /// How long each step of a VM's shutdown (powerdown, quit) may take.
    pub shutdown_timeout: Duration,
    /// How long an X11 guest's display manager may take to answer XDMCP after its VM
    /// starts (`dispatch.x11_timeout`).
    pub x11_timeout: Duration,
    /// How long a VNC guest's one-time password opens its display, from the moment it is
    /// handed to the seat (`dispatch.password_lifetime`).
    pub password_lifetime: Duration,
    /// `[[dispatch.host]]`: with any, VMs run on these hosts over libvirt.
    pub hosts: Vec<super::hosts::HvHost>,
    pub placement: super::hosts::Placement,
}

fn vnc_ports(v: Option<&str>) -> Result<(u16, u16), ConfigError> {
    let Some(s) = v else {
        return Ok((5910, 5999));
    };
    let bad = || {
        invalid(
            "dispatch.vnc_ports",
            s,
            "FIRST-LAST within 5900-65535, such as \"5910-5999\"",
        )
    };
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let a: u16 = a.trim().parse().map_err(|_| bad())?;
    let b: u16 = b.trim().parse().map_err(|_| bad())?;
    if a < 5900 || a > b {
        return Err(bad());
    }
    Ok((a, b))
}

impl TryFrom<WireDispatch> for Dispatch {
    type Error = ConfigError;

    fn try_from(wd: WireDispatch) -> Result<Dispatch, ConfigError> {
        let vnc_ports = vnc_ports(wd.vnc_ports.as_deref())?;
        Ok(Dispatch {
            max_vms: at_least_one("dispatch.max_vms", wd.max_vms, 16, "at least 1")?,
            memory_budget_mib: match wd.memory_budget.as_deref() {
                None | Some("auto") => None,
                Some(m) => Some(parse_mib(m).filter(|&n| n >= 64).ok_or_else(|| {
                    invalid(
                        "dispatch.memory_budget",
                        m,
                        "\"auto\" (80% of the machine's memory) or a size such as \"16G\"",
                    )
                })?),
            },
            disk_reserve_mib: match wd.disk_reserve.as_deref() {
                None => 1024,
                Some(m) => parse_mib(m).ok_or_else(|| {
                    invalid(
                        "dispatch.disk_reserve",
                        m,
                        "a size such as \"1G\" (\"0\": no reserve)",
                    )
                })?,
            },
            vnc_ports,
            idle_timeout: parse_duration("dispatch.idle_timeout", wd.idle_timeout.as_deref(), 600)?,
            accel: match wd.accel.as_deref().unwrap_or("auto") {
                "auto" => AccelChoice::Auto,
                "kvm" => AccelChoice::Kvm,
                "tcg" => AccelChoice::Tcg,
                other => {
                    return Err(invalid(
                        "dispatch.accel",
                        other,
                        "\"auto\", \"kvm\" or \"tcg\"",
                    ))
                }
            },
            qemu: wd.qemu.unwrap_or_else(|| "qemu-system-x86_64".into()),
            shutdown_timeout: parse_duration(
                "dispatch.shutdown_timeout",
                wd.shutdown_timeout.as_deref(),
                20,
            )?,
            x11_timeout: {
                let d = parse_duration("dispatch.x11_timeout", wd.x11_timeout.as_deref(), 180)?;
                if d < Duration::from_secs(1) || d > Duration::from_secs(3600) {
                    return Err(invalid(
                        "dispatch.x11_timeout",
                        wd.x11_timeout.as_deref().unwrap_or_default(),
                        "between \"1s\" and \"1h\"; \"3m\" gives a slow guest time to boot",
                    ));
                }
                d
            },
            password_lifetime: {
                let d = parse_duration(
                    "dispatch.password_lifetime",
                    wd.password_lifetime.as_deref(),
                    60,
                )?;
                if d < Duration::from_secs(1) || d > Duration::from_secs(600) {
                    return Err(invalid(
                        "dispatch.password_lifetime",
                        wd.password_lifetime.as_deref().unwrap_or_default(),
                        "between \"1s\" and \"10m\"; the seat asks for it right before its viewer connects, so \"1m\" is plenty",
                    ));
                }
                d
            },
            hosts: super::hosts::hosts(wd.host)?,
            placement: super::hosts::placement(wd.placement.as_deref())?,
        })
    }
}
