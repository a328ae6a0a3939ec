//! The storm's figures: per-seat results as the seats wrote them, and the table and the
//! RESULT line made of them.

use super::servers::Stack;
use super::trace::Trace;
use super::Args;
use crate::bench::median;

/// What one seat reported (times in seconds since the common start).
#[derive(Clone, Debug, Default)]
pub struct SeatResult {
    pub seat: usize,
    pub ip: Option<String>,
    pub error: Option<String>,
    pub retries: u64,
    pub discovers: u64,
    pub naks: u64,
    /// When the seat really started.
    pub started: Option<f64>,
    pub dhcp: Option<f64>,
    pub files: Option<f64>,
    pub api: Option<f64>,
    pub root: Option<f64>,
    /// All its bytes in: since the common start.
    pub done: Option<f64>,
}

impl SeatResult {
    pub fn from_json(seat: usize, v: Option<&serde_json::Value>, start: f64) -> SeatResult {
        let Some(v) = v else {
            return SeatResult {
                seat,
                error: Some("no result (killed at the deadline?)".into()),
                ..Default::default()
            };
        };
        let t = |k: &str| v.get(k).and_then(serde_json::Value::as_f64);
        let n = |k: &str| v.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
        let span = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| b - a);
        let (t0, td, tf, ta, tn) = (t("t0"), t("t_dhcp"), t("t_files"), t("t_api"), t("t_nbd"));
        SeatResult {
            seat,
            ip: v.get("ip").and_then(|x| x.as_str()).map(String::from),
            error: v.get("error").and_then(|x| x.as_str()).map(String::from),
            retries: n("retries"),
            discovers: n("discovers"),
            naks: n("naks"),
            started: t0.map(|x| x - start),
            dhcp: span(t0, td),
            files: span(td, tf),
            api: span(tf, ta),
            root: span(ta, tn),
            done: tn.map(|x| x - start),
        }
    }
}

/// One storm against one stack.
pub struct Outcome {
    pub stack: Stack,
    /// The column's name: vdd, ltsp or ltsp-tuned.
    pub label: &'static str,
    pub seats: Vec<SeatResult>,
    /// Both directions of the server's link.
    pub wire_bytes: u64,
    /// Packets its queue dropped towards the seats.
    pub drops: u64,
    /// Packets the lab's host dropped in its input backlog (any namespace).
    pub backlog: u64,
    pub cpu_seconds: Option<f64>,
}

impl Outcome {
    pub fn failed(&self) -> usize {
        self.seats.iter().filter(|s| s.error.is_some()).count()
    }

    pub fn retried(&self) -> usize {
        self.seats.iter().filter(|s| s.retries > 0).count()
    }

    /// Seats that hold an address another seat holds too.
    pub fn duplicates(&self) -> usize {
        let mut ips: Vec<&str> = self.seats.iter().filter_map(|s| s.ip.as_deref()).collect();
        ips.sort_unstable();
        let all = ips.len();
        ips.dedup();
        all - ips.len()
    }

    /// Until the last seat that made it had all its bytes (the failed ones are counted
    /// apart).
    pub fn last_done(&self) -> Option<f64> {
        self.seats
            .iter()
            .filter_map(|s| s.done)
            .max_by(f64::total_cmp)
    }

    /// How far apart the seats really started.
    pub fn start_spread(&self) -> f64 {
        let v: Vec<f64> = self.seats.iter().filter_map(|s| s.started).collect();
        let (lo, hi) = v
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
        if v.is_empty() {
            0.0
        } else {
            hi - lo
        }
    }
}

