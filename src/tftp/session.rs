//! The pure state machine of one read transfer: option negotiation, windows, ACKs,
//! retransmission with backoff, block-number rollover.
//!
//! RFC 1350 (lockstep), RFC 2347 (OACK), RFC 2348 (blksize), RFC 2349 (timeout, tsize),
//! RFC 7440 (windowsize), RFC 1123 section 4.2.3.1 (Sorcerer's Apprentice: a duplicate ACK
//! never triggers a retransmission).
//!
//! No sockets, no clock, no file: the driver passes `now` and each event in, and gets back
//! what to send (the OACK, or a range of blocks it reads from the file) and the deadline of
//! the next timeout. Blocks are numbered with absolute `u64` indices starting at 1; on the
//! wire the number is the index modulo 65536, so block 65535 is followed by block 0
//! (the rollover tftp-hpa, atftp, curl and iPXE all expect).

use std::time::{Duration, Instant};

use super::codec::Mode;

/// RFC 1350's block size, used when the client asks for none.
pub const DEFAULT_BLKSIZE: u16 = 512;
/// RFC 2348 section "blksize": 8..=65464.
pub const BLKSIZE_RANGE: std::ops::RangeInclusive<u64> = 8..=65464;
/// RFC 7440: 1..=65535.
pub const WINDOWSIZE_RANGE: std::ops::RangeInclusive<u64> = 1..=65535;
/// RFC 2349: 1..=255 seconds.
pub const TIMEOUT_RANGE: std::ops::RangeInclusive<u64> = 1..=255;
/// Retransmit timeout when the client names none; tftp-hpa uses the same second.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
/// Consecutive timeouts before the transfer is given up.
pub const DEFAULT_MAX_RETRIES: u32 = 5;
/// The backoff doubles the timeout per retry up to this factor, so a slow link gets
/// room while a vanished client is still noticed in well under half a minute.
pub const MAX_BACKOFF_FACTOR: u32 = 4;
/// Longest a transfer waits without progress, whatever timeout the client asked for. RFC
/// 2349 lets a client ask for 255 s; with the backoff that held a `max_transfers` slot for
/// 81 minutes per unanswered RRQ (and RRQs can come from spoofed addresses). A client on
/// the LAN that has not acknowledged anything for half a minute is gone.
pub const MAX_SILENCE: Duration = Duration::from_secs(30);
/// Longest a whole transfer may take. A boot file over TFTP is at most tens of MiB; at
/// 512-byte lockstep blocks and 1 ms per round trip a 64 MiB file takes 131 s.
pub const MAX_TRANSFER: Duration = Duration::from_secs(600);

/// Most bytes of converted data a netascii transfer keeps: its whole window must be kept
/// for a retransmission (the conversion cannot seek), so windowsize x blksize is bounded
/// here. Unbounded, four never-acknowledged netascii RRQs with the largest blksize and
/// windowsize held 265 MB. Octet transfers re-read the file and keep at most one refill.
pub const NETASCII_WINDOW_BYTES: u64 = 1 << 20;
/// Most bytes of netascii windows all transfers together keep: 256 transfers of 1 MiB
/// each held 316 MiB (`cargo xtask bench floods`). Past it, a new netascii transfer gets
/// the window that is left, one block at least.
pub const NETASCII_TOTAL_BYTES: u64 = 32 << 20;

/// What was agreed with the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub blksize: u16,
    pub windowsize: u16,
    pub timeout: Duration,
    /// The options to answer in an OACK; empty means no OACK (plain RFC 1350).
    pub oack: Vec<(String, String)>,
}

/// Picks the options we accept, RFC 2347: unknown options and out-of-range values are
/// left out of the OACK (ignored, not refused). `size` is the file size, answered to
/// `tsize`; `None` (netascii, whose size on the wire is not known without reading the
/// whole file) omits tsize, which RFC 2349 allows.
pub fn negotiate(options: &[(String, String)], size: Option<u64>) -> Negotiated {
    let mut n = Negotiated {
        blksize: DEFAULT_BLKSIZE,
        windowsize: 1,
        timeout: DEFAULT_TIMEOUT,
        oack: Vec::new(),
    };
    let mut seen = Vec::new();
    for (name, value) in options {
        // A repeated option: the first one counts, as in tftp-hpa.
        if seen.contains(name) {
            continue;
        }
        seen.push(name.clone());
        let num = value.trim().parse::<u64>().ok();
        match (name.as_str(), num) {
            ("blksize", Some(v)) if BLKSIZE_RANGE.contains(&v) => {
                n.blksize = v as u16;
                n.oack.push((name.clone(), v.to_string()));
            }
            ("windowsize", Some(v)) if WINDOWSIZE_RANGE.contains(&v) => {
                n.windowsize = v as u16;
                n.oack.push((name.clone(), v.to_string()));
            }
            ("timeout", Some(v)) if TIMEOUT_RANGE.contains(&v) => {
                n.timeout = Duration::from_secs(v);
                n.oack.push((name.clone(), v.to_string()));
            }
            ("tsize", Some(_)) => {
                if let Some(s) = size {
                    n.oack.push((name.clone(), s.to_string()));
                }
            }
            _ => {}
        }
    }
    n
}

