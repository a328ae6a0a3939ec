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

/// What the disk layout code below adds to the recipe's hash: change it when the layout
/// changes, so a new layout rebuilds even from an unchanged recipe.
const GUEST_X11_LAYOUT: &str = "mbr(syslinux) + fat16 boot + ext4 root, qcow2 zstd; v1";
/// The root file system's label; `root=LABEL=` in images/guest-x11/syslinux.cfg and the
/// guest's fstab name it, so the disk bus (AHCI, IDE, virtio) does not matter.
const GUEST_X11_ROOT_LABEL: &str = "vdd-x11-root";
/// Where the first partition starts: 1 MiB, as partitioning tools align today.
const FIRST_LBA: u64 = 2048;
const SECTOR: u64 = 512;
const MIB: u64 = 1 << 20;

/// Builds `images/out/guest-x11.qcow2`: a Debian guest whose xdm answers XDMCP (see
/// images/guest-x11/README.md). One bootable disk, made without mounting anything:
/// syslinux's MBR, a FAT16 partition with syslinux, the guest's kernel and initrd, and an
/// ext4 root made by `mkfs.ext4 -d` from the mmdebstrap tree. Returns the image path.
///
/// The mmdebstrap tarball is cached per recipe in `~/.cache/vdd` (it is the slow step);
/// the finished image too, per recipe and layout. Other recipes' files there go after a
/// day.
pub fn guest_x11(force: bool) -> Result<PathBuf> {
    let root = repo_root();
    let recipe = root.join("images/guest-x11");
    let out_dir = root.join("images/out");
    std::fs::create_dir_all(&out_dir)?;
    let _building = build_lock(&out_dir, "guest-x11")?;
    let image = out_dir.join("guest-x11.qcow2");
    let stamp = out_dir.join("guest-x11.recipe-sha256");
    let recipe_sha = recipe_hash_skipping(&recipe, &["README.md"])?;
    let hash = {
        let mut h = Sha256::new();
        h.update(recipe_sha.as_bytes());
        h.update(GUEST_X11_LAYOUT.as_bytes());
        format!("{:x}", h.finalize())
    };
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
    let cache = cache_dir();
    let cached_image = cache
        .as_ref()
        .map(|d| d.join(format!("guest-x11-{}.qcow2", &hash[..16])));
    if let Some(c) = cached_image.as_ref().filter(|c| c.is_file() && !force) {
        let tmp = out_dir.join("guest-x11.qcow2.tmp");
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
    for (tool, pkg) in [
        ("mmdebstrap", "mmdebstrap"),
        ("mkfs.ext4", "e2fsprogs"),
        ("mkfs.vfat", "dosfstools"),
        ("mcopy", "mtools"),
        ("syslinux", "syslinux"),
        ("qemu-img", "qemu-utils"),
        ("tar", "tar"),
    ] {
        if crate::lab::which(tool).is_none() {
            bail!("`{tool}` is missing: apt-get install -y {pkg}");
        }
    }
    let mbr_bin = Path::new("/usr/lib/syslinux/mbr/mbr.bin");
    if !mbr_bin.is_file() {
        bail!(
            "{} is missing: apt-get install -y syslinux-common",
            mbr_bin.display()
        );
    }

    let t0 = Instant::now();
    let work = out_dir.join("guest-x11.work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let result = guest_x11_build(&recipe, &recipe_sha, &work, mbr_bin, &image, force, t0);
    let _ = std::fs::remove_dir_all(&work);
    result?;
    std::fs::write(&stamp, &hash)?;
    if let Some(c) = &cached_image {
        // Best effort: a full disk must not fail the build that just worked.
        let _ = std::fs::create_dir_all(c.parent().expect("cache file has a folder"));
        if std::fs::copy(&image, c).is_ok() {
            prune_cache(c, "guest-x11-");
        }
    }
    eprintln!(
        "xtask: {} is {:.1} MiB, built in {:.0} s",
        image.display(),
        std::fs::metadata(&image)?.len() as f64 / MIB as f64,
        t0.elapsed().as_secs_f64()
    );
    Ok(image)
}

/// The steps of [`guest_x11`] inside its work folder, which the caller removes on every
/// path.
fn guest_x11_build(
    recipe: &Path,
    recipe_sha: &str,
    work: &Path,
    mbr_bin: &Path,
    image: &Path,
    force: bool,
    t0: Instant,
) -> Result<()> {
    let since = || t0.elapsed().as_secs_f64();
    // 1. The root tree, from the cached mmdebstrap tarball or a fresh mmdebstrap.
    let tarball = match cache_dir() {
        Some(d) => d.join(format!("guest-x11-root-{}.tar", &recipe_sha[..16])),
        None => work.join("root.tar"),
    };
    // --force means from scratch: the tarball is the apt sources' state of its day.
    if tarball.is_file() && !force {
        eprintln!(
            "xtask: [1/4] root tree from the cached {}",
            tarball.display()
        );
    } else {
        let (sources, suite) = apt_sources()?;
        let packages: Vec<String> = std::fs::read_to_string(recipe.join("packages"))?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(String::from)
            .collect();
        eprintln!(
            "xtask: [1/4] mmdebstrap {suite} minbase + {} packages (a few minutes) ...",
            packages.len()
        );
        std::fs::create_dir_all(tarball.parent().expect("tarball has a folder"))?;
        let tmp = tarball.with_extension("tar.tmp");
        let args = [
            "--format=tar".to_string(),
            format!("--include={}", packages.join(",")),
            // A file: mmdebstrap copies it into the guest's /etc/dpkg/dpkg.cfg.d/.
            format!("--dpkgopt={}", recipe.join("dpkg.cfg").display()),
            format!("--setup-hook={0}/setup.sh \"$1\" {0}", recipe.display()),
            format!(
                "--customize-hook={0}/customize.sh \"$1\" {0}",
                recipe.display()
            ),
        ];
        mmdebstrap(&args, &suite, &tmp, &sources)?;
        std::fs::rename(&tmp, &tarball)?;
        prune_cache(&tarball, "guest-x11-root-");
    }
    let tree = work.join("root");
    std::fs::create_dir_all(&tree)?;
    run(Command::new("tar")
        .arg("-C")
        .arg(&tree)
        .args(["--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf"])
        .arg(&tarball))?;

    // 2. The kernel and initrd leave the tree for the FAT partition.
    let (kernel, initrd) = take_kernel(&tree, work)?;

    eprintln!(
        "xtask: [2/4] ext4 root from the tree ({:.0} s so far) ...",
        since()
    );
    let used = dir_bytes(&tree)?;
    // Room for the session's logs and files; as qcow2 the free space costs nothing.
    let root_bytes = round_up(used + used / 4 + 512 * MIB, MIB);
    let root_img = work.join("root.ext4");
    std::fs::File::create(&root_img)?.set_len(root_bytes)?;
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-m", "0", "-L", GUEST_X11_ROOT_LABEL])
        // Inode tables and journal zeroed now (zeros cost nothing in qcow2), so the guest
        // runs no ext4lazyinit thread writing them into every session's overlay.
        .args(["-E", "lazy_itable_init=0,lazy_journal_init=0"])
        .arg("-d")
        .arg(&tree)
        .arg(&root_img))?;

    eprintln!(
        "xtask: [3/4] FAT boot partition, syslinux ({:.0} s so far) ...",
        since()
    );
    let fat_bytes = round_up(
        std::fs::metadata(&kernel)?.len() + std::fs::metadata(&initrd)?.len() + 8 * MIB,
        16 * MIB,
    )
    .max(32 * MIB);
    let fat_img = work.join("boot.fat");
    run(Command::new("mkfs.vfat")
        .args(["-F", "16", "-n", "VDDX11BOOT"])
        // Hidden sectors = where the partition starts, which syslinux's boot sector needs.
        .args(["-h", &FIRST_LBA.to_string(), "-C"])
        .arg(&fat_img)
        .arg((fat_bytes / 1024).to_string())
        .stdout(Stdio::null()))?;
    for (src, name) in [
        (kernel.as_path(), "vmlinuz"),
        (initrd.as_path(), "initrd.img"),
        (recipe.join("syslinux.cfg").as_path(), "syslinux.cfg"),
    ] {
        run(Command::new("mcopy")
            .arg("-i")
            .arg(&fat_img)
            .arg(src)
            .arg(format!("::/{name}")))?;
    }
    run(Command::new("syslinux").arg("--install").arg(&fat_img))?;

    eprintln!("xtask: [4/4] disk and qcow2 ({:.0} s so far) ...", since());
    let fat_start = FIRST_LBA * SECTOR;
    let root_start = fat_start + fat_bytes;
    let raw = work.join("disk.raw");
    let mut disk = std::fs::File::create(&raw)?;
    disk.set_len(root_start + root_bytes)?;
    let boot_code = std::fs::read(mbr_bin)?;
    let sector0 = mbr(
        &boot_code,
        &[
            Partition {
                bootable: true,
                kind: 0x0e, // FAT16, LBA
                start_lba: FIRST_LBA,
                sectors: fat_bytes / SECTOR,
            },
            Partition {
                bootable: false,
                kind: 0x83, // Linux
                start_lba: root_start / SECTOR,
                sectors: root_bytes / SECTOR,
            },
        ],
        u32::from_str_radix(&recipe_sha[..8], 16)?,
    )?;
    use std::io::{Seek, SeekFrom, Write};
    disk.seek(SeekFrom::Start(0))?;
    disk.write_all(&sector0)?;
    splice(&mut disk, fat_start, &fat_img)?;
    splice(&mut disk, root_start, &root_img)?;
    drop(disk);
    let tmp = image.with_extension("qcow2.tmp");
    let _ = std::fs::remove_file(&tmp);
    run(Command::new("qemu-img")
        .args([
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "compression_type=zstd",
        ])
        .arg(&raw)
        .arg(&tmp))?;
    // Rename last, so an interrupted build never leaves a half image under the real name.
    std::fs::rename(&tmp, image)?;
    Ok(())
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

/// Moves the one `boot/vmlinuz-*` and `boot/initrd.img-*` of the tree into `dir`, and
/// drops the top-level symlinks to them: they boot from the FAT partition.
fn take_kernel(tree: &Path, dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let boot = tree.join("boot");
    let find = |prefix: &str| -> Result<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&boot)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
            })
            .collect();
        v.sort();
        match v.len() {
            1 => Ok(v.remove(0)),
            n => bail!(
                "expected one {}/{prefix}* in the guest tree, found {n}",
                boot.display()
            ),
        }
    };
    let (k, i) = (find("vmlinuz-")?, find("initrd.img-")?);
    let (kernel, initrd) = (dir.join("vmlinuz"), dir.join("initrd.img"));
    std::fs::rename(&k, &kernel)?;
    std::fs::rename(&i, &initrd)?;
    for l in ["vmlinuz", "vmlinuz.old", "initrd.img", "initrd.img.old"] {
        let _ = std::fs::remove_file(tree.join(l));
    }
    Ok((kernel, initrd))
}

