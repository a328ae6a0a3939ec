//! The HTTP service: boot files for iPXE (RFC 9110 semantics, RFC 9112 HTTP/1.1 syntax).
//! Serves `/boot.ipxe`, `/boot/[<mac>/]kernel|initrd` and `/files/<name>`; the session
//! API (`/api/v1/...`) joins as more [`routes::Route`]s.
//!
//! Layers: [`codec`] (request heads, response heads), [`range`] and [`routes`] (pure
//! decisions), [`files`] (the safe resolver), and this driver (sockets, limits, bodies).
//!
//! Why a small HTTP/1.1 driver of our own instead of axum/hyper: hyper owns the socket
//! and only writes bodies it was handed as byte buffers, so every file byte would be read
//! into user space and copied back into the kernel. We own the socket and send file
//! bodies with sendfile(2), page cache to socket, driven by tokio readiness.
//!
//! Measured with `cargo xtask bench http --rounds 10` (20 concurrent curl downloads of a
//! 64 MiB file in a lab namespace, release build, 2 cores shared with other builds at
//! load average 20-25), two runs: sendfile 0.087 / 0.098 CPU-s per GB served; the same
//! server copying through a 256 KiB buffer read with `tokio::fs::File` (the work a hyper
//! body over a file does; hyper itself was not built to measure) 0.414 / 0.413, 4.2-4.8x
//! more; `python3 -m http.server` 0.31 / 0.34. Aggregate medians: sendfile 794 / 917 MB/s,
//! copy 903 / 1165, python 586 / 769; with 4 clients sendfile 1637 vs copy 1572. The
//! copy path's edge at 20 clients is not explained; our guess, not verified, is a
//! loopback effect (the receiving curl copies from pages the server just touched, hot in
//! cache; a NIC reads them by DMA). A first version with TCP_NODELAY ran sendfile at
//! half the copy rate from 4 clients up; Nagle plus a push per answer fixed that. At ~0.09 CPU-s/GB one core feeds ~10 GB/s, so a LAN
//! link is the limit, and CPU per GB is what grows with the number of seats: sendfile.
//! `[http] sendfile = false` keeps the copy
//! path for file systems without sendfile support.

pub mod admin;
pub mod codec;
pub mod files;
pub mod range;
pub mod routes;

use crate::warnlimit::WarnLimit;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::boot::{self, BootPart};
use crate::config::{Config, Live};

use codec::{HeadError, Request, ResponseHead};
use files::{FileError, Opened};
use routes::{FileInfo, Method, Route};

/// Why the http service could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The listening socket could not be bound (port in use, no permission for port 80).
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// Accepting connections failed for good.
    #[error("accepting connections")]
    Accept(#[source] io::Error),
}

/// Connections served at once; more wait in the kernel's accept queue. A classroom of
/// iPXE clients opens one or two each.
const MAX_CONNECTIONS: usize = 1024;
/// How long an idle keep-alive connection, or a slow request head, may take.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a client may accept no body bytes at all before we give up on it.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// The slowest a body may go, after the first `STALL_TIMEOUT`: a reader that takes a byte
/// now and then no longer resets a timer with each partial send and holds its slot for
/// ever. An old PC on 10 Mbit/s reads 76 times faster than this.
const MIN_RATE: f64 = 16.0 * 1024.0;

/// How long running transfers may go on after shutdown is asked for.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// The largest API request body we read (a session request is under 100 bytes).
const MAX_API_BODY: usize = 64 * 1024;
/// Buffer of the copy path (`sendfile = false`).
const COPY_BUF: usize = 256 * 1024;

