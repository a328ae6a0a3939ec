//! Every refusal of the session API, through the API's seam to the dispatcher
//! (`vdd::dispatch::Sessions`) filled with an in-memory fake: who may ask what, with
//! which key, and how each dispatcher error becomes a status and a message (with its
//! causes). No QEMU here; tests/api.rs runs the same API over the real dispatcher.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use vdd::config::{Config, Mac};
use vdd::dispatch::{
    Error, Pending, Protocol, ScreenSize, SessionInfo, SessionState, Sessions, Usage, Who,
};
use vdd::http::api::Api;

#[path = "common/api.rs"]
mod common;
use common::{call_key as call, ip, Table};

const TOKEN: &str = "0123456789abcdef0123";
const SEAT1: &str = "52:54:00:00:dd:01";
const SEAT2: &str = "52:54:00:00:dd:02";
const GUEST_NIC: &str = "0a:00:00:00:dd:09";

/// Sessions in memory: `create` of guest "full" or "broken" fails as a full server or a
/// QEMU that cannot start would; everything else is a VNC session keyed "key-N".
#[derive(Default)]
struct Fake {
    sessions: Mutex<Vec<(SessionInfo, String)>>,
}

fn session(id: &str, seat: Mac, guest: &str) -> SessionInfo {
    SessionInfo {
        id: id.into(),
        seat: seat.to_string(),
        guest: guest.into(),
        protocol: if guest == "desk" {
            Protocol::Xdmcp
        } else {
            Protocol::Vnc
        },
        host: Some(Ipv4Addr::new(10, 77, 0, 1)),
        port: 5910,
        password: None,
        started: 1,
        state: SessionState::Ready,
        error: None,
        mac: None,
        start: "boot".into(),
        screen: None,
        key: None,
    }
}

impl Fake {
    fn find(&self, id: &str, who: Who<'_>) -> Result<(SessionInfo, String), Error> {
        let all = self.sessions.lock().unwrap();
        let (s, key) = all
            .iter()
            .find(|(s, _)| s.id == id)
            .cloned()
            .ok_or_else(|| Error::NotFound(id.into()))?;
        who.check(id, &s.seat, &key)?;
        Ok((s, key))
    }
}

impl Sessions for Fake {
    fn is_guest_mac(&self, mac: Mac) -> Pending<'_, bool> {
        Box::pin(async move { mac.to_string() == GUEST_NIC })
    }
    fn list(&self, seat: Option<Mac>) -> Pending<'_, Vec<SessionInfo>> {
        let all = self.sessions.lock().unwrap();
        let v = all
            .iter()
            .filter(|(s, _)| seat.is_none_or(|m| s.seat == m.to_string()))
            .map(|(s, _)| s.clone())
            .collect();
        Box::pin(async move { v })
    }
    fn create<'a>(
        &'a self,
        seat: Mac,
        guest: &'a str,
        screen: Option<ScreenSize>,
        who: Who<'a>,
    ) -> Pending<'a, Result<SessionInfo, Error>> {
        Box::pin(async move {
            match guest {
                "full" => return Err(Error::Full("2 of 2 VMs are running".into())),
                "broken" => {
                    return Err(Error::Spawn {
                        tool: "qemu-system-x86_64".into(),
                        source: std::io::Error::from_raw_os_error(2),
                    })
                }
                "demo" | "desk" => {}
                other => return Err(Error::UnknownGuest(other.into())),
            }
            let mut all = self.sessions.lock().unwrap();
            if let Some((s, key)) = all
                .iter()
                .find(|(s, _)| s.seat == seat.to_string() && s.guest == guest)
            {
                who.check(&s.id, &s.seat, key)?;
                return Ok(SessionInfo {
                    password: Some("again".into()),
                    ..s.clone()
                });
            }
            let n = all.len() + 1;
            let s = SessionInfo {
                screen,
                ..session(&format!("s{n}"), seat, guest)
            };
            let key = format!("key-{n}");
            all.push((s.clone(), key.clone()));
            Ok(SessionInfo {
                password: Some("pw".into()),
                key: Some(key),
                ..s
            })
        })
    }
    fn get<'a>(&'a self, id: &'a str, who: Who<'a>) -> Pending<'a, Result<SessionInfo, Error>> {
        Box::pin(async move { self.find(id, who).map(|(s, _)| s) })
    }
    fn end<'a>(&'a self, id: &'a str, who: Who<'a>) -> Pending<'a, Result<(), Error>> {
        Box::pin(async move {
            self.find(id, who)?;
            self.sessions.lock().unwrap().retain(|(s, _)| s.id != id);
            Ok(())
        })
    }
    fn password<'a>(
        &'a self,
        id: &'a str,
        who: Who<'a>,
    ) -> Pending<'a, Result<SessionInfo, Error>> {
        Box::pin(async move {
            let (s, _) = self.find(id, who)?;
            if s.protocol == Protocol::Xdmcp {
                return Err(Error::NoPassword(id.into()));
            }
            Ok(SessionInfo {
                password: Some("fresh".into()),
                ..s
            })
        })
    }
    fn usage(&self) -> Pending<'_, Usage> {
        let vms = self.sessions.lock().unwrap().len();
        Box::pin(async move {
            Usage {
                vms,
                max_vms: 4,
                ..Usage::default()
            }
        })
    }
    fn reset<'a>(&'a self, id: &'a str, who: Who<'a>) -> Pending<'a, Result<SessionInfo, Error>> {
        Box::pin(async move {
            let (s, key) = self.find(id, who)?;
            Ok(SessionInfo {
                key: Some(key),
                ..s
            })
        })
    }
}

