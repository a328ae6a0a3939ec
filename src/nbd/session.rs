//! One NBD connection, the tokio driver: the fixed newstyle handshake, then transmission
//! with pipelined requests answered as they complete.
//!
//! Spec: NetworkBlockDevice/nbd `doc/proto.md`, "Handshake" (fixed newstyle), "Transmission",
//! "Ordering of messages and writes" (replies may come in any order), "Terminating the
//! transmission phase".

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::codec::{self, Opt, Request};
use super::export::{Backend, Base, Exports};
use super::policy::{self, Command, ExportInfo, Negotiation, Next};
use crate::warnlimit::WarnLimit;

/// Requests of one connection being served at once. Deep enough for nbdcopy (64) and the
/// kernel client, small enough that one client cannot flood the blocking pool.
pub const IN_FLIGHT: usize = 64;
/// Payload bytes one connection may hold in flight (KiB units in the semaphores).
const CONN_BYTES_KIB: usize = 64 << 10;
/// How long a client may take to finish the handshake before its slot is reclaimed.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a connection may go from its handshake to its first request. Four clients
/// that negotiated and then sat idle held every `max_connections` slot. A client that
/// has read is not timed out when it goes quiet: a thin client's mounted root may see no
/// request for hours, and a closed connection would break it. Dead peers are found by
/// TCP keepalive instead (`KEEPALIVE`).
pub const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one reply may wait for the client to take it. A client that never reads its
/// replies pinned the in-flight budget that every connection shares.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// TCP keepalive: idle time, probe interval, probes; a vanished peer is noticed after
/// about two minutes of silence.
const KEEPALIVE: (Duration, Duration, u32) = (Duration::from_secs(60), Duration::from_secs(10), 6);
/// Longest option data accepted: export names are at most 4096 bytes, so this is generous.
const MAX_OPTION_DATA: u32 = 64 << 10;
/// Reads up to this size are tried inline from the page cache (RWF_NOWAIT) on the
/// connection's own task: cheaper than a trip through the blocking pool. Larger ones go
/// to the pool so a long memcpy does not hold up the runtime.
const INLINE_READ_MAX: u32 = 1 << 20;
/// Reads from this size up go from the page cache to the socket with sendfile(2), no
/// copy through our memory. Smaller ones are copied: sendfile needs the header flushed
/// on its own first, and for 4 KiB replies batching many into one write wins. Measured
/// with `cargo xtask bench nbd` (256 MiB, loaded 2-core machine): sendfile for every
/// read halved 16-client 4 KiB IOPS (41-46k vs 83-124k at this threshold); sequential
/// nbdcopy went from ~1.1 GB/s (copying) to 2.2-2.4 GB/s.
const ZERO_COPY_MIN: u32 = 128 << 10;
/// TCP_NOTSENT_LOWAT of every connection: the socket counts as writable only while less
/// than this much of what we queued is still unsent. Without it the send buffer
/// autotunes to megabytes, sendfile runs far ahead of the client's receive window, and
/// the queued segments are transmitted from inside the client's recv() when its ACKs
/// open the window: the client, which must also copy every byte, pays for our TCP
/// transmit as well. Measured on loopback with nbdcopy (2 cores, perf stat task-clock
/// per GiB): server 155 -> 262 ms, nbdcopy 572 -> 309 ms, together 729 -> 581 ms;
/// packets sent from the client's context 5.5 -> 2.2 per 256 KiB reply. 128 KiB is
/// still about 1 ms of a 1 Gbit/s link (0.1 ms at 10 Gbit/s) to refill before the wire
/// idles, and 64-512 KiB measured alike here.
const NOTSENT_LOWAT: u32 = 128 << 10;

/// What every connection shares.
pub struct Shared {
    pub exports: Arc<Exports>,
    /// Payload bytes in flight over all connections (KiB): bounded memory for a classroom.
    pub bytes: Arc<Semaphore>,
    pub warn: WarnLimit,
    /// What the admin sees: connections and bytes, the root's attach as a seat's stage.
    pub hub: crate::telemetry::Hub,
}

/// How a connection ended badly (logged by the caller, never propagated further).
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The socket failed or the client went away mid-message.
    #[error("connection failed")]
    Io(#[from] io::Error),
    /// The client sent bytes that are not NBD.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The handshake took longer than HANDSHAKE_TIMEOUT.
    #[error("handshake timed out")]
    Timeout,
}

