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
//!
//! This file holds the connection's state and its loop: reading the socket and parsing
//! requests. Running each request is in `serve.rs`, the queue of replies and its writing
//! in `out.rs`, the reply headers in `reply.rs`.

mod out;
mod reply;
mod serve;

use std::collections::VecDeque;
use std::io;
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
use super::export::Backend;
use super::policy::{self, Command, ExportInfo};
use super::session::{SessionError, Shared};

use out::{Done, Out};
use reply::read_head;

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
