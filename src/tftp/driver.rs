//! The I/O side of one read transfer: its own UDP socket (a new TID, RFC 1350 section 4),
//! file reads into the packet buffer, and the [`Session`] state machine fed with ACKs,
//! ERRORs and timeouts. It runs on the transfer's own thread with blocking calls (see
//! [`transfer`] for why).
//!
//! RFC 1350 (TIDs, ERROR 5 to strangers), RFC 2347/2348/2349/7440 through `session`, and
//! netascii (RFC 764 end-of-line: LF -> CR LF, CR -> CR NUL) converted on the fly.
//!
//! File reads use `preadv` straight from the transfer's thread, many blocks at a time
//! (see [`Ahead`]); a slow disk stalls that transfer only.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::Config;

use super::codec::{self, Mode, Packet, ERR_ILLEGAL_OP, ERR_UNDEFINED, ERR_UNKNOWN_TID};
use super::paths;
use super::session::{self, Next, Send, Session};
use super::Metrics;

/// A read request, owned so it can move into the transfer's task.
#[derive(Debug, Clone)]
pub struct OwnedRequest {
    pub filename: Vec<u8>,
    pub mode: Mode,
    pub mode_text: String,
    pub options: Vec<(String, String)>,
}

/// A netascii window's share of [`super::Metrics::netascii_bytes`], given back on Drop.
struct WindowBytes {
    metrics: Arc<super::Metrics>,
    bytes: u64,
}

