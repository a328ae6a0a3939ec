//! `cargo xtask bench dhcp`: perfdhcp (kea-admin) against vdd, dnsmasq and kea-dhcp4, one
//! at a time, on the same lab network (a /16, so tens of thousands of simulated clients
//! fit one pool), stepping the offered rate of full DORA exchanges (RFC 2131 3.1).
//!
//! Each server is started fresh for each step (empty lease store, so every step measures
//! the same work), serves `br0` in the server namespace, and perfdhcp runs in a client
//! namespace as a relay agent (giaddr = 10.77.0.2), the way it always drives a server.
//! Durability as each ships: vdd fdatasyncs every lease before its ACK (group commit);
//! kea's memfile appends to its lease file without a sync per lease; dnsmasq rewrites its
//! lease file without a sync per lease either. dnsmasq runs with `--no-ping` (see below)
//! and `--quiet-dhcp`, vdd with `RUST_LOG=warn`, kea with WARN logging: no per-packet logs.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::lab::{self, Lab};
use anyhow::{bail, Context, Result};

/// One perfdhcp run's result.
#[derive(Clone, Copy, Debug, Default)]
pub struct Step {
    pub offered: u32,
    /// DISCOVERs perfdhcp really sent per second: below `offered`, the generator (or the
    /// machine) was the limit, not the server.
    pub sent: f64,
    /// REQUEST-ACK exchanges completed per second of the test period.
    pub completed: f64,
    /// 1 - ACKs / DISCOVERs sent.
    pub drop_ratio: f64,
    /// Where the losses were: DISCOVERs without an OFFER, REQUESTs without an ACK (an ACK
    /// later than perfdhcp's 1 s drop time counts as lost: for vdd that is where a slow
    /// fdatasync on a busy disk shows).
    pub offer_loss: f64,
    pub ack_loss: f64,
}

const SERVERS: [&str; 3] = ["vdd", "kea", "dnsmasq"];
/// Distinct simulated clients; below the pool size, so the pool never runs dry.
const CLIENTS: u32 = 60_000;
const POOL: (&str, &str) = ("10.77.1.0", "10.77.255.254");

pub fn run(quick: bool, repeat: u32, rates: Option<Vec<u32>>) -> Result<()> {
    if let Some(why) = lab::missing(&["perfdhcp", "kea-dhcp4", "dnsmasq", "ss"]) {
        bail!("cannot run the DHCP benchmark here: {why}");
    }
    let rates = rates.unwrap_or_else(|| vec![2000, 4000, 8000, 12000, 16000]);
    let secs = if quick { 3 } else { 10 };
    let vdd = build_vdd()?;
    let work = std::env::temp_dir().join(format!("vdd-bench-dhcp-{}", std::process::id()));
    let _cleanup = RemoveOnDrop(work.clone());
    let mut table: Vec<(&str, Vec<Step>)> = Vec::new();
    for server in SERVERS {
        let mut steps = Vec::new();
        for &rate in &rates {
            let mut runs = Vec::new();
            for r in 0..repeat.max(1) {
                let dir = work.join(format!("{server}-{rate}-{r}"));
                std::fs::create_dir_all(&dir)?;
                let s = one_step(server, &vdd, &dir, rate, secs)
                    .with_context(|| format!("{server} at {rate}/s"))?;
                eprintln!(
                    "bench dhcp: {server:8} offered {rate:6}/s  sent {:8.0}/s  completed {:8.0}/s  drops {:6.2}%",
                    s.sent,
                    s.completed,
                    s.drop_ratio * 100.0
                );
                runs.push(s);
            }
            steps.push(median(runs));
        }
        table.push((server, steps));
    }
    print_table(&table, secs, repeat);
    Ok(())
}

/// The median run by completed rate.
fn median(mut runs: Vec<Step>) -> Step {
    runs.sort_by(|a, b| a.completed.total_cmp(&b.completed));
    runs[runs.len() / 2]
}

fn best(steps: &[Step]) -> f64 {
    steps
        .iter()
        .filter(|s| s.drop_ratio <= 0.01)
        .map(|s| s.completed)
        .fold(0.0, f64::max)
}

