//! The JSON API under `/api/v1/`: the menu (`guests`) and the sessions of the dispatcher.
//! Pure request -> reply logic over the dispatcher; the HTTP driver only moves bytes.
//!
//! Who is asking: a seat is known by the address its request comes from, mapped to a MAC
//! by the server's neighbour (ARP) table, never by what the request
//! claims; the admin by `Authorization: Bearer <[http] admin_token>`.

use std::net::IpAddr;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::json;
use tracing::{info, warn};

use crate::config::{Live, Mac};
use crate::dispatch::{self, Sessions, Who};
use vdd_api::Stage;

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

/// Maps a request's source address to the seat (MAC) it belongs to.
pub trait SeatLookup: Send + Sync {
    fn seat_of(&self, ip: IpAddr) -> Option<Mac>;
}

/// The server's neighbour table (`/proc/net/arp`) on the LAN interface: every thin client
/// that talks to us over the LAN is in it, in full and in proxy DHCP mode alike. A host
/// behind another interface of the server (an uplink, the guests' own bridge) is no seat,
/// whatever its MAC.
pub struct Neighbours {
    /// `server.interface`.
    pub interface: String,
}

impl SeatLookup for Neighbours {
    fn seat_of(&self, ip: IpAddr) -> Option<Mac> {
        let IpAddr::V4(v4) = ip else { return None };
        let table = std::fs::read_to_string("/proc/net/arp").ok()?;
        parse_arp(&table, v4, &self.interface)
    }
}

