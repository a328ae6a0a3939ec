//! Which file a TFTP file name may open: only regular files beneath `[tftp] root`, plus the
//! `[boot]` bios/uefi loaders from `[boot] ipxe_dir` when the root lacks them.
//!
//! RFC 1350 leaves naming to the server; RFC 1350 section 7 / RFC 3617 warn that TFTP
//! has no authentication, so everything outside these two places is refused.
//!
//! Decisions:
//! - Leading `/` are stripped, as tftp-hpa does with `-s`: PXE configs often say
//!   `/pxelinux.0` and mean the root. Anything else absolute is impossible after that.
//! - `..` components, backslashes (Windows clients that mean a separator would still
//!   be surprised), NUL and control characters, non-UTF-8 names and names over 1024
//!   bytes are refused with ERROR 2 (access violation) before the file system is touched.
//! - Symlinks are followed only while they stay beneath the root: the file is opened by
//!   [`crate::beneath`] (openat2 `RESOLVE_BENEATH`), as HTTP's `/files/` are.
//! - Only regular files: directories, devices, fifos and sockets get ERROR 2.
//! - Missing files get ERROR 1 (file not found).

use std::fs::File;
use std::path::{Component, Path, PathBuf};

use crate::beneath::{self, OpenError};
use crate::config::Config;

use super::codec::{ERR_ACCESS, ERR_NOT_FOUND};

/// Longest file name accepted; PXE ROMs send at most 127 bytes, Linux paths 4096.
pub const MAX_NAME: usize = 1024;

/// Why a name is not served. The message goes to the client in the ERROR packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// ERROR 1.
    NotFound,
    /// ERROR 2, with the reason for the log line.
    Denied(&'static str),
}

impl Refusal {
    /// The RFC 1350 error code.
    pub fn code(&self) -> u16 {
        match self {
            Refusal::NotFound => ERR_NOT_FOUND,
            Refusal::Denied(_) => ERR_ACCESS,
        }
    }

    /// The message sent to the client: no detail about the server's file system.
    pub fn message(&self) -> &'static str {
        match self {
            Refusal::NotFound => "File not found",
            Refusal::Denied(_) => "Access violation",
        }
    }

    /// Why, for the log line.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::NotFound => "no such file",
            Refusal::Denied(why) => why,
        }
    }
}

/// Checks a name as sent and turns it into a relative path. Pure.
pub fn clean(name: &[u8]) -> Result<PathBuf, Refusal> {
    if name.len() > MAX_NAME {
        return Err(Refusal::Denied("name too long"));
    }
    let name = std::str::from_utf8(name).map_err(|_| Refusal::Denied("name not UTF-8"))?;
    if name.contains('\0') {
        return Err(Refusal::Denied("NUL in name"));
    }
    if name.chars().any(char::is_control) {
        return Err(Refusal::Denied("control character in name"));
    }
    if name.contains('\\') {
        return Err(Refusal::Denied("backslash in name"));
    }
    let rel = name.trim_start_matches('/');
    let mut out = PathBuf::new();
    for c in Path::new(rel).components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir => return Err(Refusal::Denied("`..` in name")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(Refusal::Denied("absolute name"))
            }
        }
    }
    if out.as_os_str().is_empty() {
        return Err(Refusal::Denied("empty name"));
    }
    Ok(out)
}

/// Where a clean relative name is looked up.
#[derive(Debug, PartialEq, Eq)]
pub enum Place {
    /// `rel` beneath `root`, symlinks only while they stay beneath it.
    Beneath { root: PathBuf, rel: PathBuf },
    /// A file the admin named in `[boot]`, at this path, symlinks followed.
    Configured(PathBuf),
}

/// The places a clean relative name is looked up, in order: the root, then, for the
/// configured boot loaders only, the iPXE folder. Pure.
pub fn candidates(cfg: &Config, rel: &Path) -> Vec<Place> {
    let mut v = vec![Place::Beneath {
        root: cfg.tftp.root.clone(),
        rel: rel.to_path_buf(),
    }];
    let boot = [cfg.boot.bios.as_str(), cfg.boot.uefi.as_str()];
    if boot.iter().any(|b| Path::new(b) == rel) {
        // The admin named this file in [boot]; the distribution's iPXE folder may hold it
        // as a symlink elsewhere (Debian: ipxe.efi -> /boot/ipxe.efi), so it is followed.
        // It must still be a regular file, and only these two names ever get here.
        v.push(Place::Configured(cfg.boot.ipxe_dir.join(rel)));
    }
    v
}

/// A file opened for a transfer.
#[derive(Debug)]
pub struct Opened {
    pub file: File,
    pub size: u64,
    /// The path it was found at, for log lines.
    pub path: PathBuf,
}

/// Opens what `name` may serve, or says why not.
pub fn open(cfg: &Config, name: &[u8]) -> Result<Opened, Refusal> {
    let rel = clean(name)?;
    let mut denied = None;
    for place in candidates(cfg, &rel) {
        let (opened, path) = match place {
            Place::Beneath { root, rel } => (beneath::open_beneath(&root, &rel), root.join(rel)),
            Place::Configured(path) => (beneath::open_path(&path), path),
        };
        match opened.map_err(refusal) {
            Ok(o) => {
                return Ok(Opened {
                    file: o.file,
                    size: o.meta.len(),
                    path,
                })
            }
            Err(Refusal::NotFound) => {}
            // A refusal in the root must not be hidden by a fallback in the iPXE folder.
            Err(r) => {
                denied = Some(r);
                break;
            }
        }
    }
    Err(denied.unwrap_or(Refusal::NotFound))
}

