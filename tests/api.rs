//! The session API's answers, every error path included, over a real dispatcher (QEMU
//! with the demo guest). Seats are looked up through a fixed table here; in `vdd serve`
//! it is the DHCP leases and the neighbour table.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use serde_json::Value;
use vdd::config::Config;
use vdd::dispatch::Dispatcher;
use vdd::http::api::Api;

#[path = "common/api.rs"]
mod common;
use common::{call_key, ip, Table};

const TOKEN: &str = "0123456789abcdef0123";
const SEAT1: &str = "52:54:00:00:bb:01";
const SEAT2: &str = "52:54:00:00:bb:02";
/// A seat with a reserved address, 127.0.0.50; its MAC is cloned at 127.0.0.52.
const SEAT3: &str = "52:54:00:00:bb:03";

async fn api(dir: &Path) -> Api {
    let img = xtask::image::guest_demo(false).expect("building the demo guest");
    let base = 5940 + (std::process::id() % 10) as u16;
    let text = format!(
        r#"
[server]
interface = "lo"
address = "127.0.0.1/8"
state_dir = "{state}"
[dhcp]
mode = "off"
[[dhcp.host]]
mac = "{SEAT3}"
address = "127.0.0.50"
[http]
admin_token = "{TOKEN}"
[[guest]]
name = "demo"
label = "Demo"
image = "{img}"
memory = "128M"
description = "the banner"
[[guest]]
name = "kept"
label = "Kept"
image = "/nonexistent/kept.qcow2"
persist = true
[dispatch]
max_vms = 1
vnc_ports = "{base}-{base}"
shutdown_timeout = "2s"
"#,
        state = dir.display(),
        img = img.display(),
    );
    let cfg = Arc::new(Config::parse(&text, &dir.join("c.toml")).unwrap());
    let dispatcher = Dispatcher::new(cfg.clone()).await.unwrap();
    let seats = Table(HashMap::from([
        (ip(50), SEAT1.parse().unwrap()),
        (ip(51), SEAT2.parse().unwrap()),
        ("127.0.0.50".parse().unwrap(), SEAT3.parse().unwrap()),
        ("127.0.0.52".parse().unwrap(), SEAT3.parse().unwrap()),
    ]));
    Api {
        cfg: cfg.into(),
        dispatcher: Some(dispatcher),
        leases: None,
        seats: Arc::new(seats),
        reload: None,
        hub: Default::default(),
    }
}

