//! The admin's panel and /metrics over real HTTP on loopback: who gets in and who does
//! not (login, cookie, CSRF, throttling, logout), a thin client's boot report landing in
//! its seat's timeline, and /metrics read by Prometheus' own parser (`promtool check
//! metrics`). The browser drives the same panel against a booting thin client in
//! `cargo xtask e2e panel`.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use vdd::config::Config;
use vdd::http::api::Api;

#[path = "common/api.rs"]
#[allow(dead_code)] // the call helpers are for the API's own tests
mod common;
use common::Table;

const TOKEN: &str = "0123456789abcdef-panel";
const SEAT: &str = "52:54:00:00:cc:01";

/// An answer: status, headers (lower-case names), body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn cookies(&self) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k == "set-cookie")
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/1.1 request with `Connection: close`, read to the end.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Answer {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Answer {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    }
}

/// The value a `Set-Cookie` header gives cookie `name`.
fn cookie_value<'a>(a: &'a Answer, name: &str) -> Option<&'a str> {
    a.cookies().into_iter().find_map(|c| {
        let first = c.split(';').next()?;
        let (k, v) = first.split_once('=')?;
        (k == name).then_some(v)
    })
}

/// The login page's CSRF token and cookie.
fn login_form(addr: SocketAddr) -> (String, String) {
    let page = http(addr, "GET", "/admin/", &[], b"");
    assert_eq!(page.status, 200);
    let text = page.text();
    let csrf = text
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("a csrf field in the login form")
        .to_string();
    let cookie = cookie_value(&page, "vdd_login")
        .expect("the login cookie")
        .to_string();
    assert_eq!(
        csrf, cookie,
        "double submit: the form and the cookie carry one token"
    );
    (csrf, cookie)
}

fn login(addr: SocketAddr, token: &str) -> Answer {
    let (csrf, cookie) = login_form(addr);
    let body = format!("token={token}&csrf={csrf}");
    http(
        addr,
        "POST",
        "/admin/login",
        &[
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("Cookie", &format!("vdd_login={cookie}")),
        ],
        body.as_bytes(),
    )
}

