//! The Debian packages the demo, the tests and the benchmarks need, installed when missing.
//!
//! The list is `xtask/debian-packages.txt` (one place, with the reason for each group);
//! `cargo xtask demo`, `test`, `bench` and `.ci/run` (through `cargo xtask deps`) read it.
//! As root, what is missing is installed with apt-get from the machine's own apt sources;
//! otherwise the exact command is printed and nothing runs.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::run;

const LIST: &str = include_str!("../debian-packages.txt");

/// What the packages are for; each purpose needs some groups of the list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Purpose {
    /// `cargo xtask demo`
    Demo,
    /// `cargo xtask test` and `.ci/run`
    Test,
    /// `cargo xtask bench ...`
    Bench,
    /// `cargo xtask e2e guest-x11`
    GuestX11,
}

impl Purpose {
    fn groups(self) -> &'static [&'static str] {
        match self {
            Purpose::Demo => &["lab", "build", "qemu", "images"],
            Purpose::Test => &[
                "lab", "build", "qemu", "images", "peers", "package", "xdm", "panel", "libvirt",
            ],
            Purpose::Bench => &["lab", "build", "qemu", "images", "peers", "x11-check"],
            Purpose::GuestX11 => &["lab", "build", "qemu", "images", "peers", "x11-check"],
        }
    }

    fn command(self) -> &'static str {
        match self {
            Purpose::Demo => "cargo xtask demo",
            Purpose::Test => "cargo xtask test",
            Purpose::Bench => "cargo xtask bench",
            Purpose::GuestX11 => "cargo xtask e2e guest-x11",
        }
    }
}

/// One `[group] reason` block of the list.
#[derive(Debug, PartialEq, Eq)]
pub struct Group {
    pub name: String,
    pub reason: String,
    pub packages: Vec<String>,
}

/// Parses the list's format: `[group] reason` lines, package names after them, `#` comments.
pub fn parse(text: &str) -> Result<Vec<Group>> {
    let mut groups: Vec<Group> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix('[') {
            let Some((name, reason)) = rest.split_once(']') else {
                bail!("debian-packages.txt:{}: `[` without `]`", n + 1);
            };
            groups.push(Group {
                name: name.trim().to_string(),
                reason: reason.trim().to_string(),
                packages: Vec::new(),
            });
            continue;
        }
        let Some(g) = groups.last_mut() else {
            bail!("debian-packages.txt:{}: packages before any [group]", n + 1);
        };
        g.packages
            .extend(line.split_whitespace().map(str::to_string));
    }
    Ok(groups)
}

/// The groups a purpose needs, in the list's order.
pub fn groups(p: Purpose) -> Result<Vec<Group>> {
    let all = parse(LIST)?;
    for want in p.groups() {
        if !all.iter().any(|g| g.name == *want) {
            bail!("debian-packages.txt has no group [{want}]");
        }
    }
    Ok(all
        .into_iter()
        .filter(|g| p.groups().contains(&g.name.as_str()))
        .collect())
}

