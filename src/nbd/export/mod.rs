//! NBD export backends: a read-only file served with positional reads, and the per-client
//! sparse copy-on-write overlay over it. Blocking file IO; the driver decides where it runs.
//!
//! Spec: NetworkBlockDevice/nbd `doc/proto.md`, "Request types" (READ, WRITE, FLUSH, TRIM,
//! WRITE_ZEROES, CACHE semantics; TRIM is advisory, WRITE_ZEROES must read back as zeroes).
//!
//! Files: `base` (the read-only base file, page-cache probes, zero-copy sends),
//! `overlay` (a client's copy-on-write layer and its saved allocation map),
//! `exports` (the configured exports, shared overlays and connections' leases); this
//! file holds what they share and the [`Backend`] a connection reads and writes through.

mod base;
mod exports;
mod overlay;

pub use base::Base;
pub use exports::{Exports, Lease};
pub use overlay::Overlay;

use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;

use nix::libc;

use base::pread_full;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    use std::net::IpAddr;
    use std::path::Path;

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
