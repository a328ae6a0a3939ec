//! One NBD connection, the tokio driver: the fixed newstyle handshake, then transmission
//! with pipelined requests answered as they complete.
//!
//! Spec: NetworkBlockDevice/nbd `doc/proto.md`, "Handshake" (fixed newstyle), "Transmission",
//! "Ordering of messages and writes" (replies may come in any order), "Terminating the
//! transmission phase".

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::codec::{self, Opt};
use super::export::Exports;
use super::policy::{self, ExportInfo, Negotiation, Next};
use super::transmit::{Stats, Transmit};
use crate::warnlimit::WarnLimit;

pub use super::transmit::{FIRST_REQUEST_TIMEOUT, IN_FLIGHT, WRITE_TIMEOUT};

/// How long a client may take to finish the handshake before its slot is reclaimed.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// TCP keepalive: idle time, probe interval, probes; a vanished peer is noticed after
/// about two minutes of silence.
const KEEPALIVE: (Duration, Duration, u32) = (Duration::from_secs(60), Duration::from_secs(10), 6);
/// Longest option data accepted: export names are at most 4096 bytes, so this is generous.
const MAX_OPTION_DATA: u32 = 64 << 10;
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
/// SO_MAX_PACING_RATE of every connection, in bytes a second. Any limit but "none" turns
/// on the kernel's own TCP pacing (Linux 4.13+, with any qdisc): a connection spreads
/// its congestion window over its round trip instead of sending it back to back. A room
/// switched on at once is dozens of connections each bursting its replies into the NIC's
/// queue at the same moment; unpaced, that queue overflows and the lost tails of replies
/// wait for retransmit timers (`cargo xtask bench storm`). The limit itself, 4 GB/s, is
/// above any LAN a thin client sits on.
const MAX_PACING_RATE: u32 = u32::MAX - 1;

/// Turns on TCP pacing for `sock` with `rate` as its ceiling (see [`MAX_PACING_RATE`]).
/// Neither socket2 nor nix has this option, hence the call by hand.
fn set_max_pacing_rate(sock: &impl std::os::fd::AsRawFd, rate: u32) -> io::Result<()> {
    use nix::libc;
    // SAFETY: a valid socket descriptor, and a pointer to a u32 whose size is passed.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MAX_PACING_RATE,
            (&rate as *const u32).cast(),
            std::mem::size_of::<u32>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

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
    /// Replies could not be written (the client went away, or took none for
    /// WRITE_TIMEOUT).
    #[error("writing replies failed")]
    Write(#[source] io::Error),
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
    let _ = set_max_pacing_rate(&stream, MAX_PACING_RATE);
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
    let export = info.name.clone();
    let (rd, wr) = stream.into_split();
    let t = Transmit::new(
        rd,
        wr,
        lease.backend.clone(),
        info,
        neg.structured,
        shared.clone(),
        stats.clone(),
    );
    let ended = t.run(shutdown).await;
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
        Err(SessionError::Write(e)) => {
            if let Some(dropped) = shared.warn.allow() {
                warn!(%peer, dropped, export = %export, "writing replies failed, connection closed: {e}");
            }
            "replies could not be written".to_string()
        }
        Err(e) => e.to_string(),
    };
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