/// Installs what `p` needs and is missing (as root), or says which command would (otherwise).
pub fn ensure(p: Purpose) -> Result<()> {
    let groups = groups(p)?;
    let wanted: Vec<&str> = groups
        .iter()
        .flat_map(|g| g.packages.iter().map(String::as_str))
        .collect();
    let missing = not_installed(&wanted)?;
    if missing.is_empty() {
        return Ok(());
    }
    let root = crate::lab::is_root();
    if !root {
        let plan = Plan::new(&missing, false)?;
        bail!(
            "{} needs Debian packages that are not installed ({}); as root, it installs them \
             itself, or run:\n  sudo apt-get update && sudo DEBIAN_FRONTEND=noninteractive {}",
            p.command(),
            missing.iter().cloned().collect::<Vec<_>>().join(" "),
            plan.install_args().join(" ")
        );
    }
    // Two xtask runs installing at once (two developers' tests on one machine) would race
    // on policy-rc.d below: the first to finish would remove it while the second's apt
    // still starts services. One install at a time, and look again once it is our turn.
    let lock = std::fs::File::create("/run/lock/vdd-xtask-deps.lock")
        .context("creating /run/lock/vdd-xtask-deps.lock")?;
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .context("waiting for another xtask's package install")?;
    let missing = not_installed(&wanted)?;
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!(
        "xtask: {} needs {} Debian package(s) that are not installed; installing them:",
        p.command(),
        missing.len()
    );
    for g in &groups {
        let here: Vec<&str> = g
            .packages
            .iter()
            .map(String::as_str)
            .filter(|p| missing.contains(*p))
            .collect();
        if !here.is_empty() {
            eprintln!("  [{}] {}\n      for {}", g.name, here.join(" "), g.reason);
        }
    }
    let started = Instant::now();
    let _no_services = NoServices::new()?;
    // The package mirror is sometimes briefly unreachable: retry the update and the
    // install, and go on when every package is installed anyway (apt only wanted upgrades).
    for attempt in 1..=5 {
        let mut update = apt();
        update.args(["update", "-q"]);
        if let Err(e) = run(&mut update) {
            eprintln!("xtask: {e:#}");
        }
        // After the update, so that the versions the sources offer are current.
        let plan = Plan::new(&missing, true)?;
        let mut install = apt();
        install.args(&plan.install_args()[1..]);
        match run(&mut install) {
            Ok(()) => break,
            Err(e) if not_installed(&wanted)?.is_empty() => {
                eprintln!("xtask: {e:#}; but every package is installed: going on");
                break;
            }
            Err(e) if attempt == 5 => {
                return Err(e.context(format!(
                    "cannot install the Debian packages {} needs",
                    p.command()
                )))
            }
            Err(e) => {
                eprintln!("xtask: {e:#}; trying again in 30 s ({attempt} of 5)");
                std::thread::sleep(Duration::from_secs(30));
            }
        }
    }
    let left = not_installed(&wanted)?;
    if !left.is_empty() {
        bail!(
            "apt-get ended, but these are still not installed: {}",
            left.into_iter().collect::<Vec<_>>().join(" ")
        );
    }
    eprintln!(
        "xtask: installed {} package(s) in {:.0} s",
        missing.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The install command for the missing packages, with the QEMU pin when it is needed.
struct Plan {
    packages: Vec<String>,
    /// `qemu-utils=VERSION`, when the installed qemu-utils keeps qemu-system-x86 out.
    qemu_utils: Option<String>,
}

impl Plan {
    fn new(missing: &BTreeSet<String>, say: bool) -> Result<Plan> {
        let mut packages: Vec<String> = missing.iter().cloned().collect();
        let mut qemu_utils = None;
        // Some machine images ship qemu-utils 10 from a backport (no backports source is
        // configured). It `Breaks: qemu-system-common (<< 1:8.0)`, so Debian 12's own
        // qemu-system-x86 (7.2) cannot be installed beside it, and apt gives up with "held
        // broken packages". When the installed qemu-utils is newer than anything the
        // machine's sources offer, install the sources' newest in its place: QEMU's tools
        // and its emulator then come from the same release. A machine without the backport
        // has qemu-utils from its sources (or none), and nothing is pinned.
        if missing.contains("qemu-system-x86") {
            if let Some(installed) = installed_version("qemu-utils")? {
                if let Some(offered) = offered_version("qemu-utils")? {
                    if version_gt(&installed, &offered)? {
                        if say {
                            eprintln!(
                                "xtask: qemu-utils {installed} (not from this machine's apt \
                                 sources) breaks Debian's qemu-system-x86; replacing it with \
                                 qemu-utils {offered} from the sources"
                            );
                        }
                        packages.retain(|p| p != "qemu-utils");
                        qemu_utils = Some(format!("qemu-utils={offered}"));
                    }
                }
            }
        }
        Ok(Plan {
            packages,
            qemu_utils,
        })
    }

    fn install_args(&self) -> Vec<String> {
        let mut a: Vec<String> = ["apt-get", "install", "-y", "-q", "--no-install-recommends"]
            .map(String::from)
            .to_vec();
        if let Some(q) = &self.qemu_utils {
            a.push("--allow-downgrades".into());
            a.push(q.clone());
        }
        a.extend(self.packages.iter().cloned());
        a
    }
}

/// Those of `pkgs` that dpkg does not have installed.
fn not_installed(pkgs: &[&str]) -> Result<BTreeSet<String>> {
    // dpkg-query exits 1 when it knows a name not at all; what it prints is still right.
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${Status}\\n"])
        .args(pkgs)
        .stderr(std::process::Stdio::null())
        .output()
        .context("running dpkg-query (is this Debian?)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let installed: BTreeSet<&str> = text
        .lines()
        .filter(|l| l.ends_with(" install ok installed"))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    Ok(pkgs
        .iter()
        .filter(|p| !installed.contains(*p))
        .map(|p| p.to_string())
        .collect())
}

fn installed_version(pkg: &str) -> Result<Option<String>> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}|${Version}", pkg])
        .stderr(std::process::Stdio::null())
        .output()
        .context("running dpkg-query")?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .strip_prefix("install ok installed|")
        .map(|v| v.trim().to_string()))
}

