//! The libvirt backend's hypervisor hosts: one libvirt connection each, and a watcher
//! thread per host that asks it every [`POLL`] what it has (memory, CPU busy, vdd's
//! running domains with their metadata). Those answers are what placement, adoption and
//! "has this VM exited" read, without a call to the host; a host whose answers stop for
//! [`DOWN_AFTER`] is down, and the backend gives its sessions up. When a host answers
//! (again), what vdd no longer has a session for is swept: domains of this vdd (by the
//! owner in their metadata) whose session folder is gone, and their overlays.
//!
//! libvirt's C calls block, and one to a host that vanished may block until TCP gives
//! up: they run on threads of their own (the watcher, or tokio's blocking pool with a
//! time limit), never on the dispatcher's tasks.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{info, warn};
use virt::connect::Connect;
use virt::domain::Domain;
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;

use super::domxml::{self, Meta};
use crate::config::HvHost;

/// How often each host is asked.
pub const POLL: Duration = Duration::from_secs(2);
/// A host that has not answered for this long is down: its sessions end.
pub const DOWN_AFTER: Duration = Duration::from_secs(10);
/// Every this many answers, strays are swept even without an outage.
const SWEEP_EVERY: u64 = 15;

/// A libvirt connection, closed when the last user lets go (virt 0.4's `Connect` has no
/// `Drop` of its own).
pub struct Conn(pub Connect);

impl Drop for Conn {
    fn drop(&mut self) {
        let _ = self.0.close();
    }
}

/// One of vdd's running domains on a host.
#[derive(Clone, Debug)]
pub struct Dom {
    pub uuid: String,
    pub mib: u64,
    pub cpus: u32,
    /// vdd's metadata; `None` for a `vdd-*` domain without it (not ours).
    pub meta: Option<Meta>,
}

/// What the host said at its last answer, and whether it answers.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// When the last poll that got an answer began.
    pub at: Option<Instant>,
    /// Since when polls fail, and the last error.
    pub failing: Option<(Instant, String)>,
    pub total_mib: u64,
    /// Free + buffers + page cache.
    pub free_mib: u64,
    /// Share of CPU time busy between the last two answers (0..1).
    pub cpu_busy: f64,
    /// Its capabilities offer KVM.
    pub kvm: bool,
    /// Running `vdd-*` domains by name.
    pub domains: HashMap<String, Dom>,
    /// Busy and total CPU nanoseconds at the last answer.
    cpu_prev: Option<(u64, u64)>,
    /// Domains vdd stopped, and when: an answer that began before is out of date for them.
    gone: HashMap<String, Instant>,
}

impl Snapshot {
    /// Why the host counts as down now, or `None`. A host that has not answered yet
    /// (vdd just started) is not down, only not usable.
    pub fn down(&self, now: Instant) -> Option<String> {
        if let Some((since, e)) = &self.failing {
            if now.duration_since(*since) >= DOWN_AFTER {
                return Some(e.clone());
            }
        }
        match self.at {
            Some(t) if now.duration_since(t) >= DOWN_AFTER + POLL => Some(format!(
                "no answer for {} s",
                now.duration_since(t).as_secs()
            )),
            _ => None,
        }
    }

    /// Answering, and has answered at least once.
    pub fn up(&self, now: Instant) -> bool {
        self.at.is_some() && self.failing.is_none() && self.down(now).is_none()
    }
}

pub struct Host {
    pub cfg: HvHost,
    /// This vdd's owner id (the metadata and volume names of its sessions).
    pub owner: String,
    /// `STATE_DIR/sessions`: a session of ours has its folder there for as long as its
    /// VM may run (created before the VM, removed after it stopped).
    sessions_dir: PathBuf,
    conn: Mutex<Option<Arc<Conn>>>,
    pub snap: Mutex<Snapshot>,
    /// Set when the backend goes: the watcher ends.
    stop: AtomicBool,
}