impl Drop for WindowBytes {
    fn drop(&mut self) {
        self.metrics
            .netascii_bytes
            .fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// Where DATA payloads come from: the file as is, or converted to netascii.
enum Source {
    Octet { file: File, blksize: u64 },
    Netascii(Netascii),
}

impl Source {
    /// Fills consecutive packets of `seg` bytes in `buf` (payload after each 4-byte
    /// header) with blocks `first`, `first + 1`, ... Returns how many blocks were filled
    /// and the length of the last one; every block before it is full, and a short last
    /// one is the end of the file. Octet data comes in with one `preadv` for all of them.
    fn blocks(&mut self, first: u64, buf: &mut [u8], seg: usize) -> io::Result<(usize, usize)> {
        let bs = seg - 4;
        let want = buf.len() / seg;
        match self {
            Source::Octet { file, blksize } => {
                let mut iov: Vec<io::IoSliceMut<'_>> = buf
                    .chunks_mut(seg)
                    .map(|c| io::IoSliceMut::new(&mut c[4..]))
                    .collect();
                let off = ((first - 1) * *blksize) as nix::libc::off_t;
                let mut n = loop {
                    match nix::sys::uio::preadv(&*file, &mut iov, off) {
                        Ok(n) => break n,
                        Err(nix::errno::Errno::EINTR) => continue,
                        Err(e) => return Err(e.into()),
                    }
                };
                drop(iov);
                // preadv may stop short of EOF (a signal, a huge request); finish with
                // plain reads so a short block really means the end of the file.
                while n < want * bs {
                    let (k, r) = (n / bs, n % bs);
                    let start = k * seg + 4 + r;
                    let end = k * seg + 4 + bs;
                    let got =
                        file.read_at(&mut buf[start..end], ((first - 1) * *blksize) + n as u64)?;
                    if got == 0 {
                        break;
                    }
                    n += got;
                }
                if n == want * bs {
                    Ok((want, bs))
                } else {
                    Ok((n / bs + 1, n % bs))
                }
            }
            Source::Netascii(a) => {
                for k in 0..want {
                    let len = a.block(first + k as u64, &mut buf[k * seg + 4..(k + 1) * seg])?;
                    if len < bs {
                        return Ok((k + 1, len));
                    }
                }
                Ok((want, bs))
            }
        }
    }

    /// Blocks up to `acked` will never be asked again.
    fn release(&mut self, acked: u64) {
        if let Source::Netascii(a) = self {
            while a.cache.front().is_some_and(|(i, _)| *i <= acked) {
                a.cache.pop_front();
            }
        }
    }
}

/// Netascii conversion of a file, one block at a time. Converted blocks of the current
/// window are kept, because a retransmission must resend the same bytes and the
/// conversion is not seekable.
struct Netascii {
    file: File,
    blksize: usize,
    raw: Vec<u8>,
    raw_pos: usize,
    raw_off: u64,
    /// The second byte of a CR LF / CR NUL pair that did not fit into the last block.
    pending: Option<u8>,
    /// Index of the next block to convert.
    next: u64,
    cache: VecDeque<(u64, Vec<u8>)>,
}

impl Netascii {
    fn new(file: File, blksize: u16) -> Netascii {
        Netascii {
            file,
            blksize: usize::from(blksize),
            raw: Vec::new(),
            raw_pos: 0,
            raw_off: 0,
            pending: None,
            next: 1,
            cache: VecDeque::new(),
        }
    }

    fn raw_byte(&mut self) -> io::Result<Option<u8>> {
        if self.raw_pos == self.raw.len() {
            self.raw.resize(64 * 1024, 0);
            let n = self.file.read_at(&mut self.raw, self.raw_off)?;
            self.raw.truncate(n);
            self.raw_off += n as u64;
            self.raw_pos = 0;
            if n == 0 {
                return Ok(None);
            }
        }
        self.raw_pos += 1;
        Ok(Some(self.raw[self.raw_pos - 1]))
    }

    fn convert_next(&mut self) -> io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(self.blksize);
        while out.len() < self.blksize {
            if let Some(p) = self.pending.take() {
                out.push(p);
                continue;
            }
            match self.raw_byte()? {
                None => break,
                Some(b'\n') => {
                    out.push(b'\r');
                    self.pending = Some(b'\n');
                }
                Some(b'\r') => {
                    out.push(b'\r');
                    self.pending = Some(0);
                }
                Some(b) => out.push(b),
            }
        }
        Ok(out)
    }

    fn block(&mut self, index: u64, out: &mut [u8]) -> io::Result<usize> {
        while self.next <= index {
            let b = self.convert_next()?;
            self.cache.push_back((self.next, b));
            self.next += 1;
        }
        let b = self
            .cache
            .iter()
            .find(|(i, _)| *i == index)
            .map(|(_, b)| b)
            .ok_or_else(|| io::Error::other("netascii block no longer cached"))?;
        out[..b.len()].copy_from_slice(b);
        Ok(b.len())
    }
}

/// DATA packets read ahead of the window, back to back in one buffer, each `seg` bytes
/// (4-byte header, then the block) but the file's last one.
///
/// One `preadv` fills many packets, and the buffer is refilled right after a window
/// leaves, while the client is busy with it, so the time from an ACK to the next DATA
/// holds no file read. A window that sits in the buffer leaves in one GSO `sendmsg`
/// (`UDP_SEGMENT`, Linux 4.18): the kernel cuts it into packets, one syscall instead of
/// one per packet.
struct Ahead {
    buf: Vec<u8>,
    seg: usize,
    /// Blocks per refill: a multiple of `per`, so windows do not straddle refills.
    cap: usize,
    /// Packets per send: what one GSO send can carry, at most a window.
    per: usize,
    gso: bool,
    /// Index of the first block held (0: none).
    first: u64,
    /// Blocks held.
    count: usize,
    /// Payload length of the last block held.
    last_len: usize,
}

/// The kernel's bounds for one GSO send: 64 segments, one IP datagram of payload.
const GSO_MAX_SEGMENTS: usize = 64;
const GSO_MAX_BYTES: usize = 65000;
/// How much one refill reads. 64 KiB is 44 blocks of 1468 bytes: the read costs a
/// fraction of a syscall per block, and the buffer stays within L2.
const AHEAD_BYTES: usize = 64 * 1024;

impl Ahead {
    fn new(window: usize, seg: usize) -> Ahead {
        let per = (GSO_MAX_BYTES / seg)
            .clamp(1, GSO_MAX_SEGMENTS)
            .min(window.max(1));
        let cap = ((AHEAD_BYTES / seg) / per * per).max(per);
        Ahead {
            buf: Vec::with_capacity(cap * seg),
            seg,
            cap,
            per,
            // One packet per send gains nothing from GSO.
            gso: per > 1,
            first: 0,
            count: 0,
            last_len: 0,
        }
    }

    fn holds(&self, i: u64) -> bool {
        self.count > 0 && i >= self.first && i < self.first + self.count as u64
    }

