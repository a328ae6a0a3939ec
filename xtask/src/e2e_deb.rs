//! `cargo xtask e2e deb`: the Debian package for real. Builds `vdd_*.deb`, installs it
//! with `apt-get install ./vdd_*.deb` into a Debian system booted with systemd as PID 1
//! (a `systemd-nspawn -b` container, see nspawn.rs) that sits in a lab's server
//! namespace, and runs it as an admin would: the shipped config refuses to serve; the
//! EDIT lines filled in, `systemctl start vdd` serves a DHCP client (udhcpc) and an NBD
//! read (nbdcopy) on the lab LAN, starts a VNC and an X11 guest's VM, takes a changed
//! menu on `systemctl reload vdd` (seen through GET /api/v1/guests, with the sessions
//! still running), and `systemctl stop vdd` leaves no QEMU and no tap; `apt-get purge`
//! then removes what the package and vdd made.
//!
//! The container's root holds the package's Depends and Recommends already (it has no
//! network to fetch them), so apt installs the one file.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::e2e::{admin_api, ADMIN_TOKEN};
use crate::lab::{ClientNs, Lab, SERVER_IP};
use crate::nspawn::Container;

/// Where the host folder with the package, the config and the images appears inside.
const MOUNT: &str = "/srv/vdd-test";

/// What a run measured.
#[derive(Debug)]
pub struct Report {
    pub deb: PathBuf,
    pub deb_bytes: u64,
    /// `systemd-analyze security vdd`'s overall exposure line, inside the container.
    pub exposure: String,
    /// Each step and how long it took.
    pub steps: Vec<(String, Duration)>,
    /// Whether the reload step ran (see [`reload_supported`]).
    pub reloaded: bool,
}

/// The whole test; see the module comment.
pub fn run() -> Result<Report> {
    let mut steps = Steps::new();
    // The container's root (minutes of downloads on a fresh machine) is made while the
    // package builds (minutes of compiling).
    let deps = crate::deb::relations()?;
    let deps: Vec<&str> = deps.iter().map(String::as_str).collect();
    let (built, tree) = std::thread::scope(|s| {
        let tree = s.spawn(|| crate::nspawn::tree("deb-test-root", &deps));
        let built = crate::deb::build();
        let tree = tree
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("building the container root panicked")));
        (built, tree)
    });
    let (built, tree) = (built?, tree?);
    let guest = crate::image::guest_demo(false)?;
    steps.done("cargo xtask deb; the container's root beside it");

    let mut lab = Lab::new("deb")?;
    let client = lab.add_client(None)?;
    let work = Work(std::env::temp_dir().join(format!("{}-work", lab.name)));
    std::fs::create_dir_all(&work.0)?;
    let deb_name = built.deb.file_name().context("the package has a name")?;
    std::fs::copy(&built.deb, work.0.join(deb_name))?;
    std::fs::copy(&guest, work.0.join("guest-demo.img"))?;
    let root_image = crate::bench::pseudo_random(8 << 20, 0x5eed_d0d0_cafe_f00d);
    std::fs::write(work.0.join("root.img"), &root_image)?;
    let shipped = std::fs::read_to_string(crate::image::repo_root().join("debian/config.toml"))?;
    let edited = admin_edits(&shipped)?;
    std::fs::write(work.0.join("config.toml"), &edited)?;
    std::fs::write(
        work.0.join("config-reload.toml"),
        with_second_guest(&edited),
    )?;

    let ct = Container::boot(
        &tree,
        &lab.server_ns,
        &[(work.0.as_path(), MOUNT)],
        &work.0.join("nspawn.log"),
    )?;
    steps.done("container booted (systemd PID 1)");
    let deb_name = deb_name.to_string_lossy();
    let run = Run {
        ct: &ct,
        lab: &lab,
        client: &client,
        work: &work.0,
    };
    let result = run.steps(&deb_name, &root_image, &mut steps);
    let result = match result {
        Ok(r) => Ok(r),
        Err(e) => {
            let journal = ct
                .sh_output("journalctl -u vdd --no-pager -n 60 -o short-monotonic || true")
                .unwrap_or_default();
            Err(e.context(format!(
                "vdd's journal in the container (last lines):\n{journal}"
            )))
        }
    };
    let (exposure, reloaded) = result?;
    drop(ct);
    steps.done("container halted");
    Ok(Report {
        deb_bytes: std::fs::metadata(&built.deb)?.len(),
        deb: built.deb,
        exposure,
        steps: steps.list,
        reloaded,
    })
}

/// The steps' names and times, printed as each ends.
struct Steps {
    t: Instant,
    list: Vec<(String, Duration)>,
}

impl Steps {
    fn new() -> Steps {
        Steps {
            t: Instant::now(),
            list: Vec::new(),
        }
    }