/// Serves one connection to its end. Never panics on client input.
pub async fn serve(
    mut stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let sock = socket2::SockRef::from(&stream);
    let _ = sock.set_tcp_notsent_lowat(NOTSENT_LOWAT);
    let _ = sock.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(KEEPALIVE.0)
            .with_interval(KEEPALIVE.1)
            .with_retries(KEEPALIVE.2),
    );
    let started = Instant::now();
    let hs = tokio::select! {
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut stream, &shared)) => {
            r.unwrap_or(Err(SessionError::Timeout))
        }
        _ = shutdown.cancelled() => return,
    };
    let (info, neg) = match hs {
        Ok(Some(x)) => x,
        Ok(None) => {
            debug!(%peer, "negotiation ended without an export");
            return;
        }
        Err(e) => {
            if let Some(dropped) = shared.warn.allow() {
                warn!(%peer, dropped, "handshake refused: {e}");
            }
            return;
        }
    };
    let lease = match shared.exports.open(&info.name, peer.ip()) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%peer, export = %info.name, "cannot serve export: {e:#}");
            return;
        }
    };
    // The size the client was told is the file's as the handshake found it; the backend
    // may be older (an overlay this address already had open over the image before it
    // was replaced) or newer (replaced in between). Requests are checked against the
    // smaller, so nothing reads past the backend's end: past it is EINVAL, not a panic.
    let mut info = info;
    let served = lease.backend.size();
    if served != info.size {
        warn!(%peer, export = %info.name, told = info.size, served, "export changed size under this client (image replaced?); requests past the smaller size are refused; reconnect after the other connections of this address close");
        info.size = info.size.min(served);
    }
    info!(%peer, export = %info.name, structured = neg.structured, "nbd connection opened");
    shared.hub.nbd_opened(peer.ip(), &info.name);
    let stats = Arc::new(Stats {
        hub: shared.hub.clone(),
        ..Stats::default()
    });
    let (rd, wr) = stream.into_split();
    let (tx, rx) = mpsc::channel::<Reply>(IN_FLIGHT * 2);
    let mut writer = tokio::spawn(writer(wr, rx, stats.clone()));
    let mut conn = Conn {
        rd: BufReader::with_capacity(128 << 10, rd),
        tx,
        backend: lease.backend.clone(),
        info,
        structured: neg.structured,
        in_flight: Arc::new(Semaphore::new(IN_FLIGHT)),
        conn_bytes: Arc::new(Semaphore::new(CONN_BYTES_KIB)),
        shared: shared.clone(),
        stats: stats.clone(),
    };
    // The writer ending first (a client that takes no reply for WRITE_TIMEOUT) ends the
    // connection too: the reader may be waiting on a client that sends nothing more, and
    // the connection would hold its slot for good.
    let mut written = None;
    let ended = tokio::select! {
        r = conn.requests() => r,
        w = &mut writer => {
            written = Some(w);
            Ok("replies could not be written")
        }
        _ = shutdown.cancelled() => Ok("server shutting down"),
    };
    let export = conn.info.name.clone();
    // Dropping the reader's sender lets the writer finish once every in-flight request
    // has answered: replies already promised are still delivered.
    drop(conn);
    let wres = match written {
        Some(w) => w,
        None => writer.await,
    };
    drop(lease);
    shared.hub.nbd_closed();
    let how = match ended {
        Ok(how) => how.to_string(),
        Err(SessionError::Protocol(m)) => {
            if let Some(dropped) = shared.warn.allow() {
                warn!(%peer, dropped, export = %export, "protocol violation, closing: {m}");
            }
            format!("protocol violation: {m}")
        }
        Err(e) => e.to_string(),
    };
    if let Ok(Err(e)) = wres {
        if let Some(dropped) = shared.warn.allow() {
            warn!(%peer, dropped, export = %export, "writing replies failed, connection closed: {e}");
        }
    }
    info!(
        %peer,
        export = %export,
        bytes_read = stats.read.load(Ordering::Relaxed),
        bytes_written = stats.written.load(Ordering::Relaxed),
        ms = started.elapsed().as_millis() as u64,
        "nbd connection closed: {how}"
    );
}