    /// Index of the last block held.
    fn end(&self) -> u64 {
        self.first + self.count as u64 - 1
    }

    /// The last block held is short: it is the file's last.
    fn at_eof(&self) -> bool {
        self.count > 0 && self.last_len < self.seg - 4
    }

    /// Reads blocks `first`, `first + 1`, ... as far as the buffer goes or the file ends.
    fn fill(&mut self, src: &mut Source, first: u64) -> io::Result<()> {
        self.count = 0;
        self.buf.resize(self.cap * self.seg, 0);
        let (count, last_len) = src.blocks(first, &mut self.buf, self.seg)?;
        for k in 0..count {
            codec::data_header(&mut self.buf[k * self.seg..], (first + k as u64) as u16);
        }
        self.first = first;
        self.count = count;
        self.last_len = last_len;
        Ok(())
    }

    /// The packets of blocks `i..=j`, all held.
    fn packets(&self, i: u64, j: u64) -> &[u8] {
        let a = (i - self.first) as usize * self.seg;
        let k = (j - self.first) as usize;
        let b = if k + 1 == self.count {
            k * self.seg + 4 + self.last_len
        } else {
            (k + 1) * self.seg
        };
        &self.buf[a..b]
    }

    fn send(&mut self, sock: &UdpSocket, i: u64, j: u64, peer: SocketAddr) -> io::Result<()> {
        let seg = self.seg;
        let p = self.packets(i, j);
        if self.gso && p.len() > seg {
            match send_gso(sock, p, seg, peer) {
                Ok(()) => return Ok(()),
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(
                            nix::libc::EINVAL
                                | nix::libc::EIO
                                | nix::libc::ENOPROTOOPT
                                | nix::libc::EOPNOTSUPP
                        )
                    ) =>
                {
                    debug!(%peer, error = %e, "no UDP GSO for this transfer; one packet per send");
                    self.gso = false;
                }
                Err(e) => return Err(e),
            }
        }
        for c in self.packets(i, j).chunks(seg) {
            sock.send_to(c, peer)?;
        }
        Ok(())
    }
}