/// Bytes of the files under `dir` (what `mkfs.ext4 -d` must hold), counted by `du`.
fn dir_bytes(dir: &Path) -> Result<u64> {
    let out = Command::new("du")
        .args(["-s", "-B1"])
        .arg(dir)
        .output()
        .context("running du")?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("du -s {} gave no size", dir.display()))
}

fn round_up(n: u64, to: u64) -> u64 {
    n.div_ceil(to) * to
}

/// Copies `src` into `dst` at `offset`, skipping all-zero chunks so the disk stays sparse
/// (an ext4 image is mostly zeros; writing them would cost gigabytes for nothing).
fn splice(dst: &mut std::fs::File, offset: u64, src: &Path) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let mut buf = vec![0u8; MIB as usize];
    let mut at = offset;
    loop {
        let mut n = 0;
        while n < buf.len() {
            match f.read(&mut buf[n..])? {
                0 => break,
                k => n += k,
            }
        }
        if n == 0 {
            return Ok(());
        }
        if buf[..n].iter().any(|&b| b != 0) {
            dst.seek(SeekFrom::Start(at))?;
            dst.write_all(&buf[..n])?;
        }
        at += n as u64;
    }
}

/// One primary partition of an MBR.
#[derive(Clone, Copy, Debug)]
pub struct Partition {
    pub bootable: bool,
    /// The partition type byte (0x0e FAT16 LBA, 0x83 Linux).
    pub kind: u8,
    pub start_lba: u64,
    pub sectors: u64,
}

