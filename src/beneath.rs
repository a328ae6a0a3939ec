//! The one way a file named by a client is opened: beneath a root, no symlink that leaves
//! it, regular files only, never hanging on a FIFO. TFTP and HTTP both open through here;
//! each checks its own names first (their rules differ: TFTP strips leading `/`).
//!
//! The kernel enforces the root with openat2(2) `RESOLVE_BENEATH`, so a symlink swapped in
//! mid-request cannot escape either; where openat2 is missing (Linux < 5.6, some seccomp
//! sandboxes) we fall back to canonicalize-then-check, which has that race but the same
//! rules.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};

/// Why a file was not opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Nothing there (or a path component is not a directory).
    #[error("not found")]
    NotFound,
    /// Resolving it would leave the root.
    #[error("leaves the root (symlink)")]
    Escapes,
    /// Something there, but not a regular file (a directory, FIFO, device).
    #[error("not a regular file")]
    NotRegular,
    /// The file system said no.
    #[error("permission denied")]
    Denied(#[source] io::Error),
    /// Open or stat failed for another reason (I/O).
    #[error("cannot open")]
    Io(#[source] io::Error),
}

/// An open regular file and its metadata.
#[derive(Debug)]
pub struct Opened {
    pub file: File,
    pub meta: std::fs::Metadata,
}

/// Opens `rel` (relative, already checked by the caller's name rules) beneath `root`.
pub fn open_beneath(root: &Path, rel: &Path) -> Result<Opened, OpenError> {
    let file = match open_openat2(root, rel) {
        Err(e) if e.raw_os_error() == Some(Errno::ENOSYS as i32) => open_checked(root, rel),
        r => r,
    }
    .map_err(map_open_error)?;
    regular(file)
}

/// Opens an admin-configured file (`[boot] kernel`, the iPXE loaders): any path, symlinks
/// followed, but still a regular file only, and opened so that a FIFO cannot hang us.
pub fn open_path(path: &Path) -> Result<Opened, OpenError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_NONBLOCK | OFlag::O_NOCTTY).bits())
        .open(path)
        .map_err(map_open_error)?;
    regular(file)
}

fn regular(file: File) -> Result<Opened, OpenError> {
    let meta = file.metadata().map_err(OpenError::Io)?;
    if !meta.is_file() {
        return Err(OpenError::NotRegular);
    }
    Ok(Opened { file, meta })
}

fn map_open_error(e: io::Error) -> OpenError {
    match e.raw_os_error().map(Errno::from_raw) {
        // ELOOP: a symlink loop, which resolves to nothing.
        Some(Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP) => OpenError::NotFound,
        // EXDEV is how RESOLVE_BENEATH refuses an escape.
        Some(Errno::EXDEV) => OpenError::Escapes,
        Some(Errno::EACCES | Errno::EPERM) => OpenError::Denied(e),
        _ => OpenError::Io(e),
    }
}

// O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever; on a
// regular file the flag changes nothing.
fn read_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOCTTY | OFlag::O_NONBLOCK
}

fn open_openat2(root: &Path, rel: &Path) -> io::Result<File> {
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_DIRECTORY | OFlag::O_CLOEXEC).bits())
        .open(root)?;
    let how = OpenHow::new()
        .flags(read_flags())
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let fd = nix::fcntl::openat2(dir.as_raw_fd(), rel, how).map_err(io::Error::from)?;
    // SAFETY: openat2 just returned this descriptor and nothing else owns it.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn open_checked(root: &Path, rel: &Path) -> io::Result<File> {
    let root = std::fs::canonicalize(root)?;
    let full: PathBuf = std::fs::canonicalize(root.join(rel))?;
    if !full.starts_with(&root) {
        // The error RESOLVE_BENEATH gives for the same escape.
        return Err(io::Error::from_raw_os_error(Errno::EXDEV as i32));
    }
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((read_flags() | OFlag::O_NOFOLLOW).bits())
        .open(full)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> PathBuf {
        let d = std::env::temp_dir().join(format!("vdd-beneath-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("root/sub")).unwrap();
        std::fs::write(d.join("root/sub/f"), b"hello").unwrap();
        std::fs::write(d.join("secret"), b"secret").unwrap();
        std::os::unix::fs::symlink("sub/f", d.join("root/inside")).unwrap();
        std::os::unix::fs::symlink("../secret", d.join("root/outside")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.join("root/abs")).unwrap();
        std::os::unix::fs::symlink("/etc", d.join("root/etc")).unwrap();
        nix::unistd::mkfifo(&d.join("root/fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        d
    }

    #[test]
    fn stays_beneath_root() {
        let d = tree();
        let root = d.join("root");
        let open = |n: &str| open_beneath(&root, Path::new(n));
        assert_eq!(open("sub/f").unwrap().meta.len(), 5);
        assert_eq!(open("inside").unwrap().meta.len(), 5);
        assert!(matches!(open("outside"), Err(OpenError::Escapes)));
        assert!(matches!(open("abs"), Err(OpenError::Escapes)));
        assert!(matches!(open("etc/passwd"), Err(OpenError::Escapes)));
        assert!(matches!(open("sub"), Err(OpenError::NotRegular)));
        assert!(matches!(open("fifo"), Err(OpenError::NotRegular)));
        assert!(matches!(open("nope"), Err(OpenError::NotFound)));
        assert!(matches!(open("sub/f/x"), Err(OpenError::NotFound)));
        // The fallback keeps the same rules.
        let f = |n| open_checked(&root, Path::new(n));
        assert!(f("inside").is_ok());
        assert!(f("outside").is_err());
        assert!(f("abs").is_err());
        // A configured path may be anywhere, but is still a regular file.
        assert!(open_path(&root.join("abs")).unwrap().meta.len() > 0);
        assert!(matches!(
            open_path(&root.join("fifo")),
            Err(OpenError::NotRegular)
        ));
        let _ = std::fs::remove_dir_all(&d);
    }
}
