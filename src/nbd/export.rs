//! NBD export backends: a read-only file served with positional reads, and the per-client
//! sparse copy-on-write overlay over it. Blocking file IO; the driver decides where it runs.
//!
//! Spec: NetworkBlockDevice/nbd `doc/proto.md`, "Request types" (READ, WRITE, FLUSH, TRIM,
//! WRITE_ZEROES, CACHE semantics; TRIM is advisory, WRITE_ZEROES must read back as zeroes).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nix::libc;

use crate::config::{self, ExportMode};

use super::policy::{Catalog, ExportInfo};

/// Overlay granularity: one bit of the allocation map per 4 KiB, the page size, so a
/// 4 KiB write from a kernel client never needs a read-modify-write of the base.
pub const BLOCK: u64 = 4096;

/// Why an export could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No export has this name.
    #[error("no export named {0:?}")]
    Unknown(String),
    /// The export's file could not be opened read-only.
    #[error("cannot open export file {path}")]
    OpenBase {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The overlay file or its folder could not be created.
    #[error("cannot create overlay {path}")]
    CreateOverlay {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The base image, opened read-only: nothing in this module can write it.
pub struct Base {
    file: File,
    size: u64,
    /// A read-only mapping of the whole file, never read through: it exists so that
    /// mincore(2) can tell whether a range is in the page cache before we hand it to
    /// sendfile(2) on the runtime thread (a cache miss there would stall every
    /// connection on that thread). `None` when the file cannot be mapped.
    map: Option<Mapping>,
}

struct Mapping {
    addr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is only passed to mincore and munmap, never dereferenced.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: addr/len come from a successful mmap and are unmapped once.
        unsafe {
            libc::munmap(self.addr, self.len);
        }
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

impl Base {
    pub fn open(path: &Path) -> Result<Base, Error> {
        let err = |source| Error::OpenBase {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(err)?;
        let size = file.metadata().map_err(err)?.len();
        let map = (size > 0 && size <= usize::MAX as u64)
            .then(|| {
                // SAFETY: a fresh shared read-only mapping of our own fd; see `map`.
                let addr = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        size as usize,
                        libc::PROT_READ,
                        libc::MAP_SHARED,
                        file.as_raw_fd(),
                        0,
                    )
                };
                (addr != libc::MAP_FAILED).then_some(Mapping {
                    addr,
                    len: size as usize,
                })
            })
            .flatten();
        Ok(Base { file, size, map })
    }

    /// True when every page of the range is in the page cache right now.
    pub fn resident(&self, off: u64, len: u64) -> bool {
        let Some(m) = &self.map else { return false };
        if len == 0 || off + len > self.size {
            return false;
        }
        let page = page_size();
        let start = off / page * page;
        let span = (off + len - start) as usize;
        let pages = span.div_ceil(page as usize);
        let mut small = [0u8; 256];
        let mut big;
        let vec: &mut [u8] = if pages <= small.len() {
            &mut small[..pages]
        } else {
            big = vec![0u8; pages];
            &mut big
        };
        // SAFETY: [start, start+span) lies inside the mapping (checked against size
        // above, mapping covers the whole file); vec has one byte per page.
        let r = unsafe {
            libc::mincore(
                (m.addr as *mut u8).add(start as usize).cast(),
                span,
                vec.as_mut_ptr(),
            )
        };
        r == 0 && vec.iter().all(|b| b & 1 == 1)
    }

    /// Sends `len` bytes at `off` straight from the page cache to a socket: no copy
    /// through user space. Returns bytes sent; `WouldBlock` when the socket is full.
    pub fn sendfile_to(
        &self,
        socket: std::os::fd::RawFd,
        off: u64,
        len: usize,
    ) -> io::Result<usize> {
        let mut o = off as libc::off_t;
        // SAFETY: plain syscall on fds we hold; `o` outlives it.
        let n = unsafe { libc::sendfile(socket, self.file.as_raw_fd(), &mut o, len) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

/// Set once a filesystem answers RWF_NOWAIT with EOPNOTSUPP, so we stop trying.
static NOWAIT_UNSUPPORTED: AtomicBool = AtomicBool::new(false);

/// Fills `buf` from `file` at `off`. With `nowait`, only from the page cache: `Ok(false)`
/// means some of it was not cached and the caller should retry on a blocking thread.
/// Bytes past the end of the file read as zeroes (a base that shrank under us).
fn pread_full(file: &File, mut buf: &mut [u8], mut off: u64, nowait: bool) -> io::Result<bool> {
    if nowait && NOWAIT_UNSUPPORTED.load(Ordering::Relaxed) {
        return Ok(false);
    }
    while !buf.is_empty() {
        let n = if nowait {
            let iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            // SAFETY: iov points into `buf`, which outlives the call; one iovec.
            let n = unsafe {
                libc::preadv2(
                    file.as_raw_fd(),
                    &iov,
                    1,
                    off as libc::off_t,
                    libc::RWF_NOWAIT,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN) => return Ok(false),
                    Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) => {
                        NOWAIT_UNSUPPORTED.store(true, Ordering::Relaxed);
                        return Ok(false);
                    }
                    Some(libc::EINTR) => continue,
                    _ => return Err(e),
                }
            }
            n as usize
        } else {
            match file.read_at(buf, off) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            buf.fill(0);
            break;
        }
        buf = &mut buf[n..];
        off += n as u64;
    }
    Ok(true)
}

/// A client's private copy-on-write layer over a base.
pub struct Overlay {
    base: Arc<Base>,
    file: File,
    path: PathBuf,
    map_path: PathBuf,
    /// One bit per BLOCK: set = the overlay holds this block. Atomics so reads never take
    /// a lock; a bit is set only after its data is in the overlay file.
    bits: Vec<AtomicU64>,
    /// Serialises writers: a partial block is copied from the base before it is patched,
    /// and two writers must not both do that for one block.
    write_lock: Mutex<()>,
    persist: bool,
}

const MAP_MAGIC: &[u8; 8] = b"VDDNBDM1";

impl Overlay {
    fn blocks(size: u64) -> usize {
        size.div_ceil(BLOCK) as usize
    }

    /// Opens (persist: reuses when the saved map matches the base) or creates the overlay.
    fn open(base: Arc<Base>, path: PathBuf, persist: bool) -> Result<Overlay, Error> {
        let map_path = path.with_extension("map");
        let err = |source| Error::CreateOverlay {
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let nwords = Self::blocks(base.size).div_ceil(64);
        let saved = if persist {
            Self::load_map(&map_path, base.size, nwords)
        } else {
            None
        };
        let fresh = saved.is_none();
        // 0600: an overlay holds what a client wrote to its disk, for no one else to read.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(fresh)
            .mode(0o600)
            .open(&path)
            .map_err(err)?;
        // Sparse: only written blocks take disk space.
        file.set_len(base.size).map_err(err)?;
        let bits = saved
            .unwrap_or_else(|| vec![0; nwords])
            .into_iter()
            .map(AtomicU64::new)
            .collect();
        Ok(Overlay {
            base,
            file,
            path,
            map_path,
            bits,
            write_lock: Mutex::new(()),
            persist,
        })
    }

    fn load_map(path: &Path, size: u64, nwords: usize) -> Option<Vec<u64>> {
        let b = std::fs::read(path).ok()?;
        if b.len() != 20 + nwords * 8
            || &b[..8] != MAP_MAGIC
            || b[8..16] != size.to_le_bytes()
            || b[16..20] != (BLOCK as u32).to_le_bytes()
        {
            // A map for another base (the image was replaced): start clean.
            return None;
        }
        Some(
            b[20..]
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("8")))
                .collect(),
        )
    }

    /// Writes the allocation map beside the overlay, atomically (temp file + rename), after
    /// the overlay data it describes is on disk.
    fn save_map(&self) -> io::Result<()> {
        self.file.sync_data()?;
        let mut b = Vec::with_capacity(20 + self.bits.len() * 8);
        b.extend_from_slice(MAP_MAGIC);
        b.extend_from_slice(&self.base.size.to_le_bytes());
        b.extend_from_slice(&(BLOCK as u32).to_le_bytes());
        for w in &self.bits {
            b.extend_from_slice(&w.load(Ordering::Acquire).to_le_bytes());
        }
        let tmp = self.map_path.with_extension("map.tmp");
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&b)?;
        f.sync_data()?;
        std::fs::rename(&tmp, &self.map_path)
    }

    fn is_set(&self, block: u64) -> bool {
        let (w, b) = ((block / 64) as usize, block % 64);
        self.bits[w].load(Ordering::Acquire) & (1 << b) != 0
    }

    fn set(&self, first: u64, last: u64) {
        for block in first..=last {
            let (w, b) = ((block / 64) as usize, block % 64);
            self.bits[w].fetch_or(1 << b, Ordering::Release);
        }
    }

    /// Reads runs of blocks from whichever layer holds them.
    fn read(&self, buf: &mut [u8], off: u64, nowait: bool) -> io::Result<bool> {
        let end = off + buf.len() as u64;
        let mut pos = off;
        while pos < end {
            let block = pos / BLOCK;
            let mine = self.is_set(block);
            let mut run_end = ((block + 1) * BLOCK).min(end);
            while run_end < end && self.is_set(run_end / BLOCK) == mine {
                run_end = ((run_end / BLOCK + 1) * BLOCK).min(end);
            }
            let file = if mine { &self.file } else { &self.base.file };
            let slice = &mut buf[(pos - off) as usize..(run_end - off) as usize];
            if !pread_full(file, slice, pos, nowait)? {
                return Ok(false);
            }
            pos = run_end;
        }
        Ok(true)
    }

    /// Copies a block from the base unless the overlay already holds it; caller holds
    /// the write lock and sets the bit after writing its own data.
    fn copy_up(&self, block: u64) -> io::Result<()> {
        if self.is_set(block) {
            return Ok(());
        }
        let start = block * BLOCK;
        let len = BLOCK.min(self.base.size - start) as usize;
        let mut tmp = vec![0u8; len];
        pread_full(&self.base.file, &mut tmp, start, false)?;
        self.file.write_all_at(&tmp, start)
    }

    fn write(&self, data: &[u8], off: u64, fua: bool) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let _g = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let end = off + data.len() as u64;
        let (first, last) = (off / BLOCK, (end - 1) / BLOCK);
        if off % BLOCK != 0 {
            self.copy_up(first)?;
        }
        if end % BLOCK != 0 && end != self.base.size {
            self.copy_up(last)?;
        }
        self.file.write_all_at(data, off)?;
        self.set(first, last);
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    /// Zeroes a range. Whole blocks become holes in the overlay (no disk used); partial
    /// edges are written as zero bytes. With `trim_only` the edges are left alone: TRIM
    /// is advisory and need not zero anything.
    fn zero(&self, off: u64, len: u64, fua: bool, trim_only: bool) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let end = off + len;
        let first_full = off.div_ceil(BLOCK);
        // The last block may be short when the size is not a multiple of BLOCK.
        let last_full_end = if end == self.base.size {
            end
        } else {
            end / BLOCK * BLOCK
        };
        if first_full * BLOCK >= last_full_end {
            return if trim_only {
                Ok(())
            } else {
                self.write(&vec![0u8; len as usize], off, fua)
            };
        }
        if !trim_only && off < first_full * BLOCK {
            self.write(&vec![0u8; (first_full * BLOCK - off) as usize], off, false)?;
        }
        if !trim_only && last_full_end < end {
            self.write(
                &vec![0u8; (end - last_full_end) as usize],
                last_full_end,
                false,
            )?;
        }
        let _g = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let (hs, hl) = (first_full * BLOCK, last_full_end - first_full * BLOCK);
        // SAFETY: plain syscall on our own fd.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                hs as libc::off_t,
                hl as libc::off_t,
            )
        };
        if r != 0 {
            // No hole punching on this filesystem: write the zeroes.
            let zeros = vec![0u8; (hl.min(1 << 20)) as usize];
            let mut p = hs;
            while p < hs + hl {
                let n = (hs + hl - p).min(zeros.len() as u64) as usize;
                self.file.write_all_at(&zeros[..n], p)?;
                p += n as u64;
            }
        }
        self.set(first_full, (last_full_end - 1) / BLOCK);
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    /// Drops a discarded overlay, or saves the map of a kept one.
    fn finish(&self) -> io::Result<()> {
        if self.persist {
            self.save_map()
        } else {
            std::fs::remove_file(&self.path)
        }
    }
}