fn send_gso(sock: &UdpSocket, buf: &[u8], seg: usize, peer: SocketAddr) -> io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, SockaddrStorage};
    use std::os::unix::io::AsRawFd;
    let addr = SockaddrStorage::from(peer);
    let seg = seg as u16;
    let iov = [io::IoSlice::new(buf)];
    loop {
        match sendmsg(
            sock.as_raw_fd(),
            &iov,
            &[ControlMessage::UdpGsoSegments(&seg)],
            MsgFlags::empty(),
            Some(&addr),
        ) {
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Keeps the open-transfer count and the `max_transfers` permit right on every exit
/// path, panics included. The permit goes first, so once `active` reads 0 a new request
/// is sure to get one.
struct ActiveGuard(
    Arc<Metrics>,
    Option<(OwnedSemaphorePermit, crate::peers::Slot)>,
);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        // The address's slot before the transfer's permit: once the permit is back, the
        // next request from this address may come in at once.
        if let Some((permit, slot)) = self.1.take() {
            drop(slot);
            drop(permit);
        }
        self.0
            .active
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Longest a transfer blocks in `recv` before it looks at the shutdown token again.
const SHUTDOWN_POLL: Duration = Duration::from_millis(200);
/// Longest a send may block on a full socket buffer; then the retransmission timer
/// takes over, as after a lost packet.
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// The receive timeout of the socket, changed only when the wait must end sooner than
/// it would, or would end far too soon: a `setsockopt` per ACK would cost as much as
/// the ACK itself. The deadline may pass by up to `RCV_SLACK` before we notice.
struct RecvTimeout {
    set: Duration,
}

const RCV_SLACK: Duration = Duration::from_millis(2);

impl RecvTimeout {
    fn arm(&mut self, sock: &UdpSocket, want: Duration) -> io::Result<()> {
        // Zero would mean "block forever" to SO_RCVTIMEO.
        let want = want.clamp(Duration::from_millis(1), SHUTDOWN_POLL);
        if self.set > want + RCV_SLACK || self.set < want / 2 {
            sock.set_read_timeout(Some(want))?;
            self.set = want;
        }
        Ok(())
    }
}

/// Serves one RRQ to `peer` from a new socket bound to `local` (the address the request
/// came to, so the reply leaves from the address the client talked to).
///
/// This runs on the transfer's own thread with blocking socket calls (STYLE's driver is
/// tokio; here we chose otherwise). A lockstep transfer is one round trip per block, so
/// its speed is the time from the ACK's arrival to the next DATA's departure. A blocking
/// `recvfrom` is woken by the ACK itself and goes straight to one `sendto`: two
/// syscalls per block, where the tokio loop made four to five (a `recvfrom` that found
/// nothing, `epoll_wait`, `recvfrom`, `preadv`, `sendto`) plus its timer and task
/// bookkeeping. Threads are bounded by `max_transfers`; the permit lives in here.
#[allow(clippy::too_many_arguments)]
pub fn transfer(
    cfg: Arc<Config>,
    local: IpAddr,
    peer: SocketAddr,
    req: OwnedRequest,
    metrics: Arc<Metrics>,
    permit: (OwnedSemaphorePermit, crate::peers::Slot),
    shutdown: CancellationToken,
    hub: crate::telemetry::Hub,
) {
    let _guard = ActiveGuard(metrics.clone(), Some(permit));
    let file = codec::printable(&req.filename);
    let sock = match UdpSocket::bind(SocketAddr::new(local, 0)) {
        Ok(s) => s,
        Err(e) => {
            error!(%peer, %file, error = %e, "cannot open a socket for a transfer");
            return;
        }
    };
    // Lockstep blocks wait on every round trip: ahead of the link's bulk data.
    let _ = crate::netif::waited_on(&sock);
    // An unconnected UDP socket hears of ICMP errors only with IP_RECVERR (ip(7)).
    if let Err(e) =
        nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::Ipv4RecvErr, &true)
    {
        debug!(%peer, error = %e, "cannot set IP_RECVERR; an unreachable client is noticed by the timeout");
    }
    let mut rto = RecvTimeout { set: SHUTDOWN_POLL };
    if let Err(e) = sock
        .set_read_timeout(Some(rto.set))
        .and_then(|()| sock.set_write_timeout(Some(SEND_TIMEOUT)))
    {
        error!(%peer, %file, error = %e, "cannot set socket timeouts for a transfer");
        return;
    }
    let mut out = Vec::with_capacity(512);
    if req.mode == Mode::Other {
        metrics.warn(|| warn!(%peer, %file, mode = %req.mode_text, "refused: unsupported mode"));
        codec::encode_error(&mut out, ERR_ILLEGAL_OP, "Only octet and netascii modes");
        let _ = sock.send_to(&out, peer);
        return;
    }
    let opened = match paths::open(&cfg, &req.filename) {
        Ok(o) => o,
        Err(r) => {
            metrics.warn(|| warn!(%peer, %file, reason = r.reason(), "refused file"));
            codec::encode_error(&mut out, r.code(), r.message());
            let _ = sock.send_to(&out, peer);
            return;
        }
    };
    let size_known = session::wire_size_known(req.mode);
    let mut n = session::negotiate(&req.options, size_known.then_some(opened.size));
    // A netascii transfer's window out of the service's budget; given back on every
    // way out of this function.
    let mut _window = None;
    if req.mode != Mode::Octet {
        let asked = n.clone();
        let mut bytes = 0;
        let _ = metrics
            .netascii_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                n = asked.clone();
                let left = session::NETASCII_TOTAL_BYTES.saturating_sub(used);
                session::bound_window(&mut n, session::NETASCII_WINDOW_BYTES.min(left));
                bytes = u64::from(n.windowsize) * u64::from(n.blksize);
                Some(used + bytes)
            });
        _window = Some(WindowBytes {
            metrics: metrics.clone(),
            bytes,
        });
    }
    let blksize = n.blksize;
    let blocks = size_known.then(|| session::block_count(opened.size, blksize));
    let mut source = match req.mode {
        Mode::Octet => Source::Octet {
            file: opened.file,
            blksize: u64::from(blksize),
        },
        _ => Source::Netascii(Netascii::new(opened.file, blksize)),
    };
    debug!(%peer, %file, path = %opened.path.display(), options = ?n.oack, "transfer starts");

    let started = Instant::now();
    let (mut s, mut step) = Session::new(&n, blocks, started);
    let mut now = started;
    let bs = usize::from(blksize);
    let mut ahead = Ahead::new(usize::from(n.windowsize), 4 + bs);
    let mut rbuf = vec![0u8; 2048];
    let mut highest_sent = 0u64;
    let mut bytes = 0u64;
    let mut retransmitted = 0u64;
    loop {
        match step.send {
            Send::Nothing => {}
            Send::Oack => {
                codec::encode_oack(&mut out, &n.oack);
                if let Err(e) = sock.send_to(&out, peer) {
                    debug!(%peer, error = %e, "send failed");
                }
            }
            Send::Blocks { first, last } => {
                source.release(s.acked());
                let mut i = first;
                while i <= last {
                    if !ahead.holds(i) {
                        if let Err(e) = ahead.fill(&mut source, i) {
                            error!(%peer, %file, error = %e, "read failed; transfer aborted");
                            codec::encode_error(&mut out, ERR_UNDEFINED, "Read error");
                            let _ = sock.send_to(&out, peer);
                            return;
                        }
                        if ahead.at_eof() {
                            s.set_last(ahead.end());
                        }
                    }
                    let j = last.min(ahead.end()).min(i + ahead.per as u64 - 1);
                    for index in i..=j {
                        if index > highest_sent {
                            highest_sent = index;
                            bytes += if index == ahead.end() {
                                ahead.last_len
                            } else {
                                bs
                            } as u64;
                        } else {
                            retransmitted += 1;
                        }
                    }
                    if let Err(e) = ahead.send(&sock, i, j, peer) {
                        // A full socket buffer or an ICMP error: the timeout resends.
                        debug!(%peer, error = %e, "send failed");
                    }
                    if ahead.at_eof() && j == ahead.end() {
                        break;
                    }
                    i = j + 1;
                }
                // Read the next window now, while the client works on this one; there is
                // nothing to read past the file's last block.
                let next = last + 1;
                let past_end = ahead.at_eof() && next > ahead.end();
                if !past_end && !ahead.holds(next) {
                    if let Err(e) = ahead.fill(&mut source, next) {
                        // Not fatal yet: the read is tried again when the window is due.
                        debug!(%peer, error = %e, "read ahead failed");
                        ahead.count = 0;
                    } else if ahead.at_eof() {
                        s.set_last(ahead.end());
                    }
                }
            }
        }
        let deadline = match step.next {
            Next::Wait(d) => d,
            Next::Done => {
                info!(
                    %file, %peer, bytes,
                    ms = started.elapsed().as_millis() as u64,
                    blksize, windowsize = n.windowsize, retransmitted,
                    "transfer done"
                );
                metrics
                    .completed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                hub.tftp_done(peer.ip(), &file, bytes);
                return;
            }
            Next::ClientError { code } => {
                info!(%file, %peer, code, acked = s.acked(), "client ended the transfer with ERROR");
                return;
            }
            Next::GaveUp => {
                metrics.warn(
                    || warn!(%file, %peer, acked = s.acked(), "client stopped answering; transfer given up"),
                );
                return;
            }
            Next::TooLong => {
                metrics.warn(
                    || warn!(%file, %peer, acked = s.acked(), limit_s = session::MAX_TRANSFER.as_secs(), "transfer ran too long; ended"),
                );
                codec::encode_error(&mut out, ERR_UNDEFINED, "Transfer took too long");
                let _ = sock.send_to(&out, peer);
                return;
            }
        };
        if shutdown.is_cancelled() {
            codec::encode_error(&mut out, ERR_UNDEFINED, "Server shutting down");
            let _ = sock.send_to(&out, peer);
            return;
        }
        // `now` is the time of the last event, a few microseconds old: the wait may end
        // that much late, which a timer of seconds does not notice.
        if let Err(e) = rto.arm(&sock, deadline.saturating_duration_since(now)) {
            debug!(%peer, error = %e, "cannot set the receive timeout");
        }
        let r = sock.recv_from(&mut rbuf);
        now = Instant::now();
        step = match r {
            Ok((len, from)) if from != peer => {
                // RFC 1350 section 4: a stranger gets ERROR 5, the transfer goes on.
                codec::encode_error(&mut out, ERR_UNKNOWN_TID, "Unknown transfer ID");
                let _ = sock.send_to(&out, from);
                let _ = len;
                s.waiting()
            }
            Ok((len, _)) => match Packet::parse(&rbuf[..len]) {
                Ok(Packet::Ack(b)) => s.on_ack(b, now),
                Ok(Packet::Error { code, message }) => {
                    debug!(%peer, code, %message, "client error");
                    s.on_error(code)
                }
                Ok(p) => {
                    debug!(%peer, packet = %p, "unexpected packet during a read; ignored");
                    s.waiting()
                }
                Err(e) => {
                    debug!(%peer, error = %e, "malformed packet; ignored");
                    s.waiting()
                }
            },
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                // The receive timeout: the deadline, or only a look at the shutdown token.
                if now >= s.deadline() {
                    s.on_timeout(now)
                } else {
                    s.waiting()
                }
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                // ICMP port unreachable (IP_RECVERR below): if it answers our DATA to the
                // client, nobody listens there any more (or the RRQ's source was forged).
                // One for an ERROR 5 we sent a stranger does not end the transfer.
                if unreachable(&sock, peer) {
                    info!(%file, %peer, acked = s.acked(), "client port unreachable (ICMP); transfer ended");
                    return;
                }
                s.waiting()
            }
            Err(e) => {
                debug!(%peer, error = %e, "receive failed");
                s.waiting()
            }
        };
    }
}

