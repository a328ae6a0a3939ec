//! Placement: which hypervisor host a new VM goes to. Pure: the libvirt backend says what
//! each host has (its allowance from `[[dispatch.host]]`, what vdd placed there, what the
//! host itself reports) and gets an index or the reason no host has room, which the seat
//! sees.
//!
//! The model is OpenUDS's: skip hosts without the VM's memory plus 512 MiB free, then take
//! the lowest `mem/maxmem + 1.3 * cpu/maxcpu`. What is done better here, and why:
//! - Room is also vdd's own commitment to the host: the guests' memory sizes against the
//!   host's `memory` and their vCPUs against its `cpus`. A freshly booted guest has
//!   touched little of its memory, so the host's free memory alone lets a host fill up
//!   with VMs that later grow into more than it has.
//! - VMs still starting count at once, on both sides: OpenUDS's figures are samples, so a
//!   burst of picks within one sampling period all go to the host that looked emptiest
//!   (the test `a_burst_spreads_where_sampled_figures_pile_up` shows it).
//! - The score is taken with the new VM placed, and each of its two terms is the larger
//!   of vdd's commitment and what the host reports (memory in use, CPU busy): a large VM
//!   prefers the host where it is a smaller share, and load that is not vdd's (another
//!   tenant of the host) counts too.
//! - A host that stopped answering is never picked.

/// The headroom a host keeps besides the VM's memory (OpenUDS's rule).
pub const HEADROOM_MIB: u64 = 512;
/// OpenUDS's weight of CPU against memory.
pub const CPU_WEIGHT: f64 = 1.3;

/// One host as placement sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct HostView<'a> {
    pub name: &'a str,
    /// Answering now.
    pub up: bool,
    /// `[[dispatch.host]]` `memory` and `cpus`: what vdd may give VMs there.
    pub limit_mib: u64,
    pub limit_cpus: u32,
    /// What vdd's VMs there (running and starting) were given.
    pub placed_mib: u64,
    pub placed_cpus: u32,
    /// The host's own figures, from its last answer: memory it has in all and free
    /// (free + buffers + page cache), less what VMs still starting there will take; the
    /// share of its CPU time that was busy (0..1).
    pub total_mib: u64,
    pub free_mib: u64,
    pub cpu_busy: f64,
    /// It has a LAN bridge configured (X11 guests need one).
    pub bridge: bool,
}

/// What the new VM needs.
#[derive(Clone, Copy, Debug)]
pub struct Want<'a> {
    pub label: &'a str,
    pub mib: u64,
    pub cpus: u32,
    pub bridge: bool,
}

/// The policy, `dispatch.placement`.
pub use crate::config::Placement;

/// Why `h` cannot take `w`, or `None` when it can.
fn no_room(h: &HostView<'_>, w: &Want<'_>) -> Option<String> {
    if !h.up {
        return Some(format!("{}: not answering", h.name));
    }
    if w.bridge && !h.bridge {
        return Some(format!("{}: no LAN bridge", h.name));
    }
    if h.placed_mib + w.mib > h.limit_mib {
        return Some(format!(
            "{}: {} of its {} MiB in use",
            h.name, h.placed_mib, h.limit_mib
        ));
    }
    if h.placed_cpus + w.cpus > h.limit_cpus {
        return Some(format!(
            "{}: {} of its {} vCPUs in use",
            h.name, h.placed_cpus, h.limit_cpus
        ));
    }
    if h.free_mib < w.mib + HEADROOM_MIB {
        return Some(format!("{}: only {} MiB free", h.name, h.free_mib));
    }
    None
}

/// The load of `h` with `w` placed on it: memory share + 1.3 x CPU share, each the larger
/// of vdd's commitment and what the host reports.
pub fn score(h: &HostView<'_>, w: &Want<'_>) -> f64 {
    let committed_mem = (h.placed_mib + w.mib) as f64 / h.limit_mib.max(1) as f64;
    let used_mem = if h.total_mib == 0 {
        0.0
    } else {
        (h.total_mib.saturating_sub(h.free_mib) + w.mib) as f64 / h.total_mib as f64
    };
    let committed_cpu = (h.placed_cpus + w.cpus) as f64 / h.limit_cpus.max(1) as f64;
    committed_mem.max(used_mem) + CPU_WEIGHT * committed_cpu.max(h.cpu_busy)
}

