//! The vdd session API as the thin client uses it: `POST /api/v1/sessions` for a guest
//! (the server knows the seat by this client's address), `GET /api/v1/sessions` for the
//! seat's running ones, `DELETE /api/v1/sessions/ID` to end one.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use serde::Deserialize;

use crate::guests::{request, Error};

/// How to reach a session's display; the password is only in the answer to a create.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Session {
    pub id: String,
    pub guest: String,
    pub protocol: String,
    pub host: Ipv4Addr,
    pub port: u16,
    #[serde(default)]
    pub password: Option<String>,
}

/// The seat's session of `guest`: a new VM, or its running one with a fresh password.
pub fn create(server: SocketAddr, guest: &str, timeout: Duration) -> Result<Session, Error> {
    let body = serde_json::json!({ "guest": guest }).to_string();
    let r = request(
        server,
        "POST",
        "/api/v1/sessions",
        Some(body.as_bytes()),
        timeout,
    )?;
    serde_json::from_slice(&r).map_err(Error::Json)
}

/// The seat's running sessions.
pub fn list(server: SocketAddr, timeout: Duration) -> Result<Vec<Session>, Error> {
    let r = request(server, "GET", "/api/v1/sessions", None, timeout)?;
    serde_json::from_slice(&r).map_err(Error::Json)
}

/// Ends a session (its VM is stopped and its changes are thrown away).
pub fn end(server: SocketAddr, id: &str, timeout: Duration) -> Result<(), Error> {
    request(
        server,
        "DELETE",
        &format!("/api/v1/sessions/{id}"),
        None,
        timeout,
    )
    .map(drop)
}

/// Throws a session's changes away and starts its guest afresh.
pub fn reset(server: SocketAddr, id: &str, timeout: Duration) -> Result<Session, Error> {
    let r = request(
        server,
        "POST",
        &format!("/api/v1/sessions/{id}/reset"),
        None,
        timeout,
    )?;
    serde_json::from_slice(&r).map_err(Error::Json)
}

/// The command line of the VNC session in the thin-client root: an X server on the
/// console with TigerVNC's viewer full screen, nothing else (no window manager). The
/// viewer's exit code is kept in /tmp/vdd-viewer-exit: 0 means the user left with F8 ->
/// "Exit viewer" (the session keeps running), anything else that the connection ended.
pub fn vnc_script(s: &Session) -> String {
    format!(
        "rm -f /tmp/vdd-viewer-exit; \
         xinit /bin/sh -c 'xtigervncviewer -FullScreen -SecurityTypes VncAuth -MenuKey F8 \
         -AlertOnFatalError=0 -ReconnectOnError=0 {host}::{port}; echo $? > /tmp/vdd-viewer-exit' \
         -- /usr/bin/Xorg :0 vt1 -nolisten tcp -noreset -keeptty 2>&1 | tail -n 20",
        host = s.host,
        port = s.port
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
    }
}
