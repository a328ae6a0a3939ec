//! What the boot telemetry costs in memory: the heap a seat's record takes, counted by
//! a counting allocator (this test binary's own), for a typical boot and for the worst
//! case (every boot of a seat full), and for a flood of made-up MACs. Printed with
//! `--nocapture`; the bounds asserted are the telemetry's design limits, not timings.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use vdd::config::Mac;
use vdd::telemetry::boots::{Seats, Seen, MAX_BOOTS, MAX_STAGES};
use vdd_api::{BootReport, Firmware, ReportedStage, Stage};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        System.realloc(p, l, new)
    }
}

#[global_allocator]
static A: Counting = Counting;

fn mac(n: u32) -> Mac {
    let b = n.to_be_bytes();
    Mac([0x52, 0x54, b[0], b[1], b[2], b[3]])
}

fn seen(stage: Stage, fw: Option<Firmware>, detail: &str, at: u64) -> Seen {
    Seen {
        stage,
        firmware: fw,
        detail: Some(detail.to_string()),
        at_ms: at,
    }
}

/// One boot as `cargo xtask e2e panel` sees it: vdd's stages and the thin client's.
fn typical_boot(t: &mut Seats, m: Mac, at: u64) {
    let fw = Some(Firmware::Ipxe);
    t.record(m, seen(Stage::DhcpDiscover, fw, "ipxe", at));
    t.record(m, seen(Stage::DhcpAck, fw, "ipxe 10.77.0.50", at + 10));
    t.learn_ip(m, std::net::Ipv4Addr::new(10, 77, 0, 50), at + 10);
    for (i, s) in [Stage::HttpScript, Stage::HttpKernel, Stage::HttpInitrd]
        .into_iter()
        .enumerate()
    {
        t.record(m, seen(s, None, "", at + 100 * i as u64));
    }
    let stages = [
        (Stage::Pid1, "0.1.0"),
        (Stage::ModulesLoaded, ""),
        (Stage::LinkUp, "eth0"),
        (Stage::ClientDhcp, "10.77.0.50"),
        (Stage::MenuShown, "1 guests"),
    ];
    let r = BootReport {
        uptime_ms: 20_000,
        stages: stages
            .iter()
            .enumerate()
            .map(|(i, (s, d))| ReportedStage {
                stage: *s,
                uptime_ms: 2000 + 1000 * i as u64,
                detail: Some(d.to_string()),
            })
            .collect(),
    };
    t.report(m, &r, at + 25_000).unwrap();
    for s in [
        Stage::SessionStarted,
        Stage::NbdConnected,
        Stage::SessionReady,
    ] {
        t.record(m, seen(s, None, "demo 0a1b2c3d4e5f", at + 30_000));
    }
}

#[test]
fn memory_per_seat_record() {
    const N: u32 = 2000;
    let mut t = Seats::with_cap(N as usize);
    let before = LIVE.load(Ordering::Relaxed);
    for n in 0..N {
        typical_boot(&mut t, mac(n), 1_000_000);
    }
    let typical = (LIVE.load(Ordering::Relaxed) - before) as f64 / N as f64;
    drop(t);

    // The worst case: every seat with MAX_BOOTS boots of MAX_STAGES stages, long details.
    let mut t = Seats::with_cap(N as usize);
    let before = LIVE.load(Ordering::Relaxed);
    let long = "x".repeat(64);
    for n in 0..N {
        let m = mac(n);
        for b in 0..MAX_BOOTS as u64 {
            let at = b * 10_000_000;
            t.record(
                m,
                seen(Stage::DhcpDiscover, Some(Firmware::Bios), "bios", at),
            );
            for i in 0..MAX_STAGES as u64 {
                t.record(
                    m,
                    seen(
                        Stage::SessionStarted,
                        None,
                        &format!("{i:02}{}", &long[2..]),
                        at + i + 1,
                    ),
                );
            }
        }
    }
    let worst = (LIVE.load(Ordering::Relaxed) - before) as f64 / N as f64;
    drop(t);

    // A flood of made-up MACs against the default table: it stops growing at its cap.
    let mut t = Seats::default();
    let before = LIVE.load(Ordering::Relaxed);
    for n in 0..200_000u32 {
        t.record(
            mac(n),
            seen(Stage::DhcpDiscover, Some(Firmware::Bios), "bios", n as u64),
        );
    }
    let flood = LIVE.load(Ordering::Relaxed) - before;
    let cap = t.cap();
    drop(t);

    println!("seat records: typical boot {typical:.0} B per seat ({N} seats); worst case ({MAX_BOOTS} boots x {MAX_STAGES} stages) {worst:.0} B per seat");
    println!(
        "a flood of 200000 made-up MACs: {} seats kept, {:.2} MiB in all",
        cap,
        flood as f64 / (1 << 20) as f64
    );
    assert!(typical < 4096.0, "a typical seat record takes {typical} B");
    assert!(worst < 32.0 * 1024.0, "a full seat record takes {worst} B");
    assert!(flood < 16 << 20, "the flood took {flood} B");
}