/// Lowers the agreed window so that a window holds at most `max_bytes` of payload (at
/// least one block), and says so in the OACK: RFC 7440 section 4 lets the server answer a
/// smaller windowsize than asked.
pub fn bound_window(n: &mut Negotiated, max_bytes: u64) {
    let most = (max_bytes / u64::from(n.blksize)).clamp(1, u64::from(u16::MAX)) as u16;
    if n.windowsize <= most {
        return;
    }
    n.windowsize = most;
    for (name, value) in &mut n.oack {
        if name == "windowsize" {
            *value = most.to_string();
        }
    }
}

/// Number of DATA blocks of an octet transfer of `size` bytes: a file whose size is a
/// multiple of the block size ends with an empty block (RFC 1350 section 6).
pub fn block_count(size: u64, blksize: u16) -> u64 {
    size / u64::from(blksize) + 1
}

/// The size of a netascii file on the wire is unknown up front; octet sizes are.
pub fn wire_size_known(mode: Mode) -> bool {
    mode == Mode::Octet
}

/// What the driver sends now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Send {
    Nothing,
    /// The OACK (again).
    Oack,
    /// DATA blocks with absolute indices `first..=last` (wire number = index % 65536).
    Blocks {
        first: u64,
        last: u64,
    },
}

/// Where the transfer goes after this event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Wait for a packet until this deadline, then call [`Session::on_timeout`].
    Wait(Instant),
    /// The last block was acknowledged.
    Done,
    /// The client sent ERROR: end at once, send nothing (not even on retransmit).
    ClientError { code: u16 },
    /// Too many timeouts in a row, or `MAX_SILENCE` without progress: the client is gone.
    GaveUp,
    /// The transfer ran for `MAX_TRANSFER`: ended, however it progressed.
    TooLong,
}

/// The result of one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub send: Send,
    pub next: Next,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// OACK sent, waiting for ACK 0.
    Oack,
    Data,
    Finished,
}

/// One read transfer.
#[derive(Debug, Clone)]
pub struct Session {
    phase: Phase,
    windowsize: u64,
    timeout: Duration,
    max_retries: u32,
    /// Highest block index the client acknowledged (0 before any).
    acked: u64,
    /// Highest block index sent so far.
    sent: u64,
    /// Index of the final (short) block, once known.
    last: Option<u64>,
    /// Consecutive timeouts without progress.
    retries: u32,
    deadline: Instant,
    /// When the client last made progress (the transfer's start before it did).
    progress_at: Instant,
    started: Instant,
}

impl Session {
    /// A session for agreed options. `blocks` is the block count when known up front
    /// (octet), `None` for netascii; then the driver reports the last block through
    /// [`Session::set_last`] when it reads a short one.
    pub fn new(n: &Negotiated, blocks: Option<u64>, now: Instant) -> (Session, Step) {
        let mut s = Session {
            phase: if n.oack.is_empty() {
                Phase::Data
            } else {
                Phase::Oack
            },
            windowsize: u64::from(n.windowsize.max(1)),
            timeout: n.timeout,
            max_retries: DEFAULT_MAX_RETRIES,
            acked: 0,
            sent: 0,
            last: blocks,
            retries: 0,
            deadline: now,
            progress_at: now,
            started: now,
        };
        let step = match s.phase {
            Phase::Oack => s.wait(Send::Oack, now),
            _ => {
                let send = s.window_from(1);
                s.wait(send, now)
            }
        };
        (s, step)
    }

    /// Changes the give-up bound (tests, and the driver's tuning).
    pub fn with_max_retries(mut self, n: u32) -> Session {
        self.max_retries = n;
        self
    }

