//! Shared pieces of `cargo xtask` that the integration tests use too.

pub mod bench;
pub mod browser;
pub mod deb;
pub mod deps;
pub mod e2e;
pub mod e2e_deb;
pub mod e2e_guest_x11;
pub mod e2e_hosts;
pub mod e2e_initramfs;
pub mod e2e_panel;
pub mod e2e_storm;
pub mod e2e_x11;
pub mod fuzz;
pub mod hv;
pub mod image;
pub mod initramfs;
pub mod lab;
pub mod nspawn;
pub mod qemu;
pub mod rfb;

/// Runs a command to the end, failing on a non-zero exit.
pub fn run(cmd: &mut std::process::Command) -> anyhow::Result<()> {
    use anyhow::Context;
    eprintln!("xtask: running {cmd:?}");
    let st = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !st.success() {
        anyhow::bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

/// Runs a command with no input to the end and returns its standard output; a non-zero
/// exit fails with `what` and the command's own standard error, which says why.
pub fn output(cmd: &mut std::process::Command, what: &str) -> anyhow::Result<String> {
    use anyhow::Context;
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        anyhow::bail!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Installs the cargo subcommand `cargo SUB` from crates.io (crate `krate`, `version` a
/// requirement such as "^3", or the newest) unless `cargo SUB --version` already works.
pub fn ensure_cargo_tool(sub: &str, krate: &str, version: Option<&str>) -> anyhow::Result<()> {
    use std::process::{Command, Stdio};
    let have = Command::new("cargo")
        .args([sub, "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if have {
        return Ok(());
    }
    let mut install = Command::new("cargo");
    install.args(["install", krate, "--locked"]);
    if let Some(v) = version {
        install.args(["--version", v]);
    }
    eprintln!("xtask: {krate} is missing; installing it from crates.io");
    run(&mut install)
}
