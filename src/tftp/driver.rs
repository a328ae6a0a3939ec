//! The tokio side of one read transfer: its own UDP socket (a new TID, RFC 1350 section 4),
//! file reads into the packet buffer, and the [`Session`] state machine fed with ACKs,
//! ERRORs and timeouts.
//!
//! RFC 1350 (TIDs, ERROR 5 to strangers), RFC 2347/2348/2349/7440 through `session`, and
//! netascii (RFC 764 end-of-line: LF -> CR LF, CR -> CR NUL) converted on the fly.
//!
//! File reads use `pread`/`preadv` straight from the task. They are page-cache hits for the boot
//! files and images served here, and a `spawn_blocking` hop per 512-byte block would cost
//! more than the read; each transfer runs on its own thread (see `spawn_transfer` in
//! mod.rs), so a slow disk stalls that transfer only.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::UdpSocket;
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

/// The DATA packets of (part of) a window, back to back, each `seg` bytes but the last.
///
/// With UDP GSO (`UDP_SEGMENT`, Linux 4.18) one `sendmsg` carries up to 64 packets and
/// the kernel cuts them: a window of 16 costs one syscall instead of 16. GSO needs every
/// packet but the last to be exactly `seg` bytes and each to fit the path MTU; when the
/// kernel refuses (EINVAL for a block size above the MTU, EIO without checksum offload),
/// the transfer falls back to one `sendto` per packet for good.
struct Batch {
    buf: Vec<u8>,
    /// Packets per batch: what one GSO send can carry, at most a window.
    per: usize,
    gso: bool,
}

/// The kernel's bounds for one GSO send: 64 segments, one IP datagram of payload.
const GSO_MAX_SEGMENTS: usize = 64;
const GSO_MAX_BYTES: usize = 65000;

impl Batch {
    fn new(window: usize, seg: usize) -> Batch {
        let per = (GSO_MAX_BYTES / seg)
            .clamp(1, GSO_MAX_SEGMENTS)
            .min(window.max(1));
        Batch {
            buf: Vec::with_capacity(per * seg),
            per,
            // One packet per batch gains nothing from GSO.
            gso: per > 1,
        }
    }