    /// The driver read a short block at `index`: it is the last one.
    pub fn set_last(&mut self, index: u64) {
        self.last = Some(index);
        self.sent = self.sent.min(index);
    }

    /// Blocks the client acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// The deadline of the current wait.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    fn window_from(&mut self, first: u64) -> Send {
        let mut last = first + self.windowsize - 1;
        if let Some(l) = self.last {
            last = last.min(l);
        }
        if first > last {
            return Send::Nothing;
        }
        self.sent = self.sent.max(last);
        Send::Blocks { first, last }
    }

    fn backoff(&self) -> Duration {
        let factor = 1u32 << self.retries.min(MAX_BACKOFF_FACTOR.trailing_zeros());
        self.timeout * factor
    }

    fn wait(&mut self, send: Send, now: Instant) -> Step {
        self.deadline = (now + self.backoff())
            .min(self.progress_at + MAX_SILENCE)
            .min(self.started + MAX_TRANSFER);
        Step {
            send,
            next: Next::Wait(self.deadline),
        }
    }

    /// Nothing happened that matters (a stray packet): keep the current deadline.
    pub fn waiting(&self) -> Step {
        if self.phase == Phase::Finished {
            return Step {
                send: Send::Nothing,
                next: Next::Done,
            };
        }
        self.keep_waiting()
    }

    fn keep_waiting(&self) -> Step {
        Step {
            send: Send::Nothing,
            next: Next::Wait(self.deadline),
        }
    }

    /// An ACK with wire block number `block` arrived.
    pub fn on_ack(&mut self, block: u16, now: Instant) -> Step {
        match self.phase {
            Phase::Finished => Step {
                send: Send::Nothing,
                next: Next::Done,
            },
            Phase::Oack => {
                if block != 0 {
                    // Not an answer to the OACK; RFC 2347 has the client ACK 0.
                    return self.keep_waiting();
                }
                self.phase = Phase::Data;
                self.retries = 0;
                self.progress_at = now;
                let send = self.window_from(1);
                self.wait(send, now)
            }
            Phase::Data => {
                // Map the 16-bit number onto the blocks in flight, (acked, sent]. A window
                // is at most 65535 blocks, so the mapping is unique across rollovers.
                let delta = u64::from(block.wrapping_sub(self.acked as u16));
                if delta == 0 || delta > self.sent - self.acked {
                    // A duplicate or stale ACK: ignored, never answered with a
                    // retransmission (Sorcerer's Apprentice, RFC 1123 4.2.3.1). The
                    // timeout still covers a lost window.
                    return self.keep_waiting();
                }
                self.acked += delta;
                self.retries = 0;
                self.progress_at = now;
                if self.last == Some(self.acked) {
                    self.phase = Phase::Finished;
                    return Step {
                        send: Send::Nothing,
                        next: Next::Done,
                    };
                }
                // RFC 7440: an ACK ends the window; a short one means the client missed
                // the block after it, so the next window starts right there.
                let send = self.window_from(self.acked + 1);
                self.wait(send, now)
            }
        }
    }

    /// The client sent ERROR: the transfer ends at once with nothing sent. This is what
    /// a PXE ROM does after asking tsize (ERROR 8 to the OACK).
    pub fn on_error(&mut self, code: u16) -> Step {
        self.phase = Phase::Finished;
        Step {
            send: Send::Nothing,
            next: Next::ClientError { code },
        }
    }

    /// The deadline passed without progress: resend the OACK or the unacknowledged
    /// window with a doubled timeout, or give up after `max_retries`.
    pub fn on_timeout(&mut self, now: Instant) -> Step {
        if self.phase == Phase::Finished {
            return Step {
                send: Send::Nothing,
                next: Next::Done,
            };
        }
        if now < self.deadline {
            return self.keep_waiting();
        }
        if now >= self.started + MAX_TRANSFER {
            self.phase = Phase::Finished;
            return Step {
                send: Send::Nothing,
                next: Next::TooLong,
            };
        }
        if self.retries >= self.max_retries || now >= self.progress_at + MAX_SILENCE {
            self.phase = Phase::Finished;
            return Step {
                send: Send::Nothing,
                next: Next::GaveUp,
            };
        }
        self.retries += 1;
        let send = match self.phase {
            Phase::Oack => Send::Oack,
            _ => self.window_from(self.acked + 1),
        };
        self.wait(send, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    fn plain() -> Negotiated {
        negotiate(&[], Some(0))
    }

    #[test]
    fn no_options_means_no_oack_and_512() {
        let n = negotiate(&[], Some(1000));
        assert!(n.oack.is_empty());
        assert_eq!(n.blksize, 512);
        assert_eq!(n.windowsize, 1);
    }

    #[test]
    fn options_in_range_are_answered() {
        let n = negotiate(
            &opts(&[
                ("blksize", "1468"),
                ("tsize", "0"),
                ("windowsize", "16"),
                ("timeout", "3"),
            ]),
            Some(4242),
        );
        assert_eq!(n.blksize, 1468);
        assert_eq!(n.windowsize, 16);
        assert_eq!(n.timeout, Duration::from_secs(3));
        assert_eq!(
            n.oack,
            opts(&[
                ("blksize", "1468"),
                ("tsize", "4242"),
                ("windowsize", "16"),
                ("timeout", "3")
            ])
        );
    }

    #[test]
    fn out_of_range_and_unknown_are_ignored() {
        let n = negotiate(
            &opts(&[
                ("blksize", "7"),
                ("blksize", "1024"), // repeated: first one counts, and it was ignored
                ("windowsize", "0"),
                ("timeout", "256"),
                ("multicast", ""),
                ("tsize", "x"),
                ("blksize2", "9"),
            ]),
            Some(1),
        );
        assert!(n.oack.is_empty(), "{:?}", n.oack);
        assert_eq!(n.blksize, 512);
        let n = negotiate(
            &opts(&[("blksize", "65465"), ("windowsize", "65536")]),
            None,
        );
        assert!(n.oack.is_empty());
        let n = negotiate(
            &opts(&[("blksize", "65464"), ("windowsize", "65535")]),
            None,
        );
        assert_eq!((n.blksize, n.windowsize), (65464, 65535));
        let n = negotiate(&opts(&[("blksize", "8"), ("timeout", "1")]), None);
        assert_eq!(n.blksize, 8);
        assert_eq!(n.timeout, Duration::from_secs(1));
    }

    #[test]
    fn tsize_omitted_when_size_unknown() {
        let n = negotiate(&opts(&[("tsize", "0")]), None);
        assert!(n.oack.is_empty());
    }

    #[test]
    fn netascii_windows_are_bounded_in_bytes() {
        let mut n = negotiate(
            &opts(&[("blksize", "65464"), ("windowsize", "65535")]),
            None,
        );
        bound_window(&mut n, NETASCII_WINDOW_BYTES);
        assert_eq!(n.windowsize, 16);
        assert_eq!(n.oack[1], ("windowsize".to_string(), "16".to_string()));
        // A window that fits is left as asked; one block always fits.
        let mut n = negotiate(&opts(&[("blksize", "1428"), ("windowsize", "16")]), None);
        bound_window(&mut n, NETASCII_WINDOW_BYTES);
        assert_eq!(n.windowsize, 16);
        let mut n = negotiate(&opts(&[("blksize", "65464"), ("windowsize", "4")]), None);
        bound_window(&mut n, 1000);
        assert_eq!(n.windowsize, 1);
    }

    #[test]
    fn block_counts() {
        assert_eq!(block_count(0, 512), 1);
        assert_eq!(block_count(511, 512), 1);
        assert_eq!(block_count(512, 512), 2);
        assert_eq!(block_count(64 << 20, 512), 131073);
    }

    #[test]
    fn lockstep_transfer() {
        let t = Instant::now();
        let (mut s, st) = Session::new(&plain(), Some(3), t);
        assert_eq!(st.send, Send::Blocks { first: 1, last: 1 });
        assert_eq!(st.next, Next::Wait(t + Duration::from_secs(1)));
        let st = s.on_ack(1, t);
        assert_eq!(st.send, Send::Blocks { first: 2, last: 2 });
        let st = s.on_ack(2, t);
        assert_eq!(st.send, Send::Blocks { first: 3, last: 3 });
        let st = s.on_ack(3, t);
        assert_eq!(st.next, Next::Done);
        assert_eq!(st.send, Send::Nothing);
    }

    #[test]
    fn duplicate_ack_is_ignored() {
        let t = Instant::now();
        let (mut s, _) = Session::new(&plain(), Some(5), t);
        s.on_ack(1, t);
        let st = s.on_ack(1, t + Duration::from_millis(10));
        // Sorcerer's Apprentice: no second copy of block 2.
        assert_eq!(st.send, Send::Nothing);
        assert_eq!(st.next, Next::Wait(t + Duration::from_secs(1)));
        // An ACK from the future is ignored too.
        assert_eq!(s.on_ack(9, t).send, Send::Nothing);
        assert_eq!(s.acked(), 1);
    }

    #[test]
    fn oack_then_error_8_ends_without_sending() {
        let t = Instant::now();
        let n = negotiate(&opts(&[("tsize", "0")]), Some(100));
        let (mut s, st) = Session::new(&n, Some(1), t);
        assert_eq!(st.send, Send::Oack);
        let st = s.on_error(8);
        assert_eq!(st.send, Send::Nothing);
        assert_eq!(st.next, Next::ClientError { code: 8 });
        // Even a late timeout sends nothing.
        let st = s.on_timeout(t + Duration::from_secs(100));
        assert_eq!(st.send, Send::Nothing);
        assert_eq!(st.next, Next::Done);
    }

    #[test]
    fn oack_waits_for_ack_0_and_is_resent() {
        let t = Instant::now();
        let n = negotiate(&opts(&[("blksize", "1024")]), Some(100));
        let (mut s, _) = Session::new(&n, Some(1), t);
        assert_eq!(s.on_ack(1, t).send, Send::Nothing);
        let st = s.on_timeout(t + Duration::from_secs(1));
        assert_eq!(st.send, Send::Oack);
        assert_eq!(st.next, Next::Wait(t + Duration::from_secs(3)));
        let st = s.on_ack(0, t + Duration::from_secs(2));
        assert_eq!(st.send, Send::Blocks { first: 1, last: 1 });
        assert_eq!(s.on_ack(1, t).next, Next::Done);
    }

    #[test]
    fn windows_of_16() {
        let t = Instant::now();
        let n = negotiate(&opts(&[("windowsize", "16")]), Some(0));
        let (mut s, _) = Session::new(&n, Some(40), t);
        let st = s.on_ack(0, t);
        assert_eq!(st.send, Send::Blocks { first: 1, last: 16 });
        // An ACK inside the window: block 11 was lost, resend from there.
        let st = s.on_ack(10, t);
        assert_eq!(
            st.send,
            Send::Blocks {
                first: 11,
                last: 26
            }
        );
        let st = s.on_ack(26, t);
        assert_eq!(
            st.send,
            Send::Blocks {
                first: 27,
                last: 40
            }
        );
        // A duplicate of the last window's ACK: nothing.
        assert_eq!(s.on_ack(26, t).send, Send::Nothing);
        assert_eq!(s.on_ack(40, t).next, Next::Done);
    }

    /// Issue 17, finding 2: one RRQ with `timeout=255`, never acknowledged, held its slot
    /// for about 81 minutes (255 s, then 4x backoff over 5 retries).
    #[test]
    fn a_silent_client_is_given_up_after_max_silence_whatever_its_timeout() {
        let t0 = Instant::now();
        let n = negotiate(&opts(&[("timeout", "255")]), Some(100));
        assert_eq!(n.timeout, Duration::from_secs(255));
        let (mut s, step) = Session::new(&n, Some(1), t0);
        assert_eq!(step.next, Next::Wait(t0 + MAX_SILENCE));
        assert_eq!(s.on_timeout(t0 + MAX_SILENCE).next, Next::GaveUp);

        // With progress, the silence counts from the last ACK, and a short timeout still
        // retransmits as before.
        let n = negotiate(&opts(&[("timeout", "20"), ("blksize", "8")]), Some(800));
        let (mut s, _) = Session::new(&n, Some(100), t0);
        let t1 = t0 + Duration::from_secs(5);
        let step = s.on_ack(0, t1);
        assert_eq!(step.next, Next::Wait(t1 + Duration::from_secs(20)));
        let step = s.on_timeout(t1 + Duration::from_secs(20));
        assert!(
            matches!(step.send, Send::Blocks { first: 1, .. }),
            "{step:?}"
        );
        // The doubled wait (40 s) is cut at 30 s after the last progress.
        assert_eq!(step.next, Next::Wait(t1 + MAX_SILENCE));
        assert_eq!(s.on_timeout(t1 + MAX_SILENCE).next, Next::GaveUp);
    }

    #[test]
    fn a_transfer_ends_after_max_transfer_however_it_progresses() {
        let t0 = Instant::now();
        let end = t0 + MAX_TRANSFER;
        let n = negotiate(&opts(&[("blksize", "8")]), None);
        let (mut s, _) = Session::new(&n, None, t0);
        // An ACK every 20 s is progress, but no wait reaches past MAX_TRANSFER.
        let mut now = t0;
        let mut block: u16 = 1;
        while now + Duration::from_secs(20) < end {
            now += Duration::from_secs(20);
            let Next::Wait(d) = s.on_ack(block, now).next else {
                panic!("ended early")
            };
            assert!(d <= end);
            block += 1;
        }
        assert_eq!(s.on_timeout(end).next, Next::TooLong);
    }

    #[test]
    fn timeout_resends_window_with_backoff_then_gives_up() {
        let t = Instant::now();
        let n = negotiate(&opts(&[("windowsize", "4")]), Some(0));
        let (s, _) = Session::new(&n, Some(100), t);
        let mut s = s.with_max_retries(3);
        s.on_ack(0, t);
        s.on_ack(2, t);
        // Early wake-ups change nothing.
        assert_eq!(s.on_timeout(t).send, Send::Nothing);
        let mut now = t;
        let mut waits = Vec::new();
        for _ in 0..3 {
            now = s.deadline();
            let st = s.on_timeout(now);
            assert_eq!(st.send, Send::Blocks { first: 3, last: 6 });
            let Next::Wait(d) = st.next else { panic!() };
            waits.push((d - now).as_secs());
        }
        assert_eq!(waits, vec![2, 4, 4]);
        let st = s.on_timeout(s.deadline());
        assert_eq!(st.next, Next::GaveUp);
        assert_eq!(st.send, Send::Nothing);
        // Progress resets the backoff.
        let (mut s, _) = Session::new(&n, Some(100), now);
        s.on_ack(0, now);
        s.on_timeout(s.deadline());
        let st = s.on_ack(4, now);
        assert_eq!(st.next, Next::Wait(now + Duration::from_secs(1)));
    }

    #[test]
    fn block_numbers_roll_over_to_zero() {
        let t = Instant::now();
        let total = 70_000;
        let (mut s, _) = Session::new(&plain(), Some(total), t);
        for i in 1..total {
            let st = s.on_ack((i % 65536) as u16, t);
            assert_eq!(
                st.send,
                Send::Blocks {
                    first: i + 1,
                    last: i + 1
                },
                "at {i}"
            );
        }
        assert_eq!(s.on_ack((total % 65536) as u16, t).next, Next::Done);
    }

    #[test]
    fn rollover_inside_a_window() {
        let t = Instant::now();
        let n = negotiate(&opts(&[("windowsize", "16")]), Some(0));
        let (mut s, _) = Session::new(&n, Some(70_000), t);
        s.on_ack(0, t);
        // Walk to 65530 acked.
        let mut acked = 0u64;
        while acked + 16 <= 65530 {
            acked += 16;
            s.on_ack(acked as u16, t);
        }
        let st = s.on_ack(65530u64 as u16, t);
        assert_eq!(
            st.send,
            Send::Blocks {
                first: 65531,
                last: 65546
            }
        );
        // Wire block 3 is absolute 65539 (65536 -> 0).
        let st = s.on_ack(3, t);
        assert_eq!(s.acked(), 65539);
        assert_eq!(
            st.send,
            Send::Blocks {
                first: 65540,
                last: 65555
            }
        );
    }

    #[test]
    fn unknown_length_is_learned() {
        let t = Instant::now();
        let n = negotiate(&opts(&[("windowsize", "8")]), None);
        let (mut s, _) = Session::new(&n, None, t);
        assert_eq!(s.on_ack(0, t).send, Send::Blocks { first: 1, last: 8 });
        // The driver found block 5 short.
        s.set_last(5);
        assert_eq!(s.on_ack(3, t).send, Send::Blocks { first: 4, last: 5 });
        assert_eq!(s.on_ack(5, t).next, Next::Done);
    }

    #[test]
    fn any_client_error_aborts_mid_transfer() {
        let t = Instant::now();
        let (mut s, _) = Session::new(&plain(), Some(10), t);
        s.on_ack(1, t);
        assert_eq!(s.on_error(0).next, Next::ClientError { code: 0 });
        assert_eq!(s.on_ack(2, t).send, Send::Nothing);
    }
}