/// Drains the socket's error queue; true when an ICMP destination unreachable in it was
/// for a packet we sent to `peer`.
fn unreachable(sock: &UdpSocket, peer: SocketAddr) -> bool {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, SockaddrIn};
    use std::os::fd::AsRawFd;
    let mut hit = false;
    // Bounded: the queue holds what the receive buffer allows, and each call takes one.
    for _ in 0..64 {
        let mut buf = [0u8; 64];
        let mut iov = [io::IoSliceMut::new(&mut buf)];
        let mut cmsg = nix::cmsg_space!(nix::libc::sock_extended_err, nix::libc::sockaddr_in);
        let Ok(m) = recvmsg::<SockaddrIn>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_ERRQUEUE | MsgFlags::MSG_DONTWAIT,
        ) else {
            break;
        };
        let to_peer = m
            .address
            .is_some_and(|a| SocketAddr::V4(std::net::SocketAddrV4::from(a)) == peer);
        let Ok(cmsgs) = m.cmsgs() else { continue };
        for c in cmsgs {
            if let ControlMessageOwned::Ipv4RecvErr(e, _) = c {
                // ICMP type 3: destination unreachable (port, host, network, ...).
                hit |= to_peer && e.ee_origin == nix::libc::SO_EE_ORIGIN_ICMP && e.ee_type == 3;
            }
        }
    }
    hit
}