fn api(with_sessions: bool) -> Api {
    let text = format!(
        "[server]\ninterface = \"lo\"\naddress = \"127.0.0.1/8\"\n[dhcp]\nmode = \"off\"\n\
         [http]\nadmin_token = \"{TOKEN}\"\n\
         [[guest]]\nname = \"demo\"\nlabel = \"Demo\"\nimage = \"/srv/demo.img\"\n"
    );
    let cfg = Arc::new(Config::parse(&text, Path::new("/etc/vdd/config.toml")).unwrap());
    let seats = Table(HashMap::from([
        (ip(50), SEAT1.parse().unwrap()),
        (ip(51), SEAT2.parse().unwrap()),
        (ip(60), GUEST_NIC.parse().unwrap()),
    ]));
    Api {
        cfg: cfg.into(),
        dispatcher: with_sessions.then(|| Arc::new(Fake::default()) as Arc<dyn Sessions>),
        leases: None,
        seats: Arc::new(seats),
        reload: None,
        hub: Default::default(),
    }
}

/// A seat's POST /api/v1/sessions from 10.77.0.50.
async fn post(a: &Api, body: &str) -> (u16, Value) {
    call(a, "POST", "/api/v1/sessions", ip(50), None, None, body).await
}

fn err(v: &Value) -> &str {
    v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error in {v}"))
}

