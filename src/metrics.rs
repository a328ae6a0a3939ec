//! `/metrics`: vdd's counters and gauges in the Prometheus text formats, with the
//! Prometheus project's own client crate (`prometheus-client`).
//!
//! Names follow Prometheus' conventions: the `vdd_` prefix, base units (bytes, seconds)
//! named in the metric, `_total` on counters (the crate adds it, and the unit, itself).
//! Counters are counted where things happen (the services hold clones: an atomic add
//! each); what is a state (pool use, sessions, VMs, memory) is read when scraped.
//!
//! The crate writes OpenMetrics text, which Prometheus asks for (`Accept:
//! application/openmetrics-text`). Anyone else gets the classic text format 0.0.4
//! ([`classic`]), which `promtool check metrics` and older scrapers read.
//!
//! Who may read: the admin only (`Authorization: Bearer [http] admin_token`, or the
//! panel's login), on vdd's one HTTP port. A listen address of its own would be a
//! second open port and a second config key for one small page, and on the LAN address
//! it would still need a secret; Prometheus sends a bearer token with
//! `authorization: {credentials_file: ...}` in its scrape config.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// A label set of one `&'static str` label, named by the field.
macro_rules! label {
    ($name:ident, $field:ident) => {
        #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
        pub struct $name {
            pub $field: &'static str,
        }
    };
}
label!(TypeLabel, r#type);
label!(KindLabel, kind);
label!(StageLabel, stage);
label!(ResultLabel, result);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SessionLabels {
    pub guest: String,
    pub state: &'static str,
}

/// A guest and what happened (a warm pick's `hit` or `miss`; a VM's start: `boot`,
/// `saved`, `saved_failed`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GuestResult {
    pub guest: String,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The route's pattern (`/api/v1/sessions/{id}`), never the path itself: ids and
    /// MACs would make a series per session.
    pub route: &'static str,
    pub status: u16,
}

/// The buckets of a boot stage's duration: 50 ms to about 7 minutes. A stage takes from
/// milliseconds (DHCP ACK after DISCOVER) to minutes (an old PC's kernel under TCG).
fn stage_buckets() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.05, 2.0, 14,
    ))
}

/// Every metric of vdd, registered once; clones of its counters go to the services.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub dhcp_packets: Family<TypeLabel, Counter>,
    pub dhcp_offers: Counter,
    pub dhcp_acks: Counter,
    pub dhcp_naks: Counter,
    pub dhcp_pool: Gauge,
    pub dhcp_in_use: Gauge,
    pub tftp_bytes: Counter,
    pub tftp_transfers: Counter,
    pub tftp_in_flight: Gauge,
    pub http_bytes: Counter,
    pub http_transfers: Family<KindLabel, Counter>,
    pub http_in_flight: Gauge,
    pub nbd_connections_total: Counter,
    pub nbd_connections: Gauge,
    pub nbd_read: Counter,
    pub nbd_written: Counter,
    pub sessions: Family<SessionLabels, Gauge>,
    pub vms: Gauge,
    pub vms_starting: Gauge,
    pub vm_slots: Gauge,
    pub guest_memory: Gauge,
    pub guest_memory_budget: Gauge,
    pub warm_picks: Family<GuestResult, Counter>,
    pub vm_starts: Family<GuestResult, Counter>,
    pub warm_vms: Gauge,
    pub warm_vms_ready: Gauge,
    pub api_requests: Family<RequestLabels, Counter>,
    pub boot_stage: Family<StageLabel, Histogram, fn() -> Histogram>,
    pub boot_reports: Family<ResultLabel, Counter>,
    pub seats: Gauge,
    pub panel_logins: Family<ResultLabel, Counter>,
    pub panel_screenshots: Counter,
}

impl Default for Metrics {
    fn default() -> Metrics {
        let m = Metrics {
            registry: Registry::default(),
            dhcp_packets: Family::default(),
            dhcp_offers: Counter::default(),
            dhcp_acks: Counter::default(),
            dhcp_naks: Counter::default(),
            dhcp_pool: Gauge::default(),
            dhcp_in_use: Gauge::default(),
            tftp_bytes: Counter::default(),
            tftp_transfers: Counter::default(),
            tftp_in_flight: Gauge::default(),
            http_bytes: Counter::default(),
            http_transfers: Family::default(),
            http_in_flight: Gauge::default(),
            nbd_connections_total: Counter::default(),
            nbd_connections: Gauge::default(),
            nbd_read: Counter::default(),
            nbd_written: Counter::default(),
            sessions: Family::default(),
            vms: Gauge::default(),
            vms_starting: Gauge::default(),
            vm_slots: Gauge::default(),
            guest_memory: Gauge::default(),
            guest_memory_budget: Gauge::default(),
            warm_picks: Family::default(),
            vm_starts: Family::default(),
            warm_vms: Gauge::default(),
            warm_vms_ready: Gauge::default(),
            api_requests: Family::default(),
            boot_stage: Family::new_with_constructor(stage_buckets),
            boot_reports: Family::default(),
            seats: Gauge::default(),
            panel_logins: Family::default(),
            panel_screenshots: Counter::default(),
        };
        m.register()
    }
}