fn refusal(e: OpenError) -> Refusal {
    match e {
        OpenError::NotFound => Refusal::NotFound,
        OpenError::Escapes => Refusal::Denied("leaves the root (symlink)"),
        OpenError::NotRegular => Refusal::Denied("not a regular file"),
        OpenError::Denied(_) => Refusal::Denied("permission denied"),
        OpenError::Io(_) => Refusal::Denied("cannot open (I/O error)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(root: &Path, ipxe: &Path) -> Config {
        let text = format!(
            "[server]\ninterface=\"lo\"\n[dhcp]\nmode=\"off\"\n[boot]\nipxe_dir=\"{}\"\n[tftp]\nroot=\"{}\"\n",
            ipxe.display(),
            root.display()
        );
        Config::parse(&text, Path::new("/tmp/c.toml")).unwrap()
    }

    #[test]
    fn clean_names() {
        for (name, want) in [
            ("pxelinux.0", "pxelinux.0"),
            ("/pxelinux.0", "pxelinux.0"),
            ("//boot///x.efi", "boot/x.efi"),
            ("./a/./b", "a/b"),
            ("dir/", "dir"),
            ("über.bin", "über.bin"),
        ] {
            assert_eq!(clean(name.as_bytes()).unwrap(), Path::new(want), "{name}");
        }
    }

    #[test]
    fn refused_names() {
        let long = "a".repeat(MAX_NAME + 1);
        for name in [
            "",
            "/",
            "//",
            ".",
            "./",
            "..",
            "../etc/passwd",
            "/../etc/passwd",
            "a/../../b",
            "a/..",
            "a\\..\\b",
            "..\\windows",
            "C:\\boot.ini",
            "a\nb",
            "a\rb",
            "\x1b[31m",
            "a\x7f",
            long.as_str(),
        ] {
            let r = clean(name.as_bytes()).unwrap_err();
            assert_eq!(r.code(), ERR_ACCESS, "{name:?}");
        }
        assert!(clean(b"\xff\xfe").is_err());
        assert!(clean(b"a\0b").is_err());
    }

    #[test]
    fn boot_files_fall_back_to_ipxe_dir() {
        let c = cfg(Path::new("/srv/tftp"), Path::new("/usr/lib/ipxe"));
        let v = candidates(&c, Path::new("undionly.kpxe"));
        assert_eq!(v.len(), 2);
        assert_eq!(
            v[1],
            Place::Configured("/usr/lib/ipxe/undionly.kpxe".into())
        );
        assert_eq!(candidates(&c, Path::new("ipxe.efi")).len(), 2);
        // Other names, even ones that exist in the iPXE folder, come only from the root.
        assert_eq!(candidates(&c, Path::new("ipxe.lkrn")).len(), 1);
        assert_eq!(candidates(&c, Path::new("x/undionly.kpxe")).len(), 1);
    }

    #[test]
    fn configured_boot_file_may_be_a_symlink_out_of_the_ipxe_dir() {
        // As Debian ships it: /usr/lib/ipxe/ipxe.efi -> /boot/ipxe.efi.
        let dir = std::env::temp_dir().join(format!("vdd-paths-ln-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (root, ipxe, boot) = (dir.join("root"), dir.join("ipxe"), dir.join("boot"));
        for d in [&root, &ipxe, &boot] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(boot.join("ipxe.efi"), b"efi").unwrap();
        std::os::unix::fs::symlink(boot.join("ipxe.efi"), ipxe.join("ipxe.efi")).unwrap();
        std::os::unix::fs::symlink(boot.join("ipxe.efi"), ipxe.join("other.efi")).unwrap();
        let c = cfg(&root, &ipxe);
        let o = open(&c, b"ipxe.efi").unwrap();
        assert_eq!(o.size, 3);
        // Only the configured names are looked up there at all.
        assert_eq!(open(&c, b"other.efi").unwrap_err(), Refusal::NotFound);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn opens_only_regular_files_beneath_root() {
        let dir = std::env::temp_dir().join(format!("vdd-paths-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let root = dir.join("root");
        let ipxe = dir.join("ipxe");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::create_dir_all(&ipxe).unwrap();
        std::fs::write(root.join("sub/f"), b"hello").unwrap();
        std::fs::write(ipxe.join("undionly.kpxe"), b"pxe").unwrap();
        std::fs::write(dir.join("secret"), b"no").unwrap();
        std::os::unix::fs::symlink("sub/f", root.join("inside")).unwrap();
        std::os::unix::fs::symlink(dir.join("secret"), root.join("outside")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("etc")).unwrap();
        nix::unistd::mkfifo(&root.join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let c = cfg(&root, &ipxe);

        let o = open(&c, b"/sub/f").unwrap();
        assert_eq!(o.size, 5);
        assert_eq!(open(&c, b"inside").unwrap().size, 5);
        assert_eq!(open(&c, b"undionly.kpxe").unwrap().size, 3);
        assert_eq!(open(&c, b"nothing").unwrap_err(), Refusal::NotFound);
        for name in ["outside", "etc/passwd", "fifo", "sub", "/"] {
            assert_eq!(open(&c, name.as_bytes()).unwrap_err().code(), 2, "{name}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