/// Sector 0 of a disk: `boot_code` (syslinux's mbr.bin, at most 440 bytes), the disk
/// signature, up to four primary partitions and the 0x55AA mark. The CHS fields say
/// "beyond CHS" (as fdisk writes for LBA partitions): every BIOS SeaBIOS-era and later
/// reads by LBA, and so does mbr.bin.
pub fn mbr(boot_code: &[u8], parts: &[Partition], signature: u32) -> Result<[u8; 512]> {
    if boot_code.len() > 440 {
        bail!("MBR boot code is {} bytes, more than 440", boot_code.len());
    }
    if parts.len() > 4 {
        bail!("an MBR holds 4 primary partitions, not {}", parts.len());
    }
    let mut s = [0u8; 512];
    s[..boot_code.len()].copy_from_slice(boot_code);
    s[440..444].copy_from_slice(&signature.to_le_bytes());
    for (i, p) in parts.iter().enumerate() {
        let (Ok(start), Ok(len)) = (u32::try_from(p.start_lba), u32::try_from(p.sectors)) else {
            bail!("partition {} does not fit an MBR (2 TiB)", i + 1);
        };
        let e = &mut s[446 + 16 * i..446 + 16 * (i + 1)];
        e[0] = if p.bootable { 0x80 } else { 0 };
        e[1..4].copy_from_slice(&[0xfe, 0xff, 0xff]);
        e[4] = p.kind;
        e[5..8].copy_from_slice(&[0xfe, 0xff, 0xff]);
        e[8..12].copy_from_slice(&start.to_le_bytes());
        e[12..16].copy_from_slice(&len.to_le_bytes());
    }
    s[510] = 0x55;
    s[511] = 0xaa;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mbr_has_code_table_and_mark() {
        let code = [0xfau8; 440];
        let s = mbr(
            &code,
            &[
                Partition {
                    bootable: true,
                    kind: 0x0e,
                    start_lba: 2048,
                    sectors: 65536,
                },
                Partition {
                    bootable: false,
                    kind: 0x83,
                    start_lba: 67584,
                    sectors: 1 << 21,
                },
            ],
            0x1234_5678,
        )
        .unwrap();
        assert_eq!(&s[..440], &code[..]);
        assert_eq!(&s[440..444], &[0x78, 0x56, 0x34, 0x12]);
        assert_eq!(
            &s[446..462],
            &[
                0x80, 0xfe, 0xff, 0xff, 0x0e, 0xfe, 0xff, 0xff, 0x00, 0x08, 0, 0, 0x00, 0x00, 0x01,
                0x00
            ]
        );
        assert_eq!(s[462 + 4], 0x83);
        assert_eq!(&s[462 + 8..462 + 12], &67584u32.to_le_bytes());
        assert!(s[478..510].iter().all(|&b| b == 0));
        assert_eq!(&s[510..], &[0x55, 0xaa]);
    }

    #[test]
    fn mbr_refuses_what_does_not_fit() {
        let p = Partition {
            bootable: false,
            kind: 0x83,
            start_lba: 2048,
            sectors: 1 << 33,
        };
        assert!(mbr(&[], &[p], 0).is_err());
        assert!(mbr(&[0; 441], &[], 0).is_err());
        assert!(mbr(&[], &[p; 5], 0).is_err());
    }
}
