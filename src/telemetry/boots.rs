//! The boots of every seat vdd has seen, as timelines of stages: what vdd saw itself
//! (DHCP, TFTP, HTTP, NBD, the session API) and what the thin client reported. Pure: the
//! time is passed in (ms since the Unix epoch), nothing here reads a clock or logs.
//!
//! Bounded everywhere, because any LAN host can make up MACs: [`MAX_BOOTS`] boots per
//! seat, [`MAX_STAGES`] stages per boot, [`Seats::cap`] seats in all. When the table is
//! full the least useful eighth goes in one sweep: seats that never got past DHCP (a
//! flood of made-up MACs looks like that) before seats that booted, the longest unseen
//! first. One sweep per eighth of the table keeps an insert O(1) on average.

use std::collections::{HashMap, VecDeque};
use std::net::Ipv4Addr;

use serde::Serialize;
use vdd_api::{BootReport, Firmware, Stage, MAX_REPORT_STAGES};

use crate::config::Mac;

/// Boots kept per seat: the current one and three before it.
pub const MAX_BOOTS: usize = 4;
/// Stages kept per boot. A boot has 18 kinds of stage; sessions repeat theirs.
pub const MAX_STAGES: usize = 32;
/// Seats kept by default.
pub const DEFAULT_SEATS: usize = 4096;
/// A boot whose last stage is older than this is over: the next DHCP DISCOVER of a boot
/// firmware starts a new one even if it came no further than the firmware's chain.
const BOOT_GAP_MS: u64 = 5 * 60 * 1000;
/// The longest `detail` kept (a file name, an address, a guest's name).
const MAX_DETAIL: usize = 64;
/// Reports a seat may send in a burst, and per minute after it. A boot sends about six.
const REPORTS_PER_MINUTE: f64 = 20.0;

/// One stage of one boot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StageAt {
    pub stage: Stage,
    /// When (ms since the Unix epoch, the server's clock).
    pub at_ms: u64,
    /// The thin client's uptime at the stage, for the stages it reported.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uptime_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// One boot of a seat, from its firmware's first DHCP request on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Boot {
    pub started_ms: u64,
    /// The firmware that started it (BIOS, UEFI or iPXE), and iPXE when it chained to it.
    pub firmware: Vec<Firmware>,
    /// In time order.
    pub stages: Vec<StageAt>,
    /// Stages that did not fit ([`MAX_STAGES`]).
    pub dropped: u32,
}

impl Boot {
    fn last_ms(&self) -> u64 {
        self.stages.last().map_or(self.started_ms, |s| s.at_ms)
    }

    /// Whether the boot got past its firmware's chain (DHCP, TFTP) to the iPXE script.
    fn past_firmware(&self) -> bool {
        self.stages.iter().any(|s| s.stage >= Stage::HttpScript)
    }

    /// Adds a stage in time order; returns the time since the stage before it.
    fn add(&mut self, s: StageAt) -> Option<u64> {
        // A stage seen again in the same boot with the same detail (DHCP retransmits,
        // lease renewals, a second download of the kernel, a session polled) is not
        // news; a session's stages name the session in their detail.
        if self
            .stages
            .iter()
            .any(|o| o.stage == s.stage && o.detail == s.detail)
        {
            return None;
        }
        if self.stages.len() >= MAX_STAGES {
            // Make room by the oldest repeatable stage; the boot's own stages stay.
            match self.stages.iter().position(|o| repeats(o.stage)) {
                Some(i) if repeats(s.stage) || i > 0 => {
                    self.stages.remove(i);
                }
                _ => {
                    self.dropped += 1;
                    return None;
                }
            }
            self.dropped += 1;
        }
        let i = self.stages.partition_point(|o| o.at_ms <= s.at_ms);
        let since = match i {
            0 => s.at_ms.checked_sub(self.started_ms),
            _ => Some(s.at_ms - self.stages[i - 1].at_ms),
        };
        self.stages.insert(i, s);
        since
    }
}