/// Negotiation: `Ok(None)` when the client aborted or asked for nothing we can serve.
async fn handshake(
    s: &mut TcpStream,
    shared: &Shared,
) -> Result<Option<(ExportInfo, Negotiation)>, SessionError> {
    s.write_all(&codec::greeting()).await?;
    let flags = s.read_u32().await?;
    if flags & !(codec::FLAG_C_FIXED_NEWSTYLE | codec::FLAG_C_NO_ZEROES) != 0 {
        return Err(SessionError::Protocol(format!(
            "unknown client flags {flags:#x}"
        )));
    }
    if flags & codec::FLAG_C_FIXED_NEWSTYLE == 0 {
        // Plain newstyle clients cannot take error replies; we only speak fixed newstyle.
        return Err(SessionError::Protocol(
            "client is not fixed newstyle".into(),
        ));
    }
    let mut st = Negotiation {
        no_zeroes: flags & codec::FLAG_C_NO_ZEROES != 0,
        ..Default::default()
    };
    loop {
        let mut h = [0u8; codec::OPTION_HEADER_LEN];
        s.read_exact(&mut h).await?;
        let (opt, len) =
            codec::parse_option_header(&h).map_err(|e| SessionError::Protocol(e.to_string()))?;
        if len > MAX_OPTION_DATA {
            return Err(SessionError::Protocol(format!(
                "option {opt} with {len} bytes of data"
            )));
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).await?;
        let a = policy::negotiate(&mut st, opt, Opt::parse(opt, &data), &*shared.exports);
        if let Some(why) = a.violation {
            if let Some(dropped) = shared.warn.allow() {
                warn!(peer = %s.peer_addr().map_or("-".into(), |p| p.to_string()), option = opt, dropped, "refused: {why}");
            }
        }
        s.write_all(&a.reply).await?;
        match a.next {
            Next::Options => {}
            Next::Close => return Ok(None),
            Next::Transmit(info) => return Ok(Some((info, st))),
        }
    }
}

