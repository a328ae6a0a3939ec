//! How one request of an NBD connection is run: a READ inline from the page cache into
//! the outgoing batch when it can be, everything else that touches the file on the
//! blocking pool, whose replies come back over a channel. Apart from `mod.rs`, which
//! reads and parses the requests.

use std::io;

use tokio::sync::OwnedSemaphorePermit;
use tracing::debug;

use super::out::{batch, merge, Done};
use super::reply::{errno_of, error_head, ok_head, read_head};
use super::{kib, Payload, Transmit, INLINE_READ_MAX};
use crate::nbd::codec::{self, Request};
use crate::nbd::export::Backend;
use crate::nbd::policy::{self, Command};

impl Transmit {
    /// Serves one request that passed the in-flight cap; `permit` is its share of the
    /// shared byte budget when its payload needs a buffer.
    pub(super) fn serve(&mut self, req: Request, permit: Option<OwnedSemaphorePermit>) {
        let k = if permit.is_some() { kib(req.len) } else { 0 };
        self.kib += k;
        let cmd = match policy::check(&req, &self.info, self.structured) {
            Ok(c) => c,
            Err(errno) => {
                debug!(export = %self.info.name, kind = req.kind, offset = req.offset, len = req.len, errno, "request refused");
                if req.kind == codec::CMD_WRITE {
                    // The payload is on the wire whatever we think of the request.
                    self.skip = u64::from(req.len);
                }
                let (h, n) = error_head(
                    self.structured && req.kind == codec::CMD_READ,
                    req.cookie,
                    errno,
                );
                self.push_reply(&h[..n], 0, k, permit);
                return;
            }
        };
        match cmd {
            Command::Disconnect => unreachable!("handled before"),
            Command::Read { offset, len } => self.read(req, offset, len, k, permit),
            Command::Write { offset, len, fua } => {
                self.payload = Some(Payload {
                    req,
                    offset,
                    fua,
                    data: vec![0; len as usize],
                    got: 0,
                    kib: k,
                    permit,
                });
            }
            Command::Flush => self.at_pool(req, 0, None, |b| b.flush()),
            Command::Trim { offset, len, fua } => {
                self.at_pool(req, 0, None, move |b| b.trim(offset, u64::from(len), fua))
            }
            Command::WriteZeroes { offset, len, fua } => self.at_pool(req, 0, None, move |b| {
                b.write_zeroes(offset, u64::from(len), fua)
            }),
            Command::Cache { offset, len } => {
                self.backend.cache(offset, u64::from(len));
                let (h, n) = ok_head(self.structured, false, &req);
                self.push_reply(&h[..n], 0, 0, None);
            }
        }
    }

    fn read(
        &mut self,
        req: Request,
        offset: u64,
        len: u32,
        k: usize,
        permit: Option<OwnedSemaphorePermit>,
    ) {
        if len == 0 {
            let (h, n) = ok_head(self.structured, true, &req);
            self.push_reply(&h[..n], 0, k, permit);
            return;
        }
        let (h, hl) = read_head(self.structured, &req, len);
        if len <= INLINE_READ_MAX {
            // Straight into the outgoing batch, behind its header.
            let was_empty = self.out.is_empty();
            let batch = batch(&mut self.out, &mut self.spare, hl + len as usize);
            let at = batch.buf.len();
            batch.buf.resize(at + hl + len as usize, 0);
            match self.backend.read(&mut batch.buf[at + hl..], offset, true) {
                Ok(true) => {
                    batch.buf[at..at + hl].copy_from_slice(&h[..hl]);
                    batch.requests += 1;
                    batch.data += u64::from(len);
                    batch.kib += k;
                    merge(&mut batch.permit, permit);
                    self.started(was_empty);
                    return;
                }
                Ok(false) => batch.buf.truncate(at),
                Err(e) => {
                    batch.buf.truncate(at);
                    let (h, n) = error_head(self.structured, req.cookie, errno_of(&e));
                    self.push_reply(&h[..n], 0, k, permit);
                    return;
                }
            }
            // An empty batch made for this read stays queued; writing it costs nothing.
        }
        // Not all in the page cache (or large): a blocking read on the pool, into a
        // buffer with room for the header in front.
        let (b, tx, st) = (self.backend.clone(), self.done_tx.clone(), self.structured);
        self.at_pool += 1;
        tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; hl + len as usize];
            let (reply, data) = match b.read(&mut buf[hl..], offset, false) {
                Ok(_) => {
                    buf[..hl].copy_from_slice(&h[..hl]);
                    (buf, u64::from(len))
                }
                Err(e) => {
                    let (h, n) = error_head(st, req.cookie, errno_of(&e));
                    (h[..n].to_vec(), 0)
                }
            };
            let _ = tx.send(Done {
                reply,
                data,
                kib: k,
                permit,
            });
        });
    }

    pub(super) fn write_payload(&mut self, p: Payload) {
        self.stats.written(p.data.len() as u64);
        let Payload {
            req,
            offset,
            fua,
            data,
            kib,
            permit,
            ..
        } = p;
        self.at_pool(req, kib, permit, move |b| b.write(&data, offset, fua));
    }

    /// Runs a non-read operation on the blocking pool; its reply comes back as [`Done`].
    fn at_pool(
        &mut self,
        req: Request,
        k: usize,
        permit: Option<OwnedSemaphorePermit>,
        op: impl FnOnce(&Backend) -> io::Result<()> + Send + 'static,
    ) {
        let (b, tx, st) = (self.backend.clone(), self.done_tx.clone(), self.structured);
        self.at_pool += 1;
        tokio::task::spawn_blocking(move || {
            let (h, n) = match op(&b) {
                Ok(()) => ok_head(st, false, &req),
                Err(e) => error_head(false, req.cookie, errno_of(&e)),
            };
            let _ = tx.send(Done {
                reply: h[..n].to_vec(),
                data: 0,
                kib: k,
                permit,
            });
        });
    }
}
