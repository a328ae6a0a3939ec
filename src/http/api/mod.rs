//! The JSON API under `/api/v1/`: the menu (`guests`) and the sessions of the dispatcher.
//! Pure request -> reply logic over the dispatcher; the HTTP driver only moves bytes.
//!
//! Who is asking: a seat is known by the address its request comes from, mapped to a MAC
//! by the server's neighbour (ARP) table, never by what the request
//! claims; the admin by `Authorization: Bearer <[http] admin_token>`.

use std::net::IpAddr;
use std::sync::Arc;

use serde_json::json;
use tracing::warn;

use crate::config::{Live, Mac};
use crate::dispatch::Sessions;

mod seats;
mod sessions;

pub use seats::{Neighbours, SeatLookup};

/// The largest boot report taken (16 stages with details are about 1.5 KiB).
pub const BOOT_REPORT_BODY: usize = 4096;

/// The route's pattern for the request counter: ids never become labels.
fn route_name(parts: &[&str]) -> &'static str {
    match parts {
        ["guests"] => "/api/v1/guests",
        ["status"] => "/api/v1/status",
        ["sessions"] => "/api/v1/sessions",
        ["sessions", _] => "/api/v1/sessions/{id}",
        ["sessions", _, "reset"] => "/api/v1/sessions/{id}/reset",
        ["sessions", _, "password"] => "/api/v1/sessions/{id}/password",
        ["boot"] => "/api/v1/boot",
        _ => "other",
    }
}

/// A reply: status and JSON body.
#[derive(Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

fn reply(status: u16, v: serde_json::Value) -> Reply {
    let mut body = serde_json::to_vec(&v).expect("JSON values serialize");
    body.push(b'\n');
    Reply { status, body }
}

fn error(status: u16, msg: impl Into<String>) -> Reply {
    reply(status, json!({ "error": msg.into() }))
}

/// Who is asking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Caller {
    Admin,
    Seat(Mac),
    /// A guest VM's own NIC (an X11 guest on the LAN).
    Guest,
    Unknown,
}

/// The header a seat shows a session's key in.
pub const KEY_HEADER: &str = "x-vdd-session-key";

/// The API's state.
pub struct Api {
    /// The running config; each request takes the one current when it came.
    pub cfg: Live,
    /// The sessions: the dispatcher, or a test's fake of it.
    pub dispatcher: Option<Arc<dyn Sessions>>,
    /// vdd's DHCP leases, for the admin's summary (`None`: not in full DHCP mode).
    pub leases: Option<crate::dhcp::Leases>,
    pub seats: Arc<dyn SeatLookup>,
    /// Re-reads the config file for `POST /api/v1/reload` (`vdd reload`); `None`: the
    /// route answers 404 (tests, or a vdd without a config file of its own).
    pub reload: Option<Arc<crate::reload::Reloader>>,
    /// What the admin sees: requests counted, sessions and thin clients' reports as
    /// stages of their seats' boots.
    pub hub: crate::telemetry::Hub,
}

impl Api {
    async fn caller(&self, peer: IpAddr, authorization: Option<&str>) -> Caller {
        if let (Some(token), Some(auth)) = (&self.cfg.get().http.admin_token, authorization) {
            if let Some(given) = auth.strip_prefix("Bearer ") {
                // Compared in constant time: the token is the admin's only key.
                if constant_time_eq(given.trim().as_bytes(), token.as_bytes()) {
                    return Caller::Admin;
                }
            }
        }
        match self.seats.seat_of(peer) {
            // An X11 guest sits on the LAN bridge and is in the neighbour table like a
            // seat; it must not start VMs (or reach anyone's sessions).
            Some(m) if self.is_guest(m).await => {
                warn!(ip = %peer, mac = %m, "API request from a guest VM's NIC refused");
                Caller::Guest
            }
            Some(m) => Caller::Seat(m),
            None => Caller::Unknown,
        }
    }

    /// Answers one API request; `None` when `path` is not an API path.
    pub async fn handle(
        &self,
        method: &str,
        path: &str,
        peer: IpAddr,
        authorization: Option<&str>,
        key: Option<&str>,
        body: &[u8],
    ) -> Option<Reply> {
        let rest = path.strip_prefix("/api/v1/")?;
        let rest = rest.split('?').next().unwrap_or("");
        let parts: Vec<&str> = rest.split('/').collect();
        let r = self
            .route(method, rest, &parts, peer, authorization, key, body)
            .await;
        self.hub.api_request(route_name(&parts), r.status);
        Some(r)
    }