    fn done(&mut self, name: &str) {
        let d = self.t.elapsed();
        eprintln!("xtask e2e deb: {name:<52} {:>6.1} s", d.as_secs_f64());
        self.list.push((name.to_string(), d));
        self.t = Instant::now();
    }
}

/// What the steps inside the container work with.
struct Run<'a> {
    ct: &'a Container,
    lab: &'a Lab,
    client: &'a ClientNs,
    work: &'a Path,
}

impl Run<'_> {
    /// The steps inside the booted container; returns the exposure line and whether the
    /// reload step ran.
    fn steps(&self, deb: &str, root_image: &[u8], steps: &mut Steps) -> Result<(String, bool)> {
        let Run {
            ct,
            lab,
            client,
            work,
        } = *self;
        // Install: nothing starts, nothing is enabled; the user and the config's rights.
        ct.sh_output(&format!("cd {MOUNT} && apt-get install -y -q ./{deb}"))?;
        steps.done("apt-get install ./vdd_*.deb");
        let state = ct.sh_output("systemctl is-enabled vdd; systemctl is-active vdd; true")?;
        let state: Vec<&str> = state.split_whitespace().collect();
        ensure!(
            state == ["disabled", "inactive"],
            "after the install vdd must be neither enabled nor running: {state:?}"
        );
        let groups = ct.sh_output("id -nG vdd")?;
        ensure!(
            groups.split_whitespace().any(|g| g == "kvm"),
            "the user vdd is not in group kvm: {groups:?}"
        );
        let rights = ct.sh_output("stat -c '%U:%G %a' /etc/vdd/config.toml")?;
        ensure!(
            rights.trim() == "root:vdd 640",
            "/etc/vdd/config.toml is {rights:?}, not root:vdd 640 (it holds the admin token)"
        );
        // The shipped config passes `vdd check`, and a forgotten placeholder never serves.
        let check = ct.sh_output("vdd check 2>&1")?;
        ensure!(
            check.contains("/etc/vdd/config.toml is valid"),
            "vdd check: {check}"
        );
        ensure!(
            !ct.sh_ok("systemctl start vdd")?,
            "vdd started with the shipped config's placeholder interface"
        );
        let journal = ct.sh_output("journalctl -u vdd --no-pager -o cat")?;
        ensure!(
            journal.contains("server.interface = \"EDIT-lan\": no such interface"),
            "the journal does not say why the shipped config cannot serve:\n{journal}"
        );
        // Stop the restarts Restart=on-failure would go on with.
        ct.sh_output("systemctl stop vdd; systemctl reset-failed vdd 2>/dev/null; true")?;
        let exposure = ct
            .sh_output("systemd-analyze security vdd --no-pager")?
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .map(|l| l.trim().trim_start_matches('→').trim().to_string())
            .context("systemd-analyze security printed no overall exposure")?;
        steps.done("shipped config: check passes, serve refuses");

        // The admin's part: the thin-client files (README's `install`), the EDIT lines.
        ct.sh_output(&format!(
            "install -D -m 644 {MOUNT}/root.img /var/lib/vdd/thin-client/thin-client.squashfs \
             && cp {MOUNT}/config.toml /etc/vdd/config.toml && vdd check"
        ))?;
        ct.sh_output("systemctl start vdd")?;
        let pid = ct
            .sh_output("systemctl show -p MainPID --value vdd")?
            .trim()
            .to_string();
        let status = ct.sh_output(&format!(
            "stat -c %U /proc/{pid}; grep -E '^Cap(Eff|Bnd)' /proc/{pid}/status"
        ))?;
        // CAP_NET_BIND_SERVICE (10), CAP_NET_ADMIN (12), CAP_NET_RAW (13), and no other.
        for want in [
            "vdd",
            "CapEff:\t0000000000003400",
            "CapBnd:\t0000000000003400",
        ] {
            ensure!(
                status.lines().any(|l| l == want),
                "vdd's process is not what the unit says (want {want:?}):\n{status}"
            );
        }
        steps.done("systemctl start vdd (READY=1)");

        // A seat on the LAN: a lease, then the thin client's root over NBD.
        let ip = lease(work, client)?;
        ensure!(in_pool(&ip), "udhcpc got {ip}, outside the configured pool");
        let copy = work.join("nbd-read.img");
        let out = Lab::cmd(&client.ns, "nbdcopy")
            .arg(format!("nbd://{SERVER_IP}:10809/thin-client"))
            .arg(&copy)
            .output()
            .context("running nbdcopy")?;
        ensure!(
            out.status.success(),
            "nbdcopy failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(
            std::fs::read(&copy)? == root_image,
            "the NBD export's bytes differ from the file installed"
        );
        steps.done("udhcpc lease, nbdcopy of the root export");

        // Two sessions: a VNC guest (QEMU user networking) and an X11 guest (a tap on the
        // LAN bridge, admitted by nft). The X11 one never answers XDMCP: it stays starting.
        let mut ids = Vec::new();
        for guest in ["desktop", "desk-x11"] {
            let body = format!(r#"{{"guest": "{guest}", "seat": "{}"}}"#, client.mac);
            let (code, v) = admin_api(&client.ns, "POST", "/api/v1/sessions", Some(&body))?;
            ensure!(code == 201, "POST a {guest} session: {code} {v}");
            ids.push(v["id"].as_str().context("a session has an id")?.to_string());
        }
        wait_for(
            "two QEMUs in the container",
            Duration::from_secs(30),
            || Ok(ct.processes("qemu-system").len() == 2),
        )?;
        ensure!(
            !crate::lab::vdd_taps(&lab.server_ns)?.is_empty(),
            "no vdt- tap on the lab bridge for the X11 guest"
        );
        // vdd's ambient capabilities stop at the VMs.
        for vm in ct.processes("qemu-system") {
            let st = std::fs::read_to_string(format!("/proc/{vm}/status")).unwrap_or_default();
            ensure!(
                st.lines().any(|l| l == "CapEff:\t0000000000000000")
                    && st.lines().any(|l| l == "CapPrm:\t0000000000000000"),
                "a VM holds capabilities:\n{st}"
            );
        }
        steps.done("two sessions: QEMU VMs, a tap");

        // A crash: Restart= starts vdd again, and it adopts the VMs KillMode=process left.
        let mut vms = ct.processes("qemu-system");
        vms.sort_unstable();
        ct.sh_output(&format!("kill -KILL {pid}"))?;
        let mut restarted = String::new();
        wait_for("systemd to restart vdd", Duration::from_secs(30), || {
            let out = ct.sh_output(
                "systemctl is-active vdd; systemctl show -p MainPID --value vdd; true",
            )?;
            let v: Vec<&str> = out.split_whitespace().collect();
            if let ["active", p] = v[..] {
                if p != pid && p != "0" {
                    restarted = p.to_string();
                    return Ok(true);
                }
            }
            Ok(false)
        })?;
        let pid = restarted;
        let mut after = ct.processes("qemu-system");
        after.sort_unstable();
        ensure!(
            after == vms,
            "the VMs did not outlive vdd's crash: {vms:?} before, {after:?} after"
        );
        ensure_sessions(client, &ids, "vdd's crash and restart")?;
        steps.done("kill -9 vdd: restarted, the VMs adopted");

        let reloaded = if reload_supported(ct)? {
            ct.sh_output(&format!(
                "cp {MOUNT}/config-reload.toml /etc/vdd/config.toml && systemctl reload vdd"
            ))?;
            wait_for("the reloaded menu", Duration::from_secs(30), || {
                let (code, v) = admin_api(&client.ns, "GET", "/api/v1/guests", None)?;
                Ok(code == 200
                    && v.as_array()
                        .is_some_and(|g| g.iter().any(|g| g["name"] == "second")))
            })?;
            let after = ct.sh_output("systemctl show -p MainPID --value vdd")?;
            ensure!(
                after.trim() == pid,
                "the reload restarted vdd (pid {pid} -> {})",
                after.trim()
            );
            ensure_sessions(client, &ids, "the reload")?;
            steps.done("systemctl reload vdd: the new menu, same sessions");
            true
        } else {
            eprintln!(
                "xtask e2e deb: SKIPPED the reload step: this vdd has no `vdd reload` yet \
             (live reload, issue 15, is not merged), so SIGHUP would end it"
            );
            false
        };

        ct.sh_output("systemctl stop vdd")?;
        let state = ct.sh_output("systemctl is-active vdd; true")?;
        ensure!(state.trim() == "inactive", "after stop, vdd is {state:?}");
        let left = ct.processes("qemu-system");
        ensure!(
            left.is_empty(),
            "QEMU left running after systemctl stop vdd: pids {left:?}"
        );
        let left = crate::lab::vdd_taps(&lab.server_ns)?;
        ensure!(
            left.is_empty(),
            "taps left after systemctl stop vdd: {left:?}"
        );
        steps.done("systemctl stop vdd: no QEMU, no tap");

        ct.sh_output("apt-get purge -y -q vdd")?;
        let left = ct.sh_output(
            "for p in /usr/bin/vdd /etc/vdd /var/lib/vdd /lib/systemd/system/vdd.service \
         /usr/lib/systemd/system/vdd.service /usr/lib/sysusers.d/vdd.conf /usr/share/doc/vdd; do \
         test -e $p && echo $p; done; \
         getent passwd vdd; getent group vdd; \
         nft list table bridge vdd_guests >/dev/null 2>&1 && echo 'nft table bridge vdd_guests'; \
         dpkg-query -W -f='${Status}\\n' vdd 2>/dev/null | grep -v not-installed; true",
        )?;
        ensure!(
            left.trim().is_empty(),
            "left after apt-get purge vdd:\n{left}"
        );
        steps.done("apt-get purge vdd: nothing left");
        Ok((exposure, reloaded))
    }
}

