//! What boot-menu reads from vdd's HTTP API: the raw response (`guests::parse_response`:
//! status line, headers, Content-Length or chunked body), then the JSON of the guest list
//! (`guests::parse_list`) or of a session (`sessions::Session`, one or a list).
//!
//! Input: one byte choosing which JSON the body is read as, then the whole response.
//! Invariants: a body is at most 1 MiB and, when not chunked, a slice of the response;
//! guest titles are never empty for a named guest; the shell scripts made from a session
//! quote exactly what the fixed template quotes (a server's text cannot reach the shell).
#![no_main]

use boot_menu::guests;
use boot_menu::sessions::{self, Session};
use libfuzzer_sys::fuzz_target;

fn check_session(s: &Session) {
    let script = sessions::vnc_script(s);
    let template = sessions::vnc_script(&Session {
        id: String::new(),
        guest: String::new(),
        protocol: sessions::Protocol::Vnc,
        host: None,
        port: 0,
        password: None,
        state: sessions::SessionState::Ready,
        error: None,
        key: None,
        // Numbers only: the fit script it adds is the template's own.
        screen: s.screen,
    });
    assert_eq!(script.matches('\'').count(), template.matches('\'').count());
    assert_eq!(script.matches(';').count(), template.matches(';').count());
    let t = s.target();
    assert!(t.ends_with(&format!(":{}", s.port)));
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, raw)) = data.split_first() else {
        return;
    };
    let body = match guests::parse_response(raw) {
        Ok(b) => {
            assert!(b.len() <= 1 << 20, "body of {} bytes", b.len());
            let chunked = raw.windows(7).any(|w| w.eq_ignore_ascii_case(b"chunked"));
            if !chunked && !b.is_empty() {
                assert!(
                    raw.windows(b.len()).any(|w| w == &b[..]),
                    "body is not from the response"
                );
            }
            b
        }
        // A refusal or a malformed answer: the menu shows it; feed the JSON parsers the
        // raw bytes anyway, as corpus for them.
        Err(_) => raw.to_vec(),
    };
    match sel % 3 {
        0 => {
            if let Ok(list) = guests::parse_list(&body) {
                for g in &list {
                    assert!(g.name.is_empty() || !g.title().is_empty());
                }
            }
        }
        1 => {
            if let Ok(s) = serde_json::from_slice::<Session>(&body) {
                check_session(&s);
            }
        }
        _ => {
            if let Ok(v) = serde_json::from_slice::<Vec<Session>>(&body) {
                v.iter().for_each(check_session);
            }
        }
    }
});
