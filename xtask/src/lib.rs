//! Shared pieces of `cargo xtask` that the integration tests use too.

pub mod bench;
pub mod browser;
pub mod deps;
pub mod e2e;
pub mod e2e_guest_x11;
pub mod e2e_initramfs;
pub mod e2e_panel;
pub mod e2e_x11;
pub mod fuzz;
pub mod image;
pub mod initramfs;
pub mod lab;
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
