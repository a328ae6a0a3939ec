//! The vdd session API as the thin client uses it: `POST /api/v1/sessions` for a guest
//! (the server knows the seat by this client's address), `GET /api/v1/sessions` for the
//! seat's running ones, `DELETE /api/v1/sessions/ID` to end one.
//!
//! The server hands each new session a key, once; every later call about that session
//! shows it (`X-Vdd-Session-Key`), because the server knows a seat only by its MAC and a
//! LAN host can clone that. The keys live in this process's memory only: a seat that
//! reboots cannot reach the sessions of its earlier boot (their VMs end after
//! `dispatch.idle_timeout` without a viewer, or by the admin).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use serde::Deserialize;

use crate::guests::{request, request_with_key, Error};
pub use vdd_api::{Protocol, SessionState};

/// The keys of the sessions this boot created: (session id, guest, key).
static KEYS: Mutex<Vec<(String, String, String)>> = Mutex::new(Vec::new());

fn keys() -> std::sync::MutexGuard<'static, Vec<(String, String, String)>> {
    KEYS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Keeps the key of a session the server just created (or reset).
fn remember(s: &Session) {
    if let Some(k) = &s.key {
        let mut keys = keys();
        keys.retain(|(id, _, _)| *id != s.id);
        keys.push((s.id.clone(), s.guest.clone(), k.clone()));
    }
}

fn forget(id: &str) {
    keys().retain(|(i, _, _)| i != id);
}

/// The key of session `id`, if this boot created it.
pub fn key_of(id: &str) -> Option<String> {
    keys()
        .iter()
        .find(|(i, _, _)| i == id)
        .map(|(_, _, k)| k.clone())
}

fn key_for_guest(guest: &str) -> Option<String> {
    keys()
        .iter()
        .rev()
        .find(|(_, g, _)| g == guest)
        .map(|(_, _, k)| k.clone())
}

/// How to reach a session's display; the password is only in the answer to a create.
///
/// `protocol` is VNC (host = the server, port = the VM's VNC port) or XDMCP (host = the
/// guest's own address on the LAN, port 177). An X11 session is starting until the
/// guest's display manager answers XDMCP, then ready; a failed one carries `error`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Session {
    pub id: String,
    pub guest: String,
    pub protocol: Protocol,
    #[serde(default)]
    pub host: Option<Ipv4Addr>,
    pub port: u16,
    #[serde(default)]
    pub password: Option<String>,
    /// A server without states sent none: its sessions were ready.
    #[serde(default)]
    pub state: SessionState,
    #[serde(default)]
    pub error: Option<String>,
    /// Only in the answer that created the session.
    #[serde(default)]
    pub key: Option<String>,
}

impl Session {
    /// "host:port", or "?" for a host the server does not know yet.
    pub fn target(&self) -> String {
        match self.host {
            Some(h) => format!("{h}:{}", self.port),
            None => format!("?:{}", self.port),
        }
    }
}

/// One session of this seat, as the server sees it now.
pub fn get(server: SocketAddr, id: &str, timeout: Duration) -> Result<Session, Error> {
    let r = request_with_key(
        server,
        "GET",
        &format!("/api/v1/sessions/{id}"),
        None,
        key_of(id).as_deref(),
        timeout,
    )?;
    serde_json::from_slice(&r).map_err(Error::Json)
}

/// The seat's session of `guest`: a new VM, or its running one with a fresh password.
pub fn create(server: SocketAddr, guest: &str, timeout: Duration) -> Result<Session, Error> {
    let body = match key_for_guest(guest) {
        Some(key) => serde_json::json!({ "guest": guest, "key": key }),
        None => serde_json::json!({ "guest": guest }),
    }
    .to_string();
    let r = request(
        server,
        "POST",
        "/api/v1/sessions",
        Some(body.as_bytes()),
        timeout,
    )?;
    let s: Session = serde_json::from_slice(&r).map_err(Error::Json)?;
    remember(&s);
    Ok(s)
}

/// A fresh one-time VNC password for the session (it replaces the one before): asked for
/// right before the viewer connects, so that a slow boot cannot outlast it.
pub fn password(server: SocketAddr, id: &str, timeout: Duration) -> Result<Session, Error> {
    let r = request_with_key(
        server,
        "POST",
        &format!("/api/v1/sessions/{id}/password"),
        None,
        key_of(id).as_deref(),
        timeout,
    )?;
    serde_json::from_slice(&r).map_err(Error::Json)
}