/// What a connection reads and writes through.
#[derive(Clone)]
pub enum Backend {
    ReadOnly(Arc<Base>),
    Overlay(Arc<Overlay>),
}

impl Backend {
    pub fn size(&self) -> u64 {
        match self {
            Backend::ReadOnly(b) => b.size,
            Backend::Overlay(o) => o.base.size,
        }
    }

    /// The base, when `[off, off+len)` can be sent from it without a copy: the range is
    /// in the page cache and (for an overlay) no block of it was written by the client.
    pub fn zero_copy(&self, off: u64, len: u64) -> Option<Arc<Base>> {
        let base = match self {
            Backend::ReadOnly(b) => b,
            Backend::Overlay(o) => {
                if len == 0 {
                    return None;
                }
                let (first, last) = (off / BLOCK, (off + len - 1) / BLOCK);
                if (first..=last).any(|b| o.is_set(b)) {
                    return None;
                }
                &o.base
            }
        };
        base.resident(off, len).then(|| base.clone())
    }

    /// Fills `buf` from `off`. `nowait`: page cache only; `Ok(false)` = not all cached.
    pub fn read(&self, buf: &mut [u8], off: u64, nowait: bool) -> io::Result<bool> {
        match self {
            Backend::ReadOnly(b) => pread_full(&b.file, buf, off, nowait),
            Backend::Overlay(o) => o.read(buf, off, nowait),
        }
    }

