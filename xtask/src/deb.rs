//! `cargo xtask deb`: the Debian package `target/debian/vdd_VERSION_amd64.deb`, made by
//! cargo-deb (installed from crates.io when missing) from `[package.metadata.deb]` in
//! Cargo.toml and the files in debian/ (the unit, the system user, the shipped config,
//! the maintainer scripts). The vdd in it links glibc and libvirt's C library (the
//! libvirt backend): Debian has no static libvirt, so the package depends on libvirt0.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::image::repo_root;
use crate::initramfs::{target_rustflags_var, TARGET};

/// The cargo-deb releases whose manifest keys debian/ and Cargo.toml use.
const CARGO_DEB_VERSION: &str = "^3";

/// What the build made.
#[derive(Debug)]
pub struct Built {
    pub deb: PathBuf,
    /// The packaged binary, as built (before cargo-deb packs it).
    pub binary: PathBuf,
}

/// Builds the package and returns its path.
pub fn build() -> Result<Built> {
    crate::ensure_cargo_tool("deb", "cargo-deb", Some(CARGO_DEB_VERSION))?;
    let root = repo_root();
    let out_dir = root.join("target/debian");
    std::fs::create_dir_all(&out_dir)?;
    // An explicit --target keeps the flags to vdd alone (not its build scripts).
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&root)
        .args(["deb", "-p", "vdd", "--target", TARGET, "--output"])
        .arg(&out_dir)
        .env(target_rustflags_var(), "-C strip=symbols")
        // The symbols are stripped: making the release profile's debug info first would
        // only cost build time.
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        // Set by the cargo that runs xtask; they would pin the inner build to it.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .stderr(Stdio::inherit());
    eprintln!("xtask: running {cmd:?}");
    let out = cmd.output().context("starting cargo deb")?;
    if !out.status.success() {
        bail!(
            "cargo deb failed ({}); its output above says why",
            out.status
        );
    }
    // cargo-deb prints the package's path as its last line.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let deb = stdout
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.ends_with(".deb"))
        .map(PathBuf::from)
        .with_context(|| format!("cargo deb named no .deb: {stdout:?}"))?;
    if !deb.is_file() {
        bail!("cargo deb named {}, which is not there", deb.display());
    }
    // Whether its shared libraries come with the package's Depends shows where it runs:
    // `cargo xtask e2e deb` starts it in a Debian system that has only those.
    let binary = root.join("target").join(TARGET).join("release/vdd");
    Ok(Built { deb, binary })
}

/// The package's Depends and Recommends, from `[package.metadata.deb]` of Cargo.toml,
/// each relation's first alternative without its version: what a system must hold to
/// install the package without fetching anything.
pub fn relations() -> Result<Vec<String>> {
    let path = repo_root().join("Cargo.toml");
    let text = std::fs::read_to_string(&path)?;
    let manifest: toml::Table =
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let deb = manifest
        .get("package")
        .and_then(|p| p.get("metadata"))
        .and_then(|m| m.get("deb"))
        .context("Cargo.toml has no [package.metadata.deb]")?;
    let mut all = Vec::new();
    for field in ["depends", "recommends"] {
        if let Some(v) = deb.get(field) {
            let v = v
                .as_str()
                .with_context(|| format!("package.metadata.deb.{field} is no string"))?;
            all.extend(parse_relations(v));
        }
    }
    Ok(all)
}

/// `a (>= 1), b | c` -> `[a, b]`: each relation's first alternative, without version.
fn parse_relations(field: &str) -> Vec<String> {
    field
        .split(',')
        .filter_map(|r| r.split('|').next())
        .filter_map(|r| r.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// `dpkg -c` of a package: its file list, as README.md shows it.
pub fn contents(deb: &std::path::Path) -> Result<String> {
    crate::output(
        Command::new("dpkg").arg("-c").arg(deb),
        &format!("dpkg -c {}", deb.display()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relations_keep_the_first_alternative_without_versions() {
        assert_eq!(
            parse_relations("ipxe, qemu-system-x86 (>= 1:7.2), a | b\n"),
            ["ipxe", "qemu-system-x86", "a"]
        );
        assert!(parse_relations("\n").is_empty());
    }

    #[test]
    fn the_package_depends_on_what_vdd_runs() {
        let r = relations().unwrap();
        for p in [
            "ipxe",
            "qemu-system-x86",
            "qemu-utils",
            "procps",
            "libvirt0",
            "nftables",
        ] {
            assert!(r.iter().any(|x| x == p), "{p} not in {r:?}");
        }
    }
}
