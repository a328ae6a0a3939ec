//! The thin-client root: the read-only squashfs from NBD under a tmpfs overlay, so the
//! session can write (/tmp, Xorg's logs) while the image stays shared and untouched; and
//! running a command chrooted in it.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{chdir, chroot, execve, fork, ForkResult};

/// Why the root could not be mounted or the command run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("mounting {what} on {target}")]
    Mount {
        what: String,
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("creating {0}")]
    Mkdir(PathBuf, #[source] std::io::Error),
    #[error("starting {0}")]
    Spawn(String, #[source] nix::Error),
    #[error("a command argument contains NUL")]
    Nul,
}

/// The mounted root; unmounted (in reverse order) by [`Root::unmount`] or on Drop.
pub struct Root {
    /// Where the merged root is, e.g. /run/vdd/root.
    pub path: PathBuf,
    mounts: Vec<PathBuf>,
}

/// Mounts `device` (squashfs) read-only at BASE/ro, a tmpfs at BASE/rw, their overlay at
/// BASE/root, and /dev, /proc, /sys, /dev/pts inside it.
pub fn mount_root(device: &Path, base: &Path) -> Result<Root, Error> {
    let ro = base.join("ro");
    let rw = base.join("rw");
    let root = base.join("root");
    for d in [&ro, &rw, &root] {
        std::fs::create_dir_all(d).map_err(|e| Error::Mkdir(d.clone(), e))?;
    }
    let mut r = Root {
        path: root.clone(),
        mounts: Vec::new(),
    };
    // The NBD device answers reads only once NBD_DO_IT runs on its thread; the first
    // attempts can race it, so retry briefly.
    let mut last = None;
    for _ in 0..50 {
        match mount(
            Some(device),
            &ro,
            Some("squashfs"),
            MsFlags::MS_RDONLY,
            None::<&str>,
        ) {
            Ok(()) => {
                last = None;
                break;
            }
            Err(e) => {
                last = Some(e);
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    if let Some(source) = last {
        return Err(Error::Mount {
            what: format!("{} (squashfs)", device.display()),
            target: ro,
            source,
        });
    }
    r.mounts.push(ro.clone());
    r.mount("tmpfs", &rw, "tmpfs", MsFlags::empty(), Some("mode=0755"))?;
    for d in ["upper", "work"] {
        let p = rw.join(d);
        std::fs::create_dir_all(&p).map_err(|e| Error::Mkdir(p.clone(), e))?;
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        ro.display(),
        rw.join("upper").display(),
        rw.join("work").display()
    );
    r.mount("overlay", &root, "overlay", MsFlags::empty(), Some(&opts))?;
    for (src, rel, fstype) in [
        ("/dev", "dev", None),
        ("/proc", "proc", None),
        ("/sys", "sys", None),
        ("/dev/pts", "dev/pts", None),
        ("tmpfs", "tmp", Some("tmpfs")),
        ("tmpfs", "run", Some("tmpfs")),
    ] {
        let target = root.join(rel);
        std::fs::create_dir_all(&target).map_err(|e| Error::Mkdir(target.clone(), e))?;
        match fstype {
            None => r.bind(src, &target)?,
            Some(t) => r.mount(src, &target, t, MsFlags::empty(), None)?,
        }
    }
    Ok(r)
}

impl Root {
    fn mount(
        &mut self,
        src: &str,
        target: &Path,
        fstype: &str,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<(), Error> {
        mount(Some(src), target, Some(fstype), flags, data).map_err(|source| Error::Mount {
            what: src.to_string(),
            target: target.to_path_buf(),
            source,
        })?;
        self.mounts.push(target.to_path_buf());
        Ok(())
    }

    fn bind(&mut self, src: &str, target: &Path) -> Result<(), Error> {
        mount(
            Some(src),
            target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|source| Error::Mount {
            what: src.to_string(),
            target: target.to_path_buf(),
            source,
        })?;
        self.mounts.push(target.to_path_buf());
        Ok(())
    }

    /// Runs `argv` chrooted in the root with `env`, and waits for it. Returns its exit code
    /// (128 + signal when killed).
    pub fn run(&self, argv: &[&str], env: &[(&str, &str)]) -> Result<i32, Error> {
        let args: Vec<CString> = argv
            .iter()
            .map(|a| CString::new(*a).map_err(|_| Error::Nul))
            .collect::<Result<_, _>>()?;
        let envs: Vec<CString> = env
            .iter()
            .map(|(k, v)| CString::new(format!("{k}={v}")).map_err(|_| Error::Nul))
            .collect::<Result<_, _>>()?;
        let root =
            CString::new(self.path.as_os_str().as_encoded_bytes()).map_err(|_| Error::Nul)?;
        // SAFETY: the child only calls async-signal-safe functions (chroot, chdir, execve,
        // _exit) before exec; all allocations happened above.
        match unsafe { fork() }.map_err(|e| Error::Spawn(argv.join(" "), e))? {
            ForkResult::Child => {
                if chroot(root.as_c_str()).is_ok() && chdir("/").is_ok() {
                    let _ = execve(&args[0], &args, &envs);
                }
                // SAFETY: leaving the forked child without running the parent's destructors.
                unsafe { nix::libc::_exit(127) }
            }
            ForkResult::Parent { child } => loop {
                match waitpid(child, None) {
                    Ok(WaitStatus::Exited(_, code)) => return Ok(code),
                    Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(128 + sig as i32),
                    Ok(_) => continue,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(Error::Spawn(argv.join(" "), e)),
                }
            },
        }
    }

    /// Unmounts everything, innermost first. A busy mount is detached lazily so the
    /// menu can come back even if a stray process holds it.
    pub fn unmount(mut self) {
        self.release();
    }

    fn release(&mut self) {
        while let Some(m) = self.mounts.pop() {
            if umount2(&m, MntFlags::empty()).is_err() {
                let _ = umount2(&m, MntFlags::MNT_DETACH);
            }
        }
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole mount stack on a loop device: a squashfs made here, overlay writes that
    /// never reach the image, a command run chrooted, and everything unmounted after.
    #[test]
    fn mounts_squashfs_under_overlay_and_runs_chrooted() {
        let have = |p: &str| std::process::Command::new(p).arg("--help").output().is_ok();
        let root_user = nix::unistd::geteuid().is_root();
        if !root_user
            || !have("mksquashfs")
            || !have("losetup")
            || !Path::new("/bin/busybox").exists()
        {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("CI must run as root with squashfs-tools and busybox-static");
            }
            eprintln!("skipping: needs root, mksquashfs, losetup and /bin/busybox");
            return;
        }
        let dir = std::env::temp_dir().join(format!("vdd-root-test-{}", std::process::id()));
        let src = dir.join("src");
        std::fs::create_dir_all(src.join("bin")).unwrap();
        std::fs::copy("/bin/busybox", src.join("bin/busybox")).unwrap();
        std::fs::write(src.join("marker"), "vdd-thin-client\n").unwrap();
        let img = dir.join("root.squashfs");
        let st = std::process::Command::new("mksquashfs")
            .arg(&src)
            .arg(&img)
            .args(["-noappend", "-quiet", "-no-progress"])
            .status()
            .unwrap();
        assert!(st.success());
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show", "--read-only"])
            .arg(&img)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let loopdev = String::from_utf8(out.stdout).unwrap().trim().to_string();
        let result = std::panic::catch_unwind(|| {
            let base = dir.join("mnt");
            let r = mount_root(Path::new(&loopdev), &base).unwrap();
            // A write lands in the tmpfs upper layer, and the chrooted command sees both.
            let code = r
                .run(
                    &["/bin/busybox", "sh", "-c", "echo hi > /newfile && grep -q vdd-thin-client /marker && test -d /proc/self"],
                    &[("PATH", "/bin")],
                )
                .unwrap();
            assert_eq!(code, 0);
            assert!(base.join("rw/upper/newfile").exists());
            assert_eq!(r.run(&["/bin/busybox", "false"], &[]).unwrap(), 1);
            assert_eq!(r.run(&["/no/such/program"], &[]).unwrap(), 127);
            r.unmount();
            let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
            assert!(
                !mounts.contains(base.to_str().unwrap()),
                "left mounted:\n{mounts}"
            );
        });
        let _ = std::process::Command::new("losetup")
            .args(["-d", &loopdev])
            .status();
        let _ = std::fs::remove_dir_all(&dir);
        if let Err(p) = result {
            std::panic::resume_unwind(p);
        }
    }
}
