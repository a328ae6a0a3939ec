//! `cargo xtask bench bootmenu --roots xz,zstd,lz4`: the thin-client root image in each
//! compression, made from the one `cargo xtask image thin-client` built (same files,
//! same block size), each PXE-booted through vdd by a QEMU thin client to the check in
//! its root (as `cargo xtask e2e boot`): the image's size, the bytes the seat read over
//! NBD, and the times of the boot's stages. Bytes are what a room at once shares on the
//! wire; the time from the pick to Xorg is what a seat's CPU spends decompressing (TCG
//! makes a slow old PC of it).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::median;
use crate::e2e;

/// One compression: mksquashfs's options for it.
pub fn options(comp: &str) -> Result<&'static [&'static str]> {
    Ok(match comp {
        "xz" => &["-comp", "xz"],
        // Level 19: decompression costs the same at every level; only the build is slower.
        "zstd" => &["-comp", "zstd", "-Xcompression-level", "19"],
        "lz4" => &["-comp", "lz4", "-Xhc"],
        "gzip" => &["-comp", "gzip"],
        other => bail!("no compression {other:?}: xz, zstd, lz4 or gzip"),
    })
}

/// images/out/thin-client-COMP.squashfs, made from the built image unless it is up to
/// date (its stamp names the built image's recipe).
fn variant(comp: &str) -> Result<PathBuf> {
    let out = crate::image::repo_root().join("images/out");
    let source = crate::image::thin_client(false)?;
    let recipe = std::fs::read_to_string(out.join("thin-client.recipe-sha256"))
        .context("the built image's recipe stamp")?;
    let image = out.join(format!("thin-client-{comp}.squashfs"));
    let stamp = out.join(format!("thin-client-{comp}.stamp"));
    let want = format!("{recipe} {}", options(comp)?.join(" "));
    if image.is_file() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(&want) {
        return Ok(image);
    }
    let tree = out.join(format!("thin-client-{comp}.tree"));
    let _ = std::fs::remove_dir_all(&tree);
    eprintln!(
        "bench bootmenu: making the {comp} root from {}",
        source.display()
    );
    let unpacked = Command::new("unsquashfs")
        .args(["-quiet", "-no-progress", "-d"])
        .arg(&tree)
        .arg(&source)
        .status()
        .context("running unsquashfs")?;
    let tmp = out.join(format!("thin-client-{comp}.squashfs.tmp"));
    let packed = unpacked.success()
        && Command::new("mksquashfs")
            .arg(&tree)
            .arg(&tmp)
            .args(options(comp)?)
            .args(["-noappend", "-quiet", "-no-progress"])
            .status()
            .context("running mksquashfs")?
            .success();
    let _ = std::fs::remove_dir_all(&tree);
    if !packed {
        let _ = std::fs::remove_file(&tmp);
        bail!("making the {comp} root failed (unsquashfs or mksquashfs)");
    }
    std::fs::rename(&tmp, &image)?;
    std::fs::write(&stamp, want)?;
    Ok(image)
}

/// What one boot measured.
struct Boot {
    /// Seconds since QEMU started, per stage name.
    stages: Vec<(String, f64)>,
    nbd_bytes: u64,
}

fn boot(root: &Path, vdd: &Path) -> Result<Boot> {
    let built = crate::image::repo_root().join("images/out/thin-client.squashfs");
    let (from, to) = (
        format!("path = \"{}\"", built.display()),
        format!("path = \"{}\"", root.display()),
    );
    let mut s = e2e::serve_edited(
        "bmroot",
        "console=ttyS0 vdd.autopick=demo",
        e2e::Starts::Cold,
        vdd,
        |c| {
            if !c.contains(&from) {
                bail!("the lab config serves no {}", built.display());
            }
            Ok(c.replace(&from, &to))
        },
    )?;
    let result = (|| {
        let mut q = e2e::thin_client(&mut s, e2e::BootPath::Ipxe)?;
        // To the check: the root attached, mounted, and Xorg run from it (`Xorg
        // -version`: the X server's binary and libraries read and decompressed); boot-menu
        // says nothing later that marks X being up.
        let stages = e2e::follow_stages(&mut q, &e2e::boot_stages(e2e::BootPath::Ipxe))?;
        // Counted as vdd sends (the seat's connection never closes: QEMU is killed).
        let nbd_bytes = nbd_read(&s.lab.server_ns)?;
        drop(q);
        Ok(Boot {
            stages: stages
                .into_iter()
                .map(|(n, t)| (n, t.as_secs_f64()))
                .collect(),
            nbd_bytes,
        })
    })();
    s.finish(result)
}