    pub fn write(&self, data: &[u8], off: u64, fua: bool) -> io::Result<()> {
        match self {
            Backend::ReadOnly(_) => Err(io::Error::from_raw_os_error(libc::EPERM)),
            Backend::Overlay(o) => o.write(data, off, fua),
        }
    }

    pub fn write_zeroes(&self, off: u64, len: u64, fua: bool) -> io::Result<()> {
        match self {
            Backend::ReadOnly(_) => Err(io::Error::from_raw_os_error(libc::EPERM)),
            Backend::Overlay(o) => o.zero(off, len, fua, false),
        }
    }

    pub fn trim(&self, off: u64, len: u64, fua: bool) -> io::Result<()> {
        match self {
            Backend::ReadOnly(_) => Err(io::Error::from_raw_os_error(libc::EPERM)),
            Backend::Overlay(o) => o.zero(off, len, fua, true),
        }
    }

    /// FLUSH. A discarded overlay dies with its last connection, so stable storage buys it
    /// nothing; a kept one syncs its data and then its map.
    pub fn flush(&self) -> io::Result<()> {
        match self {
            Backend::Overlay(o) if o.persist => o.save_map(),
            _ => Ok(()),
        }
    }

    /// CACHE: ask the kernel to read the base ahead.
    pub fn cache(&self, off: u64, len: u64) {
        let file = match self {
            Backend::ReadOnly(b) => &b.file,
            Backend::Overlay(o) => &o.base.file,
        };
        // SAFETY: advisory syscall on our own fd; failure is harmless.
        unsafe {
            libc::posix_fadvise(
                file.as_raw_fd(),
                off as libc::off_t,
                len as libc::off_t,
                libc::POSIX_FADV_WILLNEED,
            );
        }
    }
}

