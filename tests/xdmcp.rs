//! The XDMCP probe against a real display manager: Debian's `xdm` (see common/xdm.rs) in a
//! lab namespace. It answers Willing when its Xaccess lets everyone in, Unwilling when it
//! lets nobody in; nothing listening is a timeout with the message the session API shows.

use std::time::{Duration, Instant};

use vdd::xdmcp::{self, ProbeError, Reply};
use xtask::lab::Lab;

#[path = "common/xdm.rs"]
mod xdm;

/// Runs the probe from inside namespace `ns` (a thread of its own joins it).
fn probe_in(ns: &str, ip: &str, limit: Duration) -> Result<Reply, ProbeError> {
    let ns = ns.to_string();
    let ip = ip.parse().unwrap();
    std::thread::spawn(move || {
        let f = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
        // SAFETY: setns(2) on a file descriptor we own; it moves only this thread.
        let r = unsafe {
            nix::libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), nix::libc::CLONE_NEWNET)
        };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(xdmcp::probe(
                ip,
                xdmcp::PORT,
                Duration::from_millis(500),
                limit,
            ))
    })
    .join()
    .unwrap()
}

#[test]
fn probe_against_real_xdm() {
    if let Some(why) = xdm::skip() {
        eprintln!("skipping: {why}");
        return;
    }
    let dir = std::env::temp_dir().join(format!("vdd-xdmcp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut lab = Lab::new("xdmcp").unwrap();
    let ns = lab.server_ns.clone();

    // Nobody listens yet: a timeout, with the message the session API shows.
    let t = Instant::now();
    match probe_in(&ns, "10.77.0.1", Duration::from_secs(2)) {
        Err(e @ ProbeError::Timeout { .. }) => assert_eq!(
            e.to_string(),
            "the guest's display manager did not answer XDMCP at 10.77.0.1:177 within 2s"
        ),
        r => panic!("expected a timeout, got {r:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(5));

    // xdm willing to serve anyone.
    let pid = xdm::start(&mut lab, &ns, &dir.join("open"), "*\n");
    match probe_in(&ns, "10.77.0.1", Duration::from_secs(20)) {
        Ok(Reply::Willing {
            auth_name, status, ..
        }) => {
            assert_eq!(auth_name, "");
            assert!(!status.is_empty());
        }
        r => panic!("expected Willing from xdm, got {r:?}"),
    }
    lab.kill(pid, "TERM").unwrap();

    // xdm that lets nobody in answers a direct Query with Unwilling.
    let _pid = xdm::start(&mut lab, &ns, &dir.join("closed"), "192.0.2.1\n");
    match probe_in(&ns, "10.77.0.1", Duration::from_secs(20)) {
        Err(e @ ProbeError::Unwilling { .. }) => {
            assert!(e.to_string().contains("refused XDMCP"), "{e}")
        }
        r => panic!("expected Unwilling from xdm, got {r:?}"),
    }
    drop(lab);
    let _ = std::fs::remove_dir_all(&dir);
}
