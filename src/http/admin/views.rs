//! The panel's JSON: the room (a row per seat), the sessions, a seat's boots, the
//! server. Built from the dispatcher, the telemetry hub, the config and the leases; the
//! page does the rest (ages, percentages of budgets, colours).

use std::collections::BTreeMap;
use std::time::Instant;

use serde_json::{json, Value};
use vdd_api::Stage;

use super::{unix_now, Panel};
use crate::config::Mac;
use crate::dispatch::SessionInfo;
use crate::metrics::KindLabel;
use crate::telemetry::boots::{Seat, StageAt};
use crate::telemetry::events::LogEvent;
use crate::telemetry::now_ms;

/// Events shown on the server page, and on a seat's.
const EVENTS_SHOWN: usize = 200;

fn stage_json(s: &StageAt) -> Value {
    json!({
        "stage": s.stage,
        "label": s.stage.label(),
        "at_ms": s.at_ms,
        "uptime_ms": s.uptime_ms,
        "detail": s.detail,
    })
}

impl Panel {
    async fn sessions(&self) -> (Vec<SessionInfo>, Vec<SessionInfo>) {
        match &self.api.dispatcher {
            Some(d) => (d.list(None).await, d.failed().await),
            None => (Vec::new(), Vec::new()),
        }
    }

    fn hostname(&self, mac: &Mac) -> Option<String> {
        self.api
            .cfg
            .get()
            .host(mac)
            .and_then(|h| h.hostname.clone())
    }

    /// The sessions with what their VMs cost: resident memory, and CPU % since the
    /// previous poll (of any browser).
    async fn session_rows(&self, running: &[SessionInfo], failed: &[SessionInfo]) -> Vec<Value> {
        let usage: BTreeMap<String, crate::dispatch::VmUsage> = match &self.api.dispatcher {
            Some(d) => d.vm_usage().await.into_iter().collect(),
            None => BTreeMap::new(),
        };
        let now = Instant::now();
        let mut cpu = self.cpu.lock().unwrap_or_else(|p| p.into_inner());
        cpu.retain(|id, _| usage.contains_key(id));
        let mut rows = Vec::new();
        let cfg = self.api.cfg.get();
        for s in running.iter().chain(failed) {
            let u = usage.get(&s.id);
            let percent = u.and_then(|u| {
                let before = cpu.insert(s.id.clone(), (u.cpu_seconds, now));
                let (c0, t0) = before?;
                let dt = now.duration_since(t0).as_secs_f64();
                (dt >= 0.5).then(|| ((u.cpu_seconds - c0) / dt * 100.0).max(0.0))
            });
            let guest = cfg.guests.iter().find(|g| g.name == s.guest);
            let seat: Option<Mac> = s.seat.parse().ok();
            rows.push(json!({
                "id": s.id,
                "seat": s.seat,
                "seat_name": seat.and_then(|m| self.hostname(&m)),
                "guest": s.guest,
                "guest_label": guest.map(|g| g.label.clone()),
                "protocol": s.protocol,
                "state": s.state,
                "started": s.started,
                "error": s.error,
                "memory_mib": guest.map(|g| g.memory_mib),
                "rss_bytes": u.map(|u| u.rss_bytes),
                "cpu_seconds": u.map(|u| u.cpu_seconds),
                "cpu_percent": percent,
            }));
        }
        // Screens of sessions gone are no longer kept.
        let live: Vec<String> = running.iter().map(|s| s.id.clone()).collect();
        self.screens.retain(&live);
        rows
    }

    fn seat_row(&self, mac: Mac, seat: Option<&Seat>, sessions: &[SessionInfo]) -> Value {
        let own: Vec<Value> = sessions
            .iter()
            .filter(|s| s.seat == mac.to_string())
            .map(
                |s| json!({"id": s.id, "guest": s.guest, "state": s.state, "protocol": s.protocol}),
            )
            .collect();
        let reserved = self.api.cfg.get().host(&mac).and_then(|h| h.address);
        json!({
            "mac": mac,
            "ip": seat.and_then(|s| s.ip).or(reserved),
            "hostname": self.hostname(&mac),
            "firmware": seat.and_then(|s| s.current()).map(|b| b.firmware.clone()).unwrap_or_default(),
            "stage": seat.and_then(|s| s.stage_now()).map(stage_json),
            "boot_started_ms": seat.and_then(|s| s.current()).map(|b| b.started_ms),
            "last_seen_ms": seat.map(|s| s.last_seen_ms),
            "boots": seat.map_or(0, |s| s.boots.len()),
            "sessions": own,
        })
    }

    /// `/admin/api/state`: everything the room and the sessions pages show.
    pub(super) async fn state_json(&self, csrf: &str) -> Value {
        let (running, failed) = self.sessions().await;
        let mut macs: Vec<Mac> = running.iter().filter_map(|s| s.seat.parse().ok()).collect();
        let rows = {
            let seats = self.api.hub.seats();
            macs.extend(seats.iter().map(|s| s.mac));
            macs.sort();
            macs.dedup();
            macs.iter()
                .map(|m| self.seat_row(*m, seats.get(m), &running))
                .collect::<Vec<_>>()
        };
        let sessions = self.session_rows(&running, &failed).await;
        let usage = match &self.api.dispatcher {
            Some(d) => Some(d.usage().await),
            None => None,
        };
        let guests: Vec<Value> = self
            .api
            .cfg
            .get()
            .guests
            .iter()
            .map(|g| json!({"name": g.name, "label": g.label, "display": g.display.as_str()}))
            .collect();
        json!({
            "now_ms": now_ms(),
            "now": unix_now(),
            "csrf": csrf,
            "guests": guests,
            "seats": rows,
            "sessions": sessions,
            "usage": usage,
        })
    }

