//! The base image of an export, opened read-only: positional reads (with a page-cache-only
//! variant for the runtime thread), the mincore(2) probe of what is cached, and sendfile(2)
//! straight from the page cache. Apart from the overlay so the read path reads alone.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::libc;

use super::Error;

/// The base image, opened read-only: nothing in this module can write it.
pub struct Base {
    pub(super) file: File,
    pub(super) size: u64,
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
pub(super) fn pread_full(
    file: &File,
    mut buf: &mut [u8],
    mut off: u64,
    nowait: bool,
) -> io::Result<bool> {
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
