//! The transmission phase of one NBD connection: one task that reads requests, answers
//! what the page cache holds at once, hands the rest to the blocking pool, and writes
//! replies in the order they complete.
//!
//! Spec: NetworkBlockDevice/nbd `doc/proto.md`, "Transmission", "Ordering of messages
//! and writes" (replies may come in any order), "Terminating the transmission phase".
//!
//! Why one task and not a reader and a writer: a 4 KiB read from the page cache costs a
//! microsecond; handing its reply to a writer task through a channel, waking that task
//! (often on the other worker thread) and taking three semaphores cost more than the
//! read. Measured with `cargo xtask bench nbd` (fio 4 KiB random reads, one
//! connection): see README, "Benchmarks". Here every request that arrived in one read
//! of the socket is answered into one buffer, which leaves in one write: a queue of 32
//! requests costs one read and one write, not 64 task hand-offs.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::codec::{self, Request};
use super::export::{Backend, Base};
use super::policy::{self, Command, ExportInfo};
use super::session::{SessionError, Shared};

/// Requests of one connection being served at once (read, at the pool, or with their
/// replies not yet written). Deep enough for nbdcopy (64) and the kernel client, small
/// enough that one client cannot flood the blocking pool.
pub const IN_FLIGHT: usize = 64;
/// Payload bytes one connection may hold in flight, in KiB.
const CONN_BYTES_KIB: usize = 64 << 10;
/// How long the connection may go from its handshake to its first request. Four clients
/// that negotiated and then sat idle held every `max_connections` slot. A client that
/// has read is not timed out when it goes quiet: a thin client's mounted root may see no
/// request for hours, and a closed connection would break it. Dead peers are found by
/// TCP keepalive instead.
pub const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long queued replies may wait for the client to take any of them. A client that
/// never reads its replies pinned the in-flight budget that every connection shares.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// Reads up to this size are tried inline from the page cache (RWF_NOWAIT): cheaper than
/// a trip through the blocking pool. Larger ones go to the pool so a long memcpy does not
/// hold up the runtime.
const INLINE_READ_MAX: u32 = 1 << 20;
/// Reads from this size up go from the page cache to the socket with sendfile(2), no
/// copy through our memory. Smaller ones are copied: for 4 KiB replies batching many
/// into one write wins. Measured with `cargo xtask bench nbd` (256 MiB, loaded 2-core
/// machine): sendfile for every read halved 16-client 4 KiB IOPS (41-46k vs 83-124k at
/// this threshold); sequential nbdcopy went from ~1.1 GB/s (copying) to 2.2-2.4 GB/s.
const ZERO_COPY_MIN: u32 = 128 << 10;
/// Replies are gathered into one buffer up to this size, so they leave in one write.
const BATCH: usize = 256 << 10;
/// Queued replies are written once they reach this much, even with more requests in the
/// input: the client can send its next requests while we answer the rest. Holding the
/// whole queue (32 replies at QD32) until the input is drained left the client waiting,
/// with both it and us half idle.
const FLUSH_AT: usize = 64 << 10;
/// Input buffer: room for many request headers (and small WRITE payloads) per read.
const INPUT: usize = 128 << 10;

/// Byte counts of one connection, for its closing log line.
#[derive(Default)]
pub struct Stats {
    pub read: AtomicU64,
    pub written: AtomicU64,
    /// vdd's totals over all connections.
    pub hub: crate::telemetry::Hub,
}

impl Stats {
    fn read(&self, n: u64) {
        self.read.fetch_add(n, Ordering::Relaxed);
        self.hub.nbd_bytes(true, n);
    }

    fn written(&self, n: u64) {
        self.written.fetch_add(n, Ordering::Relaxed);
        self.hub.nbd_bytes(false, n);
    }
}

