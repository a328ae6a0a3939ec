//! The admin's panel at `/admin/` and the metrics at `/metrics`, on vdd's HTTP port.
//!
//! The panel is one page of plain HTML, CSS and a small script ([`files`], built into
//! the binary), polling small JSON routes every two seconds: `/admin/api/state` (the
//! room, the sessions, the server's summary), `/admin/api/seat/MAC` (a seat's boots),
//! `/admin/api/server` (pool and leases, transfers, the recent events). No front-end
//! library: four views of tables and a timeline need none, and the binary stays one file
//! with no build step for the page.
//!
//! Everything but the login page and its stylesheet needs a login ([`auth`]): the
//! session cookie (`vdd_admin`, HttpOnly, SameSite=Strict, 12 h at most, 30 min idle),
//! and on every POST its CSRF token in `X-CSRF-Token`. The login form carries a token of
//! its own (double-submit: a cookie and a form field that must match). The panel's
//! actions (start, end, reset) go through the session API as the admin, so they are the
//! API's, with its checks, its log lines and its telemetry.

pub mod auth;
pub mod screens;
mod views;

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tracing::{info, warn};

use super::api::{Api, Reply};
use super::codec::{query_param, Request, ResponseHead};
use auth::{cookie, Auth, Refused};

/// The cookie of a logged-in browser.
const COOKIE: &str = "vdd_admin";
/// The login form's double-submit cookie.
const LOGIN_COOKIE: &str = "vdd_login";
/// The largest request body the panel reads (a login form, a start request).
const MAX_BODY: usize = 4096;

/// The panel's files, built into the binary.
mod files {
    pub const INDEX: &str = include_str!("files/index.html");
    pub const LOGIN: &str = include_str!("files/login.html");
    pub const CSS: &str = include_str!("files/panel.css");
    pub const JS: &str = include_str!("files/panel.js");
}

/// The panel's state: logins, cached screens, CPU samples.
pub struct Panel {
    api: Arc<Api>,
    auth: Mutex<Auth>,
    screens: screens::Screens,
    /// The last CPU time of each session's VM and when it was read: CPU % between polls.
    cpu: Mutex<HashMap<String, (f64, Instant)>>,
}

/// An answer of the panel.
#[derive(Debug)]
pub struct Out {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl Out {
    fn new(status: u16, ctype: &str, body: impl Into<Vec<u8>>) -> Out {
        Out {
            status,
            headers: vec![("Content-Type", ctype.to_string())],
            body: body.into(),
        }
    }

    fn json(status: u16, v: &serde_json::Value) -> Out {
        let mut b = serde_json::to_vec(v).expect("JSON values serialize");
        b.push(b'\n');
        Out::new(status, "application/json", b)
    }

    fn error(status: u16, msg: impl std::fmt::Display) -> Out {
        Out::json(status, &serde_json::json!({ "error": msg.to_string() }))
    }

    fn from_reply(r: Reply) -> Out {
        Out::new(r.status, "application/json", r.body)
    }

    fn with(mut self, k: &'static str, v: impl Into<String>) -> Out {
        self.headers.push((k, v.into()));
        self
    }
}

/// Whether the request is the panel's or the metrics'.
pub fn is_ours(target: &str) -> bool {
    let path = target.split('?').next().unwrap_or("");
    path == "/admin" || path.starts_with("/admin/") || path == "/metrics"
}

fn login_cookie_header(id: &str, max_age: u64) -> String {
    format!("{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}")
}

impl Panel {
    pub fn new(api: Arc<Api>) -> Panel {
        Panel {
            api,
            auth: Mutex::new(Auth::default()),
            screens: screens::Screens::default(),
            cpu: Mutex::new(HashMap::new()),
        }
    }