    /// `/admin/api/seat/MAC`: the seat's boots (newest first), its sessions, its events.
    pub(super) async fn seat_json(&self, mac: Mac) -> Value {
        let (running, _) = self.sessions().await;
        let (row, boots, ips) = {
            let seats = self.api.hub.seats();
            let seat = seats.get(&mac);
            let boots: Vec<Value> = seat
                .map(|s| {
                    s.boots
                        .iter()
                        .rev()
                        .map(|b| {
                            json!({
                                "started_ms": b.started_ms,
                                "firmware": b.firmware,
                                "dropped": b.dropped,
                                "stages": b.stages.iter().map(stage_json).collect::<Vec<_>>(),
                            })
                        })
                        .collect()
                })
                .unwrap_or_default();
            (
                self.seat_row(mac, seat, &running),
                boots,
                seat.and_then(|s| s.ip).into_iter().collect::<Vec<_>>(),
            )
        };
        let events = self.events(Some((mac, ips)), EVENTS_SHOWN);
        json!({
            "now_ms": now_ms(),
            "seat": row,
            "boots": boots,
            "events": events,
            "stages": Stage::ALL.iter().map(|s| json!({"stage": s, "label": s.label(), "client": s.reported_by_client()})).collect::<Vec<_>>(),
        })
    }

    /// The recent events, all or one seat's (by its MAC, or an address it had).
    fn events(&self, seat: Option<(Mac, Vec<std::net::Ipv4Addr>)>, limit: usize) -> Vec<LogEvent> {
        self.api.hub.events().recent(limit, |e| match &seat {
            None => true,
            Some((mac, ips)) => {
                e.mac.as_deref() == Some(mac.to_string().as_str())
                    || e.ip
                        .is_some_and(|ip| ips.iter().any(|i| std::net::IpAddr::V4(*i) == ip))
            }
        })
    }

    /// `/admin/api/server`: the pool and its leases, the transfers, the VMs, the events.
    pub(super) async fn server_json(&self, seat: Option<Mac>) -> Value {
        let cfg = self.api.cfg.get();
        let m = self.api.hub.metrics();
        let leases: Vec<Value> = match crate::dhcp::leases::read_table(&cfg.server.state_dir) {
            Ok(t) => {
                let now = crate::dhcp::unix_now();
                t.all()
                    .into_iter()
                    .filter(|l| l.active(now))
                    .take(1000)
                    .map(|l| {
                        json!({
                            "ip": l.ip,
                            "mac": l.mac,
                            "hostname": l.mac.and_then(|m| self.hostname(&m)),
                            "state": format!("{:?}", l.state).to_lowercase(),
                            "expires_in": l.until.saturating_sub(now),
                        })
                    })
                    .collect()
            }
            Err(_) => Vec::new(),
        };
        let active = match &self.api.leases {
            Some(l) => l.active().await,
            None => None,
        };
        let usage = match &self.api.dispatcher {
            Some(d) => Some(d.usage().await),
            None => None,
        };
        let http_transfers: u64 = ["script", "kernel", "initrd", "file"]
            .iter()
            .map(|k| m.http_transfers.get_or_create(&KindLabel { kind: k }).get())
            .sum();
        let ips = seat.map(|mac| {
            let seats = self.api.hub.seats();
            (
                mac,
                seats.get(&mac).and_then(|s| s.ip).into_iter().collect(),
            )
        });
        let seats = self.api.hub.seats();
        json!({
            "now_ms": now_ms(),
            "dhcp": {
                "mode": format!("{:?}", cfg.dhcp.mode).to_lowercase(),
                "pool": cfg.dhcp.pool.map(|p| json!({"first": p.first, "last": p.last, "size": p.len()})),
                "active": active,
                "leases": leases,
                "offers": m.dhcp_offers.get(),
                "acks": m.dhcp_acks.get(),
                "naks": m.dhcp_naks.get(),
            },
            "tftp": {
                "in_flight": self.api.hub.tftp_in_flight(),
                "transfers": m.tftp_transfers.get(),
                "bytes": m.tftp_bytes.get(),
            },
            "http": {
                "in_flight": m.http_in_flight.get(),
                "transfers": http_transfers,
                "bytes": m.http_bytes.get(),
            },
            "nbd": {
                "connections": m.nbd_connections.get(),
                "opened": m.nbd_connections_total.get(),
                "read_bytes": m.nbd_read.get(),
                "written_bytes": m.nbd_written.get(),
            },
            "vms": usage,
            "seats": {"kept": seats.len(), "cap": seats.cap()},
            "events": self.events(ips, EVENTS_SHOWN),
        })
    }
}
