//! The NBD read trace a storm seat replays: what one real thin client read from its root
//! image while it booted, recorded once from a QEMU PXE boot through vdd and kept as the
//! fixture `trace.txt` beside this file.
//!
//! Refresh it (after the thin-client image, boot-menu or the kernel changed what a boot
//! reads) with `cargo xtask bench storm --record`, and commit the new `trace.txt`.
//! Recording boots the e2e session flow (iPXE, the menu, the demo guest picked, the NBD
//! root mounted, Xorg and the viewer started, the guest on the seat's screen) with
//! `RUST_LOG=vdd::nbd::trace=debug`, under which vdd logs every NBD request as it
//! arrives with the number of that connection's requests then in flight.
//!
//! Format: `#` lines are comments; `# key: value` lines of the header give the sizes of
//! the files of that boot; every other line is one READ: `offset length depth`, in the
//! order they arrived, where depth counts the request itself and those still in flight.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// The fixture, built into xtask so the benchmark needs no recording to run.
pub const FIXTURE: &str = include_str!("trace.txt");

/// One boot's reads and the sizes of its files.
#[derive(Clone, Debug)]
pub struct Trace {
    /// Size of the root image the offsets are in.
    pub image_bytes: u64,
    pub kernel_bytes: u64,
    pub initrd_bytes: u64,
    /// (offset, length, depth)
    pub reads: Vec<(u64, u32, u32)>,
}

impl Trace {
    pub fn parse(text: &str) -> Result<Trace> {
        let mut t = Trace {
            image_bytes: 0,
            kernel_bytes: 0,
            initrd_bytes: 0,
            reads: Vec::new(),
        };
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if let Some(c) = line.strip_prefix('#') {
                if let Some((k, v)) = c.split_once(':') {
                    let v = v.trim().parse::<u64>();
                    match (k.trim(), v) {
                        ("image_bytes", Ok(v)) => t.image_bytes = v,
                        ("kernel_bytes", Ok(v)) => t.kernel_bytes = v,
                        ("initrd_bytes", Ok(v)) => t.initrd_bytes = v,
                        _ => {}
                    }
                }
                continue;
            }
            if line.is_empty() {
                continue;
            }
            let f: Vec<&str> = line.split_whitespace().collect();
            let parsed = match f[..] {
                [o, l, d] => (o.parse(), l.parse(), d.parse()),
                _ => bail!("trace line {}: want `offset length depth`: {line}", n + 1),
            };
            match parsed {
                (Ok(o), Ok(l), Ok(d)) if d > 0 => t.reads.push((o, l, d)),
                _ => bail!("trace line {}: not numbers: {line}", n + 1),
            }
        }
        if t.image_bytes == 0 || t.kernel_bytes == 0 || t.initrd_bytes == 0 {
            bail!("the trace's header lacks image_bytes, kernel_bytes or initrd_bytes");
        }
        if let Some(r) = t
            .reads
            .iter()
            .find(|(o, l, _)| o + u64::from(*l) > t.image_bytes)
        {
            bail!(
                "a read ({r:?}) lies past the image's {} bytes",
                t.image_bytes
            );
        }
        Ok(t)
    }

    /// The reads' bytes.
    pub fn read_bytes(&self) -> u64 {
        self.reads.iter().map(|r| u64::from(r.1)).sum()
    }

    pub fn max_depth(&self) -> u32 {
        self.reads.iter().map(|r| r.2).max().unwrap_or(0)
    }

    /// `--scale`: the files cut to `f` of their size and the reads to their first `f`
    /// by bytes, so 300 seats fit a shorter run with the same shape.
    pub fn scaled(&self, f: f64) -> Trace {
        if f >= 1.0 {
            return self.clone();
        }
        let cut = |n: u64| ((n as f64 * f) as u64).max(4096);
        let want = (self.read_bytes() as f64 * f) as u64;
        let mut sum = 0;
        let reads = self
            .reads
            .iter()
            .take_while(|r| {
                let take = sum < want;
                sum += u64::from(r.1);
                take
            })
            .copied()
            .collect();
        Trace {
            image_bytes: self.image_bytes,
            kernel_bytes: cut(self.kernel_bytes),
            initrd_bytes: cut(self.initrd_bytes),
            reads,
        }
    }

    /// The text of the fixture.
    pub fn to_text(&self, note: &str) -> String {
        let mut s = String::new();
        for l in note.lines() {
            s.push_str(&format!("# {l}\n"));
        }
        s.push_str(&format!("# image_bytes: {}\n", self.image_bytes));
        s.push_str(&format!("# kernel_bytes: {}\n", self.kernel_bytes));
        s.push_str(&format!("# initrd_bytes: {}\n", self.initrd_bytes));
        for (o, l, d) in &self.reads {
            s.push_str(&format!("{o} {l} {d}\n"));
        }
        s
    }
}

