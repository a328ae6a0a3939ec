//! Saved-state starts (`[[guest]] start = "saved"`): vdd boots the guest once, waits until
//! it is up (its screen stays the same and its VM idles), and saves its RAM and device
//! state beside a frozen copy of its disk; every session of it then resumes from there on
//! its own overlay over the frozen disk, a booted guest in about a second with no VM kept
//! running for it.
//!
//! On disk: `STATE_DIR/saved/GUEST/DIGEST/` holds `disk.qcow2` (the saving VM's overlay on
//! the base image, made read-only), `state` (the backend's stream) and `saved.json`
//! ([`Meta`], written last: a folder without it is unfinished). `DIGEST` is a hash of the
//! [`fingerprint`]: the guest's settings, its base image's size, time and inode, the
//! screen, the backend's build and vdd's version. When any of them changes, the next
//! maintenance pass saves anew in the background while seats get cold boots; a state
//! that is missing or does not load is dropped with a log line, the seat gets a cold boot,
//! and it is saved again. A guest keeps at most [`KEEP`] states (one per screen size its
//! seats use); a state a running session sits on is never deleted under it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::qemu::{private_dir, Restore, VmDisplay, VmSpec};
use super::screen::ScreenSize;
use super::start::Priority;
use super::{now_unix, random, report, Backend, Dispatcher, Error};
use crate::config::{Display, Guest, Start};

/// A sample of what a guest does (see [`Backend::activity`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Activity {
    /// A digest of the screen's pixels.
    pub screen: u64,
    /// How long the VM's threads have been running or wanting to run since it started
    /// (CPU time, plus the time a busy host kept them waiting).
    pub cpu: Duration,
}

/// How long the screen must stay the same, with the VM idling, for the guest to be up.
pub const SETTLE: Duration = Duration::from_secs(2);
/// How often the guest is sampled meanwhile.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(500);
/// "Idling": busy less than this share of the time per vCPU over [`SETTLE`]. A booting
/// guest (firmware, boot loader, kernel) keeps its vCPU busy; an idle Linux under TCG a
/// few percent.
pub const IDLE_CPU: f64 = 0.5;
/// A guest that never settles is saved after this long anyway (an animated screen).
pub const SETTLE_LIMIT: Duration = Duration::from_secs(300);
/// Saved states kept per guest: one per screen size its seats use.
pub const KEEP: usize = 3;
/// A save that failed is tried again after this long.
pub const BACKOFF: Duration = Duration::from_secs(60);

/// Whether the guest is up: over the last `window` of `samples` (oldest first, `at` since
/// the VM started) the screen stayed the same, and the VM used less than `max_cpu` of a
/// CPU per vCPU.
pub fn settled(
    samples: &[(Duration, Activity)],
    window: Duration,
    cpus: u32,
    max_cpu: f64,
) -> bool {
    let Some(&(now, last)) = samples.last() else {
        return false;
    };
    let Some(from) = now.checked_sub(window) else {
        return false;
    };
    // The newest sample at or before the window's start anchors it.
    let Some(start) = samples.iter().rposition(|(t, _)| *t <= from) else {
        return false;
    };
    let span = &samples[start..];
    if span.iter().any(|(_, a)| a.screen != last.screen) {
        return false;
    }
    let (t0, a0) = span[0];
    let used = last.cpu.saturating_sub(a0.cpu).as_secs_f64();
    let wall = (now - t0).as_secs_f64();
    wall > 0.0 && used / wall < max_cpu * cpus.max(1) as f64
}

/// What a VM of a guest depends on: equal fingerprints, interchangeable VMs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fingerprint {
    pub text: String,
    /// 16 hex digits of the text's SHA-256: a folder name.
    pub digest: String,
}