fn print_table(table: &[(&str, Vec<Step>)], secs: u32, repeat: u32) {
    println!(
        "DHCP DORA benchmark: perfdhcp, {secs} s per step, {CLIENTS} clients, median of {} run(s)",
        repeat.max(1)
    );
    println!(
        "{:<9} {:>9} {:>9} {:>12} {:>8} {:>11} {:>9}",
        "server", "offered/s", "sent/s", "completed/s", "drops", "no-offer", "no-ack"
    );
    for (name, steps) in table {
        for s in steps {
            println!(
                "{:<9} {:>9} {:>9.0} {:>12.0} {:>7.2}% {:>10.2}% {:>8.2}%",
                name,
                s.offered,
                s.sent,
                s.completed,
                s.drop_ratio * 100.0,
                s.offer_loss * 100.0,
                s.ack_loss * 100.0
            );
        }
    }
    let b = |n: &str| {
        table
            .iter()
            .find(|(x, _)| *x == n)
            .map_or(0.0, |(_, s)| best(s))
    };
    let peak = |n: &str| {
        table.iter().find(|(x, _)| *x == n).map_or(0.0, |(_, s)| {
            s.iter().map(|s| s.completed).fold(0.0, f64::max)
        })
    };
    for n in SERVERS {
        println!(
            "{n:<8} best with <= 1% drops: {:>7.0}/s   peak completed: {:>7.0}/s",
            b(n),
            peak(n)
        );
    }
    let ratio = |a: f64, c: f64| {
        if c > 0.0 {
            format!("{:.2}", a / c)
        } else {
            "n/a (never under 1% drops)".to_string()
        }
    };
    for other in ["kea", "dnsmasq"] {
        println!(
            "vdd/{other:<8} best(<=1% drops) = {}   peak = {:.2}",
            ratio(b("vdd"), b(other)),
            peak("vdd") / peak(other).max(1.0)
        );
    }
}

