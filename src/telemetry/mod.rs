//! What vdd observes of its seats for the admin: every seat's boots as timelines of
//! stages ([`boots`]), the recent log events about seats and sessions ([`events`]), and
//! the counters of `/metrics` (`crate::metrics`). The [`Hub`] holds all three; every
//! service gets a clone and tells it what it sees, in typed calls (a stage is a
//! `vdd_api::Stage`, never a log message to parse).
//!
//! The services know a seat by what their protocol gives them: DHCP by MAC, TFTP, HTTP
//! and NBD by address. Addresses are mapped to MACs by the DHCP ACKs the hub saw, then by
//! the server's neighbour table.

pub mod boots;
pub mod events;

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use dhcproto::v4::{DhcpOption, MessageType, OptionCode};
use vdd_api::{BootReport, Firmware, Stage, DHCP_CLASS};

use crate::config::Mac;
use crate::dhcp::codec::Packet;
use crate::dhcp::policy::Event;
use crate::metrics::{KindLabel, Metrics, ResultLabel, StageLabel, TypeLabel};
use boots::{ReportError, Seats, Seen};
use events::Events;

/// Milliseconds since the Unix epoch: the timelines' clock.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Maps an address to the seat that has it (the server's neighbour table).
pub type Neighbours = Arc<dyn crate::http::api::SeatLookup>;

/// The shared observer: seats' boots, recent events, metrics. Cheap to clone.
#[derive(Clone, Default)]
pub struct Hub(Arc<Inner>);

#[derive(Default)]
struct Inner {
    metrics: Metrics,
    seats: Mutex<Seats>,
    events: Arc<Events>,
    tftp: OnceLock<Arc<crate::tftp::Metrics>>,
    neighbours: OnceLock<Neighbours>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hub")
    }
}

impl Hub {
    /// A hub whose recent events are `events` (the ring the log's layer fills).
    pub fn new(events: Arc<Events>) -> Hub {
        Hub(Arc::new(Inner {
            events,
            ..Inner::default()
        }))
    }

    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    pub fn events(&self) -> &Events {
        &self.0.events
    }

    /// The seats, locked: read them and let go.
    pub fn seats(&self) -> MutexGuard<'_, Seats> {
        self.0.seats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where addresses no DHCP ACK explained are looked up.
    pub fn set_neighbours(&self, n: Neighbours) {
        let _ = self.0.neighbours.set(n);
    }

    /// The TFTP service's own counters (transfers in flight).
    pub fn watch_tftp(&self, m: Arc<crate::tftp::Metrics>) {
        let _ = self.0.tftp.set(m);
    }

    /// TFTP transfers running now.
    pub fn tftp_in_flight(&self) -> usize {
        self.0
            .tftp
            .get()
            .map_or(0, |t| t.active.load(Ordering::Relaxed))
    }

    /// The seat with address `ip`.
    pub fn seat_of(&self, ip: IpAddr) -> Option<Mac> {
        let IpAddr::V4(v4) = ip.to_canonical() else {
            return None;
        };
        if let Some(m) = self.seats().mac_of(v4) {
            return Some(m);
        }
        let mac = self.0.neighbours.get()?.seat_of(ip)?;
        self.seats().learn_ip(mac, v4, now_ms());
        Some(mac)
    }

    fn record(&self, mac: Mac, seen: Seen) {
        let stage = seen.stage;
        let mut seats = self.seats();
        let since = seats.record(mac, seen);
        self.0.metrics.seats.set(seats.len() as i64);
        drop(seats);
        self.observe(stage, since);
    }

    fn observe(&self, stage: Stage, since_ms: Option<u64>) {
        if let Some(ms) = since_ms {
            self.0
                .metrics
                .boot_stage
                .get_or_create(&StageLabel {
                    stage: stage.as_str(),
                })
                .observe(ms as f64 / 1000.0);
        }
    }

    /// A stage of seat `mac` seen now.
    pub fn stage(&self, mac: Mac, stage: Stage, detail: Option<String>) {
        self.record(
            mac,
            Seen {
                stage,
                firmware: None,
                detail,
                at_ms: now_ms(),
            },
        );
    }