/// The fingerprint of `guest` at `screen` on a backend whose [`Backend::state_tag`] is
/// `tag`. The base image counts by its size, modification time and inode, not its bytes:
/// reading a 20 GiB image to hash it would take minutes, and any write to it changes its
/// time. (A qcow2 base's own backing files are not followed.)
pub fn fingerprint(guest: &Guest, screen: Option<ScreenSize>, tag: &str) -> Fingerprint {
    use sha2::Digest;
    use std::os::unix::fs::MetadataExt;
    let image = match std::fs::metadata(&guest.image) {
        Ok(m) => format!(
            "{} bytes, mtime {}.{}, inode {}:{}",
            m.len(),
            m.mtime(),
            m.mtime_nsec(),
            m.dev(),
            m.ino()
        ),
        Err(e) => format!("unreadable ({e})"),
    };
    let text = format!(
        "vdd {}\nbackend {tag}\nguest {}\nimage {} ({image})\nmemory {} MiB\ncpus {}\ndisplay {}\nnat {}\nscreen {}\n",
        env!("CARGO_PKG_VERSION"),
        guest.name,
        guest.image.display(),
        guest.memory_mib,
        guest.cpus,
        guest.display.as_str(),
        guest.nat,
        screen.map_or("default".to_string(), |s| s.to_string()),
    );
    let digest = sha2::Sha256::digest(text.as_bytes())[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Fingerprint { text, digest }
}

/// `saved.json`: what a saved state is for and what it cost.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    pub guest: String,
    pub digest: String,
    pub fingerprint: String,
    pub screen: Option<ScreenSize>,
    /// Bytes of the RAM and device state, and of the frozen disk.
    pub state_bytes: u64,
    pub disk_bytes: u64,
    /// Seconds from the VM's start until the guest was up, and then to save it.
    pub boot_secs: f64,
    pub save_secs: f64,
    pub saved_at: u64,
}

/// A saved state ready to start from.
#[derive(Clone, Debug)]
pub struct Ready {
    pub dir: PathBuf,
    pub meta: Meta,
}

impl Ready {
    pub fn restore(&self) -> Restore {
        Restore {
            disk: self.dir.join("disk.qcow2"),
            state: self.dir.join("state"),
        }
    }
}

/// The dispatcher's saved states.
#[derive(Default)]
pub struct Store {
    pub ready: Vec<Ready>,
    /// The digest being saved now (one save at a time: each is a boot).
    pub building: Option<String>,
    /// Digests whose last save failed, and when.
    pub failed: std::collections::BTreeMap<String, Instant>,
}

/// The size of a saved state for `GET /api/v1/status`.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct SavedInfo {
    pub guest: String,
    pub screen: Option<ScreenSize>,
    pub state_mib: f64,
    pub disk_mib: f64,
    pub boot_secs: f64,
    pub save_secs: f64,
}

impl From<&Ready> for SavedInfo {
    fn from(r: &Ready) -> SavedInfo {
        SavedInfo {
            guest: r.meta.guest.clone(),
            screen: r.meta.screen,
            state_mib: r.meta.state_bytes as f64 / 1048576.0,
            disk_mib: r.meta.disk_bytes as f64 / 1048576.0,
            boot_secs: r.meta.boot_secs,
            save_secs: r.meta.save_secs,
        }
    }
}

fn read_meta(dir: &Path) -> Option<Meta> {
    serde_json::from_slice(&std::fs::read(dir.join("saved.json")).ok()?).ok()
}

/// Bytes a file takes on disk (a sparse overlay less than its length).
fn disk_bytes(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).map_or(0, |m| m.blocks() * 512)
}

impl<B: Backend> Dispatcher<B> {
    pub(super) fn saved_root(&self) -> PathBuf {
        self.cfg().server.state_dir.join("saved")
    }

    /// At start: the saved states a previous run left, and nothing of a save it did not
    /// finish (its VM, if still running, is stopped).
    pub(super) async fn load_saved(&self) {
        let Ok(guests) = std::fs::read_dir(self.saved_root()) else {
            return;
        };
        let mut found = Vec::new();
        for g in guests.flatten() {
            let Ok(dirs) = std::fs::read_dir(g.path()) else {
                continue;
            };
            for d in dirs.flatten() {
                let dir = d.path();
                let name = d.file_name().to_string_lossy().into_owned();
                if let Some(id) = name.strip_prefix("new-") {
                    let n = self.backend.stop_strays(&dir, id).await;
                    warn!(guest = %g.file_name().to_string_lossy(), strays = n, "an unfinished save of a previous run removed");
                    let _ = std::fs::remove_dir_all(&dir);
                    continue;
                }
                match read_meta(&dir) {
                    Some(meta) if meta.digest == name => found.push(Ready { dir, meta }),
                    _ => {
                        warn!(dir = %dir.display(), "not a saved state (no valid saved.json); removed");
                        let _ = std::fs::remove_dir_all(&dir);
                    }
                }
            }
        }
        found.sort_by_key(|r| r.meta.saved_at);
        let mut st = self.state.lock().await;
        for r in found {
            info!(guest = %r.meta.guest, screen = ?r.meta.screen, dir = %r.dir.display(), "saved state of a previous run found");
            // The newest state's screen is what the guest's seats used last.
            if let Some(s) = r.meta.screen {
                st.screens.insert(r.meta.guest.clone(), s);
            }
            st.saved.ready.push(r);
        }
    }