/// The configured exports and the live overlays, shared by every connection.
pub struct Exports {
    /// The running config's `[[nbd.export]]`s: a reload changes what new connections
    /// open; an open connection keeps the file it opened (a replaced image file is served
    /// to new connections only).
    cfg: config::Live,
    /// Fixed at start (a reload leaves `server.state_dir`).
    state_dir: PathBuf,
    /// (export, client address) -> the overlay and how many connections use it.
    overlays: Mutex<HashMap<OverlayKey, (Arc<Overlay>, usize)>>,
}

/// An overlay's identity: export name and client address.
type OverlayKey = (String, IpAddr);

/// A connection's hold on a backend; the last lease of an overlay discards (or saves) it.
pub struct Lease {
    pub backend: Backend,
    key: Option<OverlayKey>,
    exports: Arc<Exports>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(key) = self.key.take() else { return };
        let mut map = self
            .exports
            .overlays
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let last = match map.get_mut(&key) {
            Some((_, n)) => {
                *n -= 1;
                *n == 0
            }
            None => false,
        };
        if last {
            // Finished under the lock, so a client reconnecting right now waits and then
            // gets a fresh overlay instead of one whose file is being deleted.
            if let Some((o, _)) = map.remove(&key) {
                if let Err(e) = o.finish() {
                    tracing::error!(export = %key.0, ip = %key.1, file = %o.path.display(), "overlay not finished: {e}");
                } else {
                    tracing::debug!(export = %key.0, ip = %key.1, kept = o.persist, "overlay closed");
                }
            }
        }
    }
}

