//! `cargo xtask image thin-client`: the thin-client root (Debian minbase + Xorg + a VNC
//! viewer) as squashfs, built with mmdebstrap from this machine's own apt sources, so no
//! mirror host is ever written in the repo.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// The repository's top folder (xtask lives one below it).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the repo")
        .to_path_buf()
}

/// Where built images are kept across checkouts: `$XDG_CACHE_HOME/vdd` or `~/.cache/vdd`.
fn cache_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|d| d.join("vdd"))
}

/// The machine's apt sources, handed to mmdebstrap as its "mirror" (it pastes a file's
/// contents into the chroot's sources.list), and its release name.
fn apt_sources() -> Result<(PathBuf, String)> {
    let os = std::fs::read_to_string("/etc/os-release").context("reading /etc/os-release")?;
    let suite = os
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|s| s.trim_matches('"').to_string())
        .context("no VERSION_CODENAME in /etc/os-release")?;
    for p in [
        "/etc/apt/sources.list.d/debian.sources",
        "/etc/apt/sources.list",
    ] {
        let p = PathBuf::from(p);
        if std::fs::metadata(&p).is_ok_and(|m| m.len() > 0) {
            return Ok((p, suite));
        }
    }
    bail!("no apt sources on this machine (/etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list)")
}

/// sha256 over the recipe's files (name and content), so a change to any rebuilds.
fn recipe_hash(dir: &Path) -> Result<String> {
    let mut files: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let mut h = Sha256::new();
    for f in files {
        h.update(f.file_name().unwrap_or_default().as_encoded_bytes());
        h.update(std::fs::read(&f)?);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// Builds `images/out/thin-client.squashfs` unless the recipe is unchanged since the last
/// build. Returns the image path.
pub fn thin_client(force: bool) -> Result<PathBuf> {
    let root = repo_root();
    let recipe = root.join("images/thin-client");
    let out_dir = root.join("images/out");
    std::fs::create_dir_all(&out_dir)?;
    let image = out_dir.join("thin-client.squashfs");
    let stamp = out_dir.join("thin-client.recipe-sha256");
    let hash = recipe_hash(&recipe)?;
    if !force
        && image.exists()
        && std::fs::read_to_string(&stamp).ok().as_deref() == Some(hash.as_str())
    {
        eprintln!(
            "xtask: {} is up to date (recipe {})",
            image.display(),
            &hash[..12]
        );
        return Ok(image);
    }
    // A build of the same recipe kept by an earlier checkout on this machine (CI clones
    // afresh each time): the image is a pure function of the recipe and the apt sources.
    let cached = cache_dir().map(|d| d.join(format!("thin-client-{}.squashfs", &hash[..16])));
    if let Some(c) = cached.as_ref().filter(|c| c.is_file() && !force) {
        let tmp = out_dir.join("thin-client.squashfs.tmp");
        std::fs::copy(c, &tmp).with_context(|| format!("copying {}", c.display()))?;
        std::fs::rename(&tmp, &image)?;
        std::fs::write(&stamp, &hash)?;
        eprintln!(
            "xtask: {} taken from the build cache {}",
            image.display(),
            c.display()
        );
        return Ok(image);
    }
    for tool in ["mmdebstrap", "mksquashfs"] {
        if crate::lab::which(tool).is_none() {
            bail!("`{tool}` is missing: apt-get install -y mmdebstrap squashfs-tools");
        }
    }
    let (sources, suite) = apt_sources()?;
    let packages: Vec<String> = std::fs::read_to_string(recipe.join("packages"))?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect();

    let t0 = Instant::now();
    let work = out_dir.join("thin-client.work");
    let _ = std::fs::remove_dir_all(&work);
    eprintln!(
        "xtask: [1/2] mmdebstrap {suite} minbase + {} packages into {} ...",
        packages.len(),
        work.display()
    );
    let st = Command::new("mmdebstrap")
        .args(["--variant=minbase", "--mode=root", "--verbose"])
        .arg(format!("--include={}", packages.join(",")))
        .arg("--dpkgopt=path-exclude=/usr/share/doc/*")
        .arg("--dpkgopt=path-exclude=/usr/share/man/*")
        .arg("--dpkgopt=path-exclude=/usr/share/locale/*")
        .arg("--aptopt=APT::Install-Recommends \"false\"")
        .arg(format!(
            "--customize-hook={}/customize.sh \"$1\"",
            recipe.display()
        ))
        .arg(&suite)
        .arg(&work)
        .arg(&sources)
        .status()
        .context("running mmdebstrap")?;
    if !st.success() {
        let _ = std::fs::remove_dir_all(&work);
        bail!("mmdebstrap failed ({st}); its output above says why");
    }
    eprintln!(
        "xtask: [2/2] mksquashfs ({:.0} s so far) ...",
        t0.elapsed().as_secs_f64()
    );
    let tmp = out_dir.join("thin-client.squashfs.tmp");
    let _ = std::fs::remove_file(&tmp);
    let st = Command::new("mksquashfs")
        .arg(&work)
        .arg(&tmp)
        .args(["-comp", "xz", "-noappend", "-quiet", "-progress"])
        .status()
        .context("running mksquashfs")?;
    let _ = std::fs::remove_dir_all(&work);
    if !st.success() {
        bail!("mksquashfs failed ({st})");
    }
    // Rename last, so an interrupted build never leaves a half image under the real name.
    std::fs::rename(&tmp, &image)?;
    std::fs::write(&stamp, &hash)?;
    if let Some(c) = &cached {
        // Best effort: a full disk must not fail the build that just worked.
        let _ = std::fs::create_dir_all(c.parent().expect("cache file has a folder"));
        let _ = std::fs::copy(&image, c);
    }
    let size = std::fs::metadata(&image)?.len();
    eprintln!(
        "xtask: {} is {:.1} MiB, built in {:.0} s",
        image.display(),
        size as f64 / 1048576.0,
        t0.elapsed().as_secs_f64()
    );
    Ok(image)
}

/// The newest Debian kernel installed by `linux-image-amd64`.
pub fn debian_kernel() -> Result<PathBuf> {
    let mut ks: Vec<PathBuf> = std::fs::read_dir("/boot")
        .context("reading /boot")?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .collect();
    ks.sort();
    ks.pop()
        .context("no /boot/vmlinuz-*: apt-get install -y linux-image-amd64")
}

/// Runs a command and fails with its name when it fails.
fn run(cmd: &mut Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

/// Builds `images/out/guest-demo.img`: a FAT disk booted by syslinux with Debian's kernel
/// and a busybox initramfs that paints a banner (see images/guest-demo).
pub fn guest_demo(force: bool) -> Result<PathBuf> {
    let root = repo_root();
    let recipe = root.join("images/guest-demo");
    let out_dir = root.join("images/out");
    std::fs::create_dir_all(&out_dir)?;
    let image = out_dir.join("guest-demo.img");
    let stamp = out_dir.join("guest-demo.recipe-sha256");
    let kernel = debian_kernel()?;
    let hash = format!("{} {}", recipe_hash(&recipe)?, kernel.display());
    if !force
        && image.exists()
        && std::fs::read_to_string(&stamp).ok().as_deref() == Some(hash.as_str())
    {
        eprintln!("xtask: {} is up to date", image.display());
        return Ok(image);
    }
    for (tool, pkg) in [
        ("mkfs.vfat", "dosfstools"),
        ("mcopy", "mtools"),
        ("syslinux", "syslinux"),
        ("cpio", "cpio"),
    ] {
        if crate::lab::which(tool).is_none() {
            bail!("`{tool}` is missing: apt-get install -y {pkg}");
        }
    }
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .context("no busybox: apt-get install -y busybox-static")?;

    let work = out_dir.join("guest-demo.work");
    let _ = std::fs::remove_dir_all(&work);
    let tree = work.join("initramfs");
    for d in ["bin", "dev", "proc", "sys", "tmp"] {
        std::fs::create_dir_all(tree.join(d))?;
    }
    std::fs::copy(&busybox, tree.join("bin/busybox"))?;
    std::fs::copy(recipe.join("init"), tree.join("init"))?;
    // cpio newc from the file list, then gzip: what the kernel unpacks as initramfs.
    let initrd = work.join("initrd.img");
    run(Command::new("sh").current_dir(&tree).arg("-c").arg(format!(
        "find . | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 | gzip -9 > {}",
        initrd.display()
    )))?;
    let tmp = out_dir.join("guest-demo.img.tmp");
    let _ = std::fs::remove_file(&tmp);
    // 48 MiB FAT: the kernel (~8 MiB) and the initramfs (~1 MiB) with room to spare.
    run(Command::new("mkfs.vfat")
        .args(["-n", "VDDDEMO", "-C"])
        .arg(&tmp)
        .arg("49152")
        .stdout(Stdio::null()))?;
    run(Command::new("mcopy")
        .arg("-i")
        .arg(&tmp)
        .arg(&kernel)
        .arg("::/vmlinuz"))?;
    run(Command::new("mcopy")
        .arg("-i")
        .arg(&tmp)
        .arg(&initrd)
        .arg("::/initrd.img"))?;
    run(Command::new("mcopy")
        .arg("-i")
        .arg(&tmp)
        .arg(recipe.join("syslinux.cfg"))
        .arg("::/syslinux.cfg"))?;
    run(Command::new("syslinux").arg("--install").arg(&tmp))?;
    let _ = std::fs::remove_dir_all(&work);
    std::fs::rename(&tmp, &image)?;
    std::fs::write(&stamp, &hash)?;
    eprintln!(
        "xtask: {} is {:.1} MiB (kernel {})",
        image.display(),
        std::fs::metadata(&image)?.len() as f64 / 1048576.0,
        kernel.display()
    );
    Ok(image)
}