/// The newest version of `pkg` that the machine's apt sources offer.
fn offered_version(pkg: &str) -> Result<Option<String>> {
    // `apt-cache madison` lists only versions from sources (not dpkg's status file).
    let out = Command::new("apt-cache")
        .args(["madison", pkg])
        .output()
        .context("running apt-cache madison")?;
    let mut best: Option<String> = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(v) = line.split('|').nth(1).map(str::trim) else {
            continue;
        };
        let newer = match &best {
            None => true,
            Some(b) => version_gt(v, b)?,
        };
        if newer {
            best = Some(v.to_string());
        }
    }
    Ok(best)
}

/// Debian version order, as dpkg itself compares.
fn version_gt(a: &str, b: &str) -> Result<bool> {
    let st = Command::new("dpkg")
        .args(["--compare-versions", a, "gt", b])
        .status()
        .context("running dpkg --compare-versions")?;
    Ok(st.success())
}

fn apt() -> Command {
    let mut c = Command::new("apt-get");
    c.env("DEBIAN_FRONTEND", "noninteractive");
    // Wait for dpkg's lock (unattended-upgrades, a package manager left open) rather than
    // fail at once.
    c.args(["-o", "DPkg::Lock::Timeout=600"]);
    c
}

/// While it lives, no package's own service may start: installing tftpd-hpa, kea or dnsmasq
/// must never put a DHCP or TFTP daemon on a real interface. Debian's maintainer scripts ask
/// `/usr/sbin/policy-rc.d` before they start anything; exit 101 means "no". Removed again
/// on Drop, unless the machine had one of its own, which is left as it was.
struct NoServices {
    made: bool,
}

const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

impl NoServices {
    fn new() -> Result<NoServices> {
        if Path::new(POLICY_RC_D).exists() {
            return Ok(NoServices { made: false });
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(
            POLICY_RC_D,
            "#!/bin/sh\n# cargo xtask: no services while it installs\nexit 101\n",
        )
        .with_context(|| format!("writing {POLICY_RC_D}"))?;
        std::fs::set_permissions(POLICY_RC_D, std::fs::Permissions::from_mode(0o755))?;
        Ok(NoServices { made: true })
    }
}

impl Drop for NoServices {
    fn drop(&mut self) {
        if self.made {
            let _ = std::fs::remove_file(POLICY_RC_D);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_parses_and_every_purpose_finds_its_groups() {
        for p in [
            Purpose::Demo,
            Purpose::Test,
            Purpose::Bench,
            Purpose::GuestX11,
        ] {
            let g = groups(p).unwrap();
            assert_eq!(g.len(), p.groups().len(), "{p:?}");
            assert!(g
                .iter()
                .all(|g| !g.packages.is_empty() && !g.reason.is_empty()));
        }
        let demo: Vec<String> = groups(Purpose::Demo)
            .unwrap()
            .into_iter()
            .flat_map(|g| g.packages)
            .collect();
        for p in [
            "qemu-system-x86",
            "qemu-utils",
            "ipxe",
            "mmdebstrap",
            "ovmf",
        ] {
            assert!(demo.iter().any(|d| d == p), "demo lacks {p}");
        }
    }

    #[test]
    fn format_errors_name_the_line() {
        let e = parse("# c\nfoo bar\n").unwrap_err().to_string();
        assert!(e.contains(":2: packages before any [group]"), "{e}");
        let e = parse("[a reason\n").unwrap_err().to_string();
        assert!(e.contains(":1: `[` without `]`"), "{e}");
        let g = parse("[a] why # not this\n x  y\n\n[b] other\nz\n").unwrap();
        assert_eq!(
            g,
            vec![
                Group {
                    name: "a".into(),
                    reason: "why".into(),
                    packages: vec!["x".into(), "y".into()]
                },
                Group {
                    name: "b".into(),
                    reason: "other".into(),
                    packages: vec!["z".into()]
                },
            ]
        );
    }

    #[test]
    fn the_qemu_pin_allows_the_downgrade_and_only_then() {
        let plan = Plan {
            packages: vec!["ovmf".into()],
            qemu_utils: Some("qemu-utils=1:7.2".into()),
        };
        assert_eq!(
            plan.install_args()[5..],
            ["--allow-downgrades", "qemu-utils=1:7.2", "ovmf"]
        );
        let plan = Plan {
            packages: vec!["ovmf".into()],
            qemu_utils: None,
        };
        assert_eq!(plan.install_args()[5..], ["ovmf"]);
    }
}