#[cfg(test)]
mod tests {
    use super::*;

    fn netascii_of(data: &[u8], blksize: u16) -> Vec<Vec<u8>> {
        let p = std::env::temp_dir().join(format!(
            "vdd-na-{}-{}",
            std::process::id(),
            data.len() * 1000 + usize::from(blksize)
        ));
        std::fs::write(&p, data).unwrap();
        let mut a = Netascii::new(File::open(&p).unwrap(), blksize);
        let _ = std::fs::remove_file(&p);
        let mut out = Vec::new();
        let mut buf = vec![0u8; usize::from(blksize)];
        for i in 1.. {
            let n = a.block(i, &mut buf).unwrap();
            out.push(buf[..n].to_vec());
            if n < usize::from(blksize) {
                break;
            }
        }
        out
    }

    #[test]
    fn netascii_converts_line_ends() {
        let b = netascii_of(b"a\nb\rc\r\n", 512);
        assert_eq!(b, vec![b"a\r\nb\r\0c\r\0\r\n".to_vec()]);
    }

    #[test]
    fn netascii_pair_split_across_blocks() {
        // blksize 8: "abcdefg\n" -> "abcdefg\r" | "\n" (short, last).
        let b = netascii_of(b"abcdefg\n", 8);
        assert_eq!(b, vec![b"abcdefg\r".to_vec(), b"\n".to_vec()]);
        // Exactly one block of output: an empty last block follows.
        let b = netascii_of(b"abcdef\n", 8);
        assert_eq!(b, vec![b"abcdef\r\n".to_vec(), Vec::new()]);
    }