impl Host {
    pub fn new(cfg: HvHost, owner: String, sessions_dir: PathBuf) -> Arc<Host> {
        Arc::new(Host {
            cfg,
            owner,
            sessions_dir,
            conn: Mutex::new(None),
            snap: Mutex::new(Snapshot::default()),
            stop: AtomicBool::new(false),
        })
    }

    /// The connection, opened if there is none.
    pub fn conn(&self) -> Result<Arc<Conn>, virt::error::Error> {
        let mut c = self.conn.lock().expect("conn lock");
        if let Some(c) = c.as_ref() {
            return Ok(c.clone());
        }
        let new = Arc::new(Conn(Connect::open(Some(&self.cfg.uri))?));
        *c = Some(new.clone());
        Ok(new)
    }

    /// Drops the connection after a failure: the next call opens a new one.
    pub fn reset_conn(&self) {
        *self.conn.lock().expect("conn lock") = None;
    }

    /// Domain `name` was stopped: it no longer counts, even in an answer under way.
    pub fn forget(&self, name: &str) {
        let mut s = self.snap.lock().expect("snapshot lock");
        s.domains.remove(name);
        s.gone.insert(name.to_string(), Instant::now());
    }

    pub fn snapshot(&self) -> Snapshot {
        self.snap.lock().expect("snapshot lock").clone()
    }

    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// The volume name of a session's overlay (`keep`: a seat's kept disk).
    pub fn volume_name(&self, key: &str, keep: bool) -> String {
        let kind = if keep { "keep-" } else { "" };
        format!("vdd-{}-{kind}{key}.qcow2", self.owner)
    }

    /// Starts the watcher thread; it ends after [`Host::shutdown`].
    pub fn watch(self: &Arc<Self>) {
        let me = self.clone();
        let name = format!("vdd-hv-{}", self.cfg.name);
        let spawned = std::thread::Builder::new().name(name).spawn(move || {
            let mut n: u64 = 0;
            let mut was_up = false;
            while !me.stop.load(Ordering::Relaxed) {
                let began = Instant::now();
                match me.poll(began) {
                    Ok(()) => {
                        if !was_up || n % SWEEP_EVERY == 0 {
                            me.sweep();
                        }
                        if !was_up {
                            let s = me.snapshot();
                            info!(host = %me.cfg.name, uri = %me.cfg.uri, total_mib = s.total_mib, free_mib = s.free_mib, kvm = s.kvm, domains = s.domains.len(), "hypervisor host answers");
                        }
                        was_up = true;
                        n += 1;
                    }
                    Err(e) => {
                        me.reset_conn();
                        let now = Instant::now();
                        let mut s = me.snap.lock().expect("snapshot lock");
                        let first = s.failing.is_none();
                        let since = s.failing.as_ref().map_or(began, |f| f.0);
                        s.failing = Some((since, e.to_string()));
                        let down = s.down(now);
                        drop(s);
                        if first && was_up {
                            warn!(host = %me.cfg.name, uri = %me.cfg.uri, "hypervisor host does not answer: {e}");
                        }
                        if was_up && down.is_some() {
                            was_up = false;
                            warn!(host = %me.cfg.name, uri = %me.cfg.uri, "hypervisor host is down (no answer for {} s): its sessions end; new VMs go elsewhere", DOWN_AFTER.as_secs());
                        }
                    }
                }
                let rest = POLL.saturating_sub(began.elapsed());
                std::thread::sleep(rest);
            }
        });
        if let Err(e) = spawned {
            warn!(host = %self.cfg.name, "cannot start the host's watcher thread: {e}");
        }
    }