/// The index of the host `w` goes to, or why none has room (one reason per host).
pub fn place(hosts: &[HostView<'_>], w: &Want<'_>, policy: Placement) -> Result<usize, String> {
    let mut best: Option<(usize, f64)> = None;
    let mut why = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        if let Some(r) = no_room(h, w) {
            why.push(r);
            continue;
        }
        if policy == Placement::Pack {
            return Ok(i);
        }
        let s = score(h, w);
        // Ties go to the earlier host, in the file's order.
        if best.is_none_or(|(_, b)| s < b) {
            best = Some((i, s));
        }
    }
    best.map(|(i, _)| i).ok_or_else(|| {
        format!(
            "no hypervisor host has room for {} ({} MiB, {} vCPU): {}",
            w.label,
            w.mib,
            w.cpus,
            why.join("; ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str) -> HostView<'_> {
        HostView {
            name,
            up: true,
            limit_mib: 4096,
            limit_cpus: 4,
            placed_mib: 0,
            placed_cpus: 0,
            total_mib: 8192,
            free_mib: 6000,
            cpu_busy: 0.0,
            bridge: false,
        }
    }

    const VM: Want<'static> = Want {
        label: "Demo",
        mib: 1024,
        cpus: 1,
        bridge: false,
    };

    #[test]
    fn pack_fills_the_first_host_then_the_next() {
        let mut hosts = vec![host("h1"), host("h2")];
        for _ in 0..4 {
            assert_eq!(place(&hosts, &VM, Placement::Pack), Ok(0));
            hosts[0].placed_mib += 1024;
            hosts[0].placed_cpus += 1;
        }
        assert_eq!(place(&hosts, &VM, Placement::Pack), Ok(1));
        hosts[1].up = false;
        let e = place(&hosts, &VM, Placement::Pack).unwrap_err();
        assert_eq!(
            e,
            "no hypervisor host has room for Demo (1024 MiB, 1 vCPU): h1: 4096 of its 4096 MiB in use; h2: not answering"
        );
    }

    #[test]
    fn room_needs_allowance_vcpus_real_free_memory_and_a_bridge() {
        let mut h = host("h1");
        h.placed_cpus = 4;
        assert_eq!(no_room(&h, &VM).unwrap(), "h1: 4 of its 4 vCPUs in use");
        let mut h = host("h1");
        // OpenUDS's rule: the VM's memory plus 512 MiB must be free on the host.
        h.free_mib = 1024 + 511;
        assert_eq!(no_room(&h, &VM).unwrap(), "h1: only 1535 MiB free");
        h.free_mib = 1024 + 512;
        assert_eq!(no_room(&h, &VM), None);
        let x11 = Want { bridge: true, ..VM };
        assert_eq!(no_room(&h, &x11).unwrap(), "h1: no LAN bridge");
    }

    #[test]
    fn spread_takes_the_least_loaded_host() {
        let mut hosts = vec![host("h1"), host("h2")];
        // Equal: the first. Then each pick goes where the other is fuller.
        let mut picks = Vec::new();
        for _ in 0..4 {
            let i = place(&hosts, &VM, Placement::Spread).unwrap();
            picks.push(i);
            hosts[i].placed_mib += 1024;
            hosts[i].placed_cpus += 1;
        }
        assert_eq!(picks, [0, 1, 0, 1]);
        // A host busy with work that is not vdd's loses to an idle one.
        let mut hosts = vec![host("h1"), host("h2")];
        hosts[0].cpu_busy = 0.9;
        assert_eq!(place(&hosts, &VM, Placement::Spread), Ok(1));
        // A large VM prefers the host where it is the smaller share.
        let mut hosts = vec![host("small"), host("big")];
        hosts[1].limit_mib = 16384;
        hosts[1].total_mib = 32768;
        hosts[1].free_mib = 30000;
        hosts[1].limit_cpus = 16;
        assert_eq!(place(&hosts, &VM, Placement::Spread), Ok(1));
    }

    /// OpenUDS's choice, on the host's sampled figures alone.
    fn openuds(hosts: &[HostView<'_>], w: &Want<'_>) -> Option<usize> {
        hosts
            .iter()
            .enumerate()
            .filter(|(_, h)| h.free_mib >= w.mib + HEADROOM_MIB)
            .map(|(i, h)| {
                let mem = h.total_mib.saturating_sub(h.free_mib) as f64 / h.total_mib as f64;
                (i, mem + CPU_WEIGHT * h.cpu_busy)
            })
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(i, _)| i)
    }

    #[test]
    fn a_burst_spreads_where_sampled_figures_pile_up() {
        // Six picks arrive within one sampling period: the hosts' own figures do not move
        // yet. h1 looked slightly emptier at the last sample.
        let mut hosts = vec![host("h1"), host("h2")];
        hosts[1].free_mib = 5900;
        let mut ours = Vec::new();
        let mut theirs = Vec::new();
        for _ in 0..6 {
            theirs.push(openuds(&hosts, &VM).unwrap());
            let i = place(&hosts, &VM, Placement::Spread).unwrap();
            ours.push(i);
            // vdd counts a VM still starting at once (placed, and off the free memory
            // it will take); the sampled figures OpenUDS reads stay as they were.
            hosts[i].placed_mib += 1024;
            hosts[i].placed_cpus += 1;
        }
        assert_eq!(
            theirs,
            [0, 0, 0, 0, 0, 0],
            "all on h1, past its 4 GiB allowance"
        );
        assert_eq!(ours, [0, 1, 0, 1, 0, 1]);
    }
}