    /// A stage of whichever seat has address `ip` (nothing when none has).
    pub fn stage_at(&self, ip: IpAddr, stage: Stage, detail: Option<String>) {
        if let Some(mac) = self.seat_of(ip) {
            self.stage(mac, stage, detail);
        }
    }

    /// A DHCP request decoded (before any policy): counted by type.
    pub fn dhcp_received(&self, p: &Packet) {
        let t = match p.kind {
            MessageType::Discover => "discover",
            MessageType::Request => "request",
            MessageType::Decline => "decline",
            MessageType::Release => "release",
            MessageType::Inform => "inform",
            _ => "other",
        };
        self.0
            .metrics
            .dhcp_packets
            .get_or_create(&TypeLabel { r#type: t })
            .inc();
    }

    /// What the DHCP policy decided for `p`: offers, ACKs and NAKs counted; a boot
    /// firmware's (or boot-menu's) DISCOVER and ACK recorded as stages of its seat.
    pub fn dhcp_decided(&self, p: &Packet, events: &[Event]) {
        let m = &self.0.metrics;
        let fw = firmware(p);
        let at = now_ms();
        if p.kind == MessageType::Discover && fw != Firmware::Other {
            self.record(
                p.mac,
                Seen {
                    stage: Stage::DhcpDiscover,
                    firmware: Some(fw),
                    detail: Some(fw.as_str().into()),
                    at_ms: at,
                },
            );
        }
        for e in events {
            let acked = match e {
                Event::Offered(_) | Event::ProxyOffer => {
                    m.dhcp_offers.inc();
                    continue;
                }
                Event::Nak(..) => {
                    m.dhcp_naks.inc();
                    continue;
                }
                Event::Acked(ip) => Some(*ip),
                Event::ProxyAck => None,
                _ => continue,
            };
            m.dhcp_acks.inc();
            if let Some(ip) = acked.filter(|ip| !ip.is_unspecified()) {
                self.seats().learn_ip(p.mac, ip, at);
            }
            if fw != Firmware::Other {
                let detail = match acked {
                    Some(ip) => format!("{fw} {ip}"),
                    None => fw.to_string(),
                };
                self.record(
                    p.mac,
                    Seen {
                        stage: Stage::DhcpAck,
                        firmware: Some(fw),
                        detail: Some(detail),
                        at_ms: at,
                    },
                );
            }
        }
    }

    /// A TFTP transfer completed.
    pub fn tftp_done(&self, peer: IpAddr, file: &str, bytes: u64) {
        let m = &self.0.metrics;
        m.tftp_transfers.inc();
        m.tftp_bytes.inc_by(bytes);
        self.stage_at(peer, Stage::TftpBootFile, Some(file.to_string()));
    }

    /// An HTTP body sent in full: `kind` is script, kernel, initrd or file.
    pub fn http_sent(&self, kind: &'static str, bytes: u64) {
        let m = &self.0.metrics;
        m.http_transfers.get_or_create(&KindLabel { kind }).inc();
        m.http_bytes.inc_by(bytes);
    }

    /// A boot stage over HTTP: the seat is the MAC in the URL when there is one (iPXE
    /// puts it in the script's), else the one with the address.
    pub fn http_stage(&self, peer: IpAddr, mac: Option<Mac>, stage: Stage) {
        match mac {
            Some(m) => {
                if let IpAddr::V4(v4) = peer.to_canonical() {
                    self.seats().learn_ip(m, v4, now_ms());
                }
                self.stage(m, stage, None)
            }
            None => self.stage_at(peer, stage, None),
        }
    }

    /// A file body is on its way; the gauge goes down when the guard drops.
    pub fn http_in_flight(&self) -> InFlight {
        self.0.metrics.http_in_flight.inc();
        InFlight(self.clone())
    }

    /// An NBD connection got its export.
    pub fn nbd_opened(&self, peer: IpAddr, export: &str) {
        let m = &self.0.metrics;
        m.nbd_connections_total.inc();
        m.nbd_connections.inc();
        self.stage_at(peer, Stage::NbdConnected, Some(export.to_string()));
    }

    /// An NBD connection that [`Hub::nbd_opened`] counted has closed.
    pub fn nbd_closed(&self) {
        self.0.metrics.nbd_connections.dec();
    }

    /// Bytes an NBD client read (`read`) or wrote.
    pub fn nbd_bytes(&self, read: bool, n: u64) {
        let m = &self.0.metrics;
        if read {
            m.nbd_read.inc_by(n);
        } else {
            m.nbd_written.inc_by(n);
        }
    }

    /// An API request answered.
    pub fn api_request(&self, route: &'static str, status: u16) {
        self.0
            .metrics
            .api_requests
            .get_or_create(&crate::metrics::RequestLabels { route, status })
            .inc();
    }

    /// A thin client's report of its own stages (the caller checked it is that seat).
    pub fn client_report(&self, mac: Mac, r: &BootReport) -> Result<(), ReportError> {
        let res = self.seats().report(mac, r, now_ms());
        let result = if res.is_ok() { "accepted" } else { "refused" };
        self.0
            .metrics
            .boot_reports
            .get_or_create(&ResultLabel { result })
            .inc();
        for (stage, since) in res? {
            self.observe(stage, since);
        }
        Ok(())
    }

    /// Brings the gauges that are states up to date, then writes every metric
    /// (OpenMetrics text).
    pub async fn gather(
        &self,
        sessions: Option<&Arc<dyn crate::dispatch::Sessions>>,
        leases: Option<&crate::dhcp::Leases>,
        pool: Option<usize>,
    ) -> String {
        let m = &self.0.metrics;
        if let Some(t) = self.0.tftp.get() {
            m.tftp_in_flight
                .set(t.active.load(Ordering::Relaxed) as i64);
        }
        if let Some(p) = pool {
            m.dhcp_pool.set(p as i64);
        }
        if let Some(n) = match leases {
            Some(l) => l.active().await,
            None => None,
        } {
            m.dhcp_in_use.set(n as i64);
        }
        if let Some(d) = sessions {
            let u = d.usage().await;
            m.vms.set(u.vms as i64);
            m.vms_starting.set(u.starting as i64);
            m.vm_slots.set(u.max_vms as i64);
            m.guest_memory.set((u.memory_mib << 20) as i64);
            m.guest_memory_budget
                .set((u.memory_budget_mib << 20) as i64);
            m.warm_vms.set(u.warm as i64);
            m.warm_vms_ready.set(u.warm_up as i64);
            for (guest, c) in &u.starts {
                let n = |result| crate::metrics::GuestResult {
                    guest: guest.clone(),
                    result,
                };
                for (family, result, total) in [
                    (&m.warm_picks, "hit", c.warm_hits),
                    (&m.warm_picks, "miss", c.warm_misses),
                    (&m.vm_starts, "boot", c.boots),
                    (&m.vm_starts, "saved", c.saved_starts),
                    (&m.vm_starts, "saved_failed", c.saved_fallbacks),
                ] {
                    crate::metrics::catch_up(&family.get_or_create(&n(result)), total);
                }
            }
            // Counted afresh: a guest without sessions now has no series, not its last.
            m.sessions.clear();
            let mut all = d.list(None).await;
            all.extend(d.failed().await);
            for s in all {
                m.sessions
                    .get_or_create(&crate::metrics::SessionLabels {
                        guest: s.guest,
                        state: s.state.as_str(),
                    })
                    .inc();
            }
        }
        m.seats.set(self.seats().len() as i64);
        m.openmetrics()
    }
}

/// The firmware a DHCP request came from, by its options: iPXE says so (77, 175);
/// boot-menu sends its class (60); a PXE ROM says `PXEClient` (60) and its architecture
/// (93): 0 is a BIOS, the rest UEFI.
pub fn firmware(p: &Packet) -> Firmware {
    if p.fw.ipxe {
        return Firmware::Ipxe;
    }
    if let Some(DhcpOption::ClassIdentifier(c)) = p.msg.opts().get(OptionCode::ClassIdentifier) {
        if c.as_slice() == DHCP_CLASS.as_bytes() {
            return Firmware::Client;
        }
    }
    match (p.pxe, p.fw.arch) {
        (true, None | Some(0)) | (false, Some(0)) => Firmware::Bios,
        (_, Some(_)) => Firmware::Uefi,
        (false, None) => Firmware::Other,
    }
}

/// An HTTP body in flight (see [`Hub::http_in_flight`]).
pub struct InFlight(Hub);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0 .0.metrics.http_in_flight.dec();
    }
}