struct RemoveOnDrop(PathBuf);
impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Builds vdd in release mode (the debug build would measure the compiler's settings).
fn build_vdd() -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let st = Command::new(cargo)
        .args(["build", "--release", "--package", "vdd", "--bin", "vdd"])
        .status()
        .context("running cargo build")?;
    if !st.success() {
        bail!("building vdd failed");
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    Ok(target.join("release/vdd"))
}

fn one_step(server: &str, vdd: &Path, dir: &Path, rate: u32, secs: u32) -> Result<Step> {
    let mut lab = Lab::with_prefix("bdhcp", 16)?;
    let ns = lab.server_ns.clone();
    let log = std::fs::File::create(dir.join(format!("{server}.log")))?;
    let cmd = match server {
        "vdd" => {
            let cfg = dir.join("vdd.toml");
            std::fs::write(
                &cfg,
                format!(
                    "[server]\ninterface = \"br0\"\nstate_dir = \"{}\"\n[dhcp]\npool = \"{}-{}\"\nlease_time = \"1h\"\nrouter = \"10.77.0.1\"\nnew_clients_per_minute = 10000000\n[tftp]\nenabled = false\n[http]\nenabled = false\n[nbd]\nenabled = false\n",
                    dir.join("state").display(),
                    POOL.0,
                    POOL.1
                ),
            )?;
            let mut c = Lab::cmd(&ns, vdd);
            // Per-lease info lines at 10k/s would measure the log, not the server.
            c.args(["serve", "--config"])
                .arg(&cfg)
                .env("RUST_LOG", "warn");
            c
        }
        "kea" => {
            let cfg = dir.join("kea.json");
            std::fs::write(
                &cfg,
                format!(
                    r#"{{"Dhcp4": {{
  "interfaces-config": {{"interfaces": ["br0"], "dhcp-socket-type": "udp"}},
  "lease-database": {{"type": "memfile", "persist": true, "name": "{}", "lfc-interval": 0}},
  "valid-lifetime": 3600,
  "subnet4": [{{"subnet": "10.77.0.0/16", "pools": [{{"pool": "{} - {}"}}],
                "option-data": [{{"name": "routers", "data": "10.77.0.1"}}]}}],
  "loggers": [{{"name": "kea-dhcp4", "output_options": [{{"output": "stderr"}}], "severity": "WARN"}}]
}}}}"#,
                    dir.join("kea-leases.csv").display(),
                    POOL.0,
                    POOL.1
                ),
            )?;
            let mut c = Lab::cmd(&ns, "kea-dhcp4");
            c.arg("-c")
                .arg(&cfg)
                .env("KEA_PIDFILE_DIR", dir)
                .env("KEA_LOCKFILE_DIR", dir);
            c
        }
        "dnsmasq" => {
            let mut c = Lab::cmd(&ns, "dnsmasq");
            c.args([
                "--no-daemon",
                "--conf-file=/dev/null",
                "--port=0",
                "--interface=br0",
                "--bind-interfaces",
                "--dhcp-authoritative",
                "--quiet-dhcp",
                // dnsmasq pings every new address before offering it and answers only
                // after the ping times out, longer than perfdhcp's 1 s drop time; vdd and
                // kea do no such check, so the comparison turns it off.
                "--no-ping",
                "--dhcp-lease-max=70000",
            ])
            .arg(format!("--dhcp-range={},{},255.255.0.0,1h", POOL.0, POOL.1))
            .arg(format!(
                "--dhcp-leasefile={}",
                dir.join("dnsmasq.leases").display()
            ))
            .arg(format!("--pid-file={}", dir.join("dnsmasq.pid").display()));
            c
        }
        other => bail!("unknown server {other}"),
    };
    let mut cmd = cmd;
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let pid = lab.spawn(server, cmd)?;
    // Ready when something listens on UDP 67 in the server namespace.
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        if !lab.is_running(pid) {
            bail!(
                "{server} exited at start; see {}",
                dir.join(format!("{server}.log")).display()
            );
        }
        let out = Command::new("ip")
            .args(["netns", "exec", &ns, "ss", "-ulnH", "sport", "=", ":67"])
            .output()?;
        if !out.stdout.is_empty() {
            break;
        }
        if Instant::now() > end {
            bail!("{server} did not open port 67");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let c = lab.add_client(None)?;
    lab::ip(["-n", &c.ns, "addr", "add", "10.77.0.2/16", "dev", "eth0"])?;
    // Bounded: `-p` ends sending, `-W` waits 2 s for answers in flight, `timeout` is the
    // backstop if perfdhcp itself wedges.
    let out = Command::new("timeout")
        .args([
            &format!("{}", secs + 30),
            "ip",
            "netns",
            "exec",
            &c.ns,
            "perfdhcp",
        ])
        .args([
            "-4",
            "-l",
            "eth0",
            "-r",
            &rate.to_string(),
            "-p",
            &secs.to_string(),
            "-R",
            &CLIENTS.to_string(),
            "-W",
            "2000000",
            &lab::SERVER_IP.to_string(),
        ])
        .stdin(Stdio::null())
        .output()
        .context("running perfdhcp")?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    std::fs::write(dir.join("perfdhcp.out"), &text)?;
    let stats = parse(&text);
    let get = |name: &str| stats.iter().find(|(n, _)| n == name).map(|(_, v)| *v);
    let (Some(disc), Some(req)) = (get("DISCOVER-OFFER"), get("REQUEST-ACK")) else {
        bail!(
            "no perfdhcp summary: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let acks = req.1 as f64;
    let drop_ratio = if disc.0 == 0 {
        1.0
    } else {
        (1.0 - acks / disc.0 as f64).max(0.0)
    };
    let loss = |(sent, recv): (u64, u64)| {
        if sent == 0 {
            0.0
        } else {
            1.0 - recv as f64 / sent as f64
        }
    };
    Ok(Step {
        offer_loss: loss(disc),
        ack_loss: loss(req),
        offered: rate,
        sent: disc.0 as f64 / secs as f64,
        completed: acks / secs as f64,
        drop_ratio,
    })
}

/// (exchange, (sent, received)) from perfdhcp's summary.
fn parse(text: &str) -> Vec<(String, (u64, u64))> {
    let mut v = Vec::new();
    let mut cur: Option<(String, u64)> = None;
    for l in text.lines().map(str::trim) {
        if let Some(n) = l.strip_prefix("***Statistics for: ") {
            cur = Some((n.trim_end_matches('*').trim().to_string(), 0));
            continue;
        }
        let num = |l: &str| {
            l.split(':')
                .nth(1)
                .and_then(|x| x.split_whitespace().next())
                .and_then(|x| x.parse::<u64>().ok())
                .unwrap_or(0)
        };
        if let Some((name, sent)) = cur.as_mut() {
            if l.starts_with("sent packets:") {
                *sent = num(l);
            } else if l.starts_with("received packets:") {
                v.push((name.clone(), (*sent, num(l))));
                cur = None;
            }
        }
    }
    v
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_perfdhcp_summary() {
        let t = "***Statistics for: DISCOVER-OFFER***\nsent packets: 2499\nreceived packets: 2498\ndrops: 1\n***Statistics for: REQUEST-ACK***\nsent packets: 2498\nreceived packets: 2490\n";
        let v = super::parse(t);
        assert_eq!(v[0], ("DISCOVER-OFFER".to_string(), (2499, 2498)));
        assert_eq!(v[1], ("REQUEST-ACK".to_string(), (2498, 2490)));
    }
}