/// Fails unless the admin API lists every session of `ids` (after `what`).
fn ensure_sessions(client: &ClientNs, ids: &[String], what: &str) -> Result<()> {
    let (code, v) = admin_api(&client.ns, "GET", "/api/v1/sessions", None)?;
    let running: Vec<&str> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["id"].as_str())
        .collect();
    ensure!(
        code == 200 && ids.iter().all(|id| running.contains(&id.as_str())),
        "the sessions {ids:?} did not survive {what}: {code} {v}"
    );
    Ok(())
}

/// The live reload is there when `vdd` has its `reload` command (the lead's part of
/// issue 15); before, SIGHUP's default action would end vdd.
fn reload_supported(ct: &Container) -> Result<bool> {
    let help = ct.sh_output("vdd --help")?;
    Ok(help.lines().any(|l| l.trim_start().starts_with("reload")))
}

/// The shipped config with its EDIT lines filled in for the lab, as an admin would, plus
/// what the test needs: the admin token, a quick VM shutdown, an X11 guest.
pub fn admin_edits(shipped: &str) -> Result<String> {
    let mut c = shipped.to_string();
    for (from, to) in [
        (
            "interface = \"EDIT-lan\"",
            "interface = \"br0\"".to_string(),
        ),
        ("192.0.2.", "10.77.0.".to_string()),
        (
            "# admin_token = \"EDIT\"",
            format!("admin_token = \"{ADMIN_TOKEN}\""),
        ),
        (
            "/srv/vdd/guests/desktop.qcow2",
            format!("{MOUNT}/guest-demo.img"),
        ),
        (
            "memory = \"2G\"\ncpus = 2",
            "memory = \"256M\"\ncpus = 1".to_string(),
        ),
    ] {
        ensure!(
            c.contains(from),
            "debian/config.toml has no {from:?} any more"
        );
        c = c.replace(from, &to);
    }
    c.push_str(&format!(
        r#"
# cargo xtask e2e deb: the demo guest ignores the ACPI power button.
[dispatch]
shutdown_timeout = "3s"

[[guest]]
name = "desk-x11"
display = "x11"
image = "{MOUNT}/guest-demo.img"
memory = "256M"
"#
    ));
    Ok(c)
}