    /// The saved state to start `guest` from for fingerprint `digest`, if one is ready.
    /// A state whose file went missing is dropped here, with a log line.
    pub(super) async fn saved_for(&self, guest: &Guest, digest: &str) -> Option<Ready> {
        if guest.start != Start::Saved {
            return None;
        }
        let mut st = self.state.lock().await;
        let r = st
            .saved
            .ready
            .iter()
            .find(|r| r.meta.digest == digest)?
            .clone();
        let restore = r.restore();
        if restore.state.is_file() && restore.disk.is_file() {
            return Some(r);
        }
        st.saved.ready.retain(|x| x.dir != r.dir);
        drop(st);
        warn!(guest = %guest.name, dir = %r.dir.display(), "the saved state's files are missing; a cold boot instead, and it is saved again");
        None
    }

    /// A saved state did not load: it is dropped (and saved again by the next pass).
    pub(super) async fn saved_broken(&self, guest: &Guest, r: &Ready, e: &Error) {
        warn!(guest = %guest.name, dir = %r.dir.display(), "the saved state did not load ({}); a cold boot instead, and it is saved again", report(e));
        self.state
            .lock()
            .await
            .saved
            .ready
            .retain(|x| x.dir != r.dir);
        self.gc_saved().await;
    }

    /// Saves `guest` at `screen` if it has no state for its current fingerprint: called by
    /// the maintenance pass (`warm.rs`), one save at a time.
    pub(super) async fn ensure_saved(self: &Arc<Self>, guest: &Guest, screen: Option<ScreenSize>) {
        let fp = self.fingerprint(guest, screen);
        {
            let mut st = self.state.lock().await;
            let s = &mut st.saved;
            if s.building.is_some()
                || s.ready.iter().any(|r| r.meta.digest == fp.digest)
                || s.failed
                    .get(&fp.digest)
                    .is_some_and(|t| t.elapsed() < BACKOFF)
            {
                return;
            }
            s.building = Some(fp.digest.clone());
        }
        let t0 = Instant::now();
        let r = self.save(guest, screen, &fp).await;
        let mut st = self.state.lock().await;
        st.saved.building = None;
        match r {
            Ok(ready) => {
                info!(guest = %guest.name, screen = ?screen, state_mib = ready.meta.state_bytes >> 20, disk_mib = ready.meta.disk_bytes >> 20, boot_secs = ready.meta.boot_secs, save_secs = ready.meta.save_secs, total_secs = t0.elapsed().as_secs_f64(), "guest saved; its sessions resume from here");
                st.saved.failed.remove(&fp.digest);
                st.saved.ready.push(ready);
                drop(st);
                self.gc_saved().await;
            }
            // No room for the VM to save (seats come first): the next pass tries again.
            Err(Error::Full(why)) => {
                drop(st);
                info!(guest = %guest.name, "the guest is saved when there is room: {why}");
            }
            Err(e) => {
                st.saved.failed.insert(fp.digest.clone(), Instant::now());
                drop(st);
                warn!(guest = %guest.name, "saving the guest failed ({}); seats get cold boots, tried again in {BACKOFF:?}", report(&e));
            }
        }
    }