/// File-name-safe form of an export name (names come from the admin, but one with a `/`
/// must not reach outside the state directory).
fn safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect::<String>()
        .trim_start_matches('.')
        .to_string()
}

impl Exports {
    pub fn new(cfg: impl Into<config::Live>) -> Exports {
        let cfg = cfg.into();
        Exports {
            state_dir: cfg.get().server.state_dir.clone(),
            cfg,
            overlays: Mutex::new(HashMap::new()),
        }
    }

    fn find(&self, name: &str) -> Option<config::Export> {
        self.cfg
            .get()
            .nbd
            .exports
            .iter()
            .find(|e| e.name == name)
            .cloned()
    }

    /// Where the overlay of `ip` on `export` lives.
    pub fn overlay_path(&self, export: &str, ip: IpAddr) -> PathBuf {
        self.state_dir
            .join("nbd")
            .join(safe(export))
            .join(format!("{ip}.overlay"))
    }

    /// Opens an export for one connection from `ip` (the overlay identity).
    pub fn open(self: &Arc<Self>, name: &str, ip: IpAddr) -> Result<Lease, Error> {
        let e = self
            .find(name)
            .ok_or_else(|| Error::Unknown(name.to_string()))?;
        if e.mode == ExportMode::ReadOnly {
            return Ok(Lease {
                backend: Backend::ReadOnly(Arc::new(Base::open(&e.path)?)),
                key: None,
                exports: self.clone(),
            });
        }
        let ip = ip.to_canonical();
        let key = (e.name.clone(), ip);
        let mut map = self.overlays.lock().unwrap_or_else(|p| p.into_inner());
        let overlay = match map.get_mut(&key) {
            Some((o, n)) => {
                *n += 1;
                o.clone()
            }
            None => {
                let base = Arc::new(Base::open(&e.path)?);
                let o = Arc::new(Overlay::open(base, self.overlay_path(name, ip), e.persist)?);
                map.insert(key.clone(), (o.clone(), 1));
                o
            }
        };
        Ok(Lease {
            backend: Backend::Overlay(overlay),
            key: Some(key),
            exports: self.clone(),
        })
    }
}