/// Whether a line of TigerVNC's output says the server refused the password
/// (`CConn: Authentication failure: Authentication failed`).
pub fn refused(line: &str) -> bool {
    line.to_ascii_lowercase().contains("authentication fail")
}

/// The seat's running sessions.
pub fn list(server: SocketAddr, timeout: Duration) -> Result<Vec<Session>, Error> {
    let r = request(server, "GET", "/api/v1/sessions", None, timeout)?;
    serde_json::from_slice(&r).map_err(Error::Json)
}

/// Ends a session (its VM is stopped and its changes are thrown away).
pub fn end(server: SocketAddr, id: &str, timeout: Duration) -> Result<(), Error> {
    request_with_key(
        server,
        "DELETE",
        &format!("/api/v1/sessions/{id}"),
        None,
        key_of(id).as_deref(),
        timeout,
    )?;
    forget(id);
    Ok(())
}

/// Throws a session's changes away and starts its guest afresh.
pub fn reset(server: SocketAddr, id: &str, timeout: Duration) -> Result<Session, Error> {
    let r = request_with_key(
        server,
        "POST",
        &format!("/api/v1/sessions/{id}/reset"),
        None,
        key_of(id).as_deref(),
        timeout,
    )?;
    let s: Session = serde_json::from_slice(&r).map_err(Error::Json)?;
    forget(id);
    remember(&s);
    Ok(s)
}

/// The command line of the VNC session in the thin-client root: an X server on the
/// console with TigerVNC's viewer full screen, nothing else (no window manager). The
/// viewer's exit code is kept in /tmp/vdd-viewer-exit: 0 means the user left with F8 ->
/// "Exit viewer" (the session keeps running), anything else that the connection ended.
pub fn vnc_script(s: &Session) -> String {
    let host = s
        .host
        .map_or_else(|| "0.0.0.0".to_string(), |h| h.to_string());
    format!(
        "{INPUT}rm -f /tmp/vdd-viewer-exit; \
         xinit /bin/sh -c 'xtigervncviewer -FullScreen -SecurityTypes VncAuth -MenuKey F8 \
         -AlertOnFatalError=0 -ReconnectOnError=0 {host}::{port}; echo $? > /tmp/vdd-viewer-exit' \
         -- /usr/bin/Xorg :0 vt1 -nolisten tcp -noreset -keeptty 2>&1 | tail -n 20; {INPUT_END}",
        port = s.port
    )
}

/// Starts udevd in the root before the X server: Xorg finds keyboards and mice through
/// udev's database (ID_INPUT_KEYBOARD and friends), which only a running udevd fills. It
/// runs in the session's process group, so a stop of the session stops it too.
/// udevd must be listening before the replayed "add" events go out, or they are lost:
/// `udevadm control --ping` waits for it. udevadm ignores every request in a chroot
/// ("Running in chroot, ignoring request") unless SYSTEMD_IGNORE_CHROOT is set. The line
/// it prints tells the admin what the X server got.
const INPUT: &str = "export SYSTEMD_IGNORE_CHROOT=1; \
/usr/lib/systemd/systemd-udevd >/tmp/vdd-udevd.log 2>&1 & udevd=$!; \
i=0; until udevadm control --ping >/dev/null 2>&1; do \
i=$((i+1)); [ $i -ge 60 ] && break; sleep 0.5; done; \
udevadm trigger --action=add --subsystem-match=input >/dev/null 2>&1; \
udevadm settle --timeout=30 >/dev/null 2>&1; \
k=0; m=0; for d in /dev/input/event*; do p=$(udevadm info -q property -n \"$d\" 2>/dev/null); \
case \"$p\" in *ID_INPUT_KEYBOARD=1*) k=$((k+1));; esac; \
case \"$p\" in *ID_INPUT_MOUSE=1*) m=$((m+1));; esac; done; \
echo \"input: $k keyboard(s), $m mouse/mice\"; \
[ $k -gt 0 ] || { ls /dev/input; tail -n 5 /tmp/vdd-udevd.log; }; ";
/// Stops the udevd of [`INPUT`] once the X server has ended.
const INPUT_END: &str = "kill $udevd 2>/dev/null; true";

