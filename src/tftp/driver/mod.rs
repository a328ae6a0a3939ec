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
//!
//! Files: `blocks` (where DATA packets come from: the file or its netascii conversion,
//! read ahead and sent a window at a time); this file is the transfer itself.

mod blocks;

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
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

use blocks::{Ahead, Netascii, Source};

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