/// The bytes NBD clients read from vdd so far (`/metrics`; the lab has one seat).
fn nbd_read(ns: &str) -> Result<u64> {
    metric(&e2e::metrics(ns)?, "vdd_nbd_read_bytes_total")
        .context("no vdd_nbd_read_bytes_total in /metrics")
}

/// A counter's value in Prometheus' text format.
fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let v = l.strip_prefix(name)?.strip_prefix(' ')?;
        v.trim().parse::<f64>().ok().map(|f| f as u64)
    })
}

pub fn run(comps: &[String], boots: usize) -> Result<()> {
    let vdd = super::vdd_release(None)?;
    crate::initramfs::build(None)?;
    crate::image::guest_demo(false)?;
    let mut rows = Vec::new();
    for comp in comps {
        options(comp)?;
        let image = variant(comp)?;
        let size = std::fs::metadata(&image)?.len();
        let mut runs = Vec::new();
        for i in 0..boots {
            let b = boot(&image, &vdd).with_context(|| format!("{comp} boot {}", i + 1))?;
            eprintln!(
                "bench bootmenu: {comp} boot {}/{boots}: {:.1} MB over NBD, check passed at {:.1} s",
                i + 1,
                b.nbd_bytes as f64 / 1e6,
                b.stages.last().map_or(0.0, |s| s.1)
            );
            runs.push(b);
        }
        rows.push((comp.clone(), size, runs));
    }
    let at = |runs: &[Boot], stage: &str| -> f64 {
        median(
            runs.iter()
                .filter_map(|b| {
                    b.stages
                        .iter()
                        .find(|s| s.0.starts_with(stage))
                        .map(|s| s.1)
                })
                .collect(),
        )
    };
    println!("\nThin-client root image by compression ({boots} QEMU TCG boots each through vdd, iPXE path, to the check; medians; seconds since QEMU start):");
    println!(
        "{:<6} {:>9} {:>10} {:>8} {:>8} {:>10} {:>10} {:>12}",
        "comp", "image MB", "NBD MB", "menu s", "pick s", "mounted s", "Xorg s", "pick->Xorg s"
    );
    for (comp, size, runs) in &rows {
        let nbd = median(runs.iter().map(|b| b.nbd_bytes as f64).collect());
        let pick = at(runs, "guest picked");
        let xorg = at(runs, "Xorg -version");
        println!(
            "{:<6} {:>9.1} {:>10.1} {:>8.1} {:>8.1} {:>10.1} {:>10.1} {:>12.1}",
            comp,
            *size as f64 / 1e6,
            nbd / 1e6,
            at(runs, "menu shown"),
            pick,
            at(runs, "root mounted"),
            xorg,
            xorg - pick
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn counter_from_metrics_text() {
        let text = "# HELP vdd_nbd_read_bytes Bytes the NBD clients read\n\
                    # TYPE vdd_nbd_read_bytes counter\n\
                    vdd_nbd_read_bytes_total 41234\n\
                    vdd_nbd_read_bytes_total_x 7\n";
        assert_eq!(super::metric(text, "vdd_nbd_read_bytes_total"), Some(41234));
        assert_eq!(super::metric(text, "vdd_nbd_written_bytes_total"), None);
    }
}
