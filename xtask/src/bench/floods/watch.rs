//! What `cargo xtask bench floods` watches: whether a child of the run still runs, and
//! vdd's memory, sampled on a thread of its own.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use super::SAMPLE_EVERY;

#[derive(Clone, Copy)]
pub(super) struct Sample {
    at: Instant,
    pub(super) rss_kib: u64,
    pub(super) hwm_kib: u64,
}

/// Whether a child of ours still runs. Unlike [`Lab::is_running`] this does not reap it:
/// until [`Lab::kill`] or the Lab's Drop waits for it, its pid stays ours (a zombie),
/// so signalling it then can never reach a process that reused the pid.
///
/// [`Lab::is_running`]: crate::lab::Lab::is_running
/// [`Lab::kill`]: crate::lab::Lab::kill
pub(super) fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .is_some_and(|zombie| !zombie)
}

/// VmRSS and VmHWM of `pid` in KiB.
fn mem_of(pid: u32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        s.lines()
            .find_map(|l| l.strip_prefix(name))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Reads vdd's memory every 100 ms on a thread of its own, so a blocking step of the run
/// leaves no gap in the samples.
pub(super) struct Sampler {
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Sampler {
    pub(super) fn start(pid: u32) -> Sampler {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (samples.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                if let Some((rss_kib, hwm_kib)) = mem_of(pid) {
                    s.lock().unwrap().push(Sample {
                        at: Instant::now(),
                        rss_kib,
                        hwm_kib,
                    });
                }
                std::thread::sleep(SAMPLE_EVERY);
            }
        });
        Sampler {
            samples,
            stop,
            thread: Some(thread),
        }
    }

    pub(super) fn between(&self, from: Instant, to: Instant) -> Vec<Sample> {
        let v = self.samples.lock().unwrap();
        v.iter()
            .filter(|s| s.at >= from && s.at <= to)
            .copied()
            .collect()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