impl Metrics {
    fn register(mut self) -> Metrics {
        let r = &mut self.registry;
        r.register(
            "vdd_dhcp_received_packets",
            "DHCP requests received and decoded, by message type",
            self.dhcp_packets.clone(),
        );
        r.register(
            "vdd_dhcp_offers",
            "DHCPOFFERs sent (proxy offers included)",
            self.dhcp_offers.clone(),
        );
        r.register(
            "vdd_dhcp_acks",
            "DHCPACKs sent (proxy ACKs included)",
            self.dhcp_acks.clone(),
        );
        r.register("vdd_dhcp_naks", "DHCPNAKs sent", self.dhcp_naks.clone());
        r.register(
            "vdd_dhcp_pool_addresses",
            "Addresses in the DHCP pool (dhcp.pool)",
            self.dhcp_pool.clone(),
        );
        r.register(
            "vdd_dhcp_leased_addresses",
            "Addresses with an active lease",
            self.dhcp_in_use.clone(),
        );
        r.register_with_unit(
            "vdd_tftp_sent",
            "Bytes of completed TFTP transfers",
            Unit::Bytes,
            self.tftp_bytes.clone(),
        );
        r.register(
            "vdd_tftp_transfers",
            "TFTP transfers completed",
            self.tftp_transfers.clone(),
        );
        r.register(
            "vdd_tftp_transfers_in_flight",
            "TFTP transfers running now",
            self.tftp_in_flight.clone(),
        );
        r.register_with_unit(
            "vdd_http_sent",
            "Bytes of HTTP file bodies sent (boot files and /files/)",
            Unit::Bytes,
            self.http_bytes.clone(),
        );
        r.register(
            "vdd_http_transfers",
            "HTTP transfers completed, by what was sent (script, kernel, initrd, file)",
            self.http_transfers.clone(),
        );
        r.register(
            "vdd_http_transfers_in_flight",
            "HTTP file bodies being sent now",
            self.http_in_flight.clone(),
        );
        r.register(
            "vdd_nbd_connections_opened",
            "NBD connections that got an export",
            self.nbd_connections_total.clone(),
        );
        r.register(
            "vdd_nbd_connections",
            "NBD connections open now",
            self.nbd_connections.clone(),
        );
        r.register_with_unit(
            "vdd_nbd_read",
            "Bytes the NBD clients read",
            Unit::Bytes,
            self.nbd_read.clone(),
        );
        r.register_with_unit(
            "vdd_nbd_written",
            "Bytes the NBD clients wrote",
            Unit::Bytes,
            self.nbd_written.clone(),
        );
        r.register(
            "vdd_sessions",
            "Sessions now, by guest and state (failed ones for 5 minutes)",
            self.sessions.clone(),
        );
        r.register("vdd_vms", "Guest VMs running", self.vms.clone());
        r.register(
            "vdd_vms_starting",
            "Guest VMs starting",
            self.vms_starting.clone(),
        );
        r.register(
            "vdd_vm_slots",
            "VMs that may run at once (dispatch.max_vms)",
            self.vm_slots.clone(),
        );
        r.register_with_unit(
            "vdd_guest_memory",
            "Guest memory of the running and starting VMs",
            Unit::Bytes,
            self.guest_memory.clone(),
        );
        r.register_with_unit(
            "vdd_guest_memory_budget",
            "Guest memory all VMs together may use (dispatch.memory_budget)",
            Unit::Bytes,
            self.guest_memory_budget.clone(),
        );
        r.register(
            "vdd_warm_picks",
            "Picks of a guest with a warm pool, by whether a warm VM was there (hit, miss)",
            self.warm_picks.clone(),
        );
        r.register(
            "vdd_vm_starts",
            "VMs started (seats' and warm ones), by how: boot, saved (resumed from the saved state), saved_failed (the state did not load; booted instead)",
            self.vm_starts.clone(),
        );
        r.register(
            "vdd_warm_vms",
            "Warm VMs waiting for a pick ([[guest]] warm)",
            self.warm_vms.clone(),
        );
        r.register(
            "vdd_warm_vms_ready",
            "Warm VMs whose guest is up",
            self.warm_vms_ready.clone(),
        );
        r.register(
            "vdd_api_requests",
            "API requests answered, by route and status",
            self.api_requests.clone(),
        );
        r.register_with_unit(
            "vdd_boot_stage_duration",
            "Time from a seat's previous boot stage to this one, by stage",
            Unit::Seconds,
            self.boot_stage.clone(),
        );
        r.register(
            "vdd_boot_reports",
            "Boot telemetry reports of thin clients, accepted or refused",
            self.boot_reports.clone(),
        );
        r.register(
            "vdd_seats",
            "Seats whose boots vdd keeps a record of",
            self.seats.clone(),
        );
        r.register(
            "vdd_panel_logins",
            "Logins to the admin panel, by result",
            self.panel_logins.clone(),
        );
        r.register(
            "vdd_panel_screenshots",
            "Screens of guest VMs taken for the admin panel",
            self.panel_screenshots.clone(),
        );
        self
    }

