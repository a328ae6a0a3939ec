//! busybox udhcpc as a test client: one DORA in a lab namespace, run with a script of the
//! test's own (the default script would rewrite /etc/resolv.conf), which must write the
//! environment of the `bound` event to `$OUT/bound`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use xtask::lab::{ClientNs, Lab};

/// Writes `text` as the executable `dir/udhcpc.sh` (once) and returns its path.
pub fn script(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("udhcpc.sh");
    if !p.exists() {
        std::fs::write(&p, text).unwrap();
        Command::new("chmod").arg("755").arg(&p).status().unwrap();
    }
    p
}

/// Runs one udhcpc DORA in `c` (quit after the lease) with `script` and returns the
/// `bound` environment; panics with udhcpc's output when it got no lease.
pub fn once(dir: &Path, c: &ClientNs, script: &Path, extra: &[&str]) -> HashMap<String, String> {
    let out = dir.join(format!("out-{}", c.ns));
    std::fs::create_dir_all(&out).unwrap();
    let st = Lab::cmd(&c.ns, "udhcpc")
        .args([
            "-f", "-q", "-n", "-t", "6", "-T", "2", "-A", "1", "-i", "eth0", "-s",
        ])
        .arg(script)
        .args(extra)
        .env("OUT", &out)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    env_file(&out.join("bound")).unwrap_or_else(|| {
        panic!(
            "udhcpc got no lease: {}\n{}",
            String::from_utf8_lossy(&st.stdout),
            String::from_utf8_lossy(&st.stderr)
        )
    })
}

/// A file of `KEY=value` lines (what `env | sort` writes), if it is there yet.
pub fn env_file(p: &Path) -> Option<HashMap<String, String>> {
    let s = std::fs::read_to_string(p).ok()?;
    Some(
        s.lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}