/// Stages a boot passes once per session (their detail names it): the first to go
/// when a boot's stages are full.
fn repeats(s: Stage) -> bool {
    matches!(
        s,
        Stage::SessionStarted
            | Stage::SessionReady
            | Stage::SessionEnded
            | Stage::NbdConnected
            | Stage::NbdAttached
            | Stage::XStarted
            | Stage::ViewerConnected
    )
}

/// What vdd knows of one seat.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Seat {
    pub mac: Mac,
    /// The address its last DHCP ACK gave it (or the one it spoke from).
    pub ip: Option<Ipv4Addr>,
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
    /// Oldest first; the last is the current boot.
    pub boots: VecDeque<Boot>,
    /// Report tokens left ([`REPORTS_PER_MINUTE`]).
    #[serde(skip)]
    tokens: f64,
    #[serde(skip)]
    tokens_ms: u64,
}

impl Seat {
    fn new(mac: Mac, now: u64) -> Seat {
        Seat {
            mac,
            ip: None,
            first_seen_ms: now,
            last_seen_ms: now,
            boots: VecDeque::new(),
            tokens: REPORTS_PER_MINUTE,
            tokens_ms: now,
        }
    }

    pub fn current(&self) -> Option<&Boot> {
        self.boots.back()
    }

    /// The latest stage of the current boot.
    pub fn stage_now(&self) -> Option<&StageAt> {
        self.current().and_then(|b| b.stages.last())
    }

    /// The boot firmware of the current boot (the first one of its chain).
    pub fn firmware(&self) -> Option<Firmware> {
        self.current().and_then(|b| b.firmware.first().copied())
    }

    /// Whether this seat came further than DHCP (kept longest when the table is full).
    fn booted(&self) -> bool {
        self.boots.iter().any(|b| {
            b.stages
                .iter()
                .any(|s| !matches!(s.stage, Stage::DhcpDiscover | Stage::DhcpAck))
        })
    }

    fn new_boot(&mut self, at: u64) -> &mut Boot {
        if self.boots.len() >= MAX_BOOTS {
            self.boots.pop_front();
        }
        self.boots.push_back(Boot {
            started_ms: at,
            ..Boot::default()
        });
        self.boots.back_mut().expect("just pushed")
    }

    fn take_token(&mut self, now: u64) -> bool {
        let secs = now.saturating_sub(self.tokens_ms) as f64 / 1000.0;
        self.tokens_ms = now;
        self.tokens = (self.tokens + secs * REPORTS_PER_MINUTE / 60.0).min(REPORTS_PER_MINUTE);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Why a thin client's report was refused (the API answers with this message).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    #[error("too many reports from this seat; at most {REPORTS_PER_MINUTE} a minute")]
    TooMany,
    #[error("a report has at most {MAX_REPORT_STAGES} stages")]
    TooLarge,
    #[error("stage {0} is one the server sees itself; a thin client may not report it")]
    NotYours(Stage),
    #[error("stage {0} is later than the report itself (uptime {1} ms)")]
    Future(Stage, u64),
}

/// A stage as a service saw it, before it is placed.
#[derive(Clone, Debug)]
pub struct Seen {
    pub stage: Stage,
    pub firmware: Option<Firmware>,
    pub detail: Option<String>,
    pub at_ms: u64,
}

/// The table of seats.
#[derive(Debug)]
pub struct Seats {
    seats: HashMap<Mac, Seat>,
    /// Who has which address, from DHCP ACKs: TFTP, HTTP and NBD know only an address.
    ips: HashMap<Ipv4Addr, Mac>,
    cap: usize,
}

impl Default for Seats {
    fn default() -> Seats {
        Seats::with_cap(DEFAULT_SEATS)
    }
}

impl Seats {
    pub fn with_cap(cap: usize) -> Seats {
        Seats {
            seats: HashMap::new(),
            ips: HashMap::new(),
            cap: cap.max(8),
        }
    }