    /// One round of questions; the snapshot is replaced only when all were answered.
    fn poll(&self, began: Instant) -> Result<(), virt::error::Error> {
        let c = self.conn()?;
        let conn = &c.0;
        let mem = node_stats(conn, Stats::Memory)?;
        let get = |v: &[(String, u64)], k: &str| {
            v.iter().find(|(n, _)| n == k).map(|(_, x)| *x).unwrap_or(0)
        };
        let total_mib = get(&mem, "total") / 1024;
        let free_mib = (get(&mem, "free") + get(&mem, "buffers") + get(&mem, "cached")) / 1024;
        let cpu = node_stats(conn, Stats::Cpu)?;
        let busy = get(&cpu, "kernel") + get(&cpu, "user") + get(&cpu, "iowait");
        let total = busy + get(&cpu, "idle");
        let kvm = {
            let s = self.snap.lock().expect("snapshot lock");
            if s.at.is_some() {
                s.kvm
            } else {
                drop(s);
                conn.get_capabilities()?.contains("<domain type='kvm'")
            }
        };
        let known: HashMap<String, Dom> = self.snapshot().domains;
        let mut domains = HashMap::new();
        for d in conn.list_all_domains(virt::sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)? {
            let name = d.get_name()?;
            if !name.starts_with("vdd-") {
                continue;
            }
            let uuid = d.get_uuid_string()?;
            // Metadata and size of a domain do not change while it runs: asked once.
            let dom = match known.get(&name).filter(|k| k.uuid == uuid) {
                Some(k) => k.clone(),
                None => {
                    let info = d.get_info()?;
                    let meta = meta_of(&d);
                    Dom {
                        uuid,
                        mib: info.max_mem / 1024,
                        cpus: info.nr_virt_cpu,
                        meta,
                    }
                }
            };
            domains.insert(name, dom);
        }
        let mut s = self.snap.lock().expect("snapshot lock");
        s.cpu_busy = match s.cpu_prev {
            Some((b0, t0)) if total > t0 => (busy.saturating_sub(b0)) as f64 / (total - t0) as f64,
            _ => s.cpu_busy,
        };
        s.cpu_prev = Some((busy, total));
        s.at = Some(began);
        s.failing = None;
        s.total_mib = total_mib;
        s.free_mib = free_mib;
        s.kvm = kvm;
        let gone = std::mem::take(&mut s.gone);
        s.domains = domains;
        for (name, at) in gone.into_iter().filter(|(_, at)| *at > began) {
            s.domains.remove(&name);
            s.gone.insert(name, at);
        }
        Ok(())
    }

    /// Whether session `id` of this vdd may still have a VM (its folder exists).
    fn session_lives(&self, id: &str) -> bool {
        !id.is_empty() && !id.contains('/') && self.sessions_dir.join(id).exists()
    }

    /// Stops this vdd's domains without a session, and deletes their overlays.
    fn sweep(&self) {
        let snap = self.snapshot();
        let Ok(c) = self.conn() else { return };
        for (name, d) in &snap.domains {
            let Some(m) = d.meta.as_ref().filter(|m| m.owner == self.owner) else {
                continue;
            };
            if self.session_lives(&m.id) {
                continue;
            }
            if let Ok(dom) = Domain::lookup_by_uuid_string(&c.0, &d.uuid) {
                match dom.destroy() {
                    Ok(()) => {
                        self.forget(name);
                        warn!(host = %self.cfg.name, session = %m.id, domain = %name, "a VM of this vdd without a session (ended while its host did not answer, or left by a crash) stopped")
                    }
                    Err(e) => {
                        warn!(host = %self.cfg.name, session = %m.id, domain = %name, "stopping a VM without a session: {e}")
                    }
                }
            }
        }
        let Ok(pool) = StoragePool::lookup_by_name(&c.0, &self.cfg.pool) else {
            return;
        };
        let prefix = format!("vdd-{}-", self.owner);
        for v in pool.list_volumes().unwrap_or_default() {
            let Some(id) = v
                .strip_prefix(&prefix)
                .and_then(|r| r.strip_suffix(".qcow2"))
            else {
                continue;
            };
            if id.starts_with("keep-") || self.session_lives(id) {
                continue;
            }
            if let Ok(vol) = StorageVol::lookup_by_name(&pool, &v) {
                if vol.delete(0).is_ok() {
                    info!(host = %self.cfg.name, session = %id, volume = %v, "overlay of an ended session deleted");
                }
            }
        }
    }
}

