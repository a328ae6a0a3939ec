//! Boot telemetry: the stages of the boot that only the thin client sees (PID 1 started,
//! modules, link, its DHCP, menu, NBD root, X, viewer), each with the kernel's uptime
//! at the time, sent to the server's `POST /api/v1/boot` for the admin's panel.
//!
//! Never in the boot's way: stages are queued (at most [`MAX_QUEUED`]; before the
//! server is known, and while it does not answer) and sent by a thread of their own in
//! batches, with a short timeout; a report the server refuses or never takes is
//! dropped. The server takes reports only from this seat's own address.

use std::net::SocketAddr;
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::Duration;

use vdd_api::{BootReport, ReportedStage, Stage, BOOT_REPORT_PATH, MAX_REPORT_STAGES};

/// Stages queued at most; the oldest go when more come.
pub const MAX_QUEUED: usize = 64;
/// How long one report may take.
const SEND_TIMEOUT: Duration = Duration::from_secs(3);
/// Tries per batch (a server that restarts comes back within them).
const TRIES: u32 = 3;

enum Msg {
    Stage(ReportedStage),
    Server(SocketAddr),
}

static SENDER: Mutex<Option<mpsc::Sender<Msg>>> = Mutex::new(None);

/// The kernel's uptime in ms (`/proc/uptime`), 0 when it cannot be read.
pub fn uptime_ms() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| parse_uptime(&s))
        .unwrap_or(0)
}

/// The first field of `/proc/uptime` ("12.34 56.78") in ms.
pub fn parse_uptime(s: &str) -> Option<u64> {
    let secs: f64 = s.split_whitespace().next()?.parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then_some((secs * 1000.0) as u64)
}

fn send(m: Msg) {
    let mut g = SENDER.lock().unwrap_or_else(|p| p.into_inner());
    let tx = g.get_or_insert_with(|| {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || run(rx));
        tx
    });
    let _ = tx.send(m);
}

/// Records a stage now (uptime read here), with a short detail.
pub fn stage(stage: Stage, detail: Option<String>) {
    send(Msg::Stage(ReportedStage {
        stage,
        uptime_ms: uptime_ms(),
        detail,
    }));
}

/// The server to report to (from here on, queued stages are sent).
pub fn server(addr: SocketAddr) {
    send(Msg::Server(addr));
}

/// The sending thread: waits for stages, sends what is queued whenever a server is known.
fn run(rx: mpsc::Receiver<Msg>) {
    let mut queue: Vec<ReportedStage> = Vec::new();
    let mut server: Option<SocketAddr> = None;
    while let Ok(m) = rx.recv() {
        take(&mut queue, &mut server, m);
        // What else came meanwhile goes in the same report.
        while let Ok(m) = rx.try_recv() {
            take(&mut queue, &mut server, m);
        }
        let Some(addr) = server else { continue };
        while !queue.is_empty() {
            let n = queue.len().min(MAX_REPORT_STAGES);
            let body = body(&queue[..n], uptime_ms());
            let sent = (0..TRIES).any(|i| {
                if i > 0 {
                    std::thread::sleep(Duration::from_secs(1));
                }
                match crate::guests::request(
                    addr,
                    "POST",
                    BOOT_REPORT_PATH,
                    Some(&body),
                    SEND_TIMEOUT,
                ) {
                    Ok(_) => true,
                    // Refused (too many, a stage it does not take): trying again is no use.
                    Err(crate::guests::Error::Refused(..)) => true,
                    Err(_) => false,
                }
            });
            if !sent {
                // The server is away: keep the queue for the next stage's try.
                break;
            }
            queue.drain(..n);
        }
    }
}

fn take(queue: &mut Vec<ReportedStage>, server: &mut Option<SocketAddr>, m: Msg) {
    match m {
        Msg::Stage(s) => {
            if queue.len() >= MAX_QUEUED {
                queue.remove(0);
            }
            queue.push(s);
        }
        Msg::Server(a) => *server = Some(a),
    }
}