    #[allow(clippy::too_many_arguments)]
    async fn route(
        &self,
        method: &str,
        rest: &str,
        parts: &[&str],
        peer: IpAddr,
        authorization: Option<&str>,
        key: Option<&str>,
        body: &[u8],
    ) -> Reply {
        match (method, parts) {
            ("GET" | "HEAD", ["guests"]) => self.guests(),
            ("GET" | "HEAD", ["status"]) => self.status(peer, authorization).await,
            (_, ["status"]) => error(405, "use GET"),
            ("POST", ["reload"]) => self.reload(peer, authorization).await,
            (_, ["reload"]) => error(405, "use POST"),
            (_, ["guests"]) => error(405, "use GET"),
            ("GET" | "HEAD", ["sessions"]) => self.list(peer, authorization).await,
            ("POST", ["sessions"]) => self.create(peer, authorization, body).await,
            (_, ["sessions"]) => error(405, "use GET or POST"),
            ("GET" | "HEAD", ["sessions", id]) => self.get(peer, authorization, key, id).await,
            ("DELETE", ["sessions", id]) => self.end(peer, authorization, key, id).await,
            (_, ["sessions", _]) => error(405, "use GET or DELETE"),
            ("POST", ["sessions", id, "reset"]) => self.reset(peer, authorization, key, id).await,
            (_, ["sessions", _, "reset"]) => error(405, "use POST"),
            ("POST", ["sessions", id, "password"]) => {
                self.password(peer, authorization, key, id).await
            }
            (_, ["sessions", _, "password"]) => error(405, "use POST"),
            ("POST", ["boot"]) => self.boot_report(peer, body).await,
            (_, ["boot"]) => error(405, "use POST"),
            _ => error(404, format!("no API path /api/v1/{rest}")),
        }
    }

    /// `POST /api/v1/boot`: a thin client reports the stages of its boot that only it
    /// sees. Taken only from the seat itself (its address in the neighbour table: the
    /// report names no MAC), bounded in size (the HTTP driver reads at most
    /// [`BOOT_REPORT_BODY`]) and in rate (per seat, see `telemetry::boots`).
    async fn boot_report(&self, peer: IpAddr, body: &[u8]) -> Reply {
        if body.len() > BOOT_REPORT_BODY {
            return error(
                413,
                format!("a boot report is at most {BOOT_REPORT_BODY} bytes"),
            );
        }
        let mac = match self.caller(peer, None).await {
            Caller::Seat(m) => m,
            Caller::Guest => return guest_caller(peer),
            Caller::Admin | Caller::Unknown => return unknown_caller(peer),
        };
        let r: vdd_api::BootReport = match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(e) => return error(400, format!("not a boot report: {e}")),
        };
        match self.hub.client_report(mac, &r) {
            Ok(()) => Reply {
                status: 204,
                body: Vec::new(),
            },
            Err(e) => {
                warn!(ip = %peer, %mac, "boot report refused: {e}");
                let status = match e {
                    crate::telemetry::boots::ReportError::TooMany => 429,
                    _ => 400,
                };
                error(status, e.to_string())
            }
        }
    }

    fn guests(&self) -> Reply {
        let list: Vec<_> = self
            .cfg
            .get()
            .guests
            .iter()
            .map(|g| {
                json!({
                    "name": g.name,
                    "label": g.label,
                    "display": g.display.as_str(),
                    "description": g.description,
                })
            })
            .collect();
        reply(200, json!(list))
    }

    /// Reads the config file again (`vdd reload`): 200 with what changed, or 422 with
    /// the one-line error `vdd check` gives, and the running config stays.
    async fn reload(&self, peer: IpAddr, auth: Option<&str>) -> Reply {
        match self.caller(peer, auth).await {
            Caller::Admin => {}
            Caller::Guest => return guest_caller(peer),
            _ => {
                warn!(ip = %peer, "reload asked without the admin token");
                return error(
                    403,
                    "reloading is for the admin (Authorization: Bearer [http] admin_token)",
                );
            }
        }
        let Some(r) = self.reload.clone() else {
            return error(404, "this vdd has no config file to reload");
        };
        // File I/O and the lock of one reload at a time: off the runtime's threads.
        match tokio::task::spawn_blocking(move || r.reload_logged()).await {
            Ok(Ok(o)) => reply(200, json!(o)),
            Ok(Err(e)) => error(422, e),
            Err(e) => error(500, format!("reload failed: {e}")),
        }
    }

    /// The admin's summary of the running server (`vdd status` prints it).
    async fn status(&self, peer: IpAddr, auth: Option<&str>) -> Reply {
        match self.caller(peer, auth).await {
            Caller::Admin => {}
            Caller::Guest => return guest_caller(peer),
            _ => {
                warn!(ip = %peer, "status asked without the admin token");
                return error(
                    403,
                    "the status is for the admin (Authorization: Bearer [http] admin_token)",
                );
            }
        }
        let usage = match &self.dispatcher {
            Some(d) => Some(d.usage().await),
            None => None,
        };
        let leases = match &self.leases {
            Some(l) => l.active().await,
            None => None,
        };
        let cfg = self.cfg.get();
        let pool = cfg.dhcp.pool.as_ref().map(|p| p.len());
        reply(
            200,
            json!({
                "version": env!("CARGO_PKG_VERSION"),
                "interface": cfg.server.interface,
                "address": cfg.server_ip(),
                "guests": cfg.guests.len(),
                "sessions": usage,
                "leases": {"active": leases, "pool": pool},
            }),
        )
    }

    async fn is_guest(&self, mac: Mac) -> bool {
        match &self.dispatcher {
            Some(d) => d.is_guest_mac(mac).await,
            None => false,
        }
    }
}

fn unknown_caller(peer: IpAddr) -> Reply {
    warn!(ip = %peer, "API request from an address that is no known seat");
    error(
        403,
        format!(
            "{peer} is not a known seat (not in the server's neighbour table) and gave no admin token"
        ),
    )
}

fn guest_caller(peer: IpAddr) -> Reply {
    error(
        403,
        format!("{peer} is a guest VM of this server, not a seat"),
    )
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_compare() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