/// The http service with its socket bound.
pub struct Service {
    /// The running config; each connection takes the one current when it was accepted.
    cfg: Live,
    listener: TcpListener,
    /// Caps concurrent connections; a permit lives as long as its connection task.
    limit: Arc<Semaphore>,
    per_address: crate::peers::PerAddress,
    /// Rate limit of `warn` lines about misbehaving clients.
    warns: Arc<WarnLimit>,
    /// The JSON API under /api/v1/ (menu and sessions).
    api: Arc<api::Api>,
    /// The admin's panel (`/admin/`) and `/metrics`; `None`: 404.
    panel: Option<Arc<admin::Panel>>,
    /// What the admin sees: bytes and transfers, boot files as seats' stages.
    hub: crate::telemetry::Hub,
}

impl Service {
    /// Binds `[http] port` on the server's LAN address only: the API and the boot files
    /// are for the LAN, not for whatever else the server is plugged into.
    pub async fn bind(cfg: impl Into<Live>) -> Result<Service, Error> {
        let cfg = cfg.into();
        let now = cfg.get();
        let ip = now.server_ip().unwrap_or(Ipv4Addr::UNSPECIFIED);
        let addr = SocketAddr::from((ip, now.http.port));
        Self::bind_addr(cfg, addr).await
    }

    /// Binds `addr` instead (tests use 127.0.0.1:0).
    pub async fn bind_addr(cfg: impl Into<Live>, addr: SocketAddr) -> Result<Service, Error> {
        let cfg = cfg.into();
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Bind { addr, source })?;
        let api = Arc::new(api::Api {
            cfg: cfg.clone(),
            dispatcher: None,
            leases: None,
            seats: Arc::new(api::Neighbours {
                interface: cfg.get().server.interface.clone(),
            }),
            reload: None,
            hub: Default::default(),
        });
        Ok(Service {
            cfg,
            listener,
            limit: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            per_address: crate::peers::PerAddress::default(),
            // At most a few `warn` lines per second about bad clients; the rest go to `debug`.
            warns: Arc::new(WarnLimit::new(5, Duration::from_secs(1))),
            api,
            panel: None,
            hub: Default::default(),
        })
    }

    /// Serves `api` under /api/v1/ (by default: the guest list, and no sessions), the
    /// admin's panel over it at /admin/ and /metrics, and reports to the API's hub.
    pub fn with_api(mut self, api: Arc<api::Api>) -> Service {
        self.hub = api.hub.clone();
        self.panel = Some(Arc::new(admin::Panel::new(api.clone())));
        self.api = api;
        self
    }

    /// The bound address (the real port when bound to port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown`; then stops accepting, lets running transfers finish for
    /// a few seconds and drops the rest.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let addr = self.local_addr().map_err(Error::Accept)?;
        let cfg = self.cfg.get();
        info!(
            %addr,
            root = %cfg.http.root.display(),
            sendfile = cfg.http.sendfile,
            "http serving"
        );
        if !cfg.http.root.is_dir() {
            warn!(
                root = %cfg.http.root.display(),
                "[http] root is not a folder: every /files/ request will get 404"
            );
        }
        let mut conns = JoinSet::new();
        let result = loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                p = self.limit.clone().acquire_owned() => p.expect("semaphore never closed"),
            };
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                Some(_) = conns.join_next(), if !conns.is_empty() => continue,
                a = self.listener.accept() => a,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let cfg = self.cfg.get();
                    let cap = cfg.http.max_per_address;
                    let Some(slot) = self.per_address.take(peer.ip(), cap) else {
                        if let Some(dropped) = self.warns.allow() {
                            warn!(%peer, max_per_address = cap, dropped, "http: this address holds http.max_per_address connections already; refused");
                        }
                        // Best effort, never waiting: the client learns why, and the
                        // descriptor goes at once.
                        let _ = stream.try_write(
                            b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
                        );
                        continue;
                    };
                    let conn = Conn {
                        api: self.api.clone(),
                        panel: self.panel.clone(),
                        hub: self.hub.clone(),
                        cfg,
                        peer,
                        warns: self.warns.clone(),
                        shutdown: shutdown.clone(),
                    };
                    conns.spawn(async move {
                        conn.serve(stream).await;
                        // The address's slot first: once the permit is back, the accept loop may
                        // take the next connection from this address at once.
                        drop((slot, permit));
                    });
                }
                // Out of descriptors or a connection reset before accept: transient.
                Err(e) if is_transient(&e) => {
                    warn!(error = %e, "http accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => break Err(Error::Accept(e)),
            }
        };
        let drain = async { while conns.join_next().await.is_some() {} };
        if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
            info!(
                left = conns.len(),
                "http shutdown: dropping unfinished transfers"
            );
            conns.abort_all();
        }
        info!("http stopped");
        result
    }
}