async fn serve(dir: &std::path::Path) -> (SocketAddr, CancellationToken) {
    let text = format!(
        r#"
[server]
interface = "lo"
address = "127.0.0.1/8"
state_dir = "{state}"
[dhcp]
mode = "off"
[[dhcp.host]]
mac = "{SEAT}"
address = "127.0.0.1"
hostname = "seat-one"
[http]
admin_token = "{TOKEN}"
"#,
        state = dir.display(),
    );
    let cfg = Arc::new(Config::parse(&text, &dir.join("c.toml")).unwrap());
    let seats = Table(HashMap::from([(
        IpAddr::from([127, 0, 0, 1]),
        SEAT.parse().unwrap(),
    )]));
    let api = Arc::new(Api {
        cfg: cfg.clone().into(),
        dispatcher: None,
        leases: None,
        seats: Arc::new(seats),
        reload: None,
        hub: Default::default(),
    });
    let s = vdd::http::Service::bind_addr(cfg, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
        .with_api(api);
    let addr = s.local_addr().unwrap();
    let stop = CancellationToken::new();
    let t = stop.clone();
    tokio::spawn(async move { s.run(t).await });
    (addr, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_admin_gets_in() {
    let dir = std::env::temp_dir().join(format!("vdd-panel-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (addr, stop) = serve(&dir).await;
    let r = tokio::task::spawn_blocking(move || {
        // Nothing of the panel without a login: its data, its script, the metrics.
        for path in ["/admin/api/state", "/admin/panel.js", "/admin/api/server"] {
            assert_eq!(http(addr, "GET", path, &[], b"").status, 401, "{path}");
        }
        assert_eq!(http(addr, "GET", "/metrics", &[], b"").status, 403);
        assert_eq!(
            http(addr, "GET", "/admin/api/state", &[("Cookie", "vdd_admin=made-up")], b"").status,
            401
        );

        // The right token: a session cookie as the issue asks, and a way to the panel.
        let ok = login(addr, TOKEN);
        assert_eq!(ok.status, 303, "{}", ok.text());
        assert_eq!(ok.header("location"), Some("/admin/"));
        let set = ok
            .cookies()
            .into_iter()
            .find(|c| c.starts_with("vdd_admin="))
            .expect("the session cookie")
            .to_string();
        for attr in ["HttpOnly", "SameSite=Strict", "Max-Age=43200", "Path=/"] {
            assert!(set.contains(attr), "{attr} missing in {set}");
        }
        let session = cookie_value(&ok, "vdd_admin").unwrap().to_string();
        let cookie = format!("vdd_admin={session}");
        let page = http(addr, "GET", "/admin/", &[("Cookie", &cookie)], b"");
        assert!(page.text().contains("panel.js"), "the panel, not the login");
        assert!(page
            .header("content-security-policy")
            .is_some_and(|c| c.contains("script-src 'self'")));
        let state = http(addr, "GET", "/admin/api/state", &[("Cookie", &cookie)], b"");
        assert_eq!(state.status, 200);
        let csrf = state.json()["csrf"].as_str().unwrap().to_string();
        assert_eq!(csrf.len(), 32);

        // A POST without the CSRF token is refused, with it the action goes through
        // (here: refused by the API, as this server runs no guests).
        let start = br#"{"guest": "demo", "seat": "52:54:00:00:cc:01"}"#;
        let no = http(addr, "POST", "/admin/api/sessions", &[("Cookie", &cookie)], start);
        assert_eq!(no.status, 403);
        assert!(no.text().contains("CSRF"));
        let wrong = http(
            addr,
            "POST",
            "/admin/api/sessions",
            &[("Cookie", &cookie), ("X-CSRF-Token", "0123")],
            start,
        );
        assert_eq!(wrong.status, 403);
        let yes = http(
            addr,
            "POST",
            "/admin/api/sessions",
            &[("Cookie", &cookie), ("X-CSRF-Token", &csrf)],
            start,
        );
        assert_eq!(yes.status, 503, "{}", yes.text());

        // The thin client's report, from its own address: in its seat's timeline.
        let report = br#"{"uptime_ms": 9000, "stages": [{"stage": "pid1", "uptime_ms": 1800}, {"stage": "menu_shown", "uptime_ms": 8500, "detail": "2 guests"}]}"#;
        let r = http(addr, "POST", "/api/v1/boot", &[], report);
        assert_eq!(r.status, 204, "{}", r.text());
        let bad = http(addr, "POST", "/api/v1/boot", &[], br#"{"uptime_ms": 1, "stages": [{"stage": "dhcp_ack", "uptime_ms": 1}]}"#);
        assert_eq!(bad.status, 400, "a stage the server sees itself: {}", bad.text());
        let big = vec![b' '; 8000];
        assert_eq!(http(addr, "POST", "/api/v1/boot", &[], &big).status, 413);
        let seat = http(addr, "GET", &format!("/admin/api/seat/{SEAT}"), &[("Cookie", &cookie)], b"");
        let v = seat.json();
        assert_eq!(v["seat"]["hostname"], "seat-one");
        let stages: Vec<&str> = v["boots"][0]["stages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["stage"].as_str().unwrap())
            .collect();
        assert_eq!(stages, ["pid1", "menu_shown"]);
        assert_eq!(v["boots"][0]["stages"][0]["uptime_ms"], 1800);
        // The room lists the seat, with the stage it is at.
        let room = http(addr, "GET", "/admin/api/state", &[("Cookie", &cookie)], b"").json();
        assert_eq!(room["seats"][0]["mac"], SEAT);
        assert_eq!(room["seats"][0]["stage"]["stage"], "menu_shown");

        // /metrics: with the token; OpenMetrics for Prometheus, the classic format for
        // promtool, which must find nothing to complain about.
        let bearer = format!("Bearer {TOKEN}");
        let m = http(addr, "GET", "/metrics", &[("Authorization", &bearer)], b"");
        assert_eq!(m.status, 200);
        assert!(m.header("content-type").unwrap().starts_with("text/plain; version=0.0.4"));
        let text = m.text();
        assert!(text.contains("vdd_boot_stage_duration_seconds_bucket{le="), "{text}");
        assert!(text.contains("vdd_boot_reports_total{result=\"accepted\"} 1"), "{text}");
        assert!(text.contains("vdd_api_requests_total{route=\"/api/v1/boot\",status=\"204\"} 1"), "{text}");
        promtool_check(&text);
        let om = http(
            addr,
            "GET",
            "/metrics",
            &[("Authorization", &bearer), ("Accept", "application/openmetrics-text; version=1.0.0")],
            b"",
        );
        assert!(om.text().ends_with("# EOF\n"));
        // The panel's login reads them too.
        assert_eq!(http(addr, "GET", "/metrics", &[("Cookie", &cookie)], b"").status, 200);

        // Logout ends the session.
        let out = http(addr, "POST", "/admin/logout", &[("Cookie", &cookie), ("X-CSRF-Token", &csrf)], b"");
        assert_eq!(out.status, 200);
        assert_eq!(http(addr, "GET", "/admin/api/state", &[("Cookie", &cookie)], b"").status, 401);

        // A wrong token: refused after a second, and the next try must wait.
        let t0 = Instant::now();
        let bad = login(addr, "not-the-token");
        assert_eq!(bad.status, 403);
        assert!(bad.text().contains("wrong admin token"));
        assert!(t0.elapsed() >= Duration::from_millis(900), "a failed login is slowed");
        assert!(cookie_value(&bad, "vdd_admin").is_none());
        let again = login(addr, TOKEN);
        assert_eq!(again.status, 429, "even the right token waits after a failure");
        assert!(again.header("retry-after").is_some());
        // A login without the form's token is refused however right the admin token.
        let forged = http(
            addr,
            "POST",
            "/admin/login",
            &[("Content-Type", "application/x-www-form-urlencoded")],
            format!("token={TOKEN}&csrf=abc").as_bytes(),
        );
        assert_eq!(forged.status, 403);
    })
    .await;
    stop.cancel();
    let _ = std::fs::remove_dir_all(&dir);
    r.unwrap();
}

/// `promtool check metrics` (Debian's prometheus package) on the text: it parses the
/// format and lints names, units, help texts and counters' suffixes.
fn promtool_check(text: &str) {
    use std::process::{Command, Stdio};
    let Ok(mut p) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!(
                "promtool is missing (Debian's prometheus package, in xtask/debian-packages.txt)"
            );
        }
        eprintln!("skipping promtool check: promtool not installed (cargo xtask deps test)");
        return;
    };
    p.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = p.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
