//! Live reload: `systemctl reload vdd` (SIGHUP) and `vdd reload` (`POST /api/v1/reload`)
//! read the config file again, validate it as `vdd check` does, and make it the running
//! config at once. Leases, sessions, NBD connections and transfers in flight go on: each
//! service takes the running config per request (see `config/live.rs`).
//!
//! What a service holds from its start cannot change under it: the interface and the
//! server's address, the state folder, the ports, which services run, the DHCP mode, the
//! connection caps that size a service's semaphore, the VMs' accelerator, the hypervisor
//! hosts. For those the running value stays, and the reload names each changed key as
//! waiting for a restart.
//! A guest's `warm` and `start` change live: the dispatcher's maintenance pass (every 10 s,
//! `dispatch/warm.rs`) reads the running config, starts or stops warm VMs to the new
//! count, and saves a state a guest now wants, in the background; seats are not refused
//! meanwhile (a pick without a warm VM or a saved state boots).
//! An invalid file changes nothing.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tracing::{error, info, warn};

use crate::config::{Config, ConfigError, Live};

/// What a reload did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Outcome {
    /// The sections that now run with new values ("dhcp", "boot", "guests", ...).
    pub changed: Vec<&'static str>,
    /// Keys changed in the file that keep their running value until a restart.
    pub restart: Vec<&'static str>,
    /// Menu changes by guest name.
    pub guests_added: Vec<String>,
    pub guests_removed: Vec<String>,
    pub guests_changed: Vec<String>,
}

impl Outcome {
    /// One line for the log and for `vdd reload`.
    pub fn summary(&self) -> String {
        let list = |v: &[String]| v.join(", ");
        let mut s = if self.changed.is_empty() {
            "nothing changed that runs".to_string()
        } else {
            format!("applied: {}", self.changed.join(", "))
        };
        for (what, v) in [
            ("guests added", &self.guests_added),
            (
                "removed (their running sessions go on)",
                &self.guests_removed,
            ),
            ("changed", &self.guests_changed),
        ] {
            if !v.is_empty() {
                s.push_str(&format!("; {what}: {}", list(v)));
            }
        }
        if !self.restart.is_empty() {
            s.push_str(&format!(
                "; waiting for a restart: {}",
                self.restart.join(", ")
            ));
        }
        s
    }
}

/// Reloads one running vdd's config from its file.
pub struct Reloader {
    path: PathBuf,
    live: Live,
    /// The file as last loaded (before `vdd serve` bound it to the interface): what the
    /// admin wrote, to tell which restart-only keys the new file changes. The lock also
    /// makes reloads one at a time.
    file: Mutex<Config>,
}

impl Reloader {
    /// `file`: the config as loaded from `path` at start; `live`: the running one.
    pub fn new(path: PathBuf, file: Config, live: Live) -> Reloader {
        Reloader {
            path,
            live,
            file: Mutex::new(file),
        }
    }

    /// Reads and validates the file; on success it runs from now on.
    pub fn reload(&self) -> Result<Outcome, ConfigError> {
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let new = Config::load(&self.path)?;
        let running = self.live.get();
        let (next, outcome) = next_config(&running, &file, new.clone())?;
        self.live.set(Arc::new(next));
        *file = new;
        Ok(outcome)
    }
}

impl Reloader {
    /// [`Reloader::reload`], logged: the outcome, each key that waits for a restart, or
    /// the error `vdd check` would print (as one line, with its causes).
    pub fn reload_logged(&self) -> Result<Outcome, String> {
        match self.reload() {
            Ok(o) => {
                for key in &o.restart {
                    warn!(
                        key,
                        "changed in the config file; the running value stays until vdd restarts"
                    );
                }
                info!(file = %self.path.display(), "config reloaded: {}", o.summary());
                Ok(o)
            }
            Err(e) => {
                let why = crate::dispatch::report(&e);
                error!(file = %self.path.display(), "config reload refused, the running config stays: {why}");
                Err(why)
            }
        }
    }
}