    /// The metrics in OpenMetrics text.
    pub fn openmetrics(&self) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &self.registry)
            .expect("writing to a String cannot fail");
        s
    }
}

/// Brings counter `c` up to `total`, a count kept elsewhere since vdd started (the
/// dispatcher's): counters only go up, and so does it.
pub fn catch_up(c: &Counter, total: u64) {
    c.inc_by(total.saturating_sub(c.get()));
}

/// OpenMetrics text to the classic Prometheus text format 0.0.4: a counter's family is
/// named with its `_total` there, and `# UNIT` and `# EOF` do not exist. The rest of
/// what prometheus-client writes for our types is the same in both.
pub fn classic(open: &str) -> String {
    let mut counters: Vec<&str> = Vec::new();
    for l in open.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            if let Some(name) = rest.strip_suffix(" counter") {
                counters.push(name);
            }
        }
    }
    let mut out = String::with_capacity(open.len());
    for l in open.lines() {
        if l.starts_with("# UNIT ") || l == "# EOF" {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .iter()
            .find_map(|p| l.strip_prefix(p).map(|rest| (*p, rest)));
        match meta {
            Some((p, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                if counters.contains(&name) {
                    out.push_str(&format!("{p}{name}_total {tail}"));
                } else {
                    out.push_str(l);
                }
            }
            None => out.push_str(l),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_both_formats() {
        let m = Metrics::default();
        m.tftp_bytes.inc_by(1000);
        m.dhcp_packets
            .get_or_create(&TypeLabel { r#type: "discover" })
            .inc();
        m.boot_stage
            .get_or_create(&StageLabel { stage: "pid1" })
            .observe(1.5);
        m.api_requests
            .get_or_create(&RequestLabels {
                route: "/api/v1/guests",
                status: 200,
            })
            .inc();
        let hits = m.warm_picks.get_or_create(&GuestResult {
            guest: "demo".into(),
            result: "hit",
        });
        catch_up(&hits, 3);
        catch_up(&hits, 3);
        let open = m.openmetrics();
        assert!(open.contains("vdd_tftp_sent_bytes_total 1000\n"), "{open}");
        assert!(
            open.contains("vdd_warm_picks_total{guest=\"demo\",result=\"hit\"} 3\n"),
            "{open}"
        );
        assert!(
            open.contains("# TYPE vdd_tftp_sent_bytes counter\n"),
            "{open}"
        );
        assert!(open.ends_with("# EOF\n"));
        assert!(open.contains("vdd_dhcp_received_packets_total{type=\"discover\"} 1\n"));
        assert!(
            open.contains("vdd_boot_stage_duration_seconds_bucket{le=\"1.6\",stage=\"pid1\"} 1\n"),
            "{open}"
        );
        let c = classic(&open);
        assert!(
            c.contains("# TYPE vdd_tftp_sent_bytes_total counter\n"),
            "{c}"
        );
        assert!(
            c.contains("# HELP vdd_tftp_sent_bytes_total Bytes of completed TFTP transfers.\n"),
            "{c}"
        );
        assert!(c.contains("vdd_tftp_sent_bytes_total 1000\n"));
        assert!(c.contains("# TYPE vdd_boot_stage_duration_seconds histogram\n"));
        assert!(
            c.contains("vdd_api_requests_total{route=\"/api/v1/guests\",status=\"200\"} 1\n"),
            "{c}"
        );
        assert!(!c.contains("# EOF") && !c.contains("# UNIT"));
    }
}
