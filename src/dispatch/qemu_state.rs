//! The QEMU backend's side of saved states (`saved.rs`): saving a running VM's RAM and
//! device state with QMP `migrate` (docs/devel/migration.rst) into a file, waiting for a
//! VM started with `-incoming` to finish loading one, and the samples of what a guest
//! does (a digest of its screen, the CPU time of its QEMU) that tell when it is up.
//!
//! The stream goes through a Unix socket vdd listens on (`migrate unix:PATH`) and vdd
//! writes it to the file: QEMU 7.2 has no `file:` migration, and `exec:` would hand a
//! path to a shell.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use tokio::io::AsyncWriteExt;

use super::qemu::Vm;
use super::saved::Activity;
use super::screen::ScreenSize;
use super::Error;
use qemu_ctl::qmp::Qmp;

/// How long QEMU may take to load a saved state before the start counts as failed.
const RESTORE_LIMIT: Duration = Duration::from_secs(60);
/// How long saving may take: the stream is the guest's RAM, at disk speed.
const SAVE_LIMIT: Duration = Duration::from_secs(300);

/// Waits until a VM started with `-incoming` runs: QEMU loads the state and leaves the
/// guest paused, as it was saved ([`save`] pauses it first), and `cont` resumes it. A
/// state that does not load makes QEMU exit; what it said is the error.
pub async fn wait_restored(q: &mut Qmp, vm: &mut Vm, dir: &Path) -> Result<(), String> {
    let end = tokio::time::Instant::now() + RESTORE_LIMIT;
    loop {
        let exited = vm
            .child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
        if exited {
            let log = std::fs::read_to_string(dir.join("qemu.log")).unwrap_or_default();
            return Err(format!("QEMU exited: {}", log.trim()));
        }
        match q.execute("query-status", None).await {
            Ok(v) if v["status"] == "running" => return Ok(()),
            Ok(v) if v["status"] == "inmigrate" => {}
            Ok(v) if v["status"] == "paused" => {
                q.execute("cont", None).await.map_err(|e| e.to_string())?;
            }
            Ok(v) => return Err(format!("the VM is {} after loading it", v["status"])),
            // QEMU closes the monitor when it exits on a bad state: the check above says so.
            Err(_) => {}
        }
        if tokio::time::Instant::now() > end {
            return Err(format!("not loaded within {RESTORE_LIMIT:?}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Pauses the VM and streams its state into `state` (created 0600). The VM stays paused.
pub async fn save(qmp: &Path, dir: &Path, state: &Path) -> Result<u64, Error> {
    let mut q = Qmp::connect(qmp, Duration::from_secs(10)).await?;
    q.execute("stop", None).await?;
    // QEMU 7.2 caps migration at 32 MiB/s by default, for live migration over a network;
    // into a local file of a paused VM there is nothing to spare.
    q.execute(
        "migrate-set-parameters",
        Some(json!({"max-bandwidth": 1u64 << 40})),
    )
    .await?;
    let sock = dir.join("migrate.sock");
    let _ = std::fs::remove_file(&sock);
    let listener =
        tokio::net::UnixListener::bind(&sock).map_err(|e| Error::State(sock.clone(), e))?;
    let written = async {
        q.execute(
            "migrate",
            Some(json!({"uri": format!("unix:{}", sock.display())})),
        )
        .await?;
        let (mut conn, _) = listener
            .accept()
            .await
            .map_err(|e| Error::State(sock.clone(), e))?;
        let mut file = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(state)
                .map(tokio::fs::File::from_std)
                .map_err(|e| Error::State(state.to_path_buf(), e))?
        };
        let n = tokio::io::copy(&mut conn, &mut file)
            .await
            .map_err(|e| Error::State(state.to_path_buf(), e))?;
        file.flush()
            .await
            .map_err(|e| Error::State(state.to_path_buf(), e))?;
        file.sync_all()
            .await
            .map_err(|e| Error::State(state.to_path_buf(), e))?;
        // The stream's end is QEMU's; whether it completed is its word.
        loop {
            let v = q.execute("query-migrate", None).await?;
            match v["status"].as_str() {
                Some("completed") => return Ok(n),
                Some("failed" | "cancelled") => {
                    return Err(Error::ToolFailed {
                        tool: "QEMU migrate".into(),
                        said: v["error-desc"].as_str().unwrap_or("failed").to_string(),
                    })
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    };
    let r = tokio::time::timeout(SAVE_LIMIT, written)
        .await
        .unwrap_or_else(|_| {
            Err(Error::ToolFailed {
                tool: "QEMU migrate".into(),
                said: format!("not done within {SAVE_LIMIT:?}"),
            })
        });
    let _ = std::fs::remove_file(&sock);
    r
}

/// The guest's screen: a QMP `screendump` (PPM, into the VM's folder).
async fn screendump(qmp: &Path) -> Option<Vec<u8>> {
    let file = qmp.parent()?.join("screen.ppm");
    let mut q = Qmp::connect(qmp, Duration::from_secs(5)).await.ok()?;
    q.execute(
        "screendump",
        Some(json!({"filename": file.display().to_string()})),
    )
    .await
    .ok()?;
    let bytes = tokio::fs::read(&file).await.ok();
    let _ = std::fs::remove_file(&file);
    bytes
}

/// The size of the guest's screen, from a screendump's PPM header ("P6 W H 255").
pub async fn screen_size(qmp: &Path) -> Option<ScreenSize> {
    let ppm = screendump(qmp).await?;
    let head = String::from_utf8_lossy(&ppm[..ppm.len().min(64)]).into_owned();
    let mut f = head.split_ascii_whitespace();
    (f.next()? == "P6").then_some(())?;
    Some(ScreenSize {
        width: f.next()?.parse().ok()?,
        height: f.next()?.parse().ok()?,
    })
}

/// A digest of the guest's screen (QMP `screendump`, into the VM's folder) and how busy
/// its QEMU's threads have been ([`cpu_time`]).
pub async fn activity(qmp: &Path, pid: u32) -> Option<Activity> {
    use std::hash::{Hash, Hasher};
    let bytes = screendump(qmp).await?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    Some(Activity {
        screen: h.finish(),
        cpu: cpu_time(pid)?,
    })
}

/// How long the threads of process `pid` have been running or waiting to run (the first
/// two fields of each `/proc/PID/task/TID/schedstat`, in ns). Unlike CPU time this counts
/// a busy vCPU as busy when the host is so loaded that it seldom gets a CPU: a booting
/// guest must not look idle on a busy server.
fn cpu_time(pid: u32) -> Option<Duration> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut ns: u64 = 0;
    for t in tasks.flatten() {
        let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) else {
            continue;
        };
        let mut f = s.split_whitespace().map(|x| x.parse::<u64>().unwrap_or(0));
        ns += f.next().unwrap_or(0) + f.next().unwrap_or(0);
    }
    Some(Duration::from_nanos(ns))
}

/// What a saved state depends on in the QEMU backend: the accelerator, and the QEMU
/// binary (its path, size and time: a new build may not read an older one's states).
pub fn tag(binary: &str, accel: &str) -> String {
    let path = if binary.contains('/') {
        Some(PathBuf::from(binary))
    } else {
        std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(binary))
                .find(|c| c.is_file())
        })
    };
    let meta = path.as_ref().and_then(|p| std::fs::metadata(p).ok());
    let stamp = meta.map_or("missing".to_string(), |m| {
        use std::os::unix::fs::MetadataExt;
        format!("{} bytes, mtime {}.{}", m.len(), m.mtime(), m.mtime_nsec())
    });
    format!(
        "qemu {accel} {} ({stamp})",
        path.map_or(binary.to_string(), |p| p.display().to_string())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_cpu_time_and_a_tag() {
        assert!(cpu_time(std::process::id()).is_some());
        assert!(cpu_time(u32::MAX).is_none());
        let t = tag("sh", "tcg");
        assert!(t.starts_with("qemu tcg /"), "{t}");
        assert!(tag("/nonexistent/qemu", "kvm").contains("missing"));
    }
}