fn with_second_guest(cfg: &str) -> String {
    format!(
        "{cfg}\n[[guest]]\nname = \"second\"\nlabel = \"Added by a reload\"\nimage = \"{MOUNT}/guest-demo.img\"\nmemory = \"256M\"\n"
    )
}

/// One DHCP lease for `c` from udhcpc; the address is configured on its eth0.
fn lease(work: &Path, c: &ClientNs) -> Result<String> {
    let script = work.join("udhcpc.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\n[ \"$1\" = bound ] || exit 0\nip addr add \"$ip/$subnet\" dev \"$interface\"\necho \"$ip\" > \"$OUT\"\n",
    )?;
    Command::new("chmod").arg("755").arg(&script).status()?;
    let got = work.join("lease");
    let out = Lab::cmd(&c.ns, "udhcpc")
        .args([
            "-f", "-q", "-n", "-t", "6", "-T", "2", "-A", "1", "-i", "eth0", "-s",
        ])
        .arg(&script)
        .env("OUT", &got)
        .stdin(Stdio::null())
        .output()
        .context("running udhcpc")?;
    std::fs::read_to_string(&got)
        .map(|s| s.trim().to_string())
        .with_context(|| {
            format!(
                "udhcpc got no lease: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

fn in_pool(ip: &str) -> bool {
    ip.parse::<std::net::Ipv4Addr>().is_ok_and(|ip| {
        let o = ip.octets();
        o[..3] == [10, 77, 0] && (100..=199).contains(&o[3])
    })
}

/// Polls `ok` every 200 ms until it holds or `limit` passes.
fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if ok()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("waited {} s for {what}", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The run's folder, removed on every path (XTASK_KEEP_LOGS=1 keeps it).
struct Work(PathBuf);

impl Drop for Work {
    fn drop(&mut self) {
        if std::env::var("XTASK_KEEP_LOGS").as_deref() == Ok("1") {
            eprintln!("xtask e2e deb: files kept in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_config_takes_the_admin_edits() {
        let shipped =
            std::fs::read_to_string(crate::image::repo_root().join("debian/config.toml")).unwrap();
        let c = admin_edits(&shipped).unwrap();
        assert!(!c.contains("EDIT-lan") && !c.contains("192.0.2."), "{c}");
        assert!(with_second_guest(&c).contains("name = \"second\""));
    }
}