async fn call(
    a: &Api,
    method: &str,
    path: &str,
    from: IpAddr,
    auth: Option<&str>,
    body: &str,
) -> (u16, Value) {
    call_key(a, method, path, from, auth, None, body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_of_the_session_api() {
    if xtask::lab::which("qemu-system-x86_64").is_none() || xtask::lab::which("mkfs.vfat").is_none()
    {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("CI must install qemu-system-x86 and dosfstools");
        }
        eprintln!("skipping: needs qemu-system-x86_64 and the tools of the demo guest");
        return;
    }
    let dir = std::env::temp_dir().join(format!("vdd-api-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let a = api(&dir).await;
    let admin = Some(format!("Bearer {TOKEN}"));
    let admin = admin.as_deref();

    // The menu.
    let (st, v) = call(&a, "GET", "/api/v1/guests", ip(50), None, "").await;
    assert_eq!(st, 200);
    assert_eq!(
        v,
        serde_json::json!([
            {"name": "demo", "label": "Demo", "display": "vnc", "description": "the banner"},
            {"name": "kept", "label": "Kept", "display": "vnc", "description": ""}
        ])
    );
    assert!(a
        .handle("GET", "/boot.ipxe", ip(50), None, None, b"")
        .await
        .is_none());
    assert_eq!(
        call(&a, "GET", "/api/v1/nope", ip(50), None, "").await.0,
        404
    );
    assert_eq!(
        call(&a, "PUT", "/api/v1/sessions", ip(50), None, "")
            .await
            .0,
        405
    );

    // Malformed JSON, unknown fields, a bad MAC, an unknown guest.
    for body in [
        "{",
        "[]",
        "{\"guest\": 5}",
        "{\"guest\": \"demo\", \"extra\": 1}",
        "{\"guest\": \"demo\", \"seat\": \"nope\"}",
    ] {
        let (st, v) = call(&a, "POST", "/api/v1/sessions", ip(50), None, body).await;
        assert_eq!(st, 400, "{body}: {v}");
        assert!(v["error"].is_string());
    }
    let (st, v) = call(
        &a,
        "POST",
        "/api/v1/sessions",
        ip(50),
        None,
        r#"{"guest": "windows"}"#,
    )
    .await;
    assert_eq!(
        (st, v["error"].as_str().unwrap()),
        (404, "no guest named \"windows\" in the config")
    );

    // Unknown callers and bad tokens are refused; a seat may not speak for another.
    let (st, _) = call(
        &a,
        "POST",
        "/api/v1/sessions",
        ip(99),
        None,
        r#"{"guest": "demo"}"#,
    )
    .await;
    assert_eq!(st, 403);
    let (st, _) = call(
        &a,
        "GET",
        "/api/v1/sessions",
        ip(99),
        Some("Bearer wrong-token-wrong-token"),
        "",
    )
    .await;
    assert_eq!(st, 403);
    let (st, v) = call(
        &a,
        "POST",
        "/api/v1/sessions",
        ip(50),
        None,
        &format!(r#"{{"guest": "demo", "seat": "{SEAT2}"}}"#),
    )
    .await;
    assert_eq!(st, 403, "{v}");

    // A session: created (201), returned again to its seat (200), listed for it only.
    let (st, s) = call(
        &a,
        "POST",
        "/api/v1/sessions",
        ip(50),
        None,
        r#"{"guest": "demo"}"#,
    )
    .await;
    assert_eq!(st, 201, "{s}");
    assert_eq!(
        (s["protocol"].as_str(), s["seat"].as_str()),
        (Some("vnc"), Some(SEAT1))
    );
    assert_eq!(s["password"].as_str().unwrap().len(), 8);
    assert_eq!(s["state"], "ready", "a VNC session is ready at once: {s}");
    assert_eq!(s["host"], "127.0.0.1");
    assert!(s.get("mac").is_none() && s.get("error").is_none(), "{s}");
    let id = s["id"].as_str().unwrap().to_string();
    let key = s["key"]
        .as_str()
        .expect("the creator gets the key")
        .to_string();
    assert_eq!(key.len(), 32);
    let k = Some(key.as_str());
    // GET by id: the seat (with its key) and the admin see it (without the password or
    // key), another seat may not, an unknown id is 404, other methods 405.
    let path = format!("/api/v1/sessions/{id}");
    let (st, one) = call_key(&a, "GET", &path, ip(50), None, k, "").await;
    assert_eq!(
        (st, &one["id"], &one["state"]),
        (200, &s["id"], &s["state"])
    );
    assert!(one.get("password").is_none(), "GET leaks the password");
    assert!(one.get("key").is_none(), "GET leaks the key");
    // The seat's MAC alone (a LAN host that cloned it) is not enough: 403 without the key
    // or with a wrong one, for every call about the session.
    for bad in [None, Some("0123456789abcdef0123456789abcdef")] {
        for (m, p) in [
            ("GET", path.clone()),
            ("DELETE", path.clone()),
            ("POST", format!("{path}/password")),
            ("POST", format!("{path}/reset")),
        ] {
            let (st, v) = call_key(&a, m, &p, ip(50), None, bad, "").await;
            assert_eq!(st, 403, "{m} {p} with key {bad:?}: {v}");
            assert!(v["error"].as_str().unwrap().contains("key"), "{v}");
        }
        let body = match bad {
            Some(b) => format!(r#"{{"guest": "demo", "key": "{b}"}}"#),
            None => r#"{"guest": "demo"}"#.to_string(),
        };
        let (st, v) = call(&a, "POST", "/api/v1/sessions", ip(50), None, &body).await;
        assert_eq!(st, 403, "reattach without the key: {v}");
    }
    assert_eq!(call(&a, "GET", &path, ip(99), admin, "").await.0, 200);
    assert_eq!(call(&a, "GET", &path, ip(51), None, "").await.0, 403);
    assert_eq!(call(&a, "GET", &path, ip(99), None, "").await.0, 403);
    assert_eq!(
        call(&a, "GET", "/api/v1/sessions/nope", ip(50), None, "")
            .await
            .0,
        404
    );
    assert_eq!(call(&a, "PUT", &path, ip(50), None, "").await.0, 405);
    let (st, again) = call(
        &a,
        "POST",
        "/api/v1/sessions",
        ip(50),
        None,
        &format!(r#"{{"guest": "demo", "seat": "{SEAT1}", "key": "{key}"}}"#),
    )
    .await;
    assert_eq!((st, again["id"].as_str()), (200, Some(id.as_str())));
    let (_, mine) = call(&a, "GET", "/api/v1/sessions", ip(50), None, "").await;
    assert_eq!(mine.as_array().unwrap().len(), 1);
    assert!(
        mine[0].get("password").is_none(),
        "a listing leaks the password"
    );
    let (_, theirs) = call(&a, "GET", "/api/v1/sessions", ip(51), None, "").await;
    assert_eq!(theirs, serde_json::json!([]));

    // A fresh one-time password, right before the viewer: the seat's own, or the admin's.
    let pw_path = format!("/api/v1/sessions/{id}/password");
    let (st, fresh) = call_key(&a, "POST", &pw_path, ip(50), None, k, "").await;
    assert_eq!(
        (st, fresh["id"].as_str()),
        (200, Some(id.as_str())),
        "{fresh}"
    );
    assert_eq!(fresh["password"].as_str().unwrap().len(), 8);
    assert_ne!(fresh["password"], again["password"]);
    assert_eq!(call(&a, "POST", &pw_path, ip(99), admin, "").await.0, 200);
    assert_eq!(
        call_key(&a, "POST", &pw_path, ip(51), None, k, "").await.0,
        403
    );
    assert_eq!(call(&a, "POST", &pw_path, ip(99), None, "").await.0, 403);
    assert_eq!(call(&a, "GET", &pw_path, ip(50), None, "").await.0, 405);
    assert_eq!(
        call(
            &a,
            "POST",
            "/api/v1/sessions/nope/password",
            ip(50),
            None,
            ""
        )
        .await
        .0,
        404
    );

    // Full: max_vms = 1, so the second seat gets 503 with the reason.
    let (st, v) = call(
        &a,
        "POST",
        "/api/v1/sessions",
        ip(51),
        None,
        r#"{"guest": "demo"}"#,
    )
    .await;
    assert_eq!(st, 503, "{v}");
    assert!(v["error"].as_str().unwrap().contains("max_vms"), "{v}");

    // Another seat cannot end it; the admin sees all and may reset; the seat ends it.
    let (st, _) = call(
        &a,
        "DELETE",
        &format!("/api/v1/sessions/{id}"),
        ip(51),
        None,
        "",
    )
    .await;
    assert_eq!(st, 403);
    let (st, all) = call(&a, "GET", "/api/v1/sessions", ip(99), admin, "").await;
    assert_eq!((st, all.as_array().unwrap().len()), (200, 1));
    let (st, fresh) = call(
        &a,
        "POST",
        &format!("/api/v1/sessions/{id}/reset"),
        ip(99),
        admin,
        "",
    )
    .await;
    assert_eq!(st, 200, "{fresh}");
    let new_id = fresh["id"].as_str().unwrap().to_string();
    // The reset session keeps its key: its seat ends it with the key it had.
    let (st, _) = call_key(
        &a,
        "DELETE",
        &format!("/api/v1/sessions/{new_id}"),
        ip(50),
        None,
        k,
        "",
    )
    .await;
    assert_eq!(st, 204);
    let (st, _) = call(
        &a,
        "DELETE",
        &format!("/api/v1/sessions/{new_id}"),
        ip(50),
        None,
        "",
    )
    .await;
    assert_eq!(st, 404);

    // A kept disk (persist = true) opens only for a seat at its reserved address: from
    // there the request passes on to the dispatcher (whose answer here is that the image
    // is missing); a clone of its MAC elsewhere, or a seat with no reservation, is refused
    // before anything starts.
    let kept = r#"{"guest": "kept"}"#;
    let (st, v) = call(
        &a,
        "POST",
        "/api/v1/sessions",
        "127.0.0.50".parse().unwrap(),
        None,
        kept,
    )
    .await;
    assert_eq!(st, 500, "{v}");
    assert!(v["error"].as_str().unwrap().contains("kept.qcow2"), "{v}");
    let (st, v) = call(
        &a,
        "POST",
        "/api/v1/sessions",
        "127.0.0.52".parse().unwrap(),
        None,
        kept,
    )
    .await;
    assert_eq!(st, 403, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("127.0.0.50 reserved"),
        "{v}"
    );
    let (st, v) = call(&a, "POST", "/api/v1/sessions", ip(50), None, kept).await;
    assert_eq!(st, 403, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("[[dhcp.host]]"),
        "{v}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