/// The config to run: `new` with the restart-only keys of `running`, and what changes.
/// `old_file` is what the running config was loaded from.
pub fn next_config(
    running: &Config,
    old_file: &Config,
    new: Config,
) -> Result<(Config, Outcome), ConfigError> {
    let mut next = new;
    let mut restart = Vec::new();
    // A key the file changed is named once; the running value stays either way (`vdd
    // serve` may have filled it in, e.g. the address from the interface).
    macro_rules! keep {
        ($key:literal, $($f:ident).+) => {
            if old_file.$($f).+ != next.$($f).+ {
                restart.push($key);
            }
            next.$($f).+ = running.$($f).+.clone();
        };
    }
    // Sockets, folders and the bridge are taken at start.
    let s = (&old_file.server, &next.server);
    for (key, differs) in [
        ("server.interface", s.0.interface != s.1.interface),
        (
            "server.address",
            (s.0.address, s.0.subnet) != (s.1.address, s.1.subnet),
        ),
        ("server.state_dir", s.0.state_dir != s.1.state_dir),
        ("server.bridge", s.0.bridge != s.1.bridge),
    ] {
        if differs {
            restart.push(key);
        }
    }
    // The TFTP root and the HTTP files default to STATE_DIR/tftp: while the old state
    // folder runs, so do they.
    for (root, running_root) in [
        (&mut next.tftp.root, &running.tftp.root),
        (&mut next.http.root, &running.http.root),
    ] {
        if *root == next.server.state_dir.join("tftp") && s.0.state_dir != s.1.state_dir {
            *root = running_root.clone();
        }
    }
    next.server = running.server.clone();
    if old_file.dhcp.mode != next.dhcp.mode {
        // The mode decides which sockets exist and whether there is a pool at all: the
        // whole section keeps running as it is.
        restart.push("dhcp.mode");
        next.dhcp = running.dhcp.clone();
    }
    keep!("dhcp.port", dhcp.port);
    keep!("dhcp.proxy_port", dhcp.proxy_port);
    keep!("boot.ipv6_ra", boot.ipv6_ra);
    keep!("tftp.enabled", tftp.enabled);
    keep!("tftp.port", tftp.port);
    keep!("tftp.max_transfers", tftp.max_transfers);
    keep!("http.enabled", http.enabled);
    keep!("http.port", http.port);
    keep!("nbd.enabled", nbd.enabled);
    keep!("nbd.port", nbd.port);
    keep!("nbd.max_connections", nbd.max_connections);
    keep!("dispatch.accel", dispatch.accel);
    keep!("dispatch.qemu", dispatch.qemu);
    // The libvirt backend connects to its hosts and takes its policy at start.
    keep!("dispatch.host", dispatch.hosts);
    keep!("dispatch.placement", dispatch.placement);
    // The dispatcher starts with the first guest, and X11 guests' bridge at start: a
    // guest the running vdd cannot start is in the menu, and a pick of it is refused
    // with the reason, until the restart.
    if running.guests.is_empty() && !next.guests.is_empty() {
        restart
            .push("guest (vdd started without guests: the dispatcher starts with the first one)");
    } else if !running.has_x11() && next.has_x11() {
        restart.push("guest (the first X11 guest: the LAN bridge is set up at start)");
    }
    next.check_subnet()?;

    let mut changed = Vec::new();
    for (name, differs) in [
        ("dhcp", running.dhcp != next.dhcp),
        ("boot", running.boot != next.boot),
        ("tftp", running.tftp != next.tftp),
        ("http", running.http != next.http),
        ("nbd", running.nbd != next.nbd),
        ("guests", running.guests != next.guests),
        ("dispatch", running.dispatch != next.dispatch),
    ] {
        if differs {
            changed.push(name);
        }
    }
    let names = |c: &Config| -> Vec<String> { c.guests.iter().map(|g| g.name.clone()).collect() };
    let (before, after) = (names(running), names(&next));
    let outcome = Outcome {
        changed,
        restart,
        guests_added: after
            .iter()
            .filter(|n| !before.contains(n))
            .cloned()
            .collect(),
        guests_removed: before
            .iter()
            .filter(|n| !after.contains(n))
            .cloned()
            .collect(),
        guests_changed: next
            .guests
            .iter()
            .filter(|g| running.guests.iter().any(|o| o.name == g.name && o != *g))
            .map(|g| g.name.clone())
            .collect(),
    };
    Ok((next, outcome))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const BASE: &str = r#"
[server]
interface = "vdd0"
state_dir = "/var/lib/vdd"
[dhcp]
pool = "10.77.0.100-10.77.0.199"
[http]
port = 8080
[[guest]]
name = "demo"
image = "/srv/demo.img"
[[guest]]
name = "old"
image = "/srv/old.img"
"#;

    fn parse(s: &str) -> Config {
        Config::parse(s, Path::new("/etc/vdd/config.toml")).unwrap()
    }

    /// The running config: loaded, then bound to the interface as `vdd serve` does.
    fn running() -> Config {
        let mut c = parse(BASE);
        c.server.address = Some("10.77.0.1".parse().unwrap());
        c.server.subnet = Some("10.77.0.0/24".parse().unwrap());
        c
    }

    #[test]
    fn the_menu_and_the_pool_change_live() {
        let new = BASE
            .replace(
                "name = \"old\"\nimage = \"/srv/old.img\"",
                "name = \"new\"\nimage = \"/srv/new.img\"",
            )
            .replace("image = \"/srv/demo.img\"", "image = \"/srv/demo2.img\"")
            .replace("10.77.0.199", "10.77.0.150");
        let (next, o) = next_config(&running(), &parse(BASE), parse(&new)).unwrap();
        assert_eq!(o.changed, vec!["dhcp", "guests"]);
        assert!(o.restart.is_empty(), "{o:?}");
        assert_eq!(o.guests_added, vec!["new"]);
        assert_eq!(o.guests_removed, vec!["old"]);
        assert_eq!(o.guests_changed, vec!["demo"]);
        assert_eq!(next.dhcp.pool.unwrap().last.to_string(), "10.77.0.150");
        // The address `vdd serve` filled in from the interface stays.
        assert_eq!(next.server_ip(), running().server_ip());
    }

    #[test]
    fn sockets_and_folders_wait_for_a_restart() {
        let new = BASE
            .replace("port = 8080", "port = 8081")
            .replace("interface = \"vdd0\"", "interface = \"eth1\"")
            .replace("/var/lib/vdd", "/srv/vdd")
            .replace("[dhcp]\npool", "[dhcp]\nlease_time = \"2h\"\npool");
        let (next, o) = next_config(&running(), &parse(BASE), parse(&new)).unwrap();
        assert_eq!(
            o.restart,
            vec!["server.interface", "server.state_dir", "http.port"]
        );
        assert_eq!(o.changed, vec!["dhcp"], "the lease time applies at once");
        assert_eq!(next.http.port, 8080);
        assert_eq!(next.server.interface, "vdd0");
        assert!(o
            .summary()
            .contains("waiting for a restart: server.interface"));
    }

    #[test]
    fn a_new_mode_keeps_the_running_dhcp_section() {
        let new = BASE.replace(
            "[dhcp]\npool = \"10.77.0.100-10.77.0.199\"",
            "[dhcp]\nmode = \"proxy\"",
        );
        let (next, o) = next_config(&running(), &parse(BASE), parse(&new)).unwrap();
        // Without full DHCP, router advertisements are off by default: that waits too.
        assert_eq!(o.restart, vec!["dhcp.mode", "boot.ipv6_ra"]);
        assert_eq!(next.dhcp, running().dhcp);
    }

    #[test]
    fn warm_pools_and_saved_starts_change_live() {
        let new = BASE.replace(
            "image = \"/srv/demo.img\"",
            "image = \"/srv/demo.img\"\nwarm = 2\nstart = \"saved\"",
        );
        let (next, o) = next_config(&running(), &parse(BASE), parse(&new)).unwrap();
        assert!(o.restart.is_empty(), "{o:?}");
        assert_eq!(
            (o.changed, o.guests_changed),
            (vec!["guests"], vec!["demo".into()])
        );
        assert_eq!(next.guests[0].warm, 2);
        assert_eq!(next.guests[0].start, crate::config::Start::Saved);
    }

    #[test]
    fn a_pool_outside_the_running_subnet_is_refused() {
        let new = BASE.replace("10.77.0.100-10.77.0.199", "10.78.0.100-10.78.0.199");
        let e = next_config(&running(), &parse(BASE), parse(&new)).unwrap_err();
        assert!(e.to_string().starts_with("dhcp.pool"), "{e}");
    }
}
