//! Admission: whether one more VM fits (`dispatch.max_vms`, the memory budget) and which
//! VNC port of `dispatch.vnc_ports` it gets. Pure: the dispatcher says what is in use
//! (running sessions and starts in flight, under its lock) and whether the OS has a port
//! free; the answer is a port or the reason the server is full, which the seat sees.

/// The limits of one server.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_vms: usize,
    pub budget_mib: u64,
    /// MiB the state disk must keep free (`dispatch.disk_reserve`).
    pub disk_reserve_mib: u64,
    /// Inclusive.
    pub vnc_ports: (u16, u16),
}

/// What running sessions and starts in flight hold now.
#[derive(Clone, Copy, Debug)]
pub struct InUse<'a> {
    pub vms: usize,
    pub mib: u64,
    pub ports: &'a [u16],
    /// MiB free on the state disk now (`None`: unknown, not checked).
    pub disk_free_mib: Option<u64>,
}

/// What the new VM needs.
#[derive(Clone, Copy, Debug)]
pub struct Need<'a> {
    /// The guest's label, for the refusal.
    pub label: &'a str,
    pub mib: u64,
    /// A VNC server, and so a port (X11 guests have none).
    pub vnc: bool,
}

/// `Ok(Some(port))` for a VNC guest, `Ok(None)` for one without a screen, or why not
/// (checked in this order: VM slots, memory, the state disk, ports).
pub fn admit(
    l: &Limits,
    used: &InUse<'_>,
    need: &Need<'_>,
    port_free: impl Fn(u16) -> bool,
) -> Result<Option<u16>, String> {
    if used.vms >= l.max_vms {
        return Err(format!(
            "{} of {} VMs are running; end a session or ask the admin to raise dispatch.max_vms",
            used.vms, l.max_vms
        ));
    }
    if used.mib + need.mib > l.budget_mib {
        return Err(format!(
            "{} needs {} MiB and only {} MiB of the {} MiB budget are free",
            need.label,
            need.mib,
            l.budget_mib.saturating_sub(used.mib),
            l.budget_mib
        ));
    }
    if let Some(free) = used.disk_free_mib.filter(|f| *f < l.disk_reserve_mib) {
        return Err(format!(
            "only {free} MiB are free on the state disk, which must keep {} MiB (dispatch.disk_reserve) for the lease journal and the running guests' overlays",
            l.disk_reserve_mib
        ));
    }
    if !need.vnc {
        return Ok(None);
    }
    let (lo, hi) = l.vnc_ports;
    (lo..=hi)
        .find(|p| !used.ports.contains(p) && port_free(*p))
        .map(Some)
        .ok_or_else(|| format!("all VNC ports {lo}-{hi} are in use (dispatch.vnc_ports)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Limits = Limits {
        max_vms: 2,
        budget_mib: 1024,
        disk_reserve_mib: 100,
        vnc_ports: (5910, 5912),
    };

    fn need(mib: u64, vnc: bool) -> Need<'static> {
        Need {
            label: "Demo",
            mib,
            vnc,
        }
    }

    #[test]
    fn slots_then_memory_then_ports() {
        let free = |_| true;
        let idle = InUse {
            vms: 0,
            mib: 0,
            ports: &[],
            disk_free_mib: None,
        };
        assert_eq!(admit(&L, &idle, &need(512, true), free), Ok(Some(5910)));
        assert_eq!(admit(&L, &idle, &need(512, false), free), Ok(None));
        let full = InUse {
            vms: 2,
            mib: 0,
            ports: &[],
            disk_free_mib: None,
        };
        let e = admit(&L, &full, &need(1, true), free).unwrap_err();
        assert!(e.starts_with("2 of 2 VMs are running"), "{e}");
        let heavy = InUse {
            vms: 1,
            mib: 768,
            ports: &[5910],
            disk_free_mib: Some(1000),
        };
        let e = admit(&L, &heavy, &need(512, true), free).unwrap_err();
        assert_eq!(
            e,
            "Demo needs 512 MiB and only 256 MiB of the 1024 MiB budget are free"
        );
        // Exactly the budget fits.
        assert_eq!(admit(&L, &heavy, &need(256, true), free), Ok(Some(5911)));
        let disk_full = InUse {
            disk_free_mib: Some(99),
            ..heavy
        };
        let e = admit(&L, &disk_full, &need(256, false), free).unwrap_err();
        assert!(
            e.starts_with("only 99 MiB are free on the state disk"),
            "{e}"
        );
    }

    #[test]
    fn ports_held_by_vdd_or_by_anyone_else_are_skipped() {
        let used = InUse {
            vms: 0,
            mib: 0,
            ports: &[5910],
            disk_free_mib: Some(1000),
        };
        // 5911 is taken by a process vdd has no record of (an orphaned VM, another server).
        assert_eq!(
            admit(&L, &used, &need(1, true), |p| p != 5911),
            Ok(Some(5912))
        );
        let e = admit(&L, &used, &need(1, true), |p| p == 5910).unwrap_err();
        assert_eq!(e, "all VNC ports 5910-5912 are in use (dispatch.vnc_ports)");
        // A guest without a screen needs no port, even when none is free.
        assert_eq!(admit(&L, &used, &need(1, false), |_| false), Ok(None));
    }
}