/// What waits to be written, in order.
enum Out {
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
struct Batch {
    buf: Vec<u8>,
    at: usize,
    /// Requests answered in `buf`.
    requests: usize,
    /// READ data bytes in `buf` (the connection's `bytes_read`).
    data: u64,
    kib: usize,
    permit: Option<OwnedSemaphorePermit>,
}

/// A request finished on the blocking pool: its reply, ready to send.
struct Done {
    reply: Vec<u8>,
    data: u64,
    kib: usize,
    permit: Option<OwnedSemaphorePermit>,
}

/// A WRITE whose payload is still arriving.
struct Payload {
    req: Request,
    offset: u64,
    fua: bool,
    data: Vec<u8>,
    got: usize,
    kib: usize,
    permit: Option<OwnedSemaphorePermit>,
}

/// One connection in transmission.
pub struct Transmit {
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    backend: Backend,
    info: ExportInfo,
    structured: bool,
    shared: Arc<Shared>,
    stats: Arc<Stats>,
    input: Vec<u8>,
    /// `input[start..end]` is read and not yet parsed.
    start: usize,
    end: usize,
    out: VecDeque<Out>,
    /// A drained buffer, kept for the next batch.
    spare: Vec<u8>,
    /// Requests taken and not yet answered on the wire.
    in_flight: usize,
    /// Of those, the ones at the blocking pool.
    at_pool: usize,
    /// Payload KiB of this connection's requests in flight.
    kib: usize,
    /// A request parsed but waiting for the shared byte budget.
    waiting: Option<Request>,
    /// A WRITE payload being received.
    payload: Option<Payload>,
    /// Bytes of a refused WRITE's payload still to skip.
    skip: u64,
    done_tx: mpsc::UnboundedSender<Done>,
    done_rx: mpsc::UnboundedReceiver<Done>,
    /// When the writes last made progress (or the queue last became non-empty).
    progress: Instant,
    /// Requests seen so far.
    requests: u64,
}

impl Transmit {
    pub fn new(
        rd: OwnedReadHalf,
        wr: OwnedWriteHalf,
        backend: Backend,
        info: ExportInfo,
        structured: bool,
        shared: Arc<Shared>,
        stats: Arc<Stats>,
    ) -> Transmit {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Transmit {
            rd,
            wr,
            backend,
            info,
            structured,
            shared,
            stats,
            input: vec![0; INPUT],
            start: 0,
            end: 0,
            out: VecDeque::new(),
            spare: Vec::new(),
            in_flight: 0,
            at_pool: 0,
            kib: 0,
            waiting: None,
            payload: None,
            skip: 0,
            done_tx,
            done_rx,
            progress: Instant::now(),
            requests: 0,
        }
    }