#[derive(Default)]
struct Stats {
    read: AtomicU64,
    written: AtomicU64,
    /// vdd's totals over all connections.
    hub: crate::telemetry::Hub,
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

/// One reply: a header, and for a successful READ its data, sent as is (the data was
/// pread straight into this buffer). The permits go back when it has been written.
struct Reply {
    head: [u8; 32],
    head_len: usize,
    data: Vec<u8>,
    /// Instead of `data`: READ data sent with sendfile(2) from the page cache.
    file: Option<(Arc<Base>, u64, u32)>,
    _permits: Permits,
}

struct Permits {
    _req: OwnedSemaphorePermit,
    _bytes: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
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

/// Builds the reply to a request that has finished.
fn reply(
    structured: bool,
    is_read: bool,
    req: &Request,
    result: io::Result<Vec<u8>>,
    permits: Permits,
) -> Reply {
    let (h, n, data) = match result {
        Ok(data) if is_read && structured => {
            if data.is_empty() {
                let (h, n) = head(&[&codec::structured_header(
                    req.cookie,
                    codec::REPLY_FLAG_DONE,
                    codec::REPLY_TYPE_NONE,
                    0,
                )]);
                (h, n, data)
            } else {
                let (h, n) = read_head(true, req, data.len() as u32);
                (h, n, data)
            }
        }
        Ok(data) => {
            let (h, n) = head(&[&codec::simple_reply(req.cookie, 0)]);
            (h, n, data)
        }
        Err(e) => {
            let errno = errno_of(&e);
            let (h, n) = error_head(structured && is_read, req.cookie, errno);
            (h, n, Vec::new())
        }
    };
    Reply {
        head: h,
        head_len: n,
        data,
        file: None,
        _permits: permits,
    }
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

struct Conn {
    rd: BufReader<OwnedReadHalf>,
    tx: mpsc::Sender<Reply>,
    backend: Backend,
    info: ExportInfo,
    structured: bool,
    in_flight: Arc<Semaphore>,
    conn_bytes: Arc<Semaphore>,
    shared: Arc<Shared>,
    stats: Arc<Stats>,
}

impl Conn {
    /// Reads and dispatches requests until DISC, EOF or garbage.
    async fn requests(&mut self) -> Result<&'static str, SessionError> {
        let mut first = true;
        loop {
            let mut h = [0u8; codec::REQUEST_LEN];
            let read = if first {
                first = false;
                match tokio::time::timeout(FIRST_REQUEST_TIMEOUT, self.rd.read_exact(&mut h)).await
                {
                    Ok(r) => r,
                    Err(_) => return Ok("no request within a minute of the handshake"),
                }
            } else {
                self.rd.read_exact(&mut h).await
            };
            match read {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Ok("client closed without NBD_CMD_DISC")
                }
                Err(e) => return Err(e.into()),
            }
            let req = Request::parse(&h).map_err(|e| SessionError::Protocol(e.to_string()))?;
            let req_permit = self
                .in_flight
                .clone()
                .acquire_owned()
                .await
                .expect("never closed");
            let cmd = match policy::check(&req, &self.info, self.structured) {
                Ok(c) => c,
                Err(errno) => {
                    debug!(export = %self.info.name, kind = req.kind, offset = req.offset, len = req.len, errno, "request refused");
                    if req.kind == codec::CMD_WRITE {
                        // The payload is on the wire whatever we think of the request:
                        // consume it so the next header is read where it starts.
                        let n = tokio::io::copy(
                            &mut (&mut self.rd).take(u64::from(req.len)),
                            &mut tokio::io::sink(),
                        )
                        .await?;
                        if n < u64::from(req.len) {
                            return Ok("client closed inside a write payload");
                        }
                    }
                    let (h, n) = error_head(
                        self.structured && req.kind == codec::CMD_READ,
                        req.cookie,
                        errno,
                    );
                    self.send(Reply {
                        head: h,
                        head_len: n,
                        data: Vec::new(),
                        file: None,
                        _permits: Permits {
                            _req: req_permit,
                            _bytes: None,
                        },
                    })
                    .await?;
                    continue;
                }
            };
            match cmd {
                Command::Disconnect => return Ok("client sent NBD_CMD_DISC"),
                Command::Read { offset, len } => {
                    let zero_copy = (len >= ZERO_COPY_MIN)
                        .then(|| self.backend.zero_copy(offset, u64::from(len)))
                        .flatten();
                    if let Some(base) = zero_copy {
                        // No buffer: the data goes from the page cache to the socket.
                        let permits = Permits {
                            _req: req_permit,
                            _bytes: None,
                        };
                        let mut r = reply(self.structured, true, &req, Ok(Vec::new()), permits);
                        let (h, n) = read_head(self.structured, &req, len);
                        (r.head, r.head_len, r.file) = (h, n, Some((base, offset, len)));
                        self.send(r).await?;
                        continue;
                    }
                    let bytes = self.bytes(len).await;
                    let permits = Permits {
                        _req: req_permit,
                        _bytes: Some(bytes),
                    };
                    let mut buf = vec![0u8; len as usize];
                    if len <= INLINE_READ_MAX {
                        match self.backend.read(&mut buf, offset, true) {
                            Ok(true) => {
                                let r = reply(self.structured, true, &req, Ok(buf), permits);
                                self.send(r).await?;
                                continue;
                            }
                            Ok(false) => {}
                            Err(e) => {
                                let r = reply(self.structured, true, &req, Err(e), permits);
                                self.send(r).await?;
                                continue;
                            }
                        }
                    }
                    let (b, tx, st) = (self.backend.clone(), self.tx.clone(), self.structured);
                    tokio::task::spawn_blocking(move || {
                        let res = b.read(&mut buf, offset, false).map(|_| buf);
                        let _ = tx.blocking_send(reply(st, true, &req, res, permits));
                    });
                }
                Command::Write { offset, len, fua } => {
                    let bytes = self.bytes(len).await;
                    let permits = Permits {
                        _req: req_permit,
                        _bytes: Some(bytes),
                    };
                    let mut data = vec![0u8; len as usize];
                    match self.rd.read_exact(&mut data).await {
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                            return Ok("client closed inside a write payload")
                        }
                        Err(e) => return Err(e.into()),
                    }
                    self.stats.written(u64::from(len));
                    self.blocking(req, permits, move |b| b.write(&data, offset, fua));
                }
                Command::Flush => self.blocking(
                    req,
                    Permits {
                        _req: req_permit,
                        _bytes: None,
                    },
                    |b| b.flush(),
                ),
                Command::Trim { offset, len, fua } => self.blocking(
                    req,
                    Permits {
                        _req: req_permit,
                        _bytes: None,
                    },
                    move |b| b.trim(offset, u64::from(len), fua),
                ),
                Command::WriteZeroes { offset, len, fua } => self.blocking(
                    req,
                    Permits {
                        _req: req_permit,
                        _bytes: None,
                    },
                    move |b| b.write_zeroes(offset, u64::from(len), fua),
                ),
                Command::Cache { offset, len } => {
                    self.backend.cache(offset, u64::from(len));
                    let r = reply(
                        self.structured,
                        false,
                        &req,
                        Ok(Vec::new()),
                        Permits {
                            _req: req_permit,
                            _bytes: None,
                        },
                    );
                    self.send(r).await?;
                }
            }
        }
    }

