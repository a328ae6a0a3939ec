//! Kernel module loading for the thin client: which modules a device needs (its sysfs
//! `modalias` against the glob patterns of `modules.alias`, fnmatch(3) rules), in which order
//! (`modules.dep`, depmod(8) format), and the `finit_module(2)` call.
//!
//! Debian 12's kernel ships plain `.ko` files, so no decompression happens here; a compressed
//! module (`.ko.xz`, `.ko.zst`, newer Debian) is reported as [`Error::Compressed`] and the
//! initramfs builder is the place to unpack it (one decompressor at build time instead of
//! one in every client's PID 1).

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::kmod::{finit_module, ModuleInitFlags};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read module index {0}")]
    ReadIndex(PathBuf, #[source] std::io::Error),
    #[error("module {0} is not in modules.dep")]
    Unknown(String),
    #[error("module file {0} is compressed; the initramfs must carry it uncompressed")]
    Compressed(PathBuf),
    #[error("cannot open module file {0}")]
    Open(PathBuf, #[source] std::io::Error),
    #[error("finit_module({0}) failed")]
    Load(PathBuf, #[source] Errno),
}

/// The kernel treats `-` and `_` in module names as the same; file names use both.
pub fn normalize(name: &str) -> String {
    let base = name.rsplit('/').next().unwrap_or(name);
    let base = base
        .strip_suffix(".ko")
        .or_else(|| base.split_once(".ko.").map(|(b, _)| b))
        .unwrap_or(base);
    base.replace('-', "_")
}

/// fnmatch(3) without flags: `*`, `?`, `[abc]`, `[a-z]`, `[!x]`; the pattern language of
/// `modules.alias`. Iterative with one backtrack point, so it is linear-ish on long modaliases.
pub fn glob_match(pat: &str, s: &str) -> bool {
    let p = pat.as_bytes();
    let t = s.as_bytes();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() {
            match p[pi] {
                b'*' => {
                    star = Some((pi, ti));
                    pi += 1;
                    continue;
                }
                b'?' => {
                    pi += 1;
                    ti += 1;
                    continue;
                }
                b'[' => {
                    if let Some((ok, next)) = class(&p[pi..], t[ti]) {
                        if ok {
                            pi += next;
                            ti += 1;
                            continue;
                        }
                    } else if t[ti] == b'[' {
                        // An unclosed '[' is a literal, as in fnmatch.
                        pi += 1;
                        ti += 1;
                        continue;
                    }
                }
                c if c == t[ti] => {
                    pi += 1;
                    ti += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((sp, st)) => {
                pi = sp + 1;
                ti = st + 1;
                star = Some((sp, st + 1));
            }
            None => return false,
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// Matches one byte against the bracket expression at the start of `p`; returns
/// (matched, length of the expression), or `None` if the bracket is not closed.
fn class(p: &[u8], c: u8) -> Option<(bool, usize)> {
    let mut i = 1;
    let negate = matches!(p.get(i), Some(b'!') | Some(b'^'));
    if negate {
        i += 1;
    }
    let mut hit = false;
    let mut first = true;
    while i < p.len() {
        if p[i] == b']' && !first {
            return Some((hit != negate, i + 1));
        }
        first = false;
        if i + 2 < p.len() && p[i + 1] == b'-' && p[i + 2] != b']' {
            hit |= p[i] <= c && c <= p[i + 2];
            i += 3;
        } else {
            hit |= p[i] == c;
            i += 1;
        }
    }
    None
}

/// `modules.alias`: (pattern, module) in file order.
#[derive(Debug, Default)]
pub struct Aliases(Vec<(String, String)>);

impl Aliases {
    pub fn parse(text: &str) -> Aliases {
        Aliases(
            text.lines()
                .filter_map(|l| {
                    let mut w = l.split_whitespace();
                    match (w.next(), w.next(), w.next()) {
                        (Some("alias"), Some(p), Some(m)) => Some((p.to_string(), normalize(m))),
                        _ => None,
                    }
                })
                .collect(),
        )
    }

    /// Every module whose alias pattern matches `modalias`, without repeats, in file order.
    pub fn resolve(&self, modalias: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for (p, m) in &self.0 {
            if !out.contains(m) && glob_match(p, modalias) {
                out.push(m.clone());
            }
        }
        out
    }
}

/// `modules.dep`: module name -> (path relative to the module dir, direct dependencies).
#[derive(Debug, Default)]
pub struct Deps(HashMap<String, (String, Vec<String>)>);

impl Deps {
    pub fn parse(text: &str) -> Deps {
        let mut map = HashMap::new();
        for l in text.lines() {
            let Some((path, deps)) = l.split_once(':') else {
                continue;
            };
            let path = path.trim();
            let deps = deps.split_whitespace().map(normalize).collect();
            map.insert(normalize(path), (path.to_string(), deps));
        }
        Deps(map)
    }

    pub fn path(&self, name: &str) -> Option<&str> {
        self.0.get(&normalize(name)).map(|(p, _)| p.as_str())
    }

    /// `name` and everything it needs, dependencies first (a depth-first post-order, so the
    /// order in which depmod listed them does not matter).
    pub fn closure(&self, name: &str) -> Result<Vec<String>, Error> {
        let mut out = Vec::new();
        let mut seen = BTreeSet::new();
        self.visit(&normalize(name), &mut seen, &mut out)?;
        Ok(out)
    }

    fn visit(
        &self,
        name: &str,
        seen: &mut BTreeSet<String>,
        out: &mut Vec<String>,
    ) -> Result<(), Error> {
        if !seen.insert(name.to_string()) {
            return Ok(());
        }
        let (_, deps) = self
            .0
            .get(name)
            .ok_or_else(|| Error::Unknown(name.to_string()))?;
        for d in deps {
            self.visit(d, seen, out)?;
        }
        out.push(name.to_string());
        Ok(())
    }
}

/// The module directory of the running kernel and its two indexes.
pub struct Loader {
    dir: PathBuf,
    pub aliases: Aliases,
    pub deps: Deps,
    loaded: BTreeSet<String>,
}

/// What one load attempt did, for PID 1 to print.
#[derive(Debug, PartialEq, Eq)]
pub enum Loaded {
    New,
    Already,
}

impl Loader {
    /// Opens `/lib/modules/$(uname -r)` (or `dir` for tests).
    pub fn open(dir: &Path) -> Result<Loader, Error> {
        let read = |f: &str| {
            let p = dir.join(f);
            std::fs::read_to_string(&p).map_err(|e| Error::ReadIndex(p, e))
        };
        Ok(Loader {
            aliases: Aliases::parse(&read("modules.alias")?),
            deps: Deps::parse(&read("modules.dep")?),
            dir: dir.to_path_buf(),
            loaded: BTreeSet::new(),
        })
    }

    pub fn running_kernel_dir() -> PathBuf {
        let rel = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        Path::new("/lib/modules").join(rel)
    }

    /// Loads `name` and its dependencies in order. A module already in the kernel (EEXIST)
    /// counts as success: the kernel may have it built in or loaded by an earlier pass.
    pub fn load(&mut self, name: &str) -> Result<Vec<(String, Loaded)>, Error> {
        let mut done = Vec::new();
        for m in self.deps.closure(name)? {
            if self.loaded.contains(&m) {
                continue;
            }
            let rel = self.deps.path(&m).unwrap_or_default().to_string();
            let path = self.dir.join(&rel);
            if !rel.ends_with(".ko") {
                return Err(Error::Compressed(path));
            }
            let f = File::open(&path).map_err(|e| Error::Open(path.clone(), e))?;
            let r = match finit_module(&f, c"", ModuleInitFlags::empty()) {
                Ok(()) => Loaded::New,
                Err(Errno::EEXIST) => Loaded::Already,
                Err(e) => return Err(Error::Load(path, e)),
            };
            self.loaded.insert(m.clone());
            done.push((m, r));
        }
        Ok(done)
    }
}

/// Every `modalias` of devices on the buses a thin client's NIC can sit on. virtio devices
/// appear only after virtio_pci is loaded, so callers scan again after each round.
pub fn device_modaliases(sys: &Path) -> Vec<String> {
    let mut out = Vec::new();
    // serio: the PS/2 mouse (psmouse); hid: USB keyboards and mice behind usbhid.
    for bus in ["pci", "virtio", "usb", "serio", "hid"] {
        let Ok(rd) = std::fs::read_dir(sys.join("bus").join(bus).join("devices")) else {
            continue;
        };
        for e in rd.flatten() {
            if let Ok(s) = std::fs::read_to_string(e.path().join("modalias")) {
                let s = s.trim();
                if !s.is_empty() {
                    out.push(s.to_string());
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn real_dir() -> Option<PathBuf> {
        let base = Path::new("/lib/modules");
        let mut v: Vec<_> = std::fs::read_dir(base)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .collect();
        v.sort();
        v.into_iter().find(|p| p.join("modules.alias").is_file())
    }

    #[test]
    fn glob_rules() {
        assert!(glob_match(
            "pci:v00008086d*sv*",
            "pci:v00008086d0000100Esv00001AF4"
        ));
        assert!(!glob_match(
            "pci:v00008086d*sv*",
            "pci:v000010ECd00008168sv0"
        ));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "ac"));
        assert!(glob_match("d0[0-2]*x", "d01zzx"));
        assert!(!glob_match("d0[0-2]*x", "d03zzx"));
        assert!(glob_match("[!a]b", "cb"));
        assert!(!glob_match("[!a]b", "ab"));
        assert!(glob_match("[]]", "]"));
        assert!(glob_match("a[b", "a[b"));
        assert!(glob_match("**", ""));
        assert!(!glob_match("x", ""));
        assert!(glob_match("*a*a*a*", "aaaa"));
    }

    #[test]
    fn normalizes_names() {
        assert_eq!(
            normalize("kernel/drivers/net/ethernet/via/via-rhine.ko"),
            "via_rhine"
        );
        assert_eq!(normalize("x/y/e1000e.ko.xz"), "e1000e");
        assert_eq!(normalize("8139too"), "8139too");
    }

    #[test]
    fn dependencies_come_first() {
        let d = Deps::parse(
            "kernel/a.ko: kernel/b.ko kernel/c.ko\nkernel/b.ko: kernel/c.ko\nkernel/c.ko:\nkernel/x-y.ko:\n",
        );
        assert_eq!(d.closure("a").unwrap(), ["c", "b", "a"]);
        assert_eq!(d.closure("x-y").unwrap(), ["x_y"]);
        assert_eq!(d.path("x_y"), Some("kernel/x-y.ko"));
        assert!(matches!(d.closure("nope"), Err(Error::Unknown(_))));
    }

    /// The real Debian index: the modaliases QEMU and common old NICs present.
    #[test]
    fn real_modules_alias_resolves_common_nics() {
        let Some(dir) = real_dir() else {
            eprintln!("skip: no /lib/modules/*/modules.alias on this machine");
            return;
        };
        let l = Loader::open(&dir).unwrap();
        let cases = [
            // QEMU's e1000 (82540EM) as /sys shows it.
            (
                "pci:v00008086d0000100Esv00001AF4sd00001100bc02sc00i00",
                "e1000",
            ),
            // RTL8111/8168 on countless old boards.
            (
                "pci:v000010ECd00008168sv00001043sd00008432bc02sc00i00",
                "r8169",
            ),
            // virtio-net: first the PCI function binds virtio_pci, then the virtio device.
            (
                "pci:v00001AF4d00001000sv00001AF4sd00000001bc02sc00i00",
                "virtio_pci",
            ),
            ("virtio:d00000001v00001AF4", "virtio_net"),
            // RTL8139.
            (
                "pci:v000010ECd00008139sv000010ECsd00008139bc02sc00i00",
                "8139too",
            ),
        ];
        for (alias, want) in cases {
            let got = l.aliases.resolve(alias);
            assert!(got.iter().any(|m| m == want), "{alias}: {got:?}");
        }
        assert!(l
            .aliases
            .resolve("pci:v0000FFFFd0000FFFFsv0sd0bcFFsc00i00")
            .is_empty());
        let c = l.deps.closure("virtio_net").unwrap();
        assert_eq!(c.last().map(String::as_str), Some("virtio_net"));
        let pos = |m: &str| c.iter().position(|x| x == m).unwrap();
        assert!(pos("virtio") < pos("virtio_net") && pos("failover") < pos("net_failover"));
    }
}
