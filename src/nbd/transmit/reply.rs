//! The headers of NBD replies (simple, and structured for READ) and the errno a failed
//! file operation maps to. Pure; apart so the connection's files read as I/O.
//!
//! Spec: NetworkBlockDevice/nbd `doc/proto.md`, "Simple reply message", "Structured
//! reply chunk message", "Error values".

use std::io;

use crate::nbd::codec::{self, Request};

fn head(parts: &[&[u8]]) -> ([u8; 32], usize) {
    let mut h = [0u8; 32];
    let mut n = 0;
    for p in parts {
        h[n..n + p.len()].copy_from_slice(p);
        n += p.len();
    }
    (h, n)
}

/// The header in front of `len` bytes of READ data.
pub(super) fn read_head(structured: bool, req: &Request, len: u32) -> ([u8; 32], usize) {
    if structured {
        head(&[
            &codec::structured_header(
                req.cookie,
                codec::REPLY_FLAG_DONE,
                codec::REPLY_TYPE_OFFSET_DATA,
                8 + len,
            ),
            &req.offset.to_be_bytes(),
        ])
    } else {
        head(&[&codec::simple_reply(req.cookie, 0)])
    }
}

/// The reply of a request that succeeded without data (a READ of 0 bytes included).
pub(super) fn ok_head(structured: bool, is_read: bool, req: &Request) -> ([u8; 32], usize) {
    if structured && is_read {
        head(&[&codec::structured_header(
            req.cookie,
            codec::REPLY_FLAG_DONE,
            codec::REPLY_TYPE_NONE,
            0,
        )])
    } else {
        head(&[&codec::simple_reply(req.cookie, 0)])
    }
}

pub(super) fn error_head(structured_read: bool, cookie: u64, errno: u32) -> ([u8; 32], usize) {
    if structured_read {
        head(&[&codec::structured_error(cookie, errno)])
    } else {
        head(&[&codec::simple_reply(cookie, errno)])
    }
}

/// The NBD error for a failed file operation: the spec allows only a few values.
pub(super) fn errno_of(e: &io::Error) -> u32 {
    match e.raw_os_error() {
        Some(nix::libc::EPERM) => codec::EPERM,
        Some(nix::libc::ENOSPC | nix::libc::EDQUOT | nix::libc::EFBIG) => codec::ENOSPC,
        Some(nix::libc::ENOMEM) => codec::ENOMEM,
        Some(nix::libc::EINVAL) => codec::EINVAL,
        Some(nix::libc::EOPNOTSUPP) => codec::ENOTSUP,
        _ => codec::EIO,
    }
}
