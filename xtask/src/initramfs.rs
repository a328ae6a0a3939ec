//! `cargo xtask initramfs`: the thin client's kernel and initramfs. The archive is the
//! "new ASCII" cpio format the kernel unpacks (Documentation/driver-api/early-userspace/
//! buffer-format.rst), gzip-compressed (RFC 1952), with the static boot-menu as `/init`,
//! the NIC/NBD/squashfs/overlay modules of Debian's `linux-image-amd64` with their
//! `modules.dep` closure, and trimmed `modules.alias` / `modules.dep` files.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The target the static boot-menu is built for. Passing it explicitly keeps the
/// crt-static RUSTFLAGS away from the host build (build scripts, proc macros, vdd itself).
pub const TARGET: &str = "x86_64-unknown-linux-gnu";

/// RUSTFLAGS of [`TARGET`] for the static boot-menu. Symbols stripped: boot-menu goes
/// into every client's RAM.
pub const STATIC_RUSTFLAGS: &str = "-C target-feature=+crt-static -C strip=symbols";

/// The environment variable that gives [`TARGET`] alone its RUSTFLAGS.
pub fn target_rustflags_var() -> String {
    format!(
        "CARGO_TARGET_{}_RUSTFLAGS",
        TARGET.to_uppercase().replace('-', "_")
    )
}

/// What the build produced, for the caller to print or boot.
#[derive(Debug)]
pub struct Built {
    pub kver: String,
    pub vmlinuz: PathBuf,
    pub initramfs: PathBuf,
    pub boot_menu_bytes: u64,
    pub initramfs_bytes: u64,
    pub uncompressed_bytes: u64,
    pub modules: Vec<String>,
}

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_path_buf()
}

/// A minimal newc writer: entries in the order given, mtime 0 and fixed inode numbers so
/// two builds of the same inputs give the same bytes.
pub struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

impl Default for Cpio {
    fn default() -> Self {
        Cpio::new()
    }
}

impl Cpio {
    pub fn new() -> Cpio {
        Cpio {
            buf: Vec::new(),
            ino: 1,
        }
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        let name = name.trim_start_matches('/');
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let fields = [
            self.ino,
            mode,
            0,
            0,
            nlink,
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.ino += 1;
        // Field order: ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor
        // rdevminor namesize check.
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while self.buf.len() % 4 != 0 {
            self.buf.push(0);
        }
    }

    pub fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, (0, 0), &[]);
    }

    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100000 | perm, (0, 0), data);
    }

    pub fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) {
        self.entry(name, 0o020000 | perm, (major, minor), &[]);
    }

    /// Appends the trailer and returns the archive.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.buf
    }
}

/// `-` and `_` are the same in module names; file names use both.
fn normalize(name: &str) -> String {
    let base = name.rsplit('/').next().unwrap_or(name);
    base.strip_suffix(".ko").unwrap_or(base).replace('-', "_")
}

/// `modules.dep` as name -> (relative path, direct dependencies).
fn parse_dep(text: &str) -> BTreeMap<String, (String, Vec<String>)> {
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(p, d)| {
            let p = p.trim().to_string();
            (
                normalize(&p),
                (p, d.split_whitespace().map(normalize).collect()),
            )
        })
        .collect()
}

/// The wanted modules and everything they depend on.
fn closure(
    dep: &BTreeMap<String, (String, Vec<String>)>,
    wanted: &[String],
) -> (BTreeSet<String>, Vec<String>) {
    let mut set = BTreeSet::new();
    let mut missing = Vec::new();
    let mut stack: Vec<String> = wanted.iter().map(|w| normalize(w)).collect();
    while let Some(m) = stack.pop() {
        match dep.get(&m) {
            Some((_, ds)) => {
                if set.insert(m.clone()) {
                    stack.extend(ds.iter().cloned());
                }
            }
            None => missing.push(m),
        }
    }
    (set, missing)
}

/// The files of `wanted` and of what they depend on in kernel `kver`, dependencies
/// first: the order `insmod` needs (for an init without modprobe, the demo guest's).
pub fn modules_in_load_order(kver: &str, wanted: &[String]) -> Result<Vec<PathBuf>> {
    let mdir = PathBuf::from(format!("/lib/modules/{kver}"));
    let text = std::fs::read_to_string(mdir.join("modules.dep"))
        .with_context(|| format!("reading {}/modules.dep", mdir.display()))?;
    let dep = parse_dep(&text);
    let (set, missing) = closure(&dep, wanted);
    if !missing.is_empty() {
        bail!("modules not in {kver}: {}", missing.join(", "));
    }
    // Depth-first, each module after everything it depends on.
    fn visit(
        m: &str,
        dep: &BTreeMap<String, (String, Vec<String>)>,
        done: &mut BTreeSet<String>,
        out: &mut Vec<String>,
    ) {
        if !done.insert(m.to_string()) {
            return;
        }
        for d in &dep[m].1 {
            visit(d, dep, done, out);
        }
        out.push(m.to_string());
    }
    let (mut done, mut order) = (BTreeSet::new(), Vec::new());
    for m in &set {
        visit(m, &dep, &mut done, &mut order);
    }
    Ok(order.iter().map(|m| mdir.join(&dep[m].0)).collect())
}

