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
    /// The guest's screen size: in the answer to `.../password`, what it shows now.
    #[serde(default)]
    pub screen: Option<Size>,
}

/// A screen size in pixels, as the server writes it.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
pub struct Size {
    pub width: u32,
    pub height: u32,
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
/// `screen`: this seat's monitor, so that a new guest starts at its size.
pub fn create(
    server: SocketAddr,
    guest: &str,
    screen: Option<crate::screen::Screen>,
    timeout: Duration,
) -> Result<Session, Error> {
    let mut body = serde_json::json!({ "guest": guest });
    if let Some(key) = key_for_guest(guest) {
        body["key"] = key.into();
    }
    if let Some(s) = screen {
        body["screen"] = serde_json::json!({"width": s.width, "height": s.height});
    }
    let body = body.to_string();
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

/// The pipe in the thin-client root through which the viewer gets its one-time password
/// (see [`vnc_script`]).
pub const PASSWORD_FIFO: &str = "tmp/vdd-vnc-password";

/// The command line of the VNC session in the thin-client root: an X server on the
/// console with TigerVNC's viewer full screen, nothing else (no window manager). The
/// viewer's exit code is kept in /tmp/vdd-viewer-exit: 0 means the user left with F8 ->
/// "Exit viewer" (the session keeps running), anything else that the connection ended.
///
/// The password is read from the pipe [`PASSWORD_FIFO`] once X is up, into the viewer's
/// environment (never its command line): boot-menu asks the server for it only when the
/// pipe is opened, so however long the seat took to start X, the password's lifetime
/// starts right before the viewer connects. No password (the server did not give one):
/// no viewer, rather than TigerVNC's dialog asking for one.
///
/// A guest whose screen is not the monitor's size is scaled to fit first ([`FIT`]).
pub fn vnc_script(s: &Session) -> String {
    let host = s
        .host
        .map_or_else(|| "0.0.0.0".to_string(), |h| h.to_string());
    let (fit, run_fit) = match s.screen {
        Some(g) => (
            format!("{FIT}EOF\n"),
            format!("sh /tmp/vdd-fit {}x{}; ", g.width, g.height),
        ),
        None => (String::new(), String::new()),
    };
    format!(
        "{KMS}{INPUT}rm -f /tmp/vdd-viewer-exit; {fit}\
         xinit /bin/sh -c '{run_fit}p=$(cat /{PASSWORD_FIFO}); [ -n \"$p\" ] || exit 0; \
         VNC_PASSWORD=$p xtigervncviewer -FullScreen -SecurityTypes VncAuth -MenuKey F8 \
         -AlertOnFatalError=0 -ReconnectOnError=0 {host}::{port}; echo $? > /tmp/vdd-viewer-exit' \
         -- /usr/bin/Xorg :0 vt1 -nolisten tcp -noreset -keeptty 2>&1 | tail -n 20; {INPUT_END}",
        port = s.port
    )
}

/// Writes /tmp/vdd-fit, run in the X session before the viewer with the guest's size
/// (`WxH`): TigerVNC does not scale, so when the guest's screen is not the monitor's,
/// the X screen becomes the monitor's aspect around the guest's size (RandR
/// `--scale-from`, which the X server scales to the monitor), and the full-screen viewer
/// shows the guest in its middle: the guest fills the screen one way, keeping its aspect.
/// Only with a KMS driver (RandR 1.2); elsewhere the guest stays unscaled in the middle.
const FIT: &str = r#"cat > /tmp/vdd-fit <<'EOF'
g=$1; gw=${g%x*}; gh=${g#*x}
out=$(xrandr --current | awk '/ connected/ {print $1; exit}')
cur=$(xrandr --current | awk '/^Screen 0/ {gsub(",", ""); print $8 "x" $10; exit}')
mw=${cur%x*}; mh=${cur#*x}
[ -n "$out" ] && [ -n "$mw" ] && [ "$g" != "$cur" ] || exit 0
f=$(awk -v gw="$gw" -v gh="$gh" -v mw="$mw" -v mh="$mh" 'BEGIN { s = gw / mw; if (gh / mh > s) s = gh / mh; printf "%dx%d", int(s * mw + 0.5), int(s * mh + 0.5) }')
echo "fit: the guest's $g on the monitor's $cur (X screen $f, scaled)"
xrandr --output "$out" --scale-from "$f" || echo "fit: no scaling here; the guest stays unscaled"
"#;

/// With a KMS driver (`/dev/dri/card0`, so Xorg picks modesetting): no glamor. Glamor
/// renders through OpenGL, which on a thin client without a 3D driver is Mesa's software
/// renderer: minutes to start under QEMU, and nothing gained for a full-screen viewer
/// or a remote X desktop. (Written into the root's tmpfs layer, before X starts.)
const KMS: &str = "if [ -e /dev/dri/card0 ]; then mkdir -p /etc/X11/xorg.conf.d; \
printf 'Section \"Device\"\\n  Identifier \"kms\"\\n  Driver \"modesetting\"\\n  Option \"AccelMethod\" \"none\"\\nEndSection\\n' \
> /etc/X11/xorg.conf.d/20-vdd-kms.conf; fi; ";

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
        "{KMS}{INPUT}/usr/bin/Xorg :0 vt1 -query {host} -listen tcp -once -keeptty 2>&1 | tail -n 20; \
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
        // The password comes through the pipe into the viewer's environment, once X is up.
        assert!(vnc_script(&s).contains("p=$(cat /tmp/vdd-vnc-password)"));
        assert!(vnc_script(&s).contains("VNC_PASSWORD=$p xtigervncviewer"));
        assert!(
            !vnc_script(&s).contains("AbCd2345"),
            "the password must not be on a command line"
        );
        assert!(!vnc_script(&s).contains("vdd-fit"), "no size, no fit");
        let sized: Session = serde_json::from_str(
            r#"{"id":"0a1b","guest":"demo","protocol":"vnc","host":"10.77.0.1","port":5910,"screen":{"width":720,"height":400}}"#,
        )
        .unwrap();
        let v = vnc_script(&sized);
        assert!(
            v.contains("sh /tmp/vdd-fit 720x400; p=$(cat /tmp/vdd-vnc-password)"),
            "{v}"
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

    /// The fit script against a stand-in `xrandr` that prints what Xorg's modesetting
    /// driver prints and logs how it was called.
    #[test]
    fn fit_scales_a_smaller_guest_keeping_its_aspect() {
        let dir = std::env::temp_dir().join(format!("bm-fit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let xrandr = dir.join("xrandr");
        std::fs::write(
            &xrandr,
            format!(
                "#!/bin/sh\n[ \"$1\" = --current ] && {{ echo 'Screen 0: minimum 320 x 200, current 1920 x 1080, maximum 16384 x 16384'; \
                 echo 'Virtual-1 connected primary 1920x1080+0+0 0mm x 0mm'; exit 0; }}\necho \"$@\" >> {}/calls\n",
                dir.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&xrandr, std::fs::Permissions::from_mode(0o755)).unwrap();
        let run = |size: &str| {
            let script = FIT.replace("/tmp/vdd-fit", &dir.join("fit").display().to_string());
            let st = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("{script}EOF\nsh {}/fit {size}", dir.display()))
                .env("PATH", format!("{}:/usr/bin:/bin", dir.display()))
                .status()
                .unwrap();
            assert!(st.success());
            std::fs::read_to_string(dir.join("calls")).unwrap_or_default()
        };
        // VGA text (720x400, 9:5) on 16:9: the X screen is 720x405, scaled 2.67 times.
        assert_eq!(run("720x400"), "--output Virtual-1 --scale-from 720x405\n");
        std::fs::remove_file(dir.join("calls")).unwrap();
        // 4:3 on 16:9: bars left and right.
        assert_eq!(
            run("1024x768"),
            "--output Virtual-1 --scale-from 1365x768\n"
        );
        std::fs::remove_file(dir.join("calls")).unwrap();
        // The monitor's own size: nothing to do.
        assert_eq!(run("1920x1080"), "");
        std::fs::remove_dir_all(&dir).unwrap();
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