    fn auth(&self) -> std::sync::MutexGuard<'_, Auth> {
        self.auth.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Answers one request of the panel or the metrics.
    pub async fn handle(&self, req: &Request, body: &[u8], peer: IpAddr) -> Out {
        let (path, query) = req.target.split_once('?').unwrap_or((&req.target, ""));
        let now = Instant::now();
        let logged = cookie(req.header("cookie"), COOKIE)
            .and_then(|id| self.auth().session(id, now).map(|s| (id.to_string(), s)));
        let m = req.method.as_str();
        if path == "/metrics" {
            return self.metrics(req, logged.is_some()).await;
        }
        // What needs no login: the login page, its stylesheet, the login itself.
        match (m, path) {
            ("GET" | "HEAD", "/admin") => {
                return Out::new(303, "text/plain", "").with("Location", "/admin/")
            }
            ("GET" | "HEAD", "/admin/panel.css") => {
                return Out::new(200, "text/css; charset=utf-8", files::CSS)
            }
            ("GET" | "HEAD", "/admin/") if logged.is_none() => return self.login_page(None),
            ("POST", "/admin/login") => return self.login(req, body, peer).await,
            _ => {}
        }
        let Some((id, session)) = logged else {
            return Out::error(401, "log in first (/admin/)");
        };
        if m == "POST" && !Auth::csrf_ok(&session, req.header("x-csrf-token")) {
            warn!(ip = %peer, path, "panel: a POST without its CSRF token refused");
            return Out::error(403, "missing or wrong CSRF token");
        }
        let parts: Vec<&str> = path.trim_start_matches("/admin/").split('/').collect();
        match (m, parts.as_slice()) {
            ("GET" | "HEAD", [""]) => Out::new(200, "text/html; charset=utf-8", files::INDEX),
            ("GET" | "HEAD", ["panel.js"]) => {
                Out::new(200, "text/javascript; charset=utf-8", files::JS)
            }
            ("POST", ["logout"]) => {
                self.auth().logout(&id);
                info!(ip = %peer, "panel: logged out");
                Out::json(200, &serde_json::json!({}))
                    .with("Set-Cookie", login_cookie_header("", 0))
            }
            ("GET" | "HEAD", ["api", "state"]) => {
                Out::json(200, &self.state_json(&session.csrf).await)
            }
            ("GET" | "HEAD", ["api", "seat", mac]) => match mac.parse() {
                Ok(mac) => Out::json(200, &self.seat_json(mac).await),
                Err(()) => Out::error(400, format!("{mac:?} is not a MAC address")),
            },
            ("GET" | "HEAD", ["api", "server"]) => {
                let seat = query_param(query, "seat").and_then(|s| s.parse().ok());
                Out::json(200, &self.server_json(seat).await)
            }
            ("GET" | "HEAD", ["api", "screen", file]) => {
                let id = file.strip_suffix(".png").unwrap_or(file);
                let w = query_param(query, "w").and_then(|w| w.parse().ok());
                self.screen(id, screens::width(w)).await
            }
            ("POST", ["api", "sessions"]) => {
                self.as_admin("POST", "/api/v1/sessions", peer, body).await
            }
            ("POST", ["api", "sessions", id, "end"]) => {
                self.as_admin("DELETE", &format!("/api/v1/sessions/{id}"), peer, b"")
                    .await
            }
            ("POST", ["api", "sessions", id, "reset"]) => {
                self.as_admin("POST", &format!("/api/v1/sessions/{id}/reset"), peer, b"")
                    .await
            }
            ("GET" | "HEAD", _) => Out::error(404, format!("no panel path {path}")),
            _ => Out::error(405, "method not allowed here"),
        }
    }

    fn login_page(&self, problem: Option<&str>) -> Out {
        let csrf = auth::random_token();
        let msg = problem.map_or(String::new(), |p| {
            format!("<p class=\"problem\" id=\"problem\">{}</p>", html_escape(p))
        });
        let page = files::LOGIN
            .replace("{{csrf}}", &csrf)
            .replace("{{problem}}", &msg);
        let status = if problem.is_some() { 403 } else { 200 };
        Out::new(status, "text/html; charset=utf-8", page).with(
            "Set-Cookie",
            format!("{LOGIN_COOKIE}={csrf}; Path=/admin/; HttpOnly; SameSite=Strict; Max-Age=3600"),
        )
    }

    async fn login(&self, req: &Request, body: &[u8], peer: IpAddr) -> Out {
        let form = String::from_utf8_lossy(body);
        let given = query_param(&form, "token").unwrap_or_default();
        let csrf = query_param(&form, "csrf").unwrap_or_default();
        let want = cookie(req.header("cookie"), LOGIN_COOKIE).unwrap_or("");
        let m = &self.api.hub.metrics().panel_logins;
        let count = |result| {
            m.get_or_create(&crate::metrics::ResultLabel { result })
                .inc()
        };
        if want.is_empty()
            || !auth::Auth::csrf_ok(
                &auth::AdminSession {
                    csrf: want.to_string(),
                    created: Instant::now(),
                    last: Instant::now(),
                },
                Some(&csrf),
            )
        {
            count("refused");
            warn!(ip = %peer, "panel: login without the login form's token refused");
            return self.login_page(Some("the login form expired; try again"));
        }
        let cfg = self.api.cfg.get();
        let token = cfg.http.admin_token.as_deref();
        let r = self.auth().login(peer, given.trim(), token, Instant::now());
        match r {
            Ok((id, _)) => {
                count("ok");
                info!(ip = %peer, "panel: admin logged in");
                Out::new(303, "text/plain", "")
                    .with("Location", "/admin/")
                    .with(
                        "Set-Cookie",
                        login_cookie_header(&id, auth::LIFETIME.as_secs()),
                    )
                    .with(
                        "Set-Cookie",
                        format!(
                            "{LOGIN_COOKIE}=; Path=/admin/; HttpOnly; SameSite=Strict; Max-Age=0"
                        ),
                    )
            }
            Err(Refused::Wrong) => {
                count("failed");
                warn!(ip = %peer, "panel: login with a wrong token");
                // A wrong guess costs its sender a second, whatever else it sends.
                tokio::time::sleep(Duration::from_secs(1)).await;
                self.login_page(Some("wrong admin token"))
            }
            Err(Refused::Wait(d)) => {
                count("throttled");
                warn!(ip = %peer, wait_ms = d.as_millis() as u64, "panel: login tried too soon after failed ones");
                let mut o = self.login_page(Some(&format!(
                    "too many failed logins; wait {} s",
                    d.as_secs().max(1)
                )));
                o.status = 429;
                o.with("Retry-After", d.as_secs().max(1).to_string())
            }
            Err(Refused::NoToken) => {
                count("refused");
                self.login_page(Some(
                    "no [http] admin_token is set in vdd's config: set one and restart vdd",
                ))
            }
        }
    }