    /// Boots the guest in a folder of its own, waits until it is up, saves it, freezes
    /// its disk and makes the folder the state of `fp`.
    async fn save(
        &self,
        guest: &Guest,
        screen: Option<ScreenSize>,
        fp: &Fingerprint,
    ) -> Result<Ready, Error> {
        if !guest.image.exists() {
            return Err(Error::MissingImage {
                guest: guest.name.clone(),
                path: guest.image.clone(),
            });
        }
        let id: String = random::<6>().iter().map(|b| format!("{b:02x}")).collect();
        let parent = self.saved_root().join(&guest.name);
        let dir = parent.join(format!("new-{id}"));
        private_dir(&dir)?;
        // A VM like a session's (the same devices, or the state would not load into
        // them), counted like a warm VM: it never takes a seat's place.
        let port = match self.reserve(guest, Priority::Background).await {
            Ok(p) => p,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let spec = VmSpec {
            session: id.clone(),
            guest: guest.clone(),
            dir: dir.clone(),
            overlay: dir.join("disk.qcow2"),
            display: VmDisplay::Vnc {
                addr: self.vnc_addr,
                port,
            },
            screen,
            restore: None,
        };
        let t0 = Instant::now();
        // No password: nobody can look at the VM that is saved.
        let started = self.backend.start(spec, None).await;
        let r = match started {
            Ok((mut vm, _)) => {
                let r = self.save_vm(guest, &mut vm, &dir, t0).await;
                self.backend.stop(&mut vm, Duration::ZERO).await;
                r
            }
            Err(e) => Err(e),
        };
        self.unreserve(guest, port, Priority::Background).await;
        let (boot_secs, save_secs, state_bytes) = match r {
            Ok(x) => x,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        // Frozen: sessions' overlays sit on it from now on.
        let disk = dir.join("disk.qcow2");
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&disk, std::fs::Permissions::from_mode(0o400))
                .map_err(|e| Error::State(disk.clone(), e))?;
        }
        for f in ["qmp.sock", "qemu.log", "serial.log"] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        let meta = Meta {
            guest: guest.name.clone(),
            digest: fp.digest.clone(),
            fingerprint: fp.text.clone(),
            screen,
            state_bytes,
            disk_bytes: disk_bytes(&disk),
            boot_secs,
            save_secs,
            saved_at: now_unix(),
        };
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(dir.join("saved.json"))?;
            f.write_all(&serde_json::to_vec_pretty(&meta).expect("meta serializes"))?;
            f.sync_all()?;
            std::fs::File::open(&dir)?.sync_all()
        };
        let done = parent.join(&fp.digest);
        let _ = std::fs::remove_dir_all(&done);
        write()
            .and_then(|()| std::fs::rename(&dir, &done))
            .map_err(|e| Error::State(dir.clone(), e))
            .inspect_err(|_| {
                let _ = std::fs::remove_dir_all(&dir);
            })?;
        Ok(Ready { dir: done, meta })
    }

    /// Waits until the guest is up, then saves it: (seconds to boot, to save, bytes).
    async fn save_vm(
        &self,
        guest: &Guest,
        vm: &mut B::Vm,
        dir: &Path,
        t0: Instant,
    ) -> Result<(f64, f64, u64), Error> {
        let control = self.backend.control(vm);
        let mut samples = Vec::new();
        loop {
            if self.backend.exited(vm) {
                return Err(Error::VmExited(
                    "while booting to be saved".into(),
                    String::new(),
                ));
            }
            if self.state.lock().await.closing {
                return Err(Error::Full("the server is shutting down".into()));
            }
            if let Some(a) = self.backend.activity(control.clone()).await {
                samples.push((t0.elapsed(), a));
                if settled(&samples, SETTLE, guest.cpus, IDLE_CPU) {
                    break;
                }
            }
            if t0.elapsed() > SETTLE_LIMIT {
                warn!(guest = %guest.name, "the guest's screen never settled within {SETTLE_LIMIT:?}; saving it as it is");
                break;
            }
            // Only what is recent matters.
            if samples.len() > 64 {
                samples.drain(..32);
            }
            tokio::time::sleep(SAMPLE_EVERY).await;
        }
        let boot = t0.elapsed();
        let bytes = self.backend.save_state(vm, &dir.join("state")).await?;
        Ok((
            boot.as_secs_f64(),
            (t0.elapsed() - boot).as_secs_f64(),
            bytes,
        ))
    }

    /// Deletes the saved states no longer wanted: of a stale fingerprint, of a guest no
    /// longer saved, or past [`KEEP`] per guest; never one a running session sits on.
    pub(super) async fn gc_saved(&self) {
        let st = self.state.lock().await;
        let in_use: Vec<PathBuf> = st
            .sessions
            .values()
            .filter_map(|s| s.rec.saved.clone())
            .collect();
        let cfg = self.cfg();
        let keep: Vec<PathBuf> = {
            let mut per_guest: std::collections::BTreeMap<&str, usize> = Default::default();
            let mut ready: Vec<&Ready> = st.saved.ready.iter().collect();
            ready.sort_by_key(|r| std::cmp::Reverse(r.meta.saved_at));
            ready
                .into_iter()
                .filter(|r| {
                    let Some(g) = cfg.guests.iter().find(|g| g.name == r.meta.guest) else {
                        return false;
                    };
                    let n = per_guest.entry(&r.meta.guest).or_default();
                    *n += 1;
                    g.start == Start::Saved
                        && *n <= KEEP
                        && self.fingerprint(g, r.meta.screen).digest == r.meta.digest
                })
                .map(|r| r.dir.clone())
                .collect()
        };
        drop(st);
        let Ok(guests) = std::fs::read_dir(self.saved_root()) else {
            return;
        };
        let mut gone = Vec::new();
        for g in guests.flatten() {
            for d in std::fs::read_dir(g.path()).into_iter().flatten().flatten() {
                let dir = d.path();
                let unfinished = d.file_name().to_string_lossy().starts_with("new-");
                if unfinished || keep.contains(&dir) || in_use.contains(&dir) {
                    continue;
                }
                info!(guest = %g.file_name().to_string_lossy(), dir = %dir.display(), "an old saved state removed");
                let _ = std::fs::remove_dir_all(&dir);
                gone.push(dir);
            }
        }
        if !gone.is_empty() {
            self.state
                .lock()
                .await
                .saved
                .ready
                .retain(|r| !gone.contains(&r.dir));
        }
    }
}