    pub fn len(&self) -> usize {
        self.seats.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seats.is_empty()
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    pub fn get(&self, mac: &Mac) -> Option<&Seat> {
        self.seats.get(mac)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Seat> {
        self.seats.values()
    }

    /// The seat that has `ip`, by its last DHCP ACK.
    pub fn mac_of(&self, ip: Ipv4Addr) -> Option<Mac> {
        self.ips.get(&ip).copied()
    }

    /// Records that `mac` has `ip` now.
    pub fn learn_ip(&mut self, mac: Mac, ip: Ipv4Addr, now: u64) {
        let seat = self.seat(mac, now);
        if let Some(old) = seat.ip.replace(ip) {
            if old != ip && self.ips.get(&old) == Some(&mac) {
                self.ips.remove(&old);
            }
        }
        self.ips.insert(ip, mac);
    }

    fn seat(&mut self, mac: Mac, now: u64) -> &mut Seat {
        if !self.seats.contains_key(&mac) && self.seats.len() >= self.cap {
            self.sweep();
        }
        let s = self.seats.entry(mac).or_insert_with(|| Seat::new(mac, now));
        s.last_seen_ms = s.last_seen_ms.max(now);
        s
    }

    /// Drops the least useful eighth of the table.
    fn sweep(&mut self) {
        let mut order: Vec<(bool, u64, Mac)> = self
            .seats
            .values()
            .map(|s| (s.booted(), s.last_seen_ms, s.mac))
            .collect();
        let n = (self.cap / 8).max(1);
        order.select_nth_unstable(n - 1);
        for (_, _, mac) in &order[..n] {
            if let Some(s) = self.seats.remove(mac) {
                if let Some(ip) = s.ip {
                    if self.ips.get(&ip) == Some(mac) {
                        self.ips.remove(&ip);
                    }
                }
            }
        }
    }

    /// Records a stage vdd saw; returns the time since the stage before it in the same
    /// boot (ms), for the duration histogram.
    pub fn record(&mut self, mac: Mac, seen: Seen) -> Option<u64> {
        let at = seen.at_ms;
        let seat = self.seat(mac, at);
        let starts = seen.stage == Stage::DhcpDiscover
            && seen.firmware.is_some_and(Firmware::is_boot_firmware)
            && seat
                .current()
                .is_none_or(|b| b.past_firmware() || at.saturating_sub(b.last_ms()) > BOOT_GAP_MS);
        let boot = match seat.boots.back_mut() {
            Some(b) if !starts => b,
            _ => seat.new_boot(at),
        };
        if let Some(f) = seen.firmware.filter(|f| f.is_boot_firmware()) {
            if boot.firmware.last() != Some(&f) {
                boot.firmware.push(f);
            }
        }
        boot.add(StageAt {
            stage: seen.stage,
            at_ms: at,
            uptime_ms: None,
            detail: seen.detail.map(clip),
        })
    }

    /// Records the stages a thin client reported about itself, received at `now`; returns
    /// each new stage with the time since the stage before it.
    pub fn report(
        &mut self,
        mac: Mac,
        r: &BootReport,
        now: u64,
    ) -> Result<Vec<(Stage, Option<u64>)>, ReportError> {
        if r.stages.len() > MAX_REPORT_STAGES {
            return Err(ReportError::TooLarge);
        }
        for s in &r.stages {
            if !s.stage.reported_by_client() {
                return Err(ReportError::NotYours(s.stage));
            }
            if s.uptime_ms > r.uptime_ms {
                return Err(ReportError::Future(s.stage, s.uptime_ms));
            }
        }
        let seat = self.seat(mac, now);
        if !seat.take_token(now) {
            return Err(ReportError::TooMany);
        }
        // The thin client's kernel started `uptime` ago; every stage is placed from there.
        let kernel_at = now.saturating_sub(r.uptime_ms);
        let mut added = Vec::new();
        for s in &r.stages {
            // PID 1 a second time in one boot: the client booted again (with no DHCP of
            // its firmware seen, as when vdd restarted in between).
            let again = s.stage == Stage::Pid1
                && seat
                    .current()
                    .is_some_and(|b| b.stages.iter().any(|o| o.stage == Stage::Pid1));
            let boot = match seat.boots.back_mut() {
                Some(b) if !again => b,
                _ => seat.new_boot(kernel_at),
            };
            let since = boot.add(StageAt {
                stage: s.stage,
                at_ms: kernel_at + s.uptime_ms,
                uptime_ms: Some(s.uptime_ms),
                detail: s.detail.clone().map(clip),
            });
            added.push((s.stage, since));
        }
        Ok(added)
    }
}

fn clip(mut s: String) -> String {
    if s.len() > MAX_DETAIL {
        let mut end = MAX_DETAIL;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s.retain(|c| !c.is_control());
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use vdd_api::ReportedStage;

    fn mac(n: u32) -> Mac {
        let b = n.to_be_bytes();
        Mac([0x52, 0x54, b[0], b[1], b[2], b[3]])
    }

    fn seen(stage: Stage, fw: Option<Firmware>, at: u64) -> Seen {
        Seen {
            stage,
            firmware: fw,
            detail: None,
            at_ms: at,
        }
    }

    #[test]
    fn a_boot_from_firmware_to_session() {
        let mut t = Seats::default();
        let m = mac(1);
        let fw = Some(Firmware::Ipxe);
        assert_eq!(t.record(m, seen(Stage::DhcpDiscover, fw, 1000)), Some(0));
        // A retransmitted DISCOVER is no new stage.
        assert_eq!(t.record(m, seen(Stage::DhcpDiscover, fw, 1500)), None);
        assert_eq!(t.record(m, seen(Stage::DhcpAck, fw, 2000)), Some(1000));
        t.learn_ip(m, Ipv4Addr::new(10, 77, 0, 50), 2000);
        assert_eq!(t.mac_of(Ipv4Addr::new(10, 77, 0, 50)), Some(m));
        assert_eq!(t.record(m, seen(Stage::HttpScript, None, 2100)), Some(100));
        assert_eq!(t.record(m, seen(Stage::HttpKernel, None, 3000)), Some(900));
        // The thin client's report: its kernel started 10 s before the report.
        let r = BootReport {
            uptime_ms: 10_000,
            stages: vec![
                ReportedStage {
                    stage: Stage::Pid1,
                    uptime_ms: 2000,
                    detail: None,
                },
                ReportedStage {
                    stage: Stage::ClientDhcp,
                    uptime_ms: 9000,
                    detail: Some("10.77.0.50".into()),
                },
            ],
        };
        let added = t.report(m, &r, 14_000).unwrap();
        assert_eq!(
            added,
            vec![(Stage::Pid1, Some(3000)), (Stage::ClientDhcp, Some(7000))]
        );
        let s = t.get(&m).unwrap();
        assert_eq!(s.boots.len(), 1);
        assert_eq!(s.firmware(), Some(Firmware::Ipxe));
        let b = s.current().unwrap();
        assert_eq!(b.stages[4].at_ms, 6000);
        assert_eq!(b.stages[4].uptime_ms, Some(2000));
        assert_eq!(s.stage_now().unwrap().stage, Stage::ClientDhcp);
        // The next DISCOVER of its firmware is the next boot.
        t.record(m, seen(Stage::DhcpDiscover, fw, 60_000));
        assert_eq!(t.get(&m).unwrap().boots.len(), 2);
    }

    #[test]
    fn a_uefi_chain_is_one_boot() {
        let mut t = Seats::default();
        let m = mac(2);
        t.record(m, seen(Stage::DhcpDiscover, Some(Firmware::Uefi), 0));
        t.record(m, seen(Stage::DhcpAck, Some(Firmware::Uefi), 10));
        t.record(m, seen(Stage::TftpBootFile, None, 500));
        t.record(m, seen(Stage::DhcpDiscover, Some(Firmware::Ipxe), 900));
        t.record(m, seen(Stage::HttpScript, None, 1200));
        let s = t.get(&m).unwrap();
        assert_eq!(s.boots.len(), 1);
        assert_eq!(
            s.current().unwrap().firmware,
            vec![Firmware::Uefi, Firmware::Ipxe]
        );
        // Only MAX_BOOTS boots are kept.
        for i in 1..10 {
            t.record(
                m,
                seen(Stage::DhcpDiscover, Some(Firmware::Uefi), i * 1_000_000),
            );
        }
        assert_eq!(t.get(&m).unwrap().boots.len(), MAX_BOOTS);
    }

    #[test]
    fn reports_are_checked_and_rate_limited() {
        let mut t = Seats::default();
        let m = mac(3);
        let r = |stage, up| BootReport {
            uptime_ms: 5000,
            stages: vec![ReportedStage {
                stage,
                uptime_ms: up,
                detail: None,
            }],
        };
        assert_eq!(
            t.report(m, &r(Stage::DhcpAck, 1), 0),
            Err(ReportError::NotYours(Stage::DhcpAck))
        );
        assert_eq!(
            t.report(m, &r(Stage::MenuShown, 6000), 0),
            Err(ReportError::Future(Stage::MenuShown, 6000))
        );
        let big = BootReport {
            uptime_ms: 1,
            stages: vec![r(Stage::MenuShown, 1).stages[0].clone(); MAX_REPORT_STAGES + 1],
        };
        assert_eq!(t.report(m, &big, 0), Err(ReportError::TooLarge));
        let ok = (0..30)
            .filter(|_| t.report(m, &r(Stage::MenuShown, 1), 10_000).is_ok())
            .count();
        assert_eq!(ok, REPORTS_PER_MINUTE as usize, "a burst, then refused");
        assert!(
            t.report(m, &r(Stage::MenuShown, 1), 13_000).is_ok(),
            "refilled"
        );
    }

    #[test]
    fn a_boots_stages_are_bounded() {
        let mut t = Seats::default();
        let m = mac(4);
        t.record(m, seen(Stage::DhcpDiscover, Some(Firmware::Bios), 0));
        for i in 0..500 {
            let mut s = seen(Stage::SessionStarted, None, 10 + i);
            s.detail = Some(format!("demo {i}"));
            t.record(m, s);
        }
        let b = t.get(&m).unwrap().current().unwrap();
        assert_eq!(b.stages.len(), MAX_STAGES);
        assert_eq!(
            b.stages[0].stage,
            Stage::DhcpDiscover,
            "the boot's start stays"
        );
        assert_eq!(b.stages.last().unwrap().at_ms, 509, "the newest stays");
        let long = "x".repeat(1000);
        t.record(
            m,
            Seen {
                stage: Stage::TftpBootFile,
                firmware: None,
                detail: Some(long),
                at_ms: 600,
            },
        );
        let s = t.get(&m).unwrap().stage_now().unwrap();
        assert_eq!(s.detail.as_ref().unwrap().len(), MAX_DETAIL);
    }

    /// A flood of made-up MACs never grows the table past its cap, and the seats that
    /// really booted outlive it.
    #[test]
    fn a_storm_of_random_macs_is_bounded() {
        let mut t = Seats::with_cap(1024);
        for n in 0..100 {
            let m = mac(n);
            t.record(m, seen(Stage::DhcpDiscover, Some(Firmware::Bios), n as u64));
            t.record(m, seen(Stage::HttpKernel, None, n as u64 + 1));
        }
        for n in 1000..101_000u32 {
            let m = mac(n);
            t.record(
                m,
                seen(Stage::DhcpDiscover, Some(Firmware::Bios), 1000 + n as u64),
            );
            t.learn_ip(m, Ipv4Addr::from(n), 1000 + n as u64);
            assert!(t.len() <= 1024);
        }
        assert!(t.ips.len() <= 1024, "addresses go with their seats");
        assert!(
            (0..100).all(|n| t.get(&mac(n)).is_some()),
            "booted seats stay"
        );
    }
}
