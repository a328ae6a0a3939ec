//! `cargo xtask fuzz [--seconds N] [TARGET...]`: builds the cargo-fuzz targets of `fuzz/`
//! and runs each for a bounded time, one after the other, with its working corpus
//! (`fuzz/corpus/<target>`, not committed) seeded from the committed `fuzz/seeds/<target>`.
//! Prints one line per target with libFuzzer's executions and exec/s, and fails naming
//! the artifact of any target that crashed.
//!
//! cargo-fuzz needs `-Z` flags: with a nightly toolchain installed it runs under it, else
//! under the default one with `RUSTC_BOOTSTRAP=1` (what a machine with only stable has).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

/// Every target under `fuzz/fuzz_targets/`, in the order they run.
pub const TARGETS: &[&str] = &[
    "dhcp",
    "tftp",
    "nbd",
    "http",
    "xdmcp",
    "ndp",
    "qmp",
    "bootmenu_dhcp",
    "bootmenu_json",
    "config",
];

/// libFuzzer's per-process memory ceiling; a decoder that needs more has a bug.
const RSS_LIMIT_MB: u32 = 2048;
/// One input that runs this long is reported as a hang (a timeout artifact).
const INPUT_TIMEOUT_SECS: u32 = 10;

/// Which compiler runs cargo-fuzz.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Toolchain {
    /// nightly when `rustup toolchain list` shows one, else the default with RUSTC_BOOTSTRAP=1.
    Auto,
    Nightly,
    /// The default toolchain with RUSTC_BOOTSTRAP=1.
    Stable,
}

/// What one target's run gave.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub executions: u64,
    pub per_sec: u64,
    /// The input that crashed or hung the target, as libFuzzer wrote it.
    pub artifact: Option<PathBuf>,
}

/// Reads libFuzzer's `-print_final_stats=1` lines and its "Test unit written to" line.
pub fn parse_stats(log: &str) -> Stats {
    let mut s = Stats::default();
    for line in log.lines() {
        let num = |key: &str| {
            line.strip_prefix(key)
                .and_then(|v| v.trim_start_matches(':').trim().parse().ok())
        };
        if let Some(n) = num("stat::number_of_executed_units") {
            s.executions = n;
        } else if let Some(n) = num("stat::average_exec_per_sec") {
            s.per_sec = n;
        } else if let Some(at) = line.find("Test unit written to ") {
            s.artifact = Some(PathBuf::from(
                line[at + "Test unit written to ".len()..].trim(),
            ));
        }
    }
    s
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("the workspace root exists")
}

/// `cargo` of the chosen toolchain, niced: the fuzzers share the machine.
fn cargo(tc: Toolchain) -> Command {
    let mut c = Command::new("nice");
    c.args(["-n", "10"]);
    match tc {
        Toolchain::Nightly => {
            c.args(["rustup", "run", "nightly", "cargo"]);
        }
        _ => {
            // The default toolchain, not the one `cargo xtask` was started with by path.
            c.arg("cargo");
            c.env("RUSTC_BOOTSTRAP", "1");
        }
    }
    // Set by the cargo that runs xtask; they would pin the inner build to it.
    c.env_remove("RUSTUP_TOOLCHAIN").env_remove("RUSTC");
    c
}

fn resolve(tc: Toolchain) -> Toolchain {
    if tc != Toolchain::Auto {
        return tc;
    }
    let out = Command::new("rustup").args(["toolchain", "list"]).output();
    let has_nightly = out.is_ok_and(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .any(|l| l.starts_with("nightly"))
    });
    if has_nightly {
        Toolchain::Nightly
    } else {
        Toolchain::Stable
    }
}

/// Copies the committed seeds into the working corpus (existing entries are kept: the
/// corpus grows across runs on one machine).
fn seed(root: &Path, target: &str) -> Result<PathBuf> {
    let corpus = root.join("fuzz/corpus").join(target);
    fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
    let seeds = root.join("fuzz/seeds").join(target);
    if let Ok(rd) = fs::read_dir(&seeds) {
        for e in rd {
            let e = e?;
            let to = corpus.join(format!("seed-{}", e.file_name().to_string_lossy()));
            if !to.exists() {
                fs::copy(e.path(), &to).with_context(|| format!("seeding {}", to.display()))?;
            }
        }
    }
    Ok(corpus)
}