impl Catalog for Exports {
    fn list(&self) -> Vec<(String, String)> {
        // An export whose file is missing is not offered: clients such as `nbdinfo
        // --list` would fail on it (info() logs why).
        self.cfg
            .get()
            .nbd
            .exports
            .iter()
            .filter(|e| self.info(&e.name).is_some())
            .map(|e| (e.name.clone(), e.description.clone()))
            .collect()
    }

    fn info(&self, name: &str) -> Option<ExportInfo> {
        let e = self.find(name)?;
        let size = match std::fs::metadata(&e.path) {
            Ok(m) => m.len(),
            Err(err) => {
                tracing::error!(export = %name, file = %e.path.display(), "export file unusable: {err}");
                return None;
            }
        };
        Some(ExportInfo {
            name: e.name.clone(),
            description: e.description.clone(),
            size,
            read_only: e.mode == ExportMode::ReadOnly,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    fn dir(tag: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("vdd-nbd-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }

    /// A base whose every byte differs from its neighbours' and is never zero.
    fn base(d: &Path, size: usize) -> (PathBuf, Vec<u8>) {
        let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8 + 1).collect();
        let p = d.join("base.img");
        std::fs::write(&p, &data).unwrap();
        (p, data)
    }

    fn read(b: &Backend, off: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0xeeu8; len];
        assert!(b.read(&mut v, off, false).unwrap());
        v
    }

    #[test]
    fn overlay_merges_and_never_writes_base() {
        let d = dir("merge");
        // Not a multiple of BLOCK, so the short last block is exercised too.
        let (bp, mut model) = base(&d.0, 5 * BLOCK as usize + 100);
        let o = Overlay::open(
            Arc::new(Base::open(&bp).unwrap()),
            d.0.join("x/c.overlay"),
            false,
        )
        .unwrap();
        let b = Backend::Overlay(Arc::new(o));
        let mut apply = |off: usize, data: &[u8], b: &Backend| {
            b.write(data, off as u64, false).unwrap();
            model[off..off + data.len()].copy_from_slice(data);
        };
        apply(10, &[0xaa; 20], &b); // inside block 0
        apply(4090, &[0xbb; 10], &b); // across blocks 0 and 1
        apply(3 * BLOCK as usize, &[0xcc; BLOCK as usize], &b); // exactly block 3
        apply(5 * BLOCK as usize + 50, &[0xdd; 50], &b); // to the end
        assert_eq!(read(&b, 0, model.len()), model);
        assert_eq!(read(&b, 4000, 200), model[4000..4200]);
        b.write_zeroes(100, 3 * BLOCK, false).unwrap();
        model[100..100 + 3 * BLOCK as usize].fill(0);
        assert_eq!(read(&b, 0, model.len()), model);
        b.write_zeroes(5 * BLOCK, 100, false).unwrap();
        model[5 * BLOCK as usize..].fill(0);
        assert_eq!(read(&b, 0, model.len()), model);
        // Base untouched.
        let now = std::fs::read(&bp).unwrap();
        let expect: Vec<u8> = (0..now.len()).map(|i| (i % 251) as u8 + 1).collect();
        assert_eq!(now, expect);
    }

    #[test]
    fn nowait_read_from_cache() {
        let d = dir("nowait");
        let (bp, data) = base(&d.0, 64 * 1024);
        let b = Backend::ReadOnly(Arc::new(Base::open(&bp).unwrap()));
        let mut v = vec![0u8; 8192];
        // Just written, so cached; a filesystem without RWF_NOWAIT says Ok(false).
        if b.read(&mut v, 4096, true).unwrap() {
            assert_eq!(v, data[4096..12288]);
        }
        assert!(b.write(&[1], 0, false).is_err());
    }

    #[test]
    fn zero_copy_only_for_cached_unwritten_ranges() {
        let d = dir("zc");
        let (bp, data) = base(&d.0, 16 * BLOCK as usize);
        // Make sure it is cached (it was just written, but be explicit).
        std::fs::read(&bp).unwrap();
        let ro = Backend::ReadOnly(Arc::new(Base::open(&bp).unwrap()));
        let Some(src) = ro.zero_copy(100, 3 * BLOCK) else {
            eprintln!("page cache says not resident here; nothing to check");
            return;
        };
        assert!(ro.zero_copy(0, 17 * BLOCK).is_none(), "past the end");
        // sendfile through a socket pair carries the right bytes.
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let n = src.sendfile_to(a.as_raw_fd(), 100, 5000).unwrap();
        let mut got = vec![0u8; n];
        std::io::Read::read_exact(&mut b, &mut got).unwrap();
        assert_eq!(got, data[100..100 + n]);
        let o = Overlay::open(
            Arc::new(Base::open(&bp).unwrap()),
            d.0.join("o.overlay"),
            false,
        )
        .unwrap();
        let ov = Backend::Overlay(Arc::new(o));
        ov.write(&[1; 10], 5 * BLOCK + 7, false).unwrap();
        assert!(ov.zero_copy(5 * BLOCK, 10).is_none(), "written block");
        assert!(ov.zero_copy(4 * BLOCK, BLOCK + 1).is_none(), "touches it");
        assert!(ov.zero_copy(6 * BLOCK, BLOCK).is_some(), "untouched block");
    }

    fn cfg(d: &Path, persist: bool) -> config::Config {
        let text = format!(
            "[server]\ninterface = \"lo\"\nstate_dir = \"{}\"\n[dhcp]\nmode = \"off\"\n[[nbd.export]]\nname = \"a/b\"\npath = \"base.img\"\nmode = \"overlay\"\npersist = {persist}\n",
            d.join("state").display()
        );
        config::Config::parse(&text, &d.join("config.toml")).unwrap()
    }

    #[test]
    fn overlays_are_per_client_and_discarded_with_last_lease() {
        let d = dir("lease");
        let (_, data) = base(&d.0, 3 * BLOCK as usize);
        let ex = Arc::new(Exports::new(cfg(&d.0, false)));
        let one: IpAddr = "127.0.0.1".parse().unwrap();
        let two: IpAddr = "127.0.0.2".parse().unwrap();
        let a1 = ex.open("a/b", one).unwrap();
        let a2 = ex.open("a/b", one).unwrap();
        let b1 = ex.open("a/b", two).unwrap();
        a1.backend.write(&[7; 8], 0, false).unwrap();
        assert_eq!(read(&a2.backend, 0, 8), [7; 8]);
        assert_eq!(read(&b1.backend, 0, 8), data[..8]);
        let path = ex.overlay_path("a/b", one);
        assert!(path.starts_with(d.0.join("state/nbd/a_b")), "{path:?}");
        drop(a1);
        assert!(path.exists(), "second connection still open");
        drop(a2);
        assert!(!path.exists(), "last connection gone: overlay discarded");
        let a3 = ex.open("a/b", one).unwrap();
        assert_eq!(read(&a3.backend, 0, 8), data[..8]);
        assert!(ex.open("nope", one).is_err());
    }

    #[test]
    fn persisted_overlay_comes_back() {
        let d = dir("persist");
        base(&d.0, 3 * BLOCK as usize);
        let ex = Arc::new(Exports::new(cfg(&d.0, true)));
        let ip: IpAddr = "10.77.0.5".parse().unwrap();
        let l = ex.open("a/b", ip).unwrap();
        l.backend.write(&[9; 5000], 100, false).unwrap();
        drop(l);
        let l = ex.open("a/b", ip).unwrap();
        assert_eq!(read(&l.backend, 100, 5000), vec![9; 5000]);
    }
}