/// What the guest's saved states cost, for the status.
pub fn infos(store: &Store) -> Vec<SavedInfo> {
    store.ready.iter().map(SavedInfo::from).collect()
}

/// A VNC guest's screen for a pick that reported `screen`: X11 guests have none.
pub fn guest_screen(guest: &Guest, screen: Option<ScreenSize>) -> Option<ScreenSize> {
    (guest.display == Display::Vnc)
        .then_some(screen)
        .flatten()
        .map(ScreenSize::for_guest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(screen: u64, cpu_ms: u64) -> Activity {
        Activity {
            screen,
            cpu: Duration::from_millis(cpu_ms),
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn settled_needs_a_still_screen_and_an_idle_vm() {
        let w = Duration::from_secs(2);
        // Booting: the screen changes.
        let boot: Vec<_> = (0..8).map(|i| (ms(i * 500), a(i, i * 500))).collect();
        assert!(!settled(&boot, w, 1, IDLE_CPU));
        // A still screen, but the CPU busy (the boot loader loading a kernel).
        let busy: Vec<_> = (0..8).map(|i| (ms(i * 500), a(7, i * 480))).collect();
        assert!(!settled(&busy, w, 1, IDLE_CPU));
        // Still and idle for 2 s.
        let mut up = boot.clone();
        up.extend((8..13).map(|i| (ms(i * 500), a(99, 4000 + (i - 8) * 20))));
        assert!(settled(&up, w, 1, IDLE_CPU));
        // Not yet a whole window of it.
        assert!(!settled(&up[..11], w, 1, IDLE_CPU));
        // Busier than one vCPU may be, idle enough for two.
        let two: Vec<_> = (0..6).map(|i| (ms(i * 500), a(1, i * 400))).collect();
        assert!(!settled(&two, w, 1, IDLE_CPU));
        assert!(settled(&two, w, 2, IDLE_CPU));
        assert!(!settled(&[], w, 1, IDLE_CPU));
    }

    #[test]
    fn fingerprints_follow_settings_screen_and_image() {
        let dir = std::env::temp_dir().join(format!("vdd-fp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("base.img");
        std::fs::write(&img, b"one").unwrap();
        let g = Guest {
            name: "demo".into(),
            label: "Demo".into(),
            display: Display::Vnc,
            image: img.clone(),
            memory_mib: 256,
            cpus: 1,
            description: String::new(),
            persist: false,
            nat: false,
            warm: 0,
            start: Start::Saved,
            screen: None,
        };
        let s = ScreenSize {
            width: 1024,
            height: 768,
        };
        let f = fingerprint(&g, Some(s), "qemu tcg");
        assert_eq!(f.digest.len(), 16);
        assert_eq!(f, fingerprint(&g, Some(s), "qemu tcg"));
        assert_ne!(f.digest, fingerprint(&g, None, "qemu tcg").digest);
        assert_ne!(f.digest, fingerprint(&g, Some(s), "qemu kvm").digest);
        let more = Guest {
            memory_mib: 512,
            ..g.clone()
        };
        assert_ne!(f.digest, fingerprint(&more, Some(s), "qemu tcg").digest);
        std::fs::write(&img, b"changed").unwrap();
        assert_ne!(f.digest, fingerprint(&g, Some(s), "qemu tcg").digest);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