    async fn send(&mut self, sock: &UdpSocket, seg: usize, peer: SocketAddr) -> io::Result<()> {
        if self.gso && self.buf.len() > seg {
            match send_gso(sock, &self.buf, seg, peer).await {
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
        for p in self.buf.chunks(seg) {
            sock.send_to(p, peer).await?;
        }
        Ok(())
    }
}

async fn send_gso(sock: &UdpSocket, buf: &[u8], seg: usize, peer: SocketAddr) -> io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, SockaddrStorage};
    use std::os::unix::io::AsRawFd;
    let addr = SockaddrStorage::from(peer);
    let seg = seg as u16;
    let iov = [io::IoSlice::new(buf)];
    loop {
        sock.writable().await?;
        let r = sock.try_io(tokio::io::Interest::WRITABLE, || {
            sendmsg(
                sock.as_raw_fd(),
                &iov,
                &[ControlMessage::UdpGsoSegments(&seg)],
                MsgFlags::empty(),
                Some(&addr),
            )
            .map_err(io::Error::from)
        });
        match r {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Keeps the open-transfer count and the `max_transfers` permit right on every exit
/// path, panics included. The permit goes first, so once `active` reads 0 a new request
/// is sure to get one.
struct ActiveGuard(Arc<Metrics>, Option<OwnedSemaphorePermit>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        drop(self.1.take());
        self.0
            .active
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Serves one RRQ to `peer` from a new socket bound to `local` (the address the request
/// came to, so the reply leaves from the address the client talked to).
pub async fn transfer(
    cfg: Arc<Config>,
    local: IpAddr,
    peer: SocketAddr,
    req: OwnedRequest,
    metrics: Arc<Metrics>,
    permit: OwnedSemaphorePermit,
    shutdown: CancellationToken,
) {
    let _guard = ActiveGuard(metrics.clone(), Some(permit));
    let file = codec::printable(&req.filename);
    let sock = match UdpSocket::bind(SocketAddr::new(local, 0)).await {
        Ok(s) => s,
        Err(e) => {
            error!(%peer, %file, error = %e, "cannot open a socket for a transfer");
            return;
        }
    };
    let mut out = Vec::with_capacity(512);
    if req.mode == Mode::Other {
        metrics.warn(|| warn!(%peer, %file, mode = %req.mode_text, "refused: unsupported mode"));
        codec::encode_error(&mut out, ERR_ILLEGAL_OP, "Only octet and netascii modes");
        let _ = sock.send_to(&out, peer).await;
        return;
    }
    let opened = {
        let cfg = cfg.clone();
        let name = req.filename.clone();
        // Path resolution stats and canonicalizes: off the async workers.
        match tokio::task::spawn_blocking(move || paths::open(&cfg, &name)).await {
            Ok(r) => r,
            Err(e) => {
                error!(%peer, %file, error = %e, "path lookup task failed");
                return;
            }
        }
    };
    let opened = match opened {
        Ok(o) => o,
        Err(r) => {
            metrics.warn(|| warn!(%peer, %file, reason = r.reason(), "refused file"));
            codec::encode_error(&mut out, r.code(), r.message());
            let _ = sock.send_to(&out, peer).await;
            return;
        }
    };
    let size_known = session::wire_size_known(req.mode);
    let n = session::negotiate(&req.options, size_known.then_some(opened.size));
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
    let mut batch = Batch::new(usize::from(n.windowsize), 4 + usize::from(blksize));
    let mut rbuf = vec![0u8; 2048];
    let mut highest_read = 0u64;
    let mut bytes = 0u64;
    let mut retransmitted = 0u64;
    let sleep = tokio::time::sleep_until(s.deadline().into());
    tokio::pin!(sleep);
    let cancelled = shutdown.cancelled();
    tokio::pin!(cancelled);
    loop {
        match step.send {
            Send::Nothing => {}
            Send::Oack => {
                codec::encode_oack(&mut out, &n.oack);
                if let Err(e) = sock.send_to(&out, peer).await {
                    debug!(%peer, error = %e, "send failed");
                }
            }
            Send::Blocks { first, last } => {
                source.release(s.acked());
                // The window is read into `batch`, packets back to back, with one preadv
                // per batch, and leaves in as few syscalls as GSO allows (see `Batch`).
                let bs = usize::from(blksize);
                let seg = 4 + bs;
                let mut i = first;
                while i <= last {
                    let want = (last - i + 1).min(batch.per as u64) as usize;
                    batch.buf.clear();
                    batch.buf.resize(want * seg, 0);
                    let (count, last_len) = match source.blocks(i, &mut batch.buf, seg) {
                        Ok(x) => x,
                        Err(e) => {
                            error!(%peer, %file, error = %e, "read failed; transfer aborted");
                            codec::encode_error(&mut out, ERR_UNDEFINED, "Read error");
                            let _ = sock.send_to(&out, peer).await;
                            return;
                        }
                    };
                    batch.buf.truncate((count - 1) * seg + 4 + last_len);
                    for k in 0..count {
                        let index = i + k as u64;
                        codec::data_header(&mut batch.buf[k * seg..], index as u16);
                        let len = if k + 1 == count { last_len } else { bs };
                        if index > highest_read {
                            highest_read = index;
                            bytes += len as u64;
                        } else {
                            retransmitted += 1;
                        }
                    }
                    let short = last_len < bs;
                    if short {
                        s.set_last(i + count as u64 - 1);
                    }
                    if let Err(e) = batch.send(&sock, seg, peer).await {
                        // A full socket buffer or an ICMP error: the timeout resends.
                        debug!(%peer, error = %e, "send failed");
                    }
                    if short {
                        break;
                    }
                    i += count as u64;
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
        };
        // One timer and one cancellation future for the whole transfer: re-arming a
        // timer per ACK showed up in lockstep profiles.
        let deadline = tokio::time::Instant::from_std(deadline);
        if sleep.deadline() != deadline {
            sleep.as_mut().reset(deadline);
        }
        tokio::select! {
            biased;
            r = sock.recv_from(&mut rbuf) => {
                let now = Instant::now();
                let (len, from) = match r {
                    Ok(x) => x,
                    Err(e) => {
                        // ICMP port unreachable from an earlier send shows up here on
                        // Linux; the client may still come back, the timeout decides.
                        debug!(%peer, error = %e, "receive failed");
                        step = s.waiting();
                        continue;
                    }
                };
                if from != peer {
                    // RFC 1350 section 4: a stranger gets ERROR 5, the transfer goes on.
                    codec::encode_error(&mut out, ERR_UNKNOWN_TID, "Unknown transfer ID");
                    let _ = sock.send_to(&out, from).await;
                    step = s.waiting();
                    continue;
                }
                step = match Packet::parse(&rbuf[..len]) {
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
                };
            }
            _ = &mut sleep => {
                step = s.on_timeout(Instant::now());
            }
            _ = &mut cancelled => {
                codec::encode_error(&mut out, ERR_UNDEFINED, "Server shutting down");
                let _ = sock.send_to(&out, peer).await;
                return;
            }
        }
    }
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