/// Newest kernel that has both /boot/vmlinuz-VER and /lib/modules/VER.
fn pick_kernel(kver: Option<&str>) -> Result<String> {
    if let Some(k) = kver {
        return Ok(k.to_string());
    }
    let mut v: Vec<String> = std::fs::read_dir("/lib/modules")
        .context("listing /lib/modules (is linux-image-amd64 installed?)")?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|k| Path::new(&format!("/boot/vmlinuz-{k}")).is_file())
        .collect();
    v.sort();
    v.pop()
        .context("no kernel with both /boot/vmlinuz-VER and /lib/modules/VER")
}

/// True if the ELF file has no PT_INTERP program header, i.e. it needs no dynamic loader.
pub fn is_static_elf(b: &[u8]) -> bool {
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 {
        return false;
    }
    let phoff = u64::from_le_bytes(b[0x20..0x28].try_into().unwrap()) as usize;
    let phentsize = u16::from_le_bytes([b[0x36], b[0x37]]) as usize;
    let phnum = u16::from_le_bytes([b[0x38], b[0x39]]) as usize;
    (0..phnum).all(|i| {
        let o = phoff + i * phentsize;
        b.get(o..o + 4)
            .is_some_and(|t| u32::from_le_bytes(t.try_into().unwrap()) != 3)
    })
}

/// Builds boot-menu statically for [`TARGET`] and returns the binary's path.
pub fn build_boot_menu(root: &Path) -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root)
        .args(["build", "-p", "boot-menu", "--release", "--target", TARGET])
        .env(target_rustflags_var(), STATIC_RUSTFLAGS);
    eprintln!("xtask: running {cmd:?}");
    let st = cmd.status().context("starting cargo")?;
    if !st.success() {
        bail!("building boot-menu failed: {st}");
    }
    let bin = root.join("target").join(TARGET).join("release/boot-menu");
    let bytes = std::fs::read(&bin).with_context(|| format!("reading {}", bin.display()))?;
    if !is_static_elf(&bytes) {
        bail!("{} is not a static executable", bin.display());
    }
    Ok(bin)
}