/// Finds `ip` on `device` in the text of /proc/net/arp: complete entries only (flag
/// ATF_COM, 0x2), permanent ones (ATF_PERM, 0x4: `ip neigh add ... nud permanent`, the
/// usual guard against ARP spoofing) included.
fn parse_arp(table: &str, ip: std::net::Ipv4Addr, device: &str) -> Option<Mac> {
    const ATF_COM: u32 = 0x2;
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let flags = f
            .get(2)
            .and_then(|x| u32::from_str_radix(x.trim_start_matches("0x"), 16).ok())
            .unwrap_or(0);
        if f.len() >= 6 && f[0].parse().ok() == Some(ip) && flags & ATF_COM != 0 && f[5] == device {
            f[3].parse().ok()
        } else {
            None
        }
    })
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    guest: String,
    /// The seat's MAC; a seat may only name itself. The admin may name any seat.
    seat: Option<String>,
    /// The key of the seat's running session of this guest, to reattach to it.
    key: Option<String>,
    /// The seat's monitor (its preferred mode): a new VNC guest starts at that size.
    screen: Option<dispatch::ScreenSize>,
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

    fn dispatcher(&self) -> Result<&Arc<dyn Sessions>, Reply> {
        self.dispatcher.as_ref().ok_or_else(|| {
            error(
                503,
                "this server runs no guests (no [[guest]] in its config)",
            )
        })
    }

    async fn list(&self, peer: IpAddr, auth: Option<&str>) -> Reply {
        match self.scope(peer, auth).await {
            Ok((d, seat)) => reply(200, json!(d.list(seat).await)),
            Err(r) => r,
        }
    }

    async fn create(&self, peer: IpAddr, auth: Option<&str>, body: &[u8]) -> Reply {
        let d = match self.dispatcher() {
            Ok(d) => d,
            Err(r) => return r,
        };
        let req: CreateBody = match serde_json::from_slice(body) {
            Ok(b) => b,
            Err(e) => {
                return error(
                    400,
                    format!(
                    "the body must be JSON like {{\"guest\": \"NAME\", \"seat\": \"MAC\"}}: {e}"
                ),
                )
            }
        };
        let named: Option<Mac> = match req.seat.as_deref().map(str::parse::<Mac>) {
            None => None,
            Some(Ok(m)) => Some(m),
            Some(Err(())) => {
                return error(
                    400,
                    format!(
                        "seat {:?} is not a MAC address",
                        req.seat.unwrap_or_default()
                    ),
                )
            }
        };
        let caller = self.caller(peer, auth).await;
        let seat = match (caller, named) {
            (Caller::Admin, Some(m)) => m,
            (Caller::Admin, None) => return error(400, "the admin must name the seat"),
            (Caller::Seat(m), None) => m,
            (Caller::Seat(m), Some(n)) if m == n => m,
            (Caller::Seat(m), Some(n)) => {
                warn!(ip = %peer, mac = %m, claimed = %n, "a seat asked for another seat's session");
                return error(403, format!("this client is seat {m}, not {n}"));
            }
            (Caller::Guest, _) => return guest_caller(peer),
            (Caller::Unknown, _) => return unknown_caller(peer),
        };
        if caller != Caller::Admin {
            if let Err(r) = self.may_open_kept_disk(seat, peer, &req.guest) {
                return r;
            }
        }
        let running = d
            .list(Some(seat))
            .await
            .iter()
            .any(|s| s.guest == req.guest);
        // On its own task: a connection dropped mid-start (client gone, or vdd stopping
        // and aborting connections) must not drop a half-started VM on the floor; the
        // dispatcher sees the start through and stops the VM if nobody wants it.
        let create = {
            let (d, guest, key, screen) =
                (d.clone(), req.guest.clone(), req.key.clone(), req.screen);
            let admin = caller == Caller::Admin;
            tokio::spawn(async move {
                let who = if admin {
                    Who::Admin
                } else {
                    Who::Seat {
                        mac: seat,
                        key: key.as_deref(),
                    }
                };
                d.create(seat, &guest, screen, who).await
            })
        };
        let created = match create.await {
            Ok(r) => r,
            Err(e) => return error(500, format!("starting the session failed: {e}")),
        };
        match created {
            Ok(s) => {
                info!(session = %s.id, mac = %seat, ip = %peer, guest = %s.guest, "session handed out");
                let what = format!("{} {}", s.guest, s.id);
                self.hub
                    .stage(seat, Stage::SessionStarted, Some(what.clone()));
                if s.state == vdd_api::SessionState::Ready {
                    self.hub.stage(seat, Stage::SessionReady, Some(what));
                }
                reply(if running { 200 } else { 201 }, json!(s))
            }
            Err(e) => dispatch_error(e),
        }
    }

    /// The dispatcher and the seat a listing is limited to (`None`: the admin, every
    /// session), or the refusal.
    async fn scope(
        &self,
        peer: IpAddr,
        auth: Option<&str>,
    ) -> Result<(&Arc<dyn Sessions>, Option<Mac>), Reply> {
        let d = self.dispatcher()?;
        match self.caller(peer, auth).await {
            Caller::Admin => Ok((d, None)),
            Caller::Seat(m) => Ok((d, Some(m))),
            Caller::Guest => Err(guest_caller(peer)),
            Caller::Unknown => Err(unknown_caller(peer)),
        }
    }

    /// The dispatcher and who asks for one session (a seat with the key it showed).
    async fn who<'k>(
        &self,
        peer: IpAddr,
        auth: Option<&str>,
        key: Option<&'k str>,
    ) -> Result<(&Arc<dyn Sessions>, Who<'k>), Reply> {
        let d = self.dispatcher()?;
        match self.caller(peer, auth).await {
            Caller::Admin => Ok((d, Who::Admin)),
            Caller::Seat(mac) => Ok((d, Who::Seat { mac, key })),
            Caller::Guest => Err(guest_caller(peer)),
            Caller::Unknown => Err(unknown_caller(peer)),
        }
    }

    /// One session, as POST answered it (without a password): how a thin client sees an
    /// X11 session go from "starting" to "ready" or "failed". A seat's GET also tells the
    /// dispatcher the seat is still there.
    async fn get(&self, peer: IpAddr, auth: Option<&str>, key: Option<&str>, id: &str) -> Reply {
        let (d, who) = match self.who(peer, auth, key).await {
            Ok(x) => x,
            Err(r) => return r,
        };
        match d.get(id, who).await {
            Ok(s) => {
                // An X11 session turns ready while its seat polls it: the seat's first
                // GET that finds it ready is the stage (repeats of one detail are no news).
                if let (Who::Seat { mac, .. }, vdd_api::SessionState::Ready) = (who, s.state) {
                    self.hub.stage(
                        mac,
                        Stage::SessionReady,
                        Some(format!("{} {}", s.guest, s.id)),
                    );
                }
                reply(200, json!(s))
            }
            Err(e) => dispatch_error(e),
        }
    }

    async fn end(&self, peer: IpAddr, auth: Option<&str>, key: Option<&str>, id: &str) -> Reply {
        let (d, who) = match self.who(peer, auth, key).await {
            Ok(x) => x,
            Err(r) => return r,
        };
        let known = d.get(id, who).await.ok();
        match d.end(id, who).await {
            Ok(()) => {
                if let Some(s) = known {
                    if let Ok(m) = s.seat.parse::<Mac>() {
                        let what = format!("{} {}", s.guest, s.id);
                        self.hub.stage(m, Stage::SessionEnded, Some(what));
                    }
                }
                Reply {
                    status: 204,
                    body: Vec::new(),
                }
            }
            Err(e) => dispatch_error(e),
        }
    }

    /// A fresh one-time VNC password (it replaces the one before, and expires unused).
    async fn password(
        &self,
        peer: IpAddr,
        auth: Option<&str>,
        key: Option<&str>,
        id: &str,
    ) -> Reply {
        let (d, who) = match self.who(peer, auth, key).await {
            Ok(x) => x,
            Err(r) => return r,
        };
        match d.password(id, who).await {
            Ok(s) => reply(200, json!(s)),
            Err(e) => dispatch_error(e),
        }
    }

    async fn reset(&self, peer: IpAddr, auth: Option<&str>, key: Option<&str>, id: &str) -> Reply {
        let (d, who) = match self.who(peer, auth, key).await {
            Ok(x) => x,
            Err(r) => return r,
        };
        match d.reset(id, who).await {
            Ok(s) => {
                if let Ok(m) = s.seat.parse::<Mac>() {
                    let what = format!("{} {}", s.guest, s.id);
                    self.hub.stage(m, Stage::SessionStarted, Some(what.clone()));
                    if s.state == vdd_api::SessionState::Ready {
                        self.hub.stage(m, Stage::SessionReady, Some(what));
                    }
                }
                reply(200, json!(s))
            }
            Err(e) => dispatch_error(e),
        }
    }
}

