//! The control clients of `cargo xtask bench floods`: a well-behaved client per service
//! (atftp, curl, python3-libnbd, busybox udhcpc), run during a flood to check that vdd
//! still serves it.

use std::os::unix::process::CommandExt;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::{pause, Ctx, CONTROL, EXPORT};
use crate::lab::{Lab, SERVER_IP};

/// A control client, killed and reaped on Drop unless it already ended.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Which well-behaved client checks that the service still serves during a flood.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Control {
    Tftp,
    Http,
    Nbd,
    Dhcp,
}

impl Control {
    pub(super) fn label(self) -> &'static str {
        match self {
            Control::Tftp => "atftp 1 MiB",
            Control::Http => "curl 1 MiB",
            Control::Nbd => "libnbd read 1 MiB",
            Control::Dhcp => "udhcpc lease",
        }
    }
}

/// Runs one control client in `ns`; Ok(seconds) when it was served correctly.
pub(super) fn run_control(
    ctx: &Ctx,
    kind: Control,
    ns: &str,
    limit: Duration,
) -> Result<Result<f64, String>> {
    let out = ctx.dir.join("control.out");
    let _ = std::fs::remove_file(&out);
    let server = SERVER_IP.to_string();
    let mut c = match kind {
        Control::Tftp => {
            let mut c = Lab::cmd(ns, "atftp");
            c.args(["--option", "blksize 1468", "--option", "windowsize 16"])
                .args(["-g", "-r", "control.bin", "-l"])
                .arg(&out)
                .args([server.as_str(), "69"]);
            c
        }
        Control::Http => {
            let mut c = Lab::cmd(ns, "curl");
            c.args(["-sS", "-f", "--max-time", "50", "-o"])
                .arg(&out)
                .arg(format!("http://{server}/files/control.bin"));
            c
        }
        Control::Nbd => {
            let mut c = Lab::cmd(ns, &ctx.libnbd_python);
            c.args([
                "-c",
                "import nbd, sys\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\nopen(sys.argv[2], 'wb').write(h.pread(int(sys.argv[3]), 0))\nh.shutdown()",
                &format!("nbd://{server}/{EXPORT}"),
            ])
            .arg(&out)
            .arg(CONTROL.to_string());
            c
        }
        Control::Dhcp => {
            let mut c = Lab::cmd(ns, "busybox");
            // -n: fail instead of retrying forever; -q: exit once bound; 5 DISCOVERs 2 s apart.
            c.args([
                "udhcpc", "-i", "eth0", "-n", "-q", "-f", "-t", "5", "-T", "2", "-s",
            ])
            .arg(&ctx.udhcpc_script);
            c
        }
    };
    let err = ctx.dir.join("control.err");
    c.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err)?)
        .process_group(0);
    let t = Instant::now();
    let mut p = Proc(
        c.spawn()
            .with_context(|| format!("starting {}", kind.label()))?,
    );
    let status = loop {
        if let Some(st) = p.0.try_wait()? {
            break Some(st);
        }
        if t.elapsed() > limit {
            break None;
        }
        pause(Duration::from_millis(10))?;
    };
    let secs = t.elapsed().as_secs_f64();
    drop(p);
    let why = |s: &str| {
        let e = std::fs::read_to_string(&err).unwrap_or_default();
        let e = e.trim().lines().last().unwrap_or("").to_string();
        Err(if e.is_empty() {
            s.to_string()
        } else {
            format!("{s}: {e}")
        })
    };
    Ok(match status {
        None => why(&format!("no answer within {} s", limit.as_secs())),
        Some(st) if !st.success() => why(&format!("failed ({st}) after {secs:.1} s")),
        Some(_) => match kind {
            Control::Dhcp => Ok(secs),
            Control::Nbd => match std::fs::read(&out) {
                Ok(b) if b.len() == CONTROL => Ok(secs),
                _ => why("short read"),
            },
            Control::Tftp | Control::Http => match std::fs::read(&out) {
                Ok(b) if b == ctx.control_file => Ok(secs),
                _ => why("the file differs from the one served"),
            },
        },
    })
}

pub(super) fn show(r: &Result<f64, String>) -> String {
    match r {
        Ok(s) => format!("ok {s:.2} s"),
        Err(e) => format!("FAILED ({e})"),
    }
}
