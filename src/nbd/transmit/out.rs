//! The replies of one NBD connection on their way out: batches of whole replies in one
//! buffer and READ data sent with sendfile(2), queued in order and written as the socket
//! takes them. Apart from `mod.rs` so that file holds the connection loop alone.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use super::{Transmit, BATCH};
use crate::nbd::export::Base;

/// What waits to be written, in order.
pub(super) enum Out {
    /// Replies, whole, one after another.
    Bytes(Batch),
    /// A READ reply whose data goes from the page cache with sendfile(2).
    File {
        head: [u8; 32],
        head_len: usize,
        head_at: usize,
        base: Arc<Base>,
        off: u64,
        left: usize,
    },
}

/// Replies in one buffer, and what they hold until they are written.
pub(super) struct Batch {
    pub(super) buf: Vec<u8>,
    pub(super) at: usize,
    /// Requests answered in `buf`.
    pub(super) requests: usize,
    /// READ data bytes in `buf` (the connection's `bytes_read`).
    pub(super) data: u64,
    pub(super) kib: usize,
    pub(super) permit: Option<OwnedSemaphorePermit>,
}

/// A request finished on the blocking pool: its reply, ready to send.
pub(super) struct Done {
    pub(super) reply: Vec<u8>,
    pub(super) data: u64,
    pub(super) kib: usize,
    pub(super) permit: Option<OwnedSemaphorePermit>,
}

impl Transmit {
    /// Bytes of replies queued and not yet written (files not counted).
    pub(super) fn queued(&self) -> usize {
        self.out
            .iter()
            .map(|o| match o {
                Out::Bytes(b) => b.buf.len() - b.at,
                Out::File { .. } => 0,
            })
            .sum()
    }

    /// A reply from the pool joins the queue.
    pub(super) fn finished(&mut self, d: Done) {
        self.at_pool -= 1;
        if d.reply.len() <= 4096 {
            self.push_reply(&d.reply, d.data, d.kib, d.permit);
            return;
        }
        let was_empty = self.out.is_empty();
        self.out.push_back(Out::Bytes(Batch {
            buf: d.reply,
            at: 0,
            requests: 1,
            data: d.data,
            kib: d.kib,
            permit: d.permit,
        }));
        self.started(was_empty);
    }

    /// A whole small reply into the outgoing batch.
    pub(super) fn push_reply(
        &mut self,
        bytes: &[u8],
        data: u64,
        k: usize,
        permit: Option<OwnedSemaphorePermit>,
    ) {
        let was_empty = self.out.is_empty();
        let batch = batch(&mut self.out, &mut self.spare, bytes.len());
        batch.buf.extend_from_slice(bytes);
        batch.requests += 1;
        batch.data += data;
        batch.kib += k;
        merge(&mut batch.permit, permit);
        self.started(was_empty);
    }

    /// The write timer runs from when the queue stopped being empty.
    pub(super) fn started(&mut self, was_empty: bool) {
        if was_empty {
            self.progress = Instant::now();
        }
    }

    /// Writes what the socket takes now; returns when it would block or the queue is
    /// empty.
    pub(super) fn write_some(&mut self) -> io::Result<()> {
        let sock = self.wr.as_ref();
        let fd = sock.as_raw_fd();
        while let Some(front) = self.out.front_mut() {
            let finished = match front {
                Out::Bytes(b) => {
                    if b.at < b.buf.len() {
                        match sock.try_write(&b.buf[b.at..]) {
                            Ok(n) => {
                                b.at += n;
                                self.progress = Instant::now();
                            }
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                            Err(e) => return Err(e),
                        }
                    }
                    b.at == b.buf.len()
                }
                Out::File {
                    head,
                    head_len,
                    head_at,
                    base,
                    off,
                    left,
                } => {
                    if *head_at < *head_len {
                        // MSG_MORE: the header leaves in one segment with the data instead
                        // of waking the client for it alone.
                        let part = &head[*head_at..*head_len];
                        let r = sock.try_io(tokio::io::Interest::WRITABLE, || {
                            // SAFETY: `part` is valid for its length during the call.
                            let n = unsafe {
                                nix::libc::send(
                                    fd,
                                    part.as_ptr().cast(),
                                    part.len(),
                                    nix::libc::MSG_MORE | nix::libc::MSG_NOSIGNAL,
                                )
                            };
                            if n < 0 {
                                Err(io::Error::last_os_error())
                            } else {
                                Ok(n as usize)
                            }
                        });
                        match r {
                            Ok(n) => {
                                *head_at += n;
                                self.progress = Instant::now();
                                continue;
                            }
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                            Err(e) => return Err(e),
                        }
                    }
                    match sock.try_io(tokio::io::Interest::WRITABLE, || {
                        base.sendfile_to(fd, *off, *left)
                    }) {
                        Ok(0) => {
                            // The file shrank under us: the client was promised `left`
                            // more bytes, and the stream must stay in step: zeroes.
                            let zeros = vec![0u8; *left];
                            *front = Out::Bytes(Batch {
                                buf: zeros,
                                at: 0,
                                requests: 1,
                                data: 0,
                                kib: 0,
                                permit: None,
                            });
                            continue;
                        }
                        Ok(n) => {
                            *off += n as u64;
                            *left -= n;
                            self.stats.read(n as u64);
                            self.progress = Instant::now();
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(e),
                    }
                    *left == 0
                }
            };
            if finished {
                match self.out.pop_front().expect("front exists") {
                    Out::Bytes(b) => {
                        self.in_flight -= b.requests;
                        self.kib -= b.kib;
                        self.stats.read(b.data);
                        if b.buf.capacity() <= BATCH {
                            self.spare = b.buf;
                        }
                    }
                    Out::File { .. } => self.in_flight -= 1,
                }
            }
        }
        Ok(())
    }
}

/// The batch at the end of the queue, with room for `n` more bytes (a new one, in the
/// spare buffer, when the last is full or is a file).
pub(super) fn batch<'a>(
    out: &'a mut VecDeque<Out>,
    spare: &mut Vec<u8>,
    n: usize,
) -> &'a mut Batch {
    let fits =
        matches!(out.back(), Some(Out::Bytes(b)) if b.buf.len() + n <= BATCH.max(b.buf.capacity()));
    if !fits {
        let mut buf = std::mem::take(spare);
        buf.clear();
        buf.reserve(n.max(64 << 10));
        out.push_back(Out::Bytes(Batch {
            buf,
            at: 0,
            requests: 0,
            data: 0,
            kib: 0,
            permit: None,
        }));
    }
    match out.back_mut() {
        Some(Out::Bytes(b)) => b,
        _ => unreachable!("a batch was just queued"),
    }
}

pub(super) fn merge(into: &mut Option<OwnedSemaphorePermit>, p: Option<OwnedSemaphorePermit>) {
    match (into.as_mut(), p) {
        (Some(a), Some(b)) => a.merge(b),
        (None, Some(b)) => *into = Some(b),
        _ => {}
    }
}
