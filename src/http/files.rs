//! Which file a `/files/<path>` request names, opened safely beneath `[http] root`: no
//! `..`, no symlink that leaves the root, regular files only. The kernel enforces the
//! root with openat2(2) `RESOLVE_BENEATH`, so a symlink swapped in mid-request cannot
//! escape either; where openat2 is missing (Linux < 5.6, some seccomp sandboxes) we fall
//! back to canonicalize-then-check, which has that race but the same rules.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use nix::fcntl::{OFlag, OpenHow, ResolveFlag};

/// Why a name is not served. Every variant becomes 404: a client learns nothing about
/// what exists outside the root.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The name itself is refused (`..`, NUL, backslash, empty segment, too long).
    #[error("refused name")]
    BadName,
    /// Nothing there, or resolving it would leave the root.
    #[error("not found")]
    NotFound,
    /// Something there, but not a regular file (a directory, FIFO, device).
    #[error("not a regular file")]
    NotRegular,
    /// Open failed for another reason (permissions, I/O).
    #[error("cannot open")]
    Open(#[source] io::Error),
}

/// An open regular file and its metadata.
#[derive(Debug)]
pub struct Opened {
    pub file: File,
    pub meta: std::fs::Metadata,
}

/// Checks a decoded request path (after `/files/`) lexically: only plain names.
pub fn check_name(name: &str) -> Result<&Path, FileError> {
    if name.is_empty()
        || name.len() > 1024
        || name.contains('\0')
        || name.contains('\\')
        || name.starts_with('/')
    {
        return Err(FileError::BadName);
    }
    // Path::components drops "." and empty segments silently; look at the raw ones.
    if name
        .split('/')
        .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return Err(FileError::BadName);
    }
    let p = Path::new(name);
    if !p.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(FileError::BadName);
    }
    Ok(p)
}

/// Opens `name` beneath `root`.
pub fn open_beneath(root: &Path, name: &str) -> Result<Opened, FileError> {
    let rel = check_name(name)?;
    let file = match open_openat2(root, rel) {
        Err(e) if e.raw_os_error() == Some(libc_enosys()) => open_checked(root, rel),
        r => r,
    }
    .map_err(map_open_error)?;
    regular(file)
}

/// Opens an admin-configured file (`[boot] kernel` ...): any path, but still a regular
/// file only, and opened so that a FIFO cannot hang us.
pub fn open_path(path: &Path) -> Result<Opened, FileError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(OFlag::O_NONBLOCK.bits() | OFlag::O_NOCTTY.bits())
        .open(path)
        .map_err(map_open_error)?;
    regular(file)
}

/// True when `path` would be served by [`open_path`].
pub fn usable(path: &Path) -> bool {
    open_path(path).is_ok()
}

fn regular(file: File) -> Result<Opened, FileError> {
    let meta = file.metadata().map_err(FileError::Open)?;
    if !meta.is_file() {
        return Err(FileError::NotRegular);
    }
    Ok(Opened { file, meta })
}

fn map_open_error(e: io::Error) -> FileError {
    use nix::errno::Errno;
    match e.raw_os_error().map(Errno::from_raw) {
        // EXDEV is how RESOLVE_BENEATH refuses an escape; ELOOP a symlink where none may be.
        Some(Errno::ENOENT | Errno::ENOTDIR | Errno::EXDEV | Errno::ELOOP) => FileError::NotFound,
        _ => FileError::Open(e),
    }
}

fn libc_enosys() -> i32 {
    nix::errno::Errno::ENOSYS as i32
}

// O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever; on a
// regular file the flag changes nothing.
fn read_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOCTTY | OFlag::O_NONBLOCK
}

fn open_openat2(root: &Path, rel: &Path) -> io::Result<File> {
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(OFlag::O_DIRECTORY.bits() | OFlag::O_CLOEXEC.bits())
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
        return Err(io::Error::from_raw_os_error(
            nix::errno::Errno::EXDEV as i32,
        ));
    }
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((read_flags() | OFlag::O_NOFOLLOW).bits())
        .open(full)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "a/b.img", "ipxe.efi", "dir/sub/x", "...", "a..b"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "..",
            "../x",
            "a/../../x",
            "a/..",
            "./a",
            "a//b",
            "a/",
            "a\\..\\b",
            "a\0b",
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    fn tree() -> PathBuf {
        let d = std::env::temp_dir().join(format!("vdd-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("root/sub")).unwrap();
        std::fs::write(d.join("root/sub/f"), b"hello").unwrap();
        std::fs::write(d.join("secret"), b"secret").unwrap();
        std::os::unix::fs::symlink("sub/f", d.join("root/inside")).unwrap();
        std::os::unix::fs::symlink("../secret", d.join("root/outside")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.join("root/abs")).unwrap();
        nix::unistd::mkfifo(&d.join("root/fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        d
    }

    #[test]
    fn resolver_stays_beneath_root() {
        let d = tree();
        let root = d.join("root");
        let open = |n| open_beneath(&root, n);
        assert_eq!(open("sub/f").unwrap().meta.len(), 5);
        assert_eq!(open("inside").unwrap().meta.len(), 5);
        assert!(matches!(open("outside"), Err(FileError::NotFound)));
        assert!(matches!(open("abs"), Err(FileError::NotFound)));
        assert!(matches!(open("sub"), Err(FileError::NotRegular)));
        assert!(matches!(open("fifo"), Err(FileError::NotRegular)));
        assert!(matches!(open("nope"), Err(FileError::NotFound)));
        assert!(matches!(open("sub/f/x"), Err(FileError::NotFound)));
        // The fallback keeps the same rules.
        let f = |n| open_checked(&root, Path::new(n));
        assert!(f("inside").is_ok());
        assert!(f("outside").is_err());
        assert!(f("abs").is_err());
        let _ = std::fs::remove_dir_all(&d);
    }
}
