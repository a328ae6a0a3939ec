//! `cargo xtask image guest-x11`: a Debian guest whose xdm answers XDMCP, one bootable
//! qcow2 disk made without mounting anything (the MBR and the splicing are in `disk.rs`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use super::disk::{mbr, round_up, splice, Partition, FIRST_LBA, MIB, SECTOR};
use super::{
    apt_sources, build_lock, cache_dir, mmdebstrap, prune_cache, recipe_hash_skipping, repo_root,
    run,
};

/// What the disk layout code below adds to the recipe's hash: change it when the layout
/// changes, so a new layout rebuilds even from an unchanged recipe.
const GUEST_X11_LAYOUT: &str = "mbr(syslinux) + fat16 boot + ext4 root, qcow2 zstd; v1";
/// The root file system's label; `root=LABEL=` in images/guest-x11/syslinux.cfg and the
/// guest's fstab name it, so the disk bus (AHCI, IDE, virtio) does not matter.
const GUEST_X11_ROOT_LABEL: &str = "vdd-x11-root";

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
