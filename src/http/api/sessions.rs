//! The session routes (`/api/v1/sessions...`): list, create, get, end, reset, a fresh
//! VNC password; who may reach a session, a kept disk's address check, and the
//! dispatcher's errors as replies.

use std::net::IpAddr;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::json;
use tracing::{info, warn};

use crate::config::Mac;
use crate::dispatch::{self, Sessions, Who};
use vdd_api::Stage;

use super::{error, guest_caller, reply, unknown_caller, Api, Caller, Reply};

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

impl Api {
    fn dispatcher(&self) -> Result<&Arc<dyn Sessions>, Reply> {
        self.dispatcher.as_ref().ok_or_else(|| {
            error(
                503,
                "this server runs no guests (no [[guest]] in its config)",
            )
        })
    }

    pub(super) async fn list(&self, peer: IpAddr, auth: Option<&str>) -> Reply {
        match self.scope(peer, auth).await {
            Ok((d, seat)) => reply(200, json!(d.list(seat).await)),
            Err(r) => r,
        }
    }

    pub(super) async fn create(&self, peer: IpAddr, auth: Option<&str>, body: &[u8]) -> Reply {
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
    pub(super) async fn get(
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

    pub(super) async fn end(
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
    pub(super) async fn password(
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

    pub(super) async fn reset(
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
