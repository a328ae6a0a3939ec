//! One client connection: its request loop, and the answers to a request (the boot
//! script, boot files, `/files/`, and an API request with its body).

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::boot::{self, BootPart};
use crate::config::Config;
use crate::warnlimit::WarnLimit;

use super::codec::{self, HeadError, Request, ResponseHead};
use super::files::{self, FileError};
use super::routes::{self, Method, Route};
use super::{admin, api, HEAD_TIMEOUT, MAX_API_BODY};

/// One client connection.
pub(super) struct Conn {
    pub(super) api: Arc<api::Api>,
    pub(super) panel: Option<Arc<admin::Panel>>,
    pub(super) hub: crate::telemetry::Hub,
    pub(super) cfg: Arc<Config>,
    pub(super) peer: SocketAddr,
    pub(super) warns: Arc<WarnLimit>,
    pub(super) shutdown: CancellationToken,
}

/// How a request ended, for the connection loop.
pub(super) enum Next {
    KeepAlive,
    Close,
}

pub(super) fn next(close: bool) -> Next {
    if close {
        Next::Close
    } else {
        Next::KeepAlive
    }
}

impl Conn {
    pub(super) async fn serve(self, mut stream: TcpStream) {
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
