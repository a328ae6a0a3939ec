//! `cargo xtask image thin-client`: the thin-client root (Debian minbase + Xorg + a VNC
//! viewer) as squashfs, built with mmdebstrap from this machine's own apt sources, so no
//! mirror host is ever written in the repo.
//!
//! The other images are built here too: `guest-demo` below, `guest-x11` in `guest_x11.rs`
//! (its disk helpers and the MBR in `disk.rs`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

mod disk;
mod guest_x11;

pub use disk::{mbr, Partition};
pub use guest_x11::guest_x11;

/// The repository's top folder (xtask lives one below it).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the repo")
        .to_path_buf()
}

/// Where built images are kept across checkouts: `$XDG_CACHE_HOME/vdd` or `~/.cache/vdd`.
pub(crate) fn cache_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|d| d.join("vdd"))
}

/// The machine's apt sources, handed to mmdebstrap as its "mirror" (it pastes a file's
/// contents into the chroot's sources.list), and its release name.
pub(crate) fn apt_sources() -> Result<(PathBuf, String)> {
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

/// `--dpkgopt`s that leave docs, man pages and locales out of a root nobody reads them in.
pub(crate) const NO_DOCS: [&str; 3] = [
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
];

/// Runs mmdebstrap as root: a minbase root of `suite`, without recommends, from the
/// machine's apt `sources` into `target` (a folder, or a file with `--format=tar`), with
/// `args` for the rest. A failed run leaves no `target` behind; its output says why.
pub(crate) fn mmdebstrap(
    args: &[String],
    suite: &str,
    target: &Path,
    sources: &Path,
) -> Result<()> {
    let st = Command::new("mmdebstrap")
        .args(["--variant=minbase", "--mode=root"])
        .arg("--aptopt=APT::Install-Recommends \"false\"")
        .args(args)
        .arg(suite)
        .arg(target)
        .arg(sources)
        .status()
        .context("running mmdebstrap")?;
    if !st.success() {
        let _ = std::fs::remove_dir_all(target);
        let _ = std::fs::remove_file(target);
        bail!("mmdebstrap failed ({st}); its output above says why");
    }
    Ok(())
}

/// sha256 over the recipe's files (name and content), so a change to any rebuilds.
fn recipe_hash(dir: &Path) -> Result<String> {
    recipe_hash_skipping(dir, &[])
}

/// [`recipe_hash`] without the files named in `skip` (a README edit need not cost a
/// four-minute mmdebstrap).
fn recipe_hash_skipping(dir: &Path, skip: &[&str]) -> Result<String> {
    let mut files: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .filter(|p| !skip.iter().any(|s| p.file_name() == Some(s.as_ref())))
        .collect();
    files.sort();
    let mut h = Sha256::new();
    for f in files {
        h.update(f.file_name().unwrap_or_default().as_encoded_bytes());
        h.update(std::fs::read(&f)?);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// Holds `images/out/NAME.lock` while an image is checked and built: tests in parallel
/// (and two xtask runs) ask for the same image, and two builds in one work folder break
/// each other. The one that waited then finds the image up to date.
fn build_lock(out_dir: &Path, name: &str) -> Result<nix::fcntl::Flock<std::fs::File>> {
    let path = out_dir.join(format!("{name}.lock"));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .with_context(|| format!("locking {}", path.display()))
}

/// Builds `images/out/thin-client.squashfs` unless the recipe is unchanged since the last
/// build. Returns the image path.
pub fn thin_client(force: bool) -> Result<PathBuf> {
    let root = repo_root();
    let recipe = root.join("images/thin-client");
    let out_dir = root.join("images/out");
    std::fs::create_dir_all(&out_dir)?;
    let _building = build_lock(&out_dir, "thin-client")?;
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
    let mut args = vec![
        "--verbose".to_string(),
        format!("--include={}", packages.join(",")),
        format!("--customize-hook={}/customize.sh \"$1\"", recipe.display()),
    ];
    args.extend(NO_DOCS.map(String::from));
    mmdebstrap(&args, &suite, &work, &sources)?;
    eprintln!(
        "xtask: [2/2] mksquashfs ({:.0} s so far) ...",
        t0.elapsed().as_secs_f64()
    );
    let tmp = out_dir.join("thin-client.squashfs.tmp");
    let _ = std::fs::remove_file(&tmp);
    let compression: Vec<String> = std::fs::read_to_string(recipe.join("squashfs-options"))?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect();
    let st = Command::new("mksquashfs")
        .arg(&work)
        .arg(&tmp)
        .args(&compression)
        .args(["-noappend", "-quiet", "-progress"])
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
    let _building = build_lock(&out_dir, "guest-demo")?;
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
    // The KMS driver of QEMU's VGA (and what it needs), so the guest's console takes the
    // screen size its EDID offers (the seat's), numbered in load order for the init.
    let kver = kernel
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .context("the kernel's file name has no version")?
        .to_string();
    std::fs::create_dir_all(tree.join("lib/modules"))?;
    let wanted: Vec<String> = std::fs::read_to_string(recipe.join("modules"))?
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    for (i, m) in crate::initramfs::modules_in_load_order(&kver, &wanted)?
        .iter()
        .enumerate()
    {
        let name = m.file_name().context("a module's file name")?;
        std::fs::copy(
            m,
            tree.join(format!("lib/modules/{i:02}-{}", name.to_string_lossy())),
        )?;
    }
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

/// Removes the cache's other files (or folders) named `prefix*` with the extension of
/// `keep` that are older than a day: each recipe change leaves a root tarball of about
/// 450 MB. Other
/// checkouts share the cache and may be building or reading another recipe's files right
/// now (seen: main's e2e while this branch built), so recent files stay.
pub(crate) fn prune_cache(keep: &Path, prefix: &str) {
    const STALE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
    let (Some(dir), Some(ext)) = (keep.parent(), keep.extension()) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for p in entries.filter_map(|e| e.ok().map(|e| e.path())) {
        let name = p.file_name().unwrap_or_default().to_string_lossy();
        // "guest-x11-" also starts "guest-x11-root-": the extension tells them apart.
        let stale = std::fs::metadata(&p)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > STALE));
        if p != keep && name.starts_with(prefix) && p.extension() == Some(ext) && stale {
            if p.is_dir() {
                let _ = std::fs::remove_dir_all(&p);
            } else {
                let _ = std::fs::remove_file(&p);
            }
        }
    }
}
