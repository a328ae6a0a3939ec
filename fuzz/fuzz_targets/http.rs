//! HTTP server input: `parse_request` on a request head, the route it names (the `mac=`
//! query, `/boot/<mac>/...`, `/files/<name>` with percent-decoding and the name check),
//! and the answer to a file request with its `Range` / `If-Range` / `If-None-Match`.
//!
//! Input: two bytes of file length (in KiB, plus the low byte as bytes), then the head.
//! Invariants: a complete head's length is within the buffer and `MAX_HEAD`, and the head
//! alone parses the same; a MAC that parses prints and parses back to itself; percent-
//! encoding any decoded text decodes back to it; names that pass the check are plain
//! relative paths; a body range stays inside the file and matches Content-Length and
//! Content-Range; the response head is one head, ended once.
#![no_main]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use vdd::config::Mac;
use vdd::http::codec::{self, MAX_HEAD};
use vdd::http::files;
use vdd::http::range::{self, RangeDecision};
use vdd::http::routes::{self, FileInfo, Method, Route};

fn mac_round_trip(m: Mac) {
    let s = m.to_string();
    assert_eq!(s.parse::<Mac>(), Ok(m), "{s}");
}

fn encode_all(s: &str) -> String {
    s.bytes().map(|b| format!("%{b:02X}")).collect()
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n")
        .filter_map(|l| l.split_once(": "))
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let len = u64::from(data[0]) * 1024 + u64::from(data[1]);
    let buf = &data[2..];
    let parsed = codec::parse_request(buf);
    let (req, n) = match parsed {
        Ok(Some(r)) => r,
        Ok(None) => {
            assert!(buf.len() <= MAX_HEAD, "an incomplete head past MAX_HEAD");
            return;
        }
        Err(_) => return,
    };
    assert!(n <= buf.len() && n <= MAX_HEAD);
    assert_eq!(
        codec::parse_request(&buf[..n]),
        Ok(Some((req.clone(), n))),
        "the head alone parses the same"
    );
    let _ = (req.keep_alive(), req.has_body());

    let target = req.target.as_str();
    let (_, query) = target.split_once('?').unwrap_or((target, ""));
    if let Some(m) = codec::query_param(query, "mac") {
        if let Ok(mac) = m.parse::<Mac>() {
            mac_round_trip(mac);
        }
    }
    for piece in [target, query] {
        if let Some(d) = codec::percent_decode(piece) {
            assert_eq!(codec::percent_decode(&encode_all(&d)).as_deref(), Some(&*d));
            if !piece.contains('%') {
                assert_eq!(d, piece);
            }
        }
    }
    match routes::route(target) {
        Route::BootScript { mac } | Route::BootFile { mac, .. } => {
            if let Some(m) = mac {
                mac_round_trip(m);
            }
        }
        Route::File { name } => {
            if let Ok(p) = files::check_name(&name) {
                assert!(p
                    .components()
                    .all(|c| matches!(c, std::path::Component::Normal(_))));
            }
        }
        Route::NotFound => {}
    }

    let range_hdr = req.header("range");
    let d = range::decide(range_hdr, len);
    match d {
        RangeDecision::Partial { first, last } => {
            assert!(first <= last && last < len, "{first}-{last} of {len}");
            assert_eq!(
                range::content_range(d, len),
                Some(format!("bytes {first}-{last}/{len}"))
            );
        }
        RangeDecision::Unsatisfiable => {
            assert!(range_hdr.is_some());
            assert_eq!(range::content_range(d, len), Some(format!("bytes */{len}")));
        }
        RangeDecision::Full => assert_eq!(range::content_range(d, len), None),
    }
    let Some(method) = routes::Method::parse(&req.method) else {
        return;
    };
    let f = FileInfo {
        len,
        mtime: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
    };
    let a = routes::file_answer(
        method,
        range_hdr,
        req.header("if-range"),
        req.header("if-none-match"),
        "application/octet-stream",
        f,
    );
    let wire = a.head.encode(
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        true,
    );
    let head = String::from_utf8(wire).expect("our head is text");
    assert!(head.ends_with("\r\n\r\n"));
    assert_eq!(head.matches("\r\n\r\n").count(), 1, "one head: {head:?}");
    assert!(!head.contains('\0'));
    if let Some((off, n)) = a.body {
        assert_eq!(method, Method::Get);
        assert!(
            off.checked_add(n).is_some_and(|e| e <= len),
            "body {off}+{n} of {len}"
        );
        assert_eq!(header(&head, "content-length"), Some(&*n.to_string()));
    }
});
