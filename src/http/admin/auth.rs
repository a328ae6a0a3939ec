//! Who is logged in to the panel: admin sessions behind an HttpOnly, SameSite=Strict
//! cookie, each with its CSRF token, and the brake on failed logins. Pure: the time is
//! passed in; the driver sleeps and logs.
//!
//! The secret is `[http] admin_token`, the one that already guards the API, rather than
//! a password hash of its own: the config must hold the token in clear anyway (`vdd
//! status` and scripts send it), so a hash for the panel would guard a second door
//! while the first key hangs beside it. The token is at least 16 characters the admin
//! generated, not a word a person picked, which is what a slow hash defends against.
//! The browser keeps only the session cookie, never the token.
//!
//! Failed logins: each one is answered after a second, and makes its address wait
//! before its next try is even looked at (2 s, doubling to [`MAX_WAIT`]), and all addresses together may fail at most
//! [`GLOBAL_FAILURES`] times a minute (a host with many addresses gains nothing).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// An admin session ends after this long without a request...
pub const IDLE: Duration = Duration::from_secs(30 * 60);
/// ...and after this long in any case (the cookie's Max-Age).
pub const LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// Admin sessions at once; a new login beyond it ends the oldest.
const MAX_SESSIONS: usize = 32;
/// The longest an address waits after failures.
pub const MAX_WAIT: Duration = Duration::from_secs(60);
/// Failed logins of all addresses together per minute.
const GLOBAL_FAILURES: usize = 30;
/// Addresses whose failures are remembered (the oldest are forgotten past it).
const MAX_ADDRESSES: usize = 1024;

/// One logged-in browser.
#[derive(Clone, Debug)]
pub struct AdminSession {
    /// The token every state-changing request must show (`X-CSRF-Token`).
    pub csrf: String,
    pub created: Instant,
    pub last: Instant,
}

#[derive(Clone, Copy, Debug)]
struct Failures {
    count: u32,
    /// No try of this address is looked at before this.
    next: Instant,
}

/// Why a login was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// Too soon after failures: try again after this long (429).
    Wait(Duration),
    /// Wrong token (403); the caller sleeps a second before it answers.
    Wrong,
    /// No `[http] admin_token` is configured: nobody can log in.
    NoToken,
}

/// The panel's logins.
#[derive(Debug, Default)]
pub struct Auth {
    sessions: HashMap<String, AdminSession>,
    failures: HashMap<IpAddr, Failures>,
    /// When the failures of the last minute happened (all addresses).
    recent: Vec<Instant>,
}