pub mod api;
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    ) || e.raw_os_error().is_some_and(|n| {
        use nix::errno::Errno;
        [Errno::ENFILE, Errno::EMFILE, Errno::ENOBUFS, Errno::ENOMEM].contains(&Errno::from_raw(n))
    })
}

/// One client connection.
struct Conn {
    api: Arc<api::Api>,
    panel: Option<Arc<admin::Panel>>,
    hub: crate::telemetry::Hub,
    cfg: Arc<Config>,
    peer: SocketAddr,
    warns: Arc<WarnLimit>,
    shutdown: CancellationToken,
}

/// How a request ended, for the connection loop.
enum Next {
    KeepAlive,
    Close,
}

fn next(close: bool) -> Next {
    if close {
        Next::Close
    } else {
        Next::KeepAlive
    }
}

impl Conn {
    async fn serve(self, mut stream: TcpStream) {
        // Nagle stays on while a body streams: with TCP_NODELAY every small opening of
        // the client's window became a small segment, and 4+ concurrent sendfile
        // downloads ran at half the rate (bench http). Each answer ends with `push`.
        // The script's URLs name the server the way DHCP does (`server.address`, filled
        // from the interface by `vdd serve`), so every client sees one address; the
        // address this connection reached is the fallback. The port is the one really
        // bound (tests bind port 0).
        let reached = stream.local_addr().ok();
        let local = SocketAddrV4::new(
            self.cfg
                .server_ip()
                .or(match reached {
                    Some(SocketAddr::V4(a)) => Some(*a.ip()),
                    _ => None,
                })
                .unwrap_or(Ipv4Addr::LOCALHOST),
            reached.map_or(self.cfg.http.port, |a| a.port()),
        );
        let mut buf: Vec<u8> = Vec::with_capacity(4096);
        loop {
            let req = match self.read_head(&mut stream, &mut buf).await {
                Ok(Some(r)) => r,
                Ok(None) => return,
                Err(e) => {
                    let status = match e {
                        HeadError::TooLarge => 431,
                        HeadError::Malformed(_) => 400,
                    };
                    self.client_warn(format_args!("bad request head: {e}"));
                    let _ = self
                        .send_text(&mut stream, status, "bad request\n", true)
                        .await;
                    return;
                }
            };
            let answered = if req.target.starts_with("/api/") {
                self.answer_api(&mut stream, &req, &mut buf).await
            } else if admin::is_ours(&req.target) {
                self.answer_panel(&mut stream, &req, &mut buf).await
            } else {
                self.answer(&mut stream, &req, local).await
            };
            push(&stream);
            match answered {
                Ok(Next::KeepAlive) if !self.shutdown.is_cancelled() => continue,
                Ok(_) => return,
                Err(e) => {
                    debug!(peer = %self.peer, error = %e, "http connection ended");
                    return;
                }
            }
        }
    }

    /// Reads one request head. `Ok(None)`: the client closed, went idle too long, or
    /// the service is shutting down between requests.
    async fn read_head(
        &self,
        stream: &mut TcpStream,
        buf: &mut Vec<u8>,
    ) -> Result<Option<Request>, HeadError> {
        let deadline = tokio::time::Instant::now() + HEAD_TIMEOUT;
        loop {
            if !buf.is_empty() {
                if let Some((req, n)) = codec::parse_request(buf)? {
                    buf.drain(..n);
                    return Ok(Some(req));
                }
            }
            let mut chunk = [0u8; 4096];
            let read = tokio::select! {
                _ = self.shutdown.cancelled(), if buf.is_empty() => return Ok(None),
                r = tokio::time::timeout_at(deadline, stream.read(&mut chunk)) => r,
            };
            match read {
                Ok(Ok(0)) | Ok(Err(_)) => return Ok(None),
                Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
                Err(_) => {
                    if !buf.is_empty() {
                        self.client_warn(format_args!("request head not finished in time"));
                    }
                    return Ok(None);
                }
            }
        }
    }