/// The command line of an X11 session in the thin-client root: Xorg asks the guest's
/// display manager for a login over XDMCP (`-query`, UDP 177) and must accept the
/// guest's X clients on TCP 6000 (`-listen tcp`; Xorg listens on no TCP port by
/// default). `-once` ends the server when the guest ends the session (logout), so the
/// menu comes back. Xorg's stderr is chatty; the last lines are enough on a failure.
pub fn x11_script(host: Ipv4Addr) -> String {
    format!(
        "{INPUT}/usr/bin/Xorg :0 vt1 -query {host} -listen tcp -once -keeptty 2>&1 | tail -n 20; \
         {INPUT_END}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_json() {
        let s: Session = serde_json::from_str(
            r#"{"id":"0a1b","seat":"52:54:00:00:00:01","guest":"demo","protocol":"vnc","host":"10.77.0.1","port":5910,"password":"AbCd2345","started":1}"#,
        )
        .unwrap();
        assert_eq!(s.port, 5910);
        assert_eq!(s.password.as_deref(), Some("AbCd2345"));
        let l: Vec<Session> = serde_json::from_str(
            r#"[{"id":"0a1b","seat":"x","guest":"demo","protocol":"vnc","host":"10.77.0.1","port":5910,"started":1}]"#,
        )
        .unwrap();
        assert_eq!(l[0].password, None);
        assert!(vnc_script(&s)
            .contains("xtigervncviewer -FullScreen -SecurityTypes VncAuth -MenuKey F8"));
        assert!(vnc_script(&s).contains("10.77.0.1::5910"));
        assert!(
            !vnc_script(&s).contains("AbCd2345"),
            "the password must not be on a command line"
        );
        assert_eq!(
            s.state,
            SessionState::Ready,
            "a server without states means ready"
        );
        // What TigerVNC 1.12 (the thin-client root's viewer) prints when the password is
        // refused, and a line that is not a refusal.
        assert!(refused(
            "viewer: Mon Dec  1 18:23:37 2026 CConn:       Authentication failure: Authentication failed"
        ));
        assert!(!refused("viewer: CConn: End of stream"));
    }

    #[test]
    fn keys_are_kept_per_session_and_found_by_guest() {
        let s: Session = serde_json::from_str(
            r#"{"id":"k1","seat":"x","guest":"keyed","protocol":"vnc","host":"10.77.0.1","port":5910,"started":1,"key":"00ff"}"#,
        )
        .unwrap();
        remember(&s);
        assert_eq!(key_of("k1").as_deref(), Some("00ff"));
        assert_eq!(key_for_guest("keyed").as_deref(), Some("00ff"));
        let listed: Session = serde_json::from_str(
            r#"{"id":"k1","seat":"x","guest":"keyed","protocol":"vnc","host":"10.77.0.1","port":5910,"started":1}"#,
        )
        .unwrap();
        remember(&listed);
        assert_eq!(
            key_of("k1").as_deref(),
            Some("00ff"),
            "a listing without key keeps it"
        );
        forget("k1");
        assert_eq!((key_of("k1"), key_for_guest("keyed")), (None, None));
    }

    #[test]
    fn x11_session_json() {
        let s: Session = serde_json::from_str(
            r#"{"id":"77aa","seat":"52:54:00:00:00:01","guest":"x11","protocol":"xdmcp","host":null,"port":177,"mac":"0a:56:44:01:02:03","state":"starting","started":1}"#,
        )
        .unwrap();
        assert_eq!((s.host, s.state), (None, SessionState::Starting));
        assert_eq!(s.target(), "?:177");
        let f: Session = serde_json::from_str(
            r#"{"id":"77aa","seat":"x","guest":"x11","protocol":"xdmcp","host":"10.77.0.120","port":177,"state":"failed","error":"no answer","started":1}"#,
        )
        .unwrap();
        assert_eq!(f.error.as_deref(), Some("no answer"));
        assert_eq!(f.target(), "10.77.0.120:177");
        let x = x11_script(Ipv4Addr::new(10, 77, 0, 120));
        assert!(x.contains("-query 10.77.0.120 -listen tcp -once"), "{x}");
    }
}