/// vdd's metadata of a domain, if it has any.
pub fn meta_of(d: &Domain) -> Option<Meta> {
    d.get_metadata(
        virt::sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
        Some(domxml::META_NS),
        0,
    )
    .ok()
    .and_then(|x| domxml::parse_meta(&x))
}

#[derive(Clone, Copy)]
enum Stats {
    Cpu,
    Memory,
}

/// The host's CPU times (ns: kernel, user, idle, iowait) or memory (KiB: total, free,
/// buffers, cached), all CPUs or cells together. virt 0.4 does not wrap
/// virNodeGetCPUStats and virNodeGetMemoryStats (0.5 does, but pins an older libc than
/// vdd's other crates need), so they are called here.
fn node_stats(conn: &Connect, which: Stats) -> Result<Vec<(String, u64)>, virt::error::Error> {
    use virt::sys;
    // Both structs are {char field[80]; unsigned long long value;}.
    let read = |field: &[std::os::raw::c_char; 80], value: u64| {
        // SAFETY: `field` is a NUL-terminated string libvirt wrote within its 80 bytes.
        let name = unsafe { std::ffi::CStr::from_ptr(field.as_ptr()) };
        (name.to_string_lossy().into_owned(), value)
    };
    let mut n: std::os::raw::c_int = 0;
    match which {
        Stats::Cpu => {
            // SAFETY: with a null array libvirt only writes the count to `n`; then it
            // fills at most `n` entries of an array that long. The connection is open.
            unsafe {
                let all = sys::VIR_NODE_CPU_STATS_ALL_CPUS;
                if sys::virNodeGetCPUStats(conn.as_ptr(), all, std::ptr::null_mut(), &mut n, 0) < 0
                {
                    return Err(virt::error::Error::last_error());
                }
                let mut v: Vec<sys::virNodeCPUStats> = vec![std::mem::zeroed(); n.max(0) as usize];
                if sys::virNodeGetCPUStats(conn.as_ptr(), all, v.as_mut_ptr(), &mut n, 0) < 0 {
                    return Err(virt::error::Error::last_error());
                }
                v.truncate(n.max(0) as usize);
                Ok(v.iter().map(|s| read(&s.field, s.value)).collect())
            }
        }
        Stats::Memory => {
            // SAFETY: as above.
            unsafe {
                let all = sys::VIR_NODE_MEMORY_STATS_ALL_CELLS;
                if sys::virNodeGetMemoryStats(conn.as_ptr(), all, std::ptr::null_mut(), &mut n, 0)
                    < 0
                {
                    return Err(virt::error::Error::last_error());
                }
                let mut v: Vec<sys::virNodeMemoryStats> =
                    vec![std::mem::zeroed(); n.max(0) as usize];
                if sys::virNodeGetMemoryStats(conn.as_ptr(), all, v.as_mut_ptr(), &mut n, 0) < 0 {
                    return Err(virt::error::Error::last_error());
                }
                v.truncate(n.max(0) as usize);
                Ok(v.iter().map(|s| read(&s.field, s.value)).collect())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_is_down_after_its_answers_stop() {
        let t0 = Instant::now();
        let mut s = Snapshot::default();
        assert!(
            !s.up(t0) && s.down(t0).is_none(),
            "not answered yet: not down"
        );
        s.at = Some(t0);
        assert!(s.up(t0));
        // Failing, but not for long: not up, not down.
        s.failing = Some((t0, "End of file while reading data".into()));
        assert!(!s.up(t0 + POLL) && s.down(t0 + POLL).is_none());
        assert_eq!(
            s.down(t0 + DOWN_AFTER).as_deref(),
            Some("End of file while reading data")
        );
        // A poll that hangs (no error, no answer) counts too.
        s.failing = None;
        assert!(s.down(t0 + DOWN_AFTER).is_none());
        assert_eq!(
            s.down(t0 + DOWN_AFTER + POLL).as_deref(),
            Some("no answer for 12 s")
        );
    }
}
