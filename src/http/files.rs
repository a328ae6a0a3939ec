//! Which file a `/files/<path>` request names: plain names only, opened beneath
//! `[http] root` by [`crate::beneath`] (no `..`, no symlink that leaves the root, regular
//! files only).

use std::path::{Component, Path};

use crate::beneath::OpenError;
pub use crate::beneath::{open_path, Opened};

/// Why a name is not served. Every variant becomes 404: a client learns nothing about
/// what exists outside the root.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The name itself is refused (`..`, control characters, backslash, empty segment, too
    /// long).
    #[error("refused name")]
    BadName,
    #[error(transparent)]
    Open(#[from] OpenError),
}

/// Checks a decoded request path (after `/files/`) lexically: only plain names.
pub fn check_name(name: &str) -> Result<&Path, FileError> {
    if name.is_empty()
        || name.len() > 1024
        || name.contains('\\')
        // NUL, and any control character: a decoded `%0a` or `%1b` must reach neither
        // the file system nor the admin's log (names of served files are logged).
        || name.chars().any(char::is_control)
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
    Ok(crate::beneath::open_beneath(root, rel)?)
}

/// True when `path` would be served by [`open_path`].
pub fn usable(path: &Path) -> bool {
    open_path(path).is_ok()
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
            "a\nb",
            "\x1b[2J",
            "x\x7f",
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