/// The JSON body of a report of `stages`, sent at uptime `now`.
pub fn body(stages: &[ReportedStage], now: u64) -> Vec<u8> {
    serde_json::to_vec(&BootReport {
        uptime_ms: now.max(stages.iter().map(|s| s.uptime_ms).max().unwrap_or(0)),
        stages: stages.to_vec(),
    })
    .expect("a report serializes")
}

/// Watches a session's display until both are seen or `stop` is set: the X server's
/// socket in the root (`tmp/.X11-unix/X0`), then an established connection (see
/// [`established`]); each is reported once as a stage with the session's id.
pub fn watch_display(
    root: std::path::PathBuf,
    remote: Option<SocketAddr>,
    local_port: Option<u16>,
    session: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<()> {
    use std::sync::atomic::Ordering;
    std::thread::spawn(move || {
        let (mut x, mut viewer) = (false, false);
        let t0 = std::time::Instant::now();
        while !(x && viewer || stop.load(Ordering::Relaxed)) && t0.elapsed() < WATCH_LIMIT {
            if !x && root.join("tmp/.X11-unix/X0").exists() {
                x = true;
                stage(Stage::XStarted, Some(session.clone()));
            }
            if !viewer {
                let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
                if established(&tcp, remote, local_port) {
                    viewer = true;
                    stage(Stage::ViewerConnected, Some(session.clone()));
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    })
}

/// How long a display is watched for its X server and viewer.
const WATCH_LIMIT: Duration = Duration::from_secs(600);

/// Whether `/proc/net/tcp` (its text) shows an established connection from this host to
/// `remote`, or (with `local_port`) one to this host's port `local_port`: how boot-menu
/// sees its VNC viewer connected to the session (or the guest's display manager to its
/// X server), whatever program in the root made it.
pub fn established(tcp: &str, remote: Option<SocketAddr>, local_port: Option<u16>) -> bool {
    const ESTABLISHED: &str = "01";
    tcp.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 4 || f[3] != ESTABLISHED {
            return false;
        }
        let (Some(local), Some(rem)) = (addr(f[1]), addr(f[2])) else {
            return false;
        };
        remote.is_some_and(|r| r == rem) || local_port.is_some_and(|p| p == local.port())
    })
}

/// `0100007F:1F90` (the address as the kernel holds it, printed as a native-endian
/// number) to 127.0.0.1:8080.
fn addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let ip = u32::from_str_radix(ip, 16).ok()?;
    let port = u16::from_str_radix(port, 16).ok()?;
    Some(SocketAddr::from((ip.to_ne_bytes(), port)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptime_and_body() {
        assert_eq!(parse_uptime("12.34 56.78\n"), Some(12340));
        assert_eq!(parse_uptime("x"), None);
        assert_eq!(parse_uptime(""), None);
        let b = body(
            &[ReportedStage {
                stage: Stage::Pid1,
                uptime_ms: 1500,
                detail: None,
            }],
            4000,
        );
        assert_eq!(
            String::from_utf8(b).unwrap(),
            r#"{"uptime_ms":4000,"stages":[{"stage":"pid1","uptime_ms":1500}]}"#
        );
    }

    /// Lines of a real /proc/net/tcp: a listener, the viewer's connection to
    /// 10.77.0.1:5910, and an X server's connection from a guest to port 6000.
    #[test]
    fn established_connections() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000:1770 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0\n\
   1: 32004D0A:A2B4 01004D0A:1716 01 00000000:00000000 02:000A2E4C 00000000     0        0 2 1 0000000000000000 20 4 30 10 -1\n";
        let vnc: SocketAddr = "10.77.0.1:5910".parse().unwrap();
        assert!(established(tcp, Some(vnc), None));
        assert!(!established(
            tcp,
            Some("10.77.0.1:5911".parse().unwrap()),
            None
        ));
        assert!(!established(tcp, None, Some(6000)), "6000 only listens");
        let x = format!("{tcp}   2: 32004D0A:1770 78004D0A:9C40 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0 20 4 30 10 -1\n");
        assert!(established(&x, None, Some(6000)));
    }
}
