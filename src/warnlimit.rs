//! The one rate limit on `warn` lines about clients: a flood of bad packets from the LAN
//! must not become a flood of log lines too (STYLE: warn for a misbehaving client,
//! rate-limited). Lines over the limit are counted, and the count is handed to the next
//! line that may be logged, so the admin still learns how many there were.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most `per_window` lines per `window`.
#[derive(Debug)]
pub struct WarnLimit {
    per_window: u32,
    window: Duration,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    start: Option<Instant>,
    count: u32,
    suppressed: u64,
}

impl WarnLimit {
    pub const fn new(per_window: u32, window: Duration) -> WarnLimit {
        WarnLimit {
            per_window,
            window,
            state: Mutex::new(State {
                start: None,
                count: 0,
                suppressed: 0,
            }),
        }
    }

    /// `Some(n)` when a line may be logged now, `n` being the lines held back since the
    /// last one that was; `None` when this one is over the limit (and counted).
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.start.is_none_or(|t| now.duration_since(t) >= self.window) {
            s.start = Some(now);
            s.count = 0;
        }
        if s.count < self.per_window {
            s.count += 1;
            Some(std::mem::take(&mut s.suppressed))
        } else {
            s.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_lets_its_lines_through_and_counts_the_rest() {
        let l = WarnLimit::new(2, Duration::from_secs(1));
        let t = Instant::now();
        assert_eq!(l.allow_at(t), Some(0));
        assert_eq!(l.allow_at(t), Some(0));
        for _ in 0..5 {
            assert_eq!(l.allow_at(t + Duration::from_millis(500)), None);
        }
        // The next window's first line carries what was held back, once.
        assert_eq!(l.allow_at(t + Duration::from_secs(1)), Some(5));
        assert_eq!(l.allow_at(t + Duration::from_secs(1)), Some(0));
        assert_eq!(l.allow_at(t + Duration::from_secs(1)), None);
    }
}
