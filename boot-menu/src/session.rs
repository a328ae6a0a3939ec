//! The thin-client root for a session: the NBD export mounted as squashfs read-only, a
//! tmpfs on top through overlayfs (Documentation/filesystems/overlayfs.rst), the kernel
//! file systems inside, and a command run chrooted in it. Undone in reverse on Drop.
//!
//! The real session (POST /api/v1/sessions, then Xorg or a VNC viewer) is not built yet;
//! for now the command is a check that proves the root is readable and writable.

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Where the layers live; under /run, the tmpfs PID 1 mounted.
pub const BASE: &str = "/run/vdd";

/// The check run in the new root: the image's marker file (written by the thin-client
/// recipe) is readable, a write lands in the tmpfs upper layer, and the X server of the
/// real thin-client image starts far enough to print its version.
pub const CHECK: &str = "set -e; read m < /etc/vdd-thin-client; echo \"root=$m\"; \
echo ok > /tmp/.vdd-check; read w < /tmp/.vdd-check; echo \"overlay=$w\"; \
if [ -x /usr/bin/Xorg ]; then /usr/bin/Xorg -version 2>&1 | grep 'X.Org X Server'; fi";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create {0}")]
    Mkdir(PathBuf, #[source] std::io::Error),
    #[error("cannot mount {what} on {dir}")]
    Mount {
        what: String,
        dir: PathBuf,
        #[source]
        err: nix::Error,
    },
}

/// Mounted layers; unmounted in reverse order when dropped.
pub struct Root {
    pub dir: PathBuf,
    mounted: Vec<PathBuf>,
}

fn mkdir(p: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(p).map_err(|e| Error::Mkdir(p.to_path_buf(), e))
}

impl Root {
    fn mount(
        &mut self,
        src: &str,
        dir: &Path,
        fs: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<(), Error> {
        mkdir(dir)?;
        mount(Some(src), dir, fs, flags, data).map_err(|err| Error::Mount {
            what: format!("{src} ({})", fs.unwrap_or("bind")),
            dir: dir.to_path_buf(),
            err,
        })?;
        self.mounted.push(dir.to_path_buf());
        Ok(())
    }

    /// squashfs from `dev` + tmpfs + overlay, then /proc, /sys and /dev inside.
    pub fn assemble(dev: &str) -> Result<Root, Error> {
        let base = Path::new(BASE);
        let mut r = Root {
            dir: base.join("root"),
            mounted: Vec::new(),
        };
        let (ro, rw) = (base.join("ro"), base.join("rw"));
        r.mount(dev, &ro, Some("squashfs"), MsFlags::MS_RDONLY, None)?;
        r.mount(
            "tmpfs",
            &rw,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
        )?;
        mkdir(&rw.join("upper"))?;
        mkdir(&rw.join("work"))?;
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            ro.display(),
            rw.join("upper").display(),
            rw.join("work").display()
        );
        let root = r.dir.clone();
        r.mount(
            "overlay",
            &root,
            Some("overlay"),
            MsFlags::empty(),
            Some(&opts),
        )?;
        r.mount(
            "proc",
            &root.join("proc"),
            Some("proc"),
            MsFlags::empty(),
            None,
        )?;
        r.mount(
            "sysfs",
            &root.join("sys"),
            Some("sysfs"),
            MsFlags::empty(),
            None,
        )?;
        r.mount(
            "/dev",
            &root.join("dev"),
            None,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None,
        )?;
        Ok(r)
    }

    /// A command that runs `sh -c script` with this root as `/`, in a process group of
    /// its own.
    pub fn command(&self, script: &str) -> std::process::Command {
        use std::os::unix::process::CommandExt;
        let mut c = std::process::Command::new("/bin/sh");
        // Its own process group, so all of it (sh, Xorg, the viewer) can be stopped at once.
        c.args(["-c", script])
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .process_group(0);
        let dir = self.dir.clone();
        // SAFETY: chroot and chdir are async-signal-safe; nothing else runs between fork
        // and exec.
        unsafe {
            c.pre_exec(move || {
                nix::unistd::chroot(&dir)?;
                nix::unistd::chdir("/")?;
                Ok(())
            });
        }
        c
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        for d in self.mounted.drain(..).rev() {
            // MNT_DETACH: a process still holding a file must not keep the NBD device busy
            // forever; the kernel finishes the unmount when it lets go.
            let _ = umount2(&d, MntFlags::MNT_DETACH);
        }
    }
}