    fn client_warn(&self, msg: std::fmt::Arguments<'_>) {
        if let Some(dropped) = self.warns.allow() {
            warn!(peer = %self.peer, dropped, "http: {msg}");
        } else {
            debug!(peer = %self.peer, "http: {msg}");
        }
    }

    async fn answer(
        &self,
        stream: &mut TcpStream,
        req: &Request,
        local: SocketAddrV4,
    ) -> io::Result<Next> {
        // A body we do not read would be parsed as the next request: answer, then close.
        let close = !req.keep_alive() || req.has_body();
        let next = if close { Next::Close } else { Next::KeepAlive };
        if req.minor > 1 {
            self.send_text(stream, 505, "HTTP/1.x only\n", true).await?;
            return Ok(Next::Close);
        }
        let Some(method) = Method::parse(&req.method) else {
            debug!(peer = %self.peer, method = %req.method, target = %req.target, "http method not allowed");
            let head = ResponseHead::new(405).with("Allow", routes::ALLOW);
            self.send_small(stream, head, b"method not allowed\n", false, close)
                .await?;
            return Ok(next);
        };
        match routes::route(&req.target) {
            Route::BootScript { mac } => {
                let script = boot::ipxe_script(&self.cfg, local, mac, &files::usable);
                match &script.problem {
                    None => info!(
                        peer = %self.peer,
                        mac = %mac.map_or("-".into(), |m| m.to_string()),
                        "boot script sent"
                    ),
                    Some(p) => tracing::error!(
                        peer = %self.peer,
                        mac = %mac.map_or("-".into(), |m| m.to_string()),
                        problem = ?p,
                        "boot script cannot boot this client: sent a fallback script; fix [boot] in config.toml"
                    ),
                }
                let head = ResponseHead::new(200)
                    .with("Content-Type", "text/plain; charset=utf-8")
                    .with("Cache-Control", "no-store");
                self.send_small(
                    stream,
                    head,
                    script.text.as_bytes(),
                    method == Method::Head,
                    close,
                )
                .await?;
                if method == Method::Get {
                    self.hub.http_sent("script", script.text.len() as u64);
                    self.hub
                        .http_stage(self.peer.ip(), mac, vdd_api::Stage::HttpScript);
                }
            }
            Route::BootFile { mac, part } => {
                let label = match mac {
                    Some(m) => format!("/boot/{m}/{}", part.name()),
                    None => format!("/boot/{}", part.name()),
                };
                match boot::boot_path(&self.cfg, mac, part) {
                    None => {
                        debug!(peer = %self.peer, file = %label, "no such boot file configured");
                        self.send_not_found(stream, method, close).await?;
                    }
                    Some(path) => match files::open_path(&path) {
                        Ok(f) => {
                            let (kind, stage) = match part {
                                BootPart::Kernel => ("kernel", vdd_api::Stage::HttpKernel),
                                BootPart::Initrd => ("initrd", vdd_api::Stage::HttpInitrd),
                            };
                            if self
                                .send_file(stream, req, method, f, &label, close, kind)
                                .await?
                            {
                                self.hub.http_stage(self.peer.ip(), mac, stage);
                            }
                        }
                        Err(e) => {
                            tracing::error!(
                                peer = %self.peer,
                                file = %path.display(),
                                error = %e,
                                "configured {} cannot be served",
                                boot_key(part)
                            );
                            self.send_not_found(stream, method, close).await?;
                        }
                    },
                }
            }
            Route::File { name } => match files::open_beneath(&self.cfg.http.root, &name) {
                Ok(f) => {
                    let label = format!("/files/{name}");
                    self.send_file(stream, req, method, f, &label, close, "file")
                        .await?;
                }
                Err(FileError::BadName) => {
                    self.client_warn(format_args!("refused file name {name:?}"));
                    self.send_not_found(stream, method, close).await?;
                }
                Err(e) => {
                    debug!(peer = %self.peer, file = %name, error = %e, "http file not served");
                    self.send_not_found(stream, method, close).await?;
                }
            },
            Route::NotFound => {
                debug!(peer = %self.peer, target = %req.target, "http no such resource");
                self.send_not_found(stream, method, close).await?;
            }
        }
        Ok(next)
    }