    /// Serves requests until DISC, EOF, garbage, a client that takes no replies, or
    /// shutdown; then delivers every reply already promised (within WRITE_TIMEOUT) and
    /// waits for the pool's work of this connection. `Ok`: how it ended.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<&'static str, SessionError> {
        let first_by = Instant::now() + FIRST_REQUEST_TIMEOUT;
        let mut ending: Option<Result<&'static str, SessionError>> = None;
        loop {
            if ending.is_none() {
                match self.take_requests() {
                    Ok(None) => {}
                    Ok(Some(why)) => ending = Some(Ok(why)),
                    Err(e) => ending = Some(Err(e)),
                }
            }
            while let Ok(d) = self.done_rx.try_recv() {
                self.finished(d);
            }
            if let Err(e) = self.write_some() {
                self.drain_pool().await;
                return Err(SessionError::Write(e));
            }
            if ending.is_some() && self.out.is_empty() && self.at_pool == 0 {
                break;
            }
            // A WRITE's payload is read whatever the caps say: it is part of a request
            // already taken.
            let want_read = ending.is_none()
                && self.waiting.is_none()
                && (self.payload.is_some() || self.skip > 0 || self.room());
            let want_budget = ending.is_none() && self.waiting.is_some();
            let want_write = !self.out.is_empty();
            let write_by = self.progress + WRITE_TIMEOUT;
            let need = self.waiting.map_or(0, |r| kib(r.len)) as u32;
            let asked = self.requests > 0;
            tokio::select! {
                biased;
                Some(d) = self.done_rx.recv(), if self.at_pool > 0 => self.finished(d),
                r = self.wr.writable(), if want_write => if let Err(e) = r {
                    self.drain_pool().await;
                    return Err(SessionError::Write(e));
                },
                r = read_into(
                    &mut self.rd,
                    &mut self.input,
                    &mut self.start,
                    &mut self.end,
                    &mut self.payload,
                    &mut self.skip,
                ), if want_read => match r {
                    Ok(0) => ending = Some(Ok("client closed without NBD_CMD_DISC")),
                    Ok(_) => {}
                    Err(e) => ending = Some(Err(e.into())),
                },
                p = self.shared.bytes.clone().acquire_many_owned(need), if want_budget => {
                    let req = self.waiting.take().expect("guarded");
                    self.serve(req, Some(p.expect("never closed")));
                }
                _ = tokio::time::sleep_until(write_by), if want_write => {
                    self.drain_pool().await;
                    return Err(SessionError::Write(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client took no reply for a minute",
                    )));
                }
                _ = tokio::time::sleep_until(first_by), if !asked && ending.is_none() => {
                    ending = Some(Ok("no request within a minute of the handshake"));
                }
                _ = shutdown.cancelled(), if ending.is_none() => {
                    ending = Some(Ok("server shutting down"));
                }
            }
        }
        ending.unwrap_or(Ok("ended"))
    }

    /// Waits for this connection's work on the blocking pool (an overlay write must not
    /// outlive the connection that made it).
    async fn drain_pool(&mut self) {
        while self.at_pool > 0 && self.done_rx.recv().await.is_some() {
            self.at_pool -= 1;
        }
    }

    /// Bytes of replies queued and not yet written (files not counted).
    fn queued(&self) -> usize {
        self.out
            .iter()
            .map(|o| match o {
                Out::Bytes(b) => b.buf.len() - b.at,
                Out::File { .. } => 0,
            })
            .sum()
    }

    /// Whether another request (and its payload) may be read now.
    fn room(&self) -> bool {
        self.in_flight < IN_FLIGHT && self.kib < CONN_BYTES_KIB
    }

    /// Parses and serves every whole request in the input. `Some(why)`: the client
    /// asked to end the connection.
    fn take_requests(&mut self) -> Result<Option<&'static str>, SessionError> {
        loop {
            if self.payload.as_ref().is_some_and(|p| p.got == p.data.len()) {
                let p = self.payload.take().expect("checked");
                self.write_payload(p);
                continue;
            }
            if self.payload.is_some() || self.skip > 0 {
                // read_into fills the payload or skips straight from the socket; what the
                // input already holds goes first.
                let avail = self.end - self.start;
                if avail == 0 {
                    return Ok(None);
                }
                if let Some(p) = &mut self.payload {
                    let n = avail.min(p.data.len() - p.got);
                    p.data[p.got..p.got + n]
                        .copy_from_slice(&self.input[self.start..self.start + n]);
                    p.got += n;
                    self.start += n;
                } else {
                    let n = (avail as u64).min(self.skip) as usize;
                    self.skip -= n as u64;
                    self.start += n;
                }
                continue;
            }
            if self.waiting.is_some() || !self.room() {
                return Ok(None);
            }
            if self.queued() >= FLUSH_AT {
                self.write_some().map_err(SessionError::Write)?;
            }
            if self.end - self.start < codec::REQUEST_LEN {
                // Keep the tail at the front, so the next read has the room.
                self.input.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
                return Ok(None);
            }
            let h: &[u8; codec::REQUEST_LEN] = self.input
                [self.start..self.start + codec::REQUEST_LEN]
                .try_into()
                .expect("sliced to length");
            let req = Request::parse(h).map_err(|e| SessionError::Protocol(e.to_string()))?;
            self.start += codec::REQUEST_LEN;
            // The read trace of a boot (`cargo xtask bench storm --record` turns it on
            // with RUST_LOG=vdd::nbd::trace=debug): each request as it arrives, and how
            // many of this connection's requests were in flight with it.
            debug!(
                target: "vdd::nbd::trace",
                export = %self.info.name,
                kind = req.kind,
                offset = req.offset,
                len = req.len,
                in_flight = self.in_flight + 1,
                "request"
            );
            self.requests += 1;
            if req.kind == codec::CMD_DISC && req.flags & !codec::CMD_FLAGS_KNOWN == 0 {
                return Ok(Some("client sent NBD_CMD_DISC"));
            }
            self.in_flight += 1;
            let cmd = policy::check(&req, &self.info, self.structured);
            if let Ok(Command::Read { offset, len }) = cmd {
                if len >= ZERO_COPY_MIN {
                    if let Some(base) = self.backend.zero_copy(offset, u64::from(len)) {
                        // No buffer: the data goes from the page cache to the socket.
                        let (head, head_len) = read_head(self.structured, &req, len);
                        let was_empty = self.out.is_empty();
                        self.out.push_back(Out::File {
                            head,
                            head_len,
                            head_at: 0,
                            base,
                            off: offset,
                            left: len as usize,
                        });
                        self.started(was_empty);
                        continue;
                    }
                }
            }
            let buffered = matches!(cmd, Ok(Command::Read { len, .. } | Command::Write { len, .. }) if len > 0);
            if !buffered {
                self.serve(req, None);
                continue;
            }
            match self
                .shared
                .bytes
                .clone()
                .try_acquire_many_owned(kib(req.len) as u32)
            {
                Ok(p) => self.serve(req, Some(p)),
                Err(_) => {
                    self.waiting = Some(req);
                    return Ok(None);
                }
            }
        }
    }

    /// Serves one request that passed the in-flight cap; `permit` is its share of the
    /// shared byte budget when its payload needs a buffer.
    fn serve(&mut self, req: Request, permit: Option<OwnedSemaphorePermit>) {
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

    fn write_payload(&mut self, p: Payload) {
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

    /// A reply from the pool joins the queue.
    fn finished(&mut self, d: Done) {
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
    fn push_reply(
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
    fn started(&mut self, was_empty: bool) {
        if was_empty {
            self.progress = Instant::now();
        }
    }

    /// Writes what the socket takes now; returns when it would block or the queue is
    /// empty.
    fn write_some(&mut self) -> io::Result<()> {
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
fn batch<'a>(out: &'a mut VecDeque<Out>, spare: &mut Vec<u8>, n: usize) -> &'a mut Batch {
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

/// Reads from the socket: into a WRITE payload being received, past a refused one, or
/// into the input buffer. Ok(0) is end of stream.
async fn read_into(
    rd: &mut OwnedReadHalf,
    input: &mut [u8],
    start: &mut usize,
    end: &mut usize,
    payload: &mut Option<Payload>,
    skip: &mut u64,
) -> io::Result<usize> {
    if let Some(p) = payload {
        // Large payloads straight into their buffer; the input holds only headers.
        if p.got < p.data.len() && *start == *end {
            let n = rd.read(&mut p.data[p.got..]).await?;
            p.got += n;
            return Ok(n);
        }
    }
    if *skip > 0 && *start == *end {
        *start = 0;
        *end = 0;
        let room = (*skip).min(input.len() as u64) as usize;
        let n = rd.read(&mut input[..room]).await?;
        *skip -= n as u64;
        return Ok(n);
    }
    if *end == input.len() {
        input.copy_within(*start..*end, 0);
        *end -= *start;
        *start = 0;
    }
    let n = rd.read(&mut input[*end..]).await?;
    *end += n;
    Ok(n)
}

fn kib(len: u32) -> usize {
    len.div_ceil(1024) as usize
}

fn merge(into: &mut Option<OwnedSemaphorePermit>, p: Option<OwnedSemaphorePermit>) {
    match (into.as_mut(), p) {
        (Some(a), Some(b)) => a.merge(b),
        (None, Some(b)) => *into = Some(b),
        _ => {}
    }
}

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
fn read_head(structured: bool, req: &Request, len: u32) -> ([u8; 32], usize) {
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
fn ok_head(structured: bool, is_read: bool, req: &Request) -> ([u8; 32], usize) {
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

fn error_head(structured_read: bool, cookie: u64, errno: u32) -> ([u8; 32], usize) {
    if structured_read {
        head(&[&codec::structured_error(cookie, errno)])
    } else {
        head(&[&codec::simple_reply(cookie, errno)])
    }
}

/// The NBD error for a failed file operation: the spec allows only a few values.
fn errno_of(e: &io::Error) -> u32 {
    match e.raw_os_error() {
        Some(nix::libc::EPERM) => codec::EPERM,
        Some(nix::libc::ENOSPC | nix::libc::EDQUOT | nix::libc::EFBIG) => codec::ENOSPC,
        Some(nix::libc::ENOMEM) => codec::ENOMEM,
        Some(nix::libc::EINVAL) => codec::EINVAL,
        Some(nix::libc::EOPNOTSUPP) => codec::ENOTSUP,
        _ => codec::EIO,
    }
}