    /// Waits for room for `len` payload bytes, on this connection and overall.
    async fn bytes(&self, len: u32) -> (OwnedSemaphorePermit, OwnedSemaphorePermit) {
        let kib = len.div_ceil(1024);
        let mine = self
            .conn_bytes
            .clone()
            .acquire_many_owned(kib)
            .await
            .expect("never closed");
        let all = self
            .shared
            .bytes
            .clone()
            .acquire_many_owned(kib)
            .await
            .expect("never closed");
        (mine, all)
    }

    /// Runs a non-read operation on the blocking pool and queues its reply.
    fn blocking(
        &self,
        req: Request,
        permits: Permits,
        op: impl FnOnce(&Backend) -> io::Result<()> + Send + 'static,
    ) {
        let (b, tx, st) = (self.backend.clone(), self.tx.clone(), self.structured);
        tokio::task::spawn_blocking(move || {
            let res = op(&b).map(|_| Vec::new());
            let _ = tx.blocking_send(reply(st, false, &req, res, permits));
        });
    }

    async fn send(&self, r: Reply) -> Result<(), SessionError> {
        self.tx
            .send(r)
            .await
            .map_err(|_| SessionError::Io(io::ErrorKind::BrokenPipe.into()))
    }
}

/// Sends replies in completion order; flushes when no other reply is waiting, so a burst
/// of small replies goes out in few segments.
async fn writer(
    wr: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Reply>,
    stats: Arc<Stats>,
) -> io::Result<()> {
    let mut w = BufWriter::with_capacity(64 << 10, wr);
    let mut next = rx.recv().await;
    while let Some(r) = next {
        if let Some((base, off, len)) = &r.file {
            // Earlier replies first; then the header with MSG_MORE, so it leaves in one
            // segment with the data instead of waking the client for 16 bytes.
            timed(w.flush()).await?;
            let sock = w.get_ref().as_ref();
            timed(send_more(sock, &r.head[..r.head_len])).await?;
            timed(send_file(sock, base, *off, *len as usize)).await?;
            stats.read(u64::from(*len));
        } else {
            timed(w.write_all(&r.head[..r.head_len])).await?;
            if !r.data.is_empty() {
                timed(w.write_all(&r.data)).await?;
                stats.read(r.data.len() as u64);
            }
        }
        drop(r);
        next = match rx.try_recv() {
            Ok(r) => Some(r),
            Err(mpsc::error::TryRecvError::Empty) => {
                timed(w.flush()).await?;
                rx.recv().await
            }
            Err(mpsc::error::TryRecvError::Disconnected) => None,
        };
    }
    timed(w.flush()).await?;
    timed(w.into_inner().shutdown()).await
}

/// One write of the writer, given up after [`WRITE_TIMEOUT`]. The writer then ends, its
/// queue closes, and every reply still waiting gives its share of the budget back.
async fn timed<T>(f: impl std::future::Future<Output = io::Result<T>>) -> io::Result<T> {
    tokio::time::timeout(WRITE_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client took no reply for a minute",
            ))
        })
}

/// Writes all of `buf` with MSG_MORE: the kernel holds it for the data that follows.
async fn send_more(sock: &TcpStream, mut buf: &[u8]) -> io::Result<()> {
    let fd = sock.as_raw_fd();
    while !buf.is_empty() {
        sock.writable().await?;
        let r = sock.try_io(tokio::io::Interest::WRITABLE, || {
            // SAFETY: buf is valid for its length during the call.
            let n = unsafe {
                nix::libc::send(
                    fd,
                    buf.as_ptr().cast(),
                    buf.len(),
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
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// sendfile(2) of a whole range to the non-blocking socket, waiting when it is full. If
/// the file ends early (it shrank under us) the rest goes out as zeroes: the client was
/// promised `len` bytes and the stream must stay in step.
async fn send_file(sock: &TcpStream, base: &Base, mut off: u64, mut len: usize) -> io::Result<()> {
    let fd = sock.as_raw_fd();
    while len > 0 {
        sock.writable().await?;
        match sock.try_io(tokio::io::Interest::WRITABLE, || {
            base.sendfile_to(fd, off, len)
        }) {
            Ok(0) => {
                let zeros = vec![0u8; len.min(1 << 20)];
                while len > 0 {
                    let n = len.min(zeros.len());
                    sock.writable().await?;
                    match sock.try_write(&zeros[..n]) {
                        Ok(k) => len -= k,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            Ok(n) => {
                off += n as u64;
                len -= n;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