/// p-th percentile (nearest rank) of the seats' values.
fn pct(mut v: Vec<f64>, p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

fn stage(o: &Outcome, f: impl Fn(&SeatResult) -> Option<f64>) -> String {
    let v: Vec<f64> = o.seats.iter().filter_map(f).collect();
    match (pct(v.clone(), 50.0), pct(v.clone(), 95.0), pct(v, 100.0)) {
        (Some(a), Some(b), Some(c)) => format!("{a:.2} / {b:.2} / {c:.2}"),
        _ => "-".into(),
    }
}

fn secs(x: Option<f64>) -> String {
    x.map_or("-".into(), |x| format!("{x:.2}"))
}

/// One line as each storm ends.
pub fn brief(o: &Outcome) {
    eprintln!(
        "bench storm: {}: last seat done at {} s; {} failed, {} retried, {} addresses twice; started within {:.0} ms",
        o.label,
        secs(o.last_done()),
        o.failed(),
        o.retried(),
        o.duplicates(),
        o.start_spread() * 1000.0
    );
}

/// The table of the last round of each stack, and the RESULT line over all rounds.
pub fn print(a: &Args, t: &Trace, all: &[Outcome]) {
    let last = |s: Stack| all.iter().rev().find(|o| o.stack == s);
    let cols: Vec<&Outcome> = [Stack::Vdd, Stack::Ltsp]
        .into_iter()
        .filter_map(last)
        .collect();
    let mb = |b: u64| b as f64 / 1e6;
    let files = t.kernel_bytes + t.initrd_bytes;
    let per_seat = files + t.read_bytes();
    let payload = per_seat * a.seats as u64;
    let limit = payload as f64 * 8.0 / (f64::from(a.link) * 1e6);
    println!();
    println!(
        "Storm: {} seats switched on together ({}), the server's link shaped to {} Mbit/s (tc tbf with pfifo_fast below, both directions)",
        a.seats,
        if a.ramp > 0.0 {
            format!("ramp of {} s", a.ramp)
        } else {
            "all within 100 ms".into()
        },
        a.link
    );
    println!(
        "Each seat: DHCP (busybox udhcpc as iPXE); kernel {:.1} MB + initrd {:.1} MB (vdd: HTTP; LTSP: TFTP, blksize 1432 as iPXE); \
         GET /api/v1/guests (vdd only); root: {} NBD reads, {:.1} MB, depth up to {} (python3-libnbd replaying a recorded boot{})",
        mb(t.kernel_bytes),
        mb(t.initrd_bytes),
        t.reads.len(),
        mb(t.read_bytes()),
        t.max_depth(),
        if a.scale < 1.0 {
            format!(", --scale {}", a.scale)
        } else {
            String::new()
        }
    );
    println!(
        "Link limit: {} seats x {:.1} MB payload = {:.0} MB at {} Mbit/s = {limit:.2} s",
        a.seats,
        mb(per_seat),
        mb(payload),
        a.link
    );
    println!();
    let row = |label: &str, f: &dyn Fn(&Outcome) -> String| {
        print!("{label:<34}");
        for o in &cols {
            print!(" {:>24}", f(o));
        }
        println!();
    };
    row("", &|o| o.label.to_string());
    row("last seat has all its bytes (s)", &|o| secs(o.last_done()));
    row("  (of the seats that did not fail)", &|o| {
        format!("{} of {}", o.seats.len() - o.failed(), o.seats.len())
    });
    row("seats started within (ms)", &|o| {
        format!("{:.0}", o.start_spread() * 1000.0)
    });
    row("DHCP p50 / p95 / max (s)", &|o| stage(o, |s| s.dhcp));
    row("kernel + initrd p50 / p95 / max", &|o| {
        stage(o, |s| s.files)
    });
    row("menu API p50 / p95 / max", &|o| {
        if o.stack == Stack::Vdd {
            stage(o, |s| s.api)
        } else {
            "-".into()
        }
    });
    row("root reads p50 / p95 / max", &|o| stage(o, |s| s.root));
    row("all done p50 / p95 / max", &|o| stage(o, |s| s.done));
    row("failed seats", &|o| o.failed().to_string());
    row("retried seats (any stage)", &|o| o.retried().to_string());
    row("DISCOVERs sent / NAKs got", &|o| {
        let d: u64 = o.seats.iter().map(|s| s.discovers).sum();
        let n: u64 = o.seats.iter().map(|s| s.naks).sum();
        format!("{d} / {n}")
    });
    row("addresses held by two seats", &|o| {
        o.duplicates().to_string()
    });
    row("bytes on the server's link (MB)", &|o| {
        format!("{:.0}", mb(o.wire_bytes))
    });
    row("packets dropped at the server's link", &|o| {
        o.drops.to_string()
    });
    row("  and in the host's backlog (lab)", &|o| {
        o.backlog.to_string()
    });
    row("server CPU (s)", &|o| secs(o.cpu_seconds));
    row("time / link limit", &|o| {
        o.last_done()
            .map_or("-".into(), |d| format!("{:.2}x", d / limit))
    });
    let times = |s: Stack| -> Vec<f64> {
        all.iter()
            .filter(|o| o.stack == s)
            .filter_map(Outcome::last_done)
            .collect()
    };
    let fails = |s: Stack| -> Option<usize> {
        all.iter()
            .filter(|o| o.stack == s)
            .map(Outcome::failed)
            .max()
    };
    let (v, p) = (times(Stack::Vdd), times(Stack::Ltsp));
    let med = |v: &[f64]| (!v.is_empty()).then(|| median(v.to_vec()));
    if let (Some(v), Some(p)) = (med(&v), med(&p)) {
        println!(
            "{:<34} {:>24}",
            "peer time / vdd time",
            format!("{:.2}x", p / v)
        );
    }
    if a.rounds > 1 {
        println!("rounds: vdd {v:.2?} s, ltsp {p:.2?} s (RESULT gives medians)");
    }
    let dup: usize = all
        .iter()
        .filter(|o| o.stack == Stack::Vdd)
        .map(Outcome::duplicates)
        .max()
        .unwrap_or(0);
    let num = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.2}"));
    let cnt = |x: Option<usize>| x.map_or("-".into(), |x| x.to_string());
    println!(
        "RESULT storm seats={} link_mbit={} limit_s={limit:.2} vdd_s={} peer_s={} vdd_fail={} peer_fail={} dup={dup}",
        a.seats,
        a.link,
        num(med(&v)),
        num(med(&p)),
        cnt(fails(Stack::Vdd)),
        cnt(fails(Stack::Ltsp)),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(pct(v.clone(), 50.0), Some(10.0));
        assert_eq!(pct(v.clone(), 95.0), Some(19.0));
        assert_eq!(pct(v, 100.0), Some(20.0));
        assert_eq!(pct(vec![], 50.0), None);
    }

    #[test]
    fn seats_sharing_an_address_are_counted() {
        let seat = |ip: &str| SeatResult {
            ip: Some(ip.into()),
            ..Default::default()
        };
        let o = Outcome {
            stack: Stack::Ltsp,
            label: "ltsp",
            seats: vec![seat("10.77.1.1"), seat("10.77.1.2"), seat("10.77.1.1")],
            wire_bytes: 0,
            drops: 0,
            backlog: 0,
            cpu_seconds: None,
        };
        assert_eq!(o.duplicates(), 1);
    }
}