/// The whole `cargo xtask initramfs`.
pub fn build(kver: Option<&str>) -> Result<Built> {
    let root = root();
    let bin = build_boot_menu(&root)?;
    let init = std::fs::read(&bin)?;
    let kver = pick_kernel(kver)?;
    let mdir = PathBuf::from(format!("/lib/modules/{kver}"));
    let read = |f: &str| {
        std::fs::read_to_string(mdir.join(f))
            .with_context(|| format!("reading {}/{f}", mdir.display()))
    };
    let dep_text = read("modules.dep")?;
    let alias_text = read("modules.alias")?;
    let dep = parse_dep(&dep_text);
    let list = std::fs::read_to_string(root.join("initramfs/modules.list"))
        .context("reading initramfs/modules.list")?;
    let wanted: Vec<String> = list
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    let (set, missing) = closure(&dep, &wanted);
    for m in &missing {
        eprintln!("xtask: module {m} is not in {kver}'s modules.dep (built in or absent), skipped");
    }

    let mut c = Cpio::new();
    for d in ["dev", "proc", "sys", "run", "tmp", "lib", "lib/modules"] {
        c.dir(d);
    }
    // The kernel opens /dev/console for PID 1's stdio before /init runs, so it must exist
    // in the archive itself, not only in the devtmpfs mounted later.
    c.char_dev("dev/console", 0o600, 5, 1);
    c.file("init", 0o755, &init);
    let base = format!("lib/modules/{kver}");
    let mut dirs = BTreeSet::new();
    let mut files = Vec::new();
    for m in &set {
        let rel = &dep[m].0;
        if !rel.ends_with(".ko") {
            bail!("module {rel} is compressed; boot-menu loads plain .ko only (decompress it here first)");
        }
        let mut p = Path::new(rel).parent();
        while let Some(d) = p.filter(|d| !d.as_os_str().is_empty()) {
            dirs.insert(format!("{base}/{}", d.display()));
            p = d.parent();
        }
        files.push(rel.clone());
    }
    c.dir(&base);
    for d in &dirs {
        c.dir(d);
    }
    for rel in &files {
        let data =
            std::fs::read(mdir.join(rel)).with_context(|| format!("reading module {rel}"))?;
        c.file(&format!("{base}/{rel}"), 0o644, &data);
    }
    let trimmed_dep: String = dep_text
        .lines()
        .filter(|l| {
            l.split_once(':')
                .is_some_and(|(p, _)| set.contains(&normalize(p)))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let trimmed_alias: String = alias_text
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(2)
                .is_some_and(|m| set.contains(&normalize(m)))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    c.file(
        &format!("{base}/modules.dep"),
        0o644,
        trimmed_dep.as_bytes(),
    );
    c.file(
        &format!("{base}/modules.alias"),
        0o644,
        trimmed_alias.as_bytes(),
    );
    let cpio = c.finish();

    let out = root.join("images/out");
    std::fs::create_dir_all(&out)?;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&cpio)?;
    let gz = gz.finish()?;
    let img = out.join("initramfs.img");
    std::fs::write(&img, &gz).with_context(|| format!("writing {}", img.display()))?;
    let vmlinuz = out.join("vmlinuz");
    std::fs::copy(format!("/boot/vmlinuz-{kver}"), &vmlinuz)
        .with_context(|| format!("copying /boot/vmlinuz-{kver}"))?;
    Ok(Built {
        kver,
        vmlinuz,
        initramfs: img,
        boot_menu_bytes: init.len() as u64,
        initramfs_bytes: gz.len() as u64,
        uncompressed_bytes: cpio.len() as u64,
        modules: set.into_iter().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses a newc archive back: (name, mode, data) per entry. Test-only reader that
    /// follows the kernel's rules for alignment.
    fn read(mut b: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut off = 0usize;
        loop {
            assert_eq!(&b[..6], b"070701", "magic at offset {off}");
            let f = |i: usize| {
                u32::from_str_radix(std::str::from_utf8(&b[6 + i * 8..14 + i * 8]).unwrap(), 16)
                    .unwrap()
            };
            let (mode, size, namesize) = (f(1), f(6) as usize, f(11) as usize);
            let name = String::from_utf8(b[110..110 + namesize - 1].to_vec()).unwrap();
            assert_eq!(b[110 + namesize - 1], 0);
            let data_at = (110 + namesize).div_ceil(4) * 4;
            let data = b[data_at..data_at + size].to_vec();
            let next = (data_at + size).div_ceil(4) * 4;
            if name == "TRAILER!!!" {
                assert_eq!(next, b.len());
                return out;
            }
            out.push((name, mode, data));
            b = &b[next..];
            off += next;
        }
    }

    #[test]
    fn newc_round_trip_and_alignment() {
        let mut c = Cpio::new();
        c.dir("/dev");
        c.char_dev("dev/console", 0o600, 5, 1);
        c.file("init", 0o755, b"abcde");
        c.file("lib/x", 0o644, b"");
        let a = c.finish();
        assert_eq!(a.len() % 4, 0);
        let e = read(&a);
        let names: Vec<_> = e.iter().map(|x| x.0.as_str()).collect();
        assert_eq!(names, ["dev", "dev/console", "init", "lib/x"]);
        assert_eq!(e[0].1, 0o040755);
        assert_eq!(e[1].1, 0o020600);
        assert_eq!(e[2].1, 0o100755);
        assert_eq!(e[2].2, b"abcde");
        // rdev of the console: 5:1 in fields 9 and 10 of the second header.
        let h2 = &a[a.windows(11).position(|w| w == b"dev/console").unwrap() - 110..];
        assert_eq!(&h2[6 + 9 * 8..6 + 11 * 8], b"0000000500000001");
    }

    #[test]
    fn closure_and_names() {
        let dep =
            parse_dep("kernel/a/via-rhine.ko: kernel/m/mii.ko\nkernel/m/mii.ko:\nkernel/n.ko:\n");
        let (set, missing) = closure(&dep, &["via_rhine".into(), "nope".into()]);
        assert_eq!(set.into_iter().collect::<Vec<_>>(), ["mii", "via_rhine"]);
        assert_eq!(missing, ["nope"]);
    }

    #[test]
    fn static_elf_check() {
        assert!(!is_static_elf(b"not an elf"));
        // /bin/sh on Debian is dynamically linked.
        if let Ok(b) = std::fs::read("/bin/sh") {
            assert!(!is_static_elf(&b));
        }
    }
}