    #[test]
    fn netascii_blocks_are_repeatable_until_released() {
        let p = std::env::temp_dir().join(format!("vdd-na-rep-{}", std::process::id()));
        std::fs::write(&p, b"x\n".repeat(100)).unwrap();
        let mut s = Source::Netascii(Netascii::new(File::open(&p).unwrap(), 16));
        let _ = std::fs::remove_file(&p);
        let mut a = [0u8; 20];
        let mut b = [0u8; 20];
        assert_eq!(s.blocks(3, &mut a, 20).unwrap(), (1, 16));
        s.blocks(2, &mut b, 20).unwrap();
        s.blocks(2, &mut a, 20).unwrap();
        assert_eq!(a, b);
        s.release(2);
        assert!(s.blocks(2, &mut a, 20).is_err());
        assert_eq!(s.blocks(3, &mut a, 20).unwrap(), (1, 16));
    }

    #[test]
    fn read_ahead_holds_whole_windows_and_finds_the_end() {
        let p = std::env::temp_dir().join(format!("vdd-ahead-{}", std::process::id()));
        // 10 blocks of 4 bytes and a short one of 2.
        let data: Vec<u8> = (0..42u8).collect();
        std::fs::write(&p, &data).unwrap();
        let mut src = Source::Octet {
            file: File::open(&p).unwrap(),
            blksize: 4,
        };
        let _ = std::fs::remove_file(&p);
        let mut a = Ahead::new(3, 8);
        // Refills are whole windows: 64 KiB / 8 bytes, rounded down to a multiple of 3.
        assert_eq!(a.cap % 3, 0);
        a.cap = 6;
        a.fill(&mut src, 1).unwrap();
        assert!(a.holds(1) && a.holds(6) && !a.holds(7) && !a.at_eof());
        // Blocks 2..=3: two packets back to back, headers in place.
        assert_eq!(
            a.packets(2, 3),
            &[0, 3, 0, 2, 4, 5, 6, 7, 0, 3, 0, 3, 8, 9, 10, 11]
        );
        a.fill(&mut src, 7).unwrap();
        assert_eq!((a.first, a.end(), a.last_len), (7, 11, 2));
        assert!(a.at_eof());
        assert_eq!(a.packets(11, 11), &[0, 3, 0, 11, 40, 41]);
    }

    #[test]
    fn octet_windows_come_in_one_read() {
        let p = std::env::temp_dir().join(format!("vdd-oct-{}", std::process::id()));
        std::fs::write(&p, b"0123456789").unwrap();
        let mut s = Source::Octet {
            file: File::open(&p).unwrap(),
            blksize: 4,
        };
        let _ = std::fs::remove_file(&p);
        let mut buf = [0xaau8; 8 * 4];
        // Blocks 1..=3 of a 10-byte file at blksize 4: two full, one of 2 bytes.
        assert_eq!(s.blocks(1, &mut buf, 8).unwrap(), (3, 2));
        assert_eq!(&buf[4..8], b"0123");
        assert_eq!(&buf[12..16], b"4567");
        assert_eq!(&buf[20..22], b"89");
        // Starting in the middle.
        assert_eq!(s.blocks(2, &mut buf[..16], 8).unwrap(), (2, 2));
        assert_eq!(&buf[4..8], b"4567");
        let p = std::env::temp_dir().join(format!("vdd-oct8-{}", std::process::id()));
        std::fs::write(&p, b"01234567").unwrap();
        let mut s = Source::Octet {
            file: File::open(&p).unwrap(),
            blksize: 4,
        };
        let _ = std::fs::remove_file(&p);
        // A size that is a multiple of the block size ends with an empty block.
        assert_eq!(s.blocks(1, &mut buf, 8).unwrap(), (3, 0));
        assert_eq!(s.blocks(3, &mut buf[..8], 8).unwrap(), (1, 0));
        assert_eq!(s.blocks(1, &mut buf[..16], 8).unwrap(), (2, 4));
    }
}