    /// An API request: its body (Content-Length only, at most [`MAX_API_BODY`]) is read
    /// here, so the connection stays in step and may be kept alive.
    async fn answer_api(
        &self,
        stream: &mut TcpStream,
        req: &Request,
        buf: &mut Vec<u8>,
    ) -> io::Result<Next> {
        let json = |r: api::Reply| {
            (
                ResponseHead::new(r.status)
                    .with("Content-Type", "application/json")
                    .with("Cache-Control", "no-store"),
                r.body,
            )
        };
        if req.header("transfer-encoding").is_some() {
            let (h, b) = json(api::Reply {
                status: 411,
                body: b"{\"error\": \"send the body with Content-Length\"}\n".to_vec(),
            });
            self.send_small(stream, h, &b, false, true).await?;
            return Ok(Next::Close);
        }
        let len = match req.header("content-length").map(str::parse::<usize>) {
            None => 0,
            Some(Ok(n)) if n <= MAX_API_BODY => n,
            Some(_) => {
                self.client_warn(format_args!("API body too large or malformed length"));
                let (h, b) = json(api::Reply {
                    status: 413,
                    body: b"{\"error\": \"the body is limited to 64 KiB\"}\n".to_vec(),
                });
                self.send_small(stream, h, &b, false, true).await?;
                return Ok(Next::Close);
            }
        };
        let deadline = tokio::time::Instant::now() + HEAD_TIMEOUT;
        while buf.len() < len {
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Ok(Next::Close),
                Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body: Vec<u8> = buf.drain(..len).collect();
        let reply = self
            .api
            .handle(
                &req.method,
                &req.target,
                self.peer.ip(),
                req.header("authorization"),
                req.header(api::KEY_HEADER),
                &body,
            )
            .await
            .unwrap_or_else(|| api::Reply {
                status: 404,
                body: b"{\"error\": \"no such API path\"}\n".to_vec(),
            });
        debug!(peer = %self.peer, method = %req.method, target = %req.target, status = reply.status, "api");
        let close = !req.keep_alive();
        let head_only = req.method == "HEAD" || reply.status == 204;
        let (h, b) = json(reply);
        self.send_small(stream, h, &b, head_only, close).await?;
        Ok(if close { Next::Close } else { Next::KeepAlive })
    }

    async fn send_not_found(
        &self,
        stream: &mut TcpStream,
        method: Method,
        close: bool,
    ) -> io::Result<()> {
        let head = ResponseHead::new(404).with("Content-Type", "text/plain; charset=utf-8");
        self.send_small(stream, head, b"not found\n", method == Method::Head, close)
            .await
    }

    async fn send_text(
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
    async fn send_small(
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
    async fn send_file(
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

fn boot_key(part: BootPart) -> &'static str {
    match part {
        BootPart::Kernel => "kernel ([boot] or [[dhcp.host]] kernel)",
        BootPart::Initrd => "initrd ([boot] or [[dhcp.host]] initrd)",
    }
}

/// Sends what Nagle still holds back (the tail of an answer), so the client never waits
/// for its own delayed ACK: turning TCP_NODELAY on pushes pending segments at once
/// (tcp(7)); turning it off again restores Nagle for the next body.
fn push(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_nodelay(false);
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
