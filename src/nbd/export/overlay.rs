//! A client's sparse copy-on-write overlay over a base: the allocation bitmap, copy-up of
//! partial blocks, zeroing by hole punching, and the map saved beside a kept overlay.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nix::libc;

use super::base::{pread_full, Base};
use super::{Error, BLOCK};

/// A client's private copy-on-write layer over a base.
pub struct Overlay {
    pub(super) base: Arc<Base>,
    file: File,
    pub(super) path: PathBuf,
    map_path: PathBuf,
    /// One bit per BLOCK: set = the overlay holds this block. Atomics so reads never take
    /// a lock; a bit is set only after its data is in the overlay file.
    bits: Vec<AtomicU64>,
    /// Serialises writers: a partial block is copied from the base before it is patched,
    /// and two writers must not both do that for one block.
    write_lock: Mutex<()>,
    pub(super) persist: bool,
}

const MAP_MAGIC: &[u8; 8] = b"VDDNBDM1";

impl Overlay {
    fn blocks(size: u64) -> usize {
        size.div_ceil(BLOCK) as usize
    }

    /// Opens (persist: reuses when the saved map matches the base) or creates the overlay.
    pub(super) fn open(base: Arc<Base>, path: PathBuf, persist: bool) -> Result<Overlay, Error> {
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
    pub(super) fn save_map(&self) -> io::Result<()> {
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

    pub(super) fn is_set(&self, block: u64) -> bool {
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
    pub(super) fn read(&self, buf: &mut [u8], off: u64, nowait: bool) -> io::Result<bool> {
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

    pub(super) fn write(&self, data: &[u8], off: u64, fua: bool) -> io::Result<()> {
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
    pub(super) fn zero(&self, off: u64, len: u64, fua: bool, trim_only: bool) -> io::Result<()> {
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
    pub(super) fn finish(&self) -> io::Result<()> {
        if self.persist {
            self.save_map()
        } else {
            std::fs::remove_file(&self.path)
        }
    }
}
