//! Writing answers: bodies in memory, files by sendfile(2) or through a buffer, and the
//! pace a client must keep while it reads.

use std::io;
use std::os::fd::AsFd;
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tracing::{debug, info};

use super::codec::{Request, ResponseHead};
use super::files::Opened;
use super::routes::{self, FileInfo, Method};
use super::{Conn, COPY_BUF, MIN_RATE, STALL_TIMEOUT};

impl Conn {
    pub(super) async fn send_not_found(
        &self,
        stream: &mut TcpStream,
        method: Method,
        close: bool,
    ) -> io::Result<()> {
        let head = ResponseHead::new(404).with("Content-Type", "text/plain; charset=utf-8");
        self.send_small(stream, head, b"not found\n", method == Method::Head, close)
            .await
    }

    pub(super) async fn send_text(
        &self,
        stream: &mut TcpStream,
        status: u16,
        text: &str,
        close: bool,
    ) -> io::Result<()> {
        let head = ResponseHead::new(status).with("Content-Type", "text/plain; charset=utf-8");
        self.send_small(stream, head, text.as_bytes(), false, close)
            .await
    }

    /// A response whose body is in memory; HEAD gets the same fields and no body.
    pub(super) async fn send_small(
        &self,
        stream: &mut TcpStream,
        head: ResponseHead,
        body: &[u8],
        head_only: bool,
        close: bool,
    ) -> io::Result<()> {
        let mut out = head
            .with("Content-Length", body.len().to_string())
            .encode(SystemTime::now(), close);
        if !head_only {
            out.extend_from_slice(body);
        }
        with_stall_timeout(stream.write_all(&out)).await
    }

    /// Sends a file's answer; true when a body was sent in full (`kind` counts it).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn send_file(
        &self,
        stream: &mut TcpStream,
        req: &Request,
        method: Method,
        f: Opened,
        label: &str,
        close: bool,
        kind: &'static str,
    ) -> io::Result<bool> {
        let info = FileInfo {
            len: f.meta.len(),
            mtime: f.meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        };
        let ans = routes::file_answer(
            method,
            req.header("range"),
            req.header("if-range"),
            req.header("if-none-match"),
            "application/octet-stream",
            info,
        );
        let status = ans.head.status;
        let head = ans.head.encode(SystemTime::now(), close);
        with_stall_timeout(stream.write_all(&head)).await?;
        let Some((offset, len)) = ans.body else {
            debug!(peer = %self.peer, file = %label, status, "http answered without body");
            return Ok(false);
        };
        let started = Instant::now();
        let in_flight = self.hub.http_in_flight();
        let sent = if self.cfg.http.sendfile {
            send_sendfile(stream, &f.file, offset, len).await
        } else {
            send_copy(stream, f.file, offset, len).await
        };
        let ms = started.elapsed().as_millis() as u64;
        drop(in_flight);
        match sent {
            Ok(()) => {
                info!(peer = %self.peer, file = %label, status, bytes = len, ms, "file served");
                self.hub.http_sent(kind, len);
                Ok(true)
            }
            Err(e) => {
                info!(peer = %self.peer, file = %label, status, ms, error = %e, "file transfer aborted");
                Err(e)
            }
        }
    }
}

/// Runs a write, failing it if the client accepts nothing for [`STALL_TIMEOUT`].
async fn with_stall_timeout<T>(
    f: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    tokio::time::timeout(STALL_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "client stalled")))
}

/// The pace a body must keep: `STALL_TIMEOUT` for a start, then `MIN_RATE`.
struct Pace {
    start: tokio::time::Instant,
    sent: u64,
}

impl Pace {
    fn new() -> Pace {
        Pace {
            start: tokio::time::Instant::now(),
            sent: 0,
        }
    }

    /// When the next `n` bytes must be out.
    fn deadline(&self, n: u64) -> tokio::time::Instant {
        self.start + STALL_TIMEOUT + Duration::from_secs_f64((self.sent + n) as f64 / MIN_RATE)
    }
}

fn stalled() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "client stalled or too slow")
}

/// Sends `len` bytes of `file` from `offset` with sendfile(2): the kernel moves pages
/// from the page cache to the socket. The socket is non-blocking; we wait for tokio's
/// write readiness whenever the socket buffer is full.
async fn send_sendfile(
    stream: &TcpStream,
    file: &std::fs::File,
    offset: u64,
    len: u64,
) -> io::Result<()> {
    // Bounded calls keep one fast client from holding a worker thread for long; the
    // kernel's own limit per call is 0x7ffff000 bytes.
    const MAX_CHUNK: u64 = 1024 * 1024;
    let mut off = i64::try_from(offset).map_err(|_| io::Error::other("offset too large"))?;
    let mut left = len;
    let mut pace = Pace::new();
    while left > 0 {
        let want = left.min(MAX_CHUNK) as usize;
        let n = tokio::time::timeout_at(pace.deadline(want as u64), async {
            loop {
                stream.writable().await?;
                match stream.try_io(Interest::WRITABLE, || {
                    nix::sys::sendfile::sendfile64(
                        stream.as_fd(),
                        file.as_fd(),
                        Some(&mut off),
                        want,
                    )
                    .map_err(io::Error::from)
                }) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    r => return r,
                }
            }
        })
        .await
        .unwrap_or_else(|_| Err(stalled()))?;
        if n == 0 {
            // The file shrank under us: the promised Content-Length cannot be kept, so the
            // connection must end (the client sees a short body, not wrong bytes).
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file shrank during transfer",
            ));
        }
        left -= n as u64;
        pace.sent += n as u64;
    }
    Ok(())
}

/// The user-space path: read through `tokio::fs::File` into a buffer, write to the socket.
async fn send_copy(
    stream: &mut TcpStream,
    file: std::fs::File,
    offset: u64,
    len: u64,
) -> io::Result<()> {
    let mut file = tokio::fs::File::from_std(file);
    file.seek(io::SeekFrom::Start(offset)).await?;
    let mut buf = vec![0u8; COPY_BUF];
    let mut left = len;
    let mut pace = Pace::new();
    while left > 0 {
        let want = left.min(COPY_BUF as u64) as usize;
        let n = file.read(&mut buf[..want]).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file shrank during transfer",
            ));
        }
        tokio::time::timeout_at(pace.deadline(n as u64), stream.write_all(&buf[..n]))
            .await
            .unwrap_or_else(|_| Err(stalled()))?;
        left -= n as u64;
        pace.sent += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that takes a byte now and then reset the 60 s timer with each partial
    /// send; the pace gives it `STALL_TIMEOUT` plus what `MIN_RATE` allows, no more.
    #[test]
    fn a_trickling_reader_runs_out_of_time() {
        let p = Pace {
            start: tokio::time::Instant::now(),
            sent: 0,
        };
        let mib = 1024 * 1024;
        assert_eq!(p.deadline(0), p.start + STALL_TIMEOUT);
        assert_eq!(
            p.deadline(mib),
            p.start + STALL_TIMEOUT + Duration::from_secs(64)
        );
        // One byte sent after another does not move the deadline by more than a byte's
        // worth at MIN_RATE.
        let later = Pace { sent: 1, ..p };
        assert!(later.deadline(mib) - p.deadline(mib) < Duration::from_millis(1));
    }
}