/// 128 random bits, hex: session ids and CSRF tokens.
pub fn random_token() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("the kernel's random source");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn same(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq;
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

impl Auth {
    /// Checks `given` against `token`; a new session id and its CSRF token on success.
    pub fn login(
        &mut self,
        ip: IpAddr,
        given: &str,
        token: Option<&str>,
        now: Instant,
    ) -> Result<(String, AdminSession), Refused> {
        self.recent
            .retain(|t| now.saturating_duration_since(*t) < Duration::from_secs(60));
        if let Some(f) = self.failures.get(&ip) {
            if f.next > now {
                return Err(Refused::Wait(f.next - now));
            }
        }
        if self.recent.len() >= GLOBAL_FAILURES {
            let oldest = self.recent[0];
            return Err(Refused::Wait(
                Duration::from_secs(60).saturating_sub(now.saturating_duration_since(oldest)),
            ));
        }
        let Some(token) = token else {
            return Err(Refused::NoToken);
        };
        if given.is_empty() || !same(given, token) {
            self.fail(ip, now);
            return Err(Refused::Wrong);
        }
        self.failures.remove(&ip);
        self.sessions
            .retain(|_, s| now.saturating_duration_since(s.last) < IDLE);
        if self.sessions.len() >= MAX_SESSIONS {
            if let Some(oldest) = self
                .sessions
                .iter()
                .min_by_key(|(_, s)| s.created)
                .map(|(k, _)| k.clone())
            {
                self.sessions.remove(&oldest);
            }
        }
        let s = AdminSession {
            csrf: random_token(),
            created: now,
            last: now,
        };
        let id = random_token();
        self.sessions.insert(id.clone(), s.clone());
        Ok((id, s))
    }

    fn fail(&mut self, ip: IpAddr, now: Instant) {
        self.recent.push(now);
        if self.failures.len() >= MAX_ADDRESSES && !self.failures.contains_key(&ip) {
            // Forget the address that may try again soonest.
            if let Some(k) = self
                .failures
                .iter()
                .min_by_key(|(_, f)| f.next)
                .map(|(k, _)| *k)
            {
                self.failures.remove(&k);
            }
        }
        let f = self.failures.entry(ip).or_insert(Failures {
            count: 0,
            next: now,
        });
        f.count += 1;
        // 2 s, doubling: the first second of it passes while the answer is held back.
        let wait = Duration::from_secs(1u64 << f.count.min(6)).min(MAX_WAIT);
        f.next = now + wait;
    }

    /// The session of cookie value `id`, if it is still valid; marks it used.
    pub fn session(&mut self, id: &str, now: Instant) -> Option<AdminSession> {
        let s = self.sessions.get_mut(id)?;
        if now.saturating_duration_since(s.last) >= IDLE
            || now.saturating_duration_since(s.created) >= LIFETIME
        {
            self.sessions.remove(id);
            return None;
        }
        s.last = now;
        Some(s.clone())
    }

    /// Ends a session (logout).
    pub fn logout(&mut self, id: &str) {
        self.sessions.remove(id);
    }

    /// Whether `given` is the CSRF token of session `s` (constant time).
    pub fn csrf_ok(s: &AdminSession, given: Option<&str>) -> bool {
        given.is_some_and(|g| !g.is_empty() && same(g, &s.csrf))
    }
}

/// The value of cookie `name` in a `Cookie` header (RFC 6265 5.4: `a=b; c=d`).
pub fn cookie<'a>(header: Option<&'a str>, name: &str) -> Option<&'a str> {
    header?.split(';').find_map(|kv| {
        let (k, v) = kv.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "e2e-admin-token-0123456789";

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 77, 0, n])
    }

    #[test]
    fn logins_sessions_and_their_end() {
        let mut a = Auth::default();
        let t = Instant::now();
        let (id, s) = a.login(ip(1), TOKEN, Some(TOKEN), t).unwrap();
        assert_eq!((id.len(), s.csrf.len()), (32, 32));
        assert_ne!(id, s.csrf);
        assert!(a.session(&id, t + Duration::from_secs(60)).is_some());
        assert!(Auth::csrf_ok(&s, Some(&s.csrf)));
        assert!(!Auth::csrf_ok(&s, None));
        assert!(!Auth::csrf_ok(&s, Some("")));
        assert!(!Auth::csrf_ok(&s, Some(&id)));
        // Idle too long: gone.
        assert!(a.session(&id, t + Duration::from_secs(60) + IDLE).is_none());
        let (id, _) = a.login(ip(1), TOKEN, Some(TOKEN), t).unwrap();
        a.logout(&id);
        assert!(a.session(&id, t).is_none());
        assert!(a.session("nonsense", t).is_none());
        assert_eq!(
            a.login(ip(1), TOKEN, None, t).unwrap_err(),
            Refused::NoToken
        );
    }

    #[test]
    fn failures_slow_an_address_down_and_all_of_them_together() {
        let mut a = Auth::default();
        let t = Instant::now();
        assert_eq!(
            a.login(ip(2), "guess", Some(TOKEN), t).unwrap_err(),
            Refused::Wrong
        );
        // Even the right token waits its turn now.
        assert_eq!(
            a.login(ip(2), TOKEN, Some(TOKEN), t).unwrap_err(),
            Refused::Wait(Duration::from_secs(2))
        );
        let t2 = t + Duration::from_secs(2);
        assert_eq!(
            a.login(ip(2), "guess", Some(TOKEN), t2).unwrap_err(),
            Refused::Wrong
        );
        assert_eq!(
            a.login(ip(2), "x", Some(TOKEN), t2 + Duration::from_millis(500))
                .unwrap_err(),
            Refused::Wait(Duration::from_millis(3500))
        );
        // Another address is not slowed by this one...
        assert!(a.login(ip(3), TOKEN, Some(TOKEN), t2).is_ok());
        // ...until all together failed GLOBAL_FAILURES times in a minute.
        for n in 0..GLOBAL_FAILURES as u8 {
            let _ = a.login(ip(100 + n), "guess", Some(TOKEN), t2);
        }
        assert!(matches!(
            a.login(ip(4), TOKEN, Some(TOKEN), t2),
            Err(Refused::Wait(_))
        ));
        assert!(a
            .login(ip(4), TOKEN, Some(TOKEN), t2 + Duration::from_secs(61))
            .is_ok());
    }

    #[test]
    fn cookies() {
        let h = Some("a=1; vdd_admin=abc; b=2");
        assert_eq!(cookie(h, "vdd_admin"), Some("abc"));
        assert_eq!(cookie(h, "b"), Some("2"));
        assert_eq!(cookie(h, "c"), None);
        assert_eq!(cookie(None, "a"), None);
    }
}