/// The READs of one export from a vdd log written under RUST_LOG=vdd::nbd::trace=debug,
/// in the order vdd received them: `(offset, length, depth)`.
pub fn reads_in_log(log: &str, export: &str) -> Vec<(u64, u32, u32)> {
    let field = |line: &str, key: &str| -> Option<u64> {
        let at = line.find(&format!(" {key}="))? + key.len() + 2;
        line[at..]
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    log.lines()
        .filter(|l| l.contains("vdd::nbd::trace") && l.contains(&format!("export={export} ")))
        // NBD_CMD_READ is 0.
        .filter(|l| field(l, "kind") == Some(0))
        .filter_map(|l| {
            Some((
                field(l, "offset")?,
                u32::try_from(field(l, "len")?).ok()?,
                u32::try_from(field(l, "in_flight")?).ok()?,
            ))
        })
        .collect()
}

/// Where the fixture lives in the source tree.
fn fixture_path() -> PathBuf {
    crate::image::repo_root().join("xtask/src/bench/storm/trace.txt")
}

/// `--record`: one QEMU thin client PXE-boots through vdd to the demo guest on its screen
/// (as `cargo xtask e2e session`), and the reads vdd logged become the new fixture.
pub fn record() -> Result<PathBuf> {
    use crate::e2e;
    crate::initramfs::build(None)?;
    let image = crate::image::thin_client(false)?;
    crate::image::guest_demo(false)?;
    let out = crate::image::repo_root().join("images/out");
    let size = |p: &Path| -> Result<u64> {
        Ok(std::fs::metadata(p)
            .with_context(|| format!("{}", p.display()))?
            .len())
    };
    // Read by `e2e::serve` for vdd's environment.
    std::env::set_var("RUST_LOG", "info,vdd::nbd::trace=debug");
    let mut s = e2e::serve(
        "strec",
        "console=ttyS0 vdd.autopick=demo",
        e2e::Starts::Cold,
    )?;
    let result = (|| -> Result<Vec<(u64, u32, u32)>> {
        let mut q = e2e::thin_client(&mut s, e2e::BootPath::Ipxe)?;
        let mut stages = e2e::boot_stages(e2e::BootPath::Ipxe);
        stages.push(e2e::Stage {
            name: "viewer started",
            marker: "vdd-boot-menu: viewer: connecting",
            timeout: Duration::from_secs(120),
        });
        e2e::follow_stages(&mut q, &stages)?;
        e2e::wait_for_guest_screen(&q, &s.dir, "storm-record")?;
        // What the viewer reads once it draws has arrived by now; a little more for the
        // readahead that follows.
        std::thread::sleep(Duration::from_secs(3));
        drop(q);
        let log = std::fs::read_to_string(s.dir.join("vdd.log"))?;
        let reads = reads_in_log(&log, "thin-client");
        if reads.is_empty() {
            bail!("vdd logged no NBD reads of the thin-client export");
        }
        Ok(reads)
    })();
    let reads = s.finish(result)?;
    let t = Trace {
        image_bytes: size(&image)?,
        kernel_bytes: size(&out.join("vmlinuz"))?,
        initrd_bytes: size(&out.join("initramfs.img"))?,
        reads,
    };
    let note = format!(
        "NBD reads of one thin client's boot through vdd, from the NBD attach to the demo\n\
         guest on its screen (Xorg and the VNC viewer started): {} reads, {} bytes, depth\n\
         up to {}. Made by `cargo xtask bench storm --record`; see trace.rs.",
        t.reads.len(),
        t.read_bytes(),
        t.max_depth()
    );
    let path = fixture_path();
    std::fs::write(&path, t.to_text(&note))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_become_reads() {
        let log = "2025-01-01T00:00:00.000001Z DEBUG vdd::nbd::trace: request export=thin-client kind=0 offset=4096 len=131072 in_flight=3\n\
                   2025-01-01T00:00:00.000002Z DEBUG vdd::nbd::trace: request export=thin-client kind=3 offset=0 len=0 in_flight=1\n\
                   2025-01-01T00:00:00.000003Z DEBUG vdd::nbd::trace: request export=other kind=0 offset=0 len=512 in_flight=1\n\
                   2025-01-01T00:00:00.000004Z  INFO vdd::nbd::session: nbd connection opened\n";
        assert_eq!(reads_in_log(log, "thin-client"), vec![(4096, 131072, 3)]);
    }

    #[test]
    fn fixture_parses_and_scales() {
        let t = Trace::parse(FIXTURE).unwrap();
        assert!(!t.reads.is_empty());
        let again = Trace::parse(&t.to_text("x")).unwrap();
        assert_eq!(again.reads, t.reads);
        let half = t.scaled(0.5);
        assert!(half.read_bytes() >= t.read_bytes() / 2);
        assert!(half.reads.len() <= t.reads.len());
        assert!(half.kernel_bytes < t.kernel_bytes);
    }
}