/// Builds the targets and runs each for `seconds`; all of them when `targets` is empty.
/// `dev`: an unoptimised build, several times faster to make and slower to run: for CI's
/// few seconds per target, where the build is most of the time.
pub fn run(seconds: u64, targets: &[String], toolchain: Toolchain, dev: bool) -> Result<()> {
    for t in targets {
        if !TARGETS.contains(&t.as_str()) {
            bail!("no fuzz target {t:?}; there are: {}", TARGETS.join(", "));
        }
    }
    let chosen: Vec<&str> = if targets.is_empty() {
        TARGETS.to_vec()
    } else {
        targets.iter().map(String::as_str).collect()
    };
    let root = root();
    crate::ensure_cargo_tool("fuzz", "cargo-fuzz", None)?;
    let tc = resolve(toolchain);
    eprintln!("xtask fuzz: building with {tc:?}");
    let built = Instant::now();
    // Overflow checks and debug assertions on (-a): an arithmetic slip in a decoder is a
    // crash here, not a wrapped length. No sanitizer: every decoder is safe Rust, whose
    // bugs are panics, so ASan would only halve the executions and lengthen the build.
    let mut build = cargo(tc);
    build.current_dir(&root).args(["fuzz", "build"]);
    build.args(if dev {
        &["--dev"][..]
    } else {
        &["-O", "-a"][..]
    });
    build.args(["--sanitizer", "none"]);
    if !targets.is_empty() && chosen.len() == 1 {
        build.arg(chosen[0]);
    }
    crate::run(&mut build)?;
    eprintln!("xtask fuzz: built in {} s", built.elapsed().as_secs());
    let profile = if dev { "debug" } else { "release" };
    let bin_dir = root
        .join("fuzz/target/x86_64-unknown-linux-gnu")
        .join(profile);
    let logs = root.join("fuzz/target/logs");
    fs::create_dir_all(&logs)?;
    let mut crashed = Vec::new();
    let mut lines = Vec::new();
    for t in &chosen {
        let corpus = seed(&root, t)?;
        let artifacts = root.join("fuzz/artifacts").join(t);
        fs::create_dir_all(&artifacts)?;
        let log_path = logs.join(format!("{t}.log"));
        let log = fs::File::create(&log_path)?;
        let started = Instant::now();
        let status = Command::new("nice")
            .args(["-n", "10"])
            .arg(bin_dir.join(t))
            .arg(&corpus)
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
            .arg(format!("-timeout={INPUT_TIMEOUT_SECS}"))
            .arg("-print_final_stats=1")
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .current_dir(&root)
            .stdout(Stdio::null())
            .stderr(log)
            .status()
            .with_context(|| format!("starting fuzz target {t}"))?;
        let text = fs::read_to_string(&log_path).unwrap_or_default();
        let s = parse_stats(&text);
        let line = format!(
            "xtask fuzz: {t:<14} {:>12} executions {:>8} exec/s in {} s{}",
            s.executions,
            s.per_sec,
            started.elapsed().as_secs(),
            if status.success() { "" } else { "  CRASHED" }
        );
        eprintln!("{line}");
        lines.push(line);
        if !status.success() {
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            eprintln!("--- {} (last lines)", log_path.display());
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
            crashed.push(match s.artifact {
                Some(a) => format!("{t}: {}", a.display()),
                None => format!("{t}: {status} (no artifact; see {})", log_path.display()),
            });
        }
    }
    eprintln!("xtask fuzz: summary");
    for l in &lines {
        eprintln!("{l}");
    }
    if !crashed.is_empty() {
        bail!(
            "fuzz targets crashed; reproduce with `cargo fuzz run TARGET ARTIFACT`:\n  {}",
            crashed.join("\n  ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzer_final_stats_and_artifact() {
        let log = "#1234\tDONE   cov: 10 ft: 20 corp: 3/30b exec/s: 617 rss: 40Mb\n\
                   ==1== ERROR: libFuzzer: deadly signal\n\
                   artifact_prefix='fuzz/artifacts/dhcp/'; Test unit written to fuzz/artifacts/dhcp/crash-abc\n\
                   stat::number_of_executed_units: 1234\n\
                   stat::average_exec_per_sec:     617\n\
                   stat::new_units_added:          3\n";
        assert_eq!(
            parse_stats(log),
            Stats {
                executions: 1234,
                per_sec: 617,
                artifact: Some(PathBuf::from("fuzz/artifacts/dhcp/crash-abc")),
            }
        );
    }

    #[test]
    fn every_target_has_a_file_and_seeds() {
        let root = root();
        for t in TARGETS {
            assert!(
                root.join(format!("fuzz/fuzz_targets/{t}.rs")).is_file(),
                "{t}"
            );
            let seeds = fs::read_dir(root.join("fuzz/seeds").join(t)).map_or(0, |d| d.count());
            assert!(seeds > 0, "no seeds for {t}");
        }
    }
}