impl Api {
    /// A `persist = true` guest keeps a disk per seat, keyed on the seat's MAC. A MAC is
    /// easy to clone, so a seat reaches its kept disk only from the address the admin
    /// reserved for it (`[[dhcp.host]] address`): a LAN host that clones a seat's MAC but
    /// keeps its own address is refused. (One that takes the seat's address too while the
    /// seat is off is that seat as far as any server can tell: switch port security is
    /// the measure there; see README's security section.) The admin is not asked.
    fn may_open_kept_disk(&self, seat: Mac, peer: IpAddr, guest: &str) -> Result<(), Reply> {
        let cfg = self.cfg.get();
        let Some(g) = cfg.guests.iter().find(|g| g.name == guest) else {
            return Ok(()); // The dispatcher answers an unknown guest.
        };
        if !g.persist {
            return Ok(());
        }
        let reserved = cfg.host(&seat).and_then(|h| h.address);
        match reserved {
            Some(ip) if IpAddr::V4(ip) == peer.to_canonical() => Ok(()),
            Some(ip) => {
                warn!(%peer, mac = %seat, reserved = %ip, guest, "a kept disk was asked for from another address than the seat's reservation (a cloned MAC?); refused");
                Err(error(
                    403,
                    format!("{} keeps a disk per seat; seat {seat} has address {ip} reserved, and this request came from {peer}", g.label),
                ))
            }
            None => {
                warn!(%peer, mac = %seat, guest, "a kept disk was asked for by a seat without a reserved address; refused");
                Err(error(
                    403,
                    format!("{} keeps a disk per seat, which needs a reserved address for the seat: ask the admin to add [[dhcp.host]] mac = \"{seat}\" with an address", g.label),
                ))
            }
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

fn dispatch_error(e: dispatch::Error) -> Reply {
    use dispatch::Error as E;
    let status = match &e {
        E::UnknownGuest(_) | E::NotFound(_) => 404,
        E::NotYours(_) | E::WrongKey(_) => 403,
        E::NoPassword(_) => 409,
        E::Full(_) | E::HostDown { .. } => 503,
        E::MissingImage { .. }
        | E::Spawn { .. }
        | E::ToolFailed { .. }
        | E::State(..)
        | E::VmExited(..)
        | E::Qmp(_)
        | E::QmpNeverUp
        | E::NoLan(_)
        | E::Lan(_)
        | E::TapFilter(_)
        | E::Reserve(_)
        | E::Restore(..)
        | E::Host { .. } => 500,
    };
    // With its causes: the admin (and the seat's screen) must see the errno.
    let message = dispatch::report(&e);
    if status == 500 {
        tracing::error!("{message}");
    }
    error(status, message)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn arp_table() {
        let t = "IP address       HW type     Flags       HW address            Mask     Device\n\
                 10.77.0.50       0x1         0x2         52:54:00:e2:e0:01     *        br0\n\
                 10.77.0.51       0x1         0x0         00:00:00:00:00:00     *        br0\n\
                 10.77.0.53       0x1         0x6         52:54:00:e2:e0:03     *        br0\n\
                 10.1.0.9         0x1         0x2         52:54:00:e2:e0:09     *        eth1\n";
        let parse_arp = |t, ip| super::parse_arp(t, ip, "br0");
        assert_eq!(
            parse_arp(t, Ipv4Addr::new(10, 77, 0, 50)),
            Some("52:54:00:e2:e0:01".parse().unwrap())
        );
        assert_eq!(
            parse_arp(t, Ipv4Addr::new(10, 77, 0, 51)),
            None,
            "incomplete entry"
        );
        assert_eq!(parse_arp(t, Ipv4Addr::new(10, 77, 0, 52)), None);
        assert_eq!(
            parse_arp(t, Ipv4Addr::new(10, 77, 0, 53)),
            Some("52:54:00:e2:e0:03".parse().unwrap()),
            "a static (permanent) entry is a seat too"
        );
        assert_eq!(
            parse_arp(t, Ipv4Addr::new(10, 1, 0, 9)),
            None,
            "a neighbour on another interface is no seat"
        );
    }

    #[test]
    fn token_compare() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