    /// `/metrics`: the admin's (token or panel login). OpenMetrics for who asks for it
    /// (Prometheus does), the classic text format for everyone else.
    async fn metrics(&self, req: &Request, logged: bool) -> Out {
        let api = &self.api;
        let cfg = api.cfg.get();
        let bearer = req
            .header("authorization")
            .and_then(|a| a.strip_prefix("Bearer "))
            .zip(cfg.http.admin_token.as_deref())
            .is_some_and(|(given, token)| {
                use subtle::ConstantTimeEq;
                bool::from(given.trim().as_bytes().ct_eq(token.as_bytes()))
            });
        if !bearer && !logged {
            return Out::error(
                403,
                "the metrics are for the admin (Authorization: Bearer [http] admin_token)",
            );
        }
        let pool = cfg.dhcp.pool.as_ref().map(|p| p.len() as usize);
        let text = api
            .hub
            .gather(api.dispatcher.as_ref(), api.leases.as_ref(), pool)
            .await;
        let open = req
            .header("accept")
            .is_some_and(|a| a.contains("application/openmetrics-text"));
        if open {
            Out::new(
                200,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                text,
            )
        } else {
            Out::new(
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                crate::metrics::classic(&text),
            )
        }
    }

    /// A panel action through the session API, as the admin.
    async fn as_admin(&self, method: &str, path: &str, peer: IpAddr, body: &[u8]) -> Out {
        let cfg = self.api.cfg.get();
        let Some(token) = &cfg.http.admin_token else {
            return Out::error(503, "no [http] admin_token is set");
        };
        let auth = format!("Bearer {token}");
        match self
            .api
            .handle(method, path, peer, Some(&auth), None, body)
            .await
        {
            Some(r) => Out::from_reply(r),
            None => Out::error(404, "no such API path"),
        }
    }

    async fn screen(&self, id: &str, width: usize) -> Out {
        let Some(d) = &self.api.dispatcher else {
            return Out::error(404, "this server runs no guests");
        };
        match self.screens.png(d, id, width).await {
            Ok(png) => {
                self.api.hub.metrics().panel_screenshots.inc();
                Out::new(200, "image/png", png.as_slice())
            }
            Err(e @ crate::dispatch::Error::NotFound(_)) => Out::error(404, e),
            Err(e) => Out::error(500, crate::dispatch::report(&e)),
        }
    }
}

/// Text for HTML element content.
fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

impl super::Conn {
    /// A request of the panel or the metrics: its body (Content-Length, at most
    /// [`MAX_BODY`]) is read here, then the panel answers.
    pub(super) async fn answer_panel(
        &self,
        stream: &mut TcpStream,
        req: &Request,
        buf: &mut Vec<u8>,
    ) -> io::Result<super::Next> {
        let close = !req.keep_alive();
        let Some(panel) = &self.panel else {
            let head = ResponseHead::new(404).with("Content-Type", "text/plain; charset=utf-8");
            self.send_small(
                stream,
                head,
                b"no admin panel on this server\n",
                false,
                close,
            )
            .await?;
            return Ok(super::next(close));
        };
        if req.header("transfer-encoding").is_some() {
            let head = ResponseHead::new(411);
            self.send_small(stream, head, b"", false, true).await?;
            return Ok(super::Next::Close);
        }
        let len = match req.header("content-length").map(str::parse::<usize>) {
            None => 0,
            Some(Ok(n)) if n <= MAX_BODY => n,
            Some(_) => {
                let head = ResponseHead::new(413);
                self.send_small(stream, head, b"", false, true).await?;
                return Ok(super::Next::Close);
            }
        };
        let deadline = tokio::time::Instant::now() + super::HEAD_TIMEOUT;
        while buf.len() < len {
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Ok(super::Next::Close),
                Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body: Vec<u8> = buf.drain(..len).collect();
        let out = panel.handle(req, &body, self.peer.ip()).await;
        let mut head = ResponseHead::new(out.status)
            .with("Cache-Control", "no-store")
            .with("X-Content-Type-Options", "nosniff")
            .with("X-Frame-Options", "DENY")
            .with("Referrer-Policy", "no-referrer")
            .with(
                "Content-Security-Policy",
                "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                 connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
            );
        for (k, v) in out.headers {
            head = head.with(k, v);
        }
        let head_only = req.method == "HEAD";
        self.send_small(stream, head, &out.body, head_only, close)
            .await?;
        Ok(super::next(close))
    }
}

/// Seconds since the Unix epoch, as the sessions' `started`.
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