#[tokio::test]
async fn who_may_ask_what() {
    let a = api(true);
    let admin = Some("Bearer 0123456789abcdef0123");

    // Unknown callers, guests, a wrong token.
    let (st, v) = call(&a, "GET", "/api/v1/sessions", ip(99), None, None, "").await;
    assert_eq!(st, 403);
    assert!(err(&v).contains("not a known seat"), "{v}");
    let (st, v) = call(
        &a,
        "POST",
        "/api/v1/sessions",
        ip(60),
        None,
        None,
        r#"{"guest":"demo"}"#,
    )
    .await;
    assert_eq!(st, 403);
    assert!(err(&v).contains("is a guest VM of this server"), "{v}");
    let bad = Some("Bearer 0123456789abcdef0124");
    assert_eq!(
        call(&a, "GET", "/api/v1/sessions", ip(99), bad, None, "")
            .await
            .0,
        403
    );
    assert_eq!(
        call(&a, "GET", "/api/v1/sessions", ip(99), admin, None, "")
            .await
            .0,
        200
    );

    // Bodies.
    let (st, v) = post(&a, "not json").await;
    assert_eq!(st, 400);
    assert!(err(&v).contains("must be JSON"), "{v}");
    let (st, v) = post(&a, r#"{"guest":"demo","seat":"nope"}"#).await;
    assert_eq!((st, err(&v)), (400, "seat \"nope\" is not a MAC address"));
    let (st, v) = post(&a, &format!(r#"{{"guest":"demo","seat":"{SEAT2}"}}"#)).await;
    assert_eq!(st, 403);
    assert!(err(&v).contains("not 52:54:00:00:dd:02"), "{v}");
    let (st, v) = call(
        &a,
        "POST",
        "/api/v1/sessions",
        ip(99),
        admin,
        None,
        r#"{"guest":"demo"}"#,
    )
    .await;
    assert_eq!((st, err(&v)), (400, "the admin must name the seat"));

    // The dispatcher's errors, as statuses; a 500 carries the errno.
    let (st, v) = post(&a, r#"{"guest":"nope"}"#).await;
    assert_eq!(
        (st, err(&v)),
        (404, "no guest named \"nope\" in the config")
    );
    let (st, v) = post(&a, r#"{"guest":"full"}"#).await;
    assert_eq!(
        (st, err(&v)),
        (503, "the server is full: 2 of 2 VMs are running")
    );
    let (st, v) = post(&a, r#"{"guest":"broken"}"#).await;
    assert_eq!(st, 500);
    assert!(
        err(&v).contains("starting qemu-system-x86_64: No such file or directory"),
        "{v}"
    );

    // A session and its key; the seat's screen reaches the dispatcher, and a bad one is
    // a 400.
    let (st, v) = post(&a, r#"{"guest":"demo","screen":"1920x1080"}"#).await;
    assert_eq!(st, 400, "{v}");
    let (st, s) = post(
        &a,
        r#"{"guest":"demo","screen":{"width":1920,"height":1080}}"#,
    )
    .await;
    assert_eq!(st, 201, "{s}");
    assert_eq!(
        s["screen"],
        serde_json::json!({"width": 1920, "height": 1080})
    );
    let (id, key) = (s["id"].as_str().unwrap(), s["key"].as_str().unwrap());
    let path = format!("/api/v1/sessions/{id}");
    let (st, v) = post(&a, r#"{"guest":"demo"}"#).await;
    assert_eq!(st, 403, "reattach without the key: {v}");
    let (st, v) = post(&a, &format!(r#"{{"guest":"demo","key":"{key}"}}"#)).await;
    assert_eq!((st, v["password"].as_str()), (200, Some("again")));
    let (st, v) = call(&a, "GET", &path, ip(50), None, None, "").await;
    assert_eq!(st, 403);
    assert!(err(&v).contains("needs its key"), "{v}");
    assert_eq!(
        call(&a, "GET", &path, ip(50), None, Some("key-9"), "")
            .await
            .0,
        403
    );
    assert_eq!(
        call(&a, "GET", &path, ip(50), None, Some(key), "").await.0,
        200
    );
    let (st, v) = call(&a, "GET", &path, ip(51), None, Some(key), "").await;
    assert_eq!(st, 403, "another seat, even with the key: {v}");
    assert!(err(&v).contains("belongs to another seat"), "{v}");
    // A seat lists only its own; the admin all, never with keys or passwords.
    let (_, mine) = call(&a, "GET", "/api/v1/sessions", ip(51), None, None, "").await;
    assert_eq!(mine, serde_json::json!([]));
    let (_, all) = call(&a, "GET", "/api/v1/sessions", ip(99), admin, None, "").await;
    assert_eq!(all.as_array().unwrap().len(), 1);
    assert!(
        all[0].get("key").is_none() && all[0].get("password").is_none(),
        "{all}"
    );

    // Password and reset.
    let pw = format!("{path}/password");
    let (st, v) = call(&a, "POST", &pw, ip(50), None, Some(key), "").await;
    assert_eq!((st, v["password"].as_str()), (200, Some("fresh")));
    let (st, x) = call(
        &a,
        "POST",
        "/api/v1/sessions",
        ip(51),
        None,
        None,
        r#"{"guest":"desk"}"#,
    )
    .await;
    assert_eq!(st, 201);
    let xpw = format!("/api/v1/sessions/{}/password", x["id"].as_str().unwrap());
    let (st, v) = call(&a, "POST", &xpw, ip(51), None, x["key"].as_str(), "").await;
    assert_eq!(st, 409, "{v}");
    let reset = format!("{path}/reset");
    let (st, v) = call(&a, "POST", &reset, ip(50), None, Some(key), "").await;
    assert_eq!(
        (st, v["key"].as_str()),
        (200, Some(key)),
        "a reset keeps the key"
    );

    // The admin's summary, for the admin only.
    let (st, v) = call(&a, "GET", "/api/v1/status", ip(99), admin, None, "").await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        (v["sessions"]["vms"].as_u64(), v["guests"].as_u64()),
        (Some(2), Some(1)),
        "{v}"
    );
    let (st, v) = call(&a, "GET", "/api/v1/status", ip(50), None, None, "").await;
    assert_eq!(st, 403, "a seat asked for the status: {v}");

    // Wrong methods and paths.
    assert_eq!(
        call(&a, "PUT", "/api/v1/sessions", ip(50), None, None, "")
            .await
            .0,
        405
    );
    assert_eq!(
        call(&a, "GET", &reset, ip(50), None, Some(key), "").await.0,
        405
    );
    assert_eq!(
        call(&a, "GET", "/api/v1/nothing", ip(50), None, None, "")
            .await
            .0,
        404
    );

    // End: the key again, then the session is gone.
    assert_eq!(
        call(&a, "DELETE", &path, ip(50), None, None, "").await.0,
        403
    );
    assert_eq!(
        call(&a, "DELETE", &path, ip(50), None, Some(key), "")
            .await
            .0,
        204
    );
    assert_eq!(
        call(&a, "DELETE", &path, ip(50), None, Some(key), "")
            .await
            .0,
        404
    );
}

#[tokio::test]
async fn a_server_without_guests_says_so() {
    let a = api(false);
    let (st, v) = call(&a, "GET", "/api/v1/guests", ip(50), None, None, "").await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = call(
        &a,
        "POST",
        "/api/v1/sessions",
        ip(50),
        None,
        None,
        r#"{"guest":"demo"}"#,
    )
    .await;
    assert_eq!(st, 503);
    assert!(err(&v).contains("runs no guests"), "{v}");
}
