//! The menu flow: one attempt at the whole boot (modules, link, DHCP, the guest list, the
//! menu loop and its actions), and the screen after a failure.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use boot_menu::menu::{Action, Key, Menu};
use boot_menu::{cmdline, guests, report, sessions};
use vdd_api::Stage;

use crate::console::{chain, Console};
use crate::init::{load_modules, network, pick_link};
use crate::runs::session;
use crate::HTTP_TIMEOUT;

/// With nobody at the keyboard, a failed boot retries by itself after this long, so a
/// room of clients recovers when the server comes back.
const AUTO_RETRY: Duration = Duration::from_secs(30);

/// Set by the lease keeper when the lease is gone; the menu then starts over.
static LEASE_LOST: Mutex<Option<&'static str>> = Mutex::new(None);
/// Stop flag of the running lease keeper.
static KEEPER: Mutex<Option<Arc<AtomicBool>>> = Mutex::new(None);

/// One attempt at the whole boot, up to and including the menu loop.
pub fn boot(
    con: &mut Console,
    args: &cmdline::BootArgs,
    autopick: &mut Option<String>,
) -> Result<()> {
    con.say("loading modules");
    load_modules(con)?;
    report::stage(Stage::ModulesLoaded, None);
    let iface = pick_link(con)?;
    report::stage(Stage::LinkUp, Some(iface.clone()));
    con.say(&format!("link {iface} up, starting DHCP"));
    let (lease, holder) = {
        let mut log = |m: String| con.say(&m);
        network(&iface, &mut log)?
    };
    report::stage(Stage::ClientDhcp, Some(lease.ip.to_string()));
    // Keep the lease alive in the background; the menu notices when it is lost. The
    // previous attempt's keeper (if any) is stopped first so only one owns port 68.
    let stop = Arc::new(AtomicBool::new(false));
    if let Some(old) = KEEPER
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .replace(stop.clone())
    {
        old.store(true, Ordering::Relaxed);
    }
    *LEASE_LOST.lock().unwrap_or_else(|e| e.into_inner()) = None;
    std::thread::spawn(move || {
        let mut out = Console::open_output();
        let why = holder.keep(&stop, &mut |m| out.say(&m));
        if !stop.load(Ordering::Relaxed) {
            *LEASE_LOST.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
        }
    });
    con.say(&format!(
        "dhcp bound {}/{} router {} server {} lease {}s",
        lease.ip,
        lease.prefix,
        lease.router.map(|r| r.to_string()).unwrap_or("-".into()),
        lease.server,
        lease.lease_secs
    ));
    let server = args.server.unwrap_or_else(|| {
        let ip = if lease.next_server.is_unspecified() {
            lease.server
        } else {
            lease.next_server
        };
        SocketAddr::new(IpAddr::V4(ip), cmdline::DEFAULT_PORT)
    });
    // The stages so far, and the ones to come, go to this server.
    report::server(server);
    let mut menu_reported = false;
    loop {
        con.say(&format!("fetching http://{server}/api/v1/guests"));
        let list = guests::fetch(server, HTTP_TIMEOUT)
            .with_context(|| format!("guest list from {server}"))?;
        con.say(&format!("menu: {} guests", list.len()));
        let mut menu = Menu::new(list);
        // The seat's running sessions are marked; a server without the session API (or
        // one that is failing) just gives a menu without marks.
        let running = sessions::list(server, HTTP_TIMEOUT).unwrap_or_default();
        menu.running = running.iter().map(|s| s.guest.clone()).collect();
        if !running.is_empty() {
            con.say(&format!(
                "{} running session(s) of this seat",
                running.len()
            ));
        }
        con.draw(&menu.render(&server.to_string()));
        if !menu_reported {
            menu_reported = true;
            report::stage(
                Stage::MenuShown,
                Some(format!("{} guests", menu.guests.len())),
            );
        }
        let mut pending = autopick.take().and_then(|name| {
            let hit = menu.autopick(&name);
            if hit.is_none() {
                con.say(&format!(
                    "vdd.autopick={name}: no such guest, showing the menu"
                ));
            }
            hit.map(Action::Pick)
        });
        'menu: loop {
            if let Some(why) = *LEASE_LOST.lock().unwrap_or_else(|e| e.into_inner()) {
                bail!("DHCP lease lost: {why}");
            }
            let actions: Vec<Action> = match pending.take() {
                Some(a) => vec![a],
                None => con
                    .keys(Duration::from_secs(2))
                    .into_iter()
                    .map(|k| menu.key(k))
                    .collect(),
            };
            for a in actions {
                match a {
                    Action::Moved => con.draw(&menu.render(&server.to_string())),
                    Action::Pick(name) => {
                        con.say(&format!("picked {name}"));
                        let guest = menu.guest(&name).cloned();
                        match guest.map(|g| session(con, args, server, &g)) {
                            Some(Ok(())) => con.say("back to the menu"),
                            Some(Err(e)) => {
                                con.say(&format!("session failed: {e:#}; back to the menu"))
                            }
                            None => con.say(&format!("no guest {name} in the menu")),
                        }
                        std::thread::sleep(Duration::from_secs(2));
                        // Fetch again: the session may have ended or still be running.
                        break 'menu;
                    }
                    Action::End(ref name) | Action::Reset(ref name) => {
                        let Some(s) = running.iter().find(|s| &s.guest == name) else {
                            continue;
                        };
                        let r = if matches!(a, Action::End(_)) {
                            sessions::end(server, &s.id, HTTP_TIMEOUT)
                                .map(|()| format!("session {} of {name} ended", s.id))
                        } else {
                            sessions::reset(server, &s.id, HTTP_TIMEOUT).map(|n| {
                                format!(
                                    "{name} reset to a clean desktop (session {}); Enter connects",
                                    n.id
                                )
                            })
                        };
                        match r {
                            Ok(m) => con.say(&m),
                            Err(e) => con.say(&format!("{name}: {}", chain(&e))),
                        }
                        std::thread::sleep(Duration::from_secs(1));
                        break 'menu;
                    }
                    Action::Refresh => break 'menu,
                    Action::Reboot => reboot(con),
                    Action::Nothing => {}
                }
            }
        }
    }
}

fn reboot(con: &mut Console) {
    con.say("rebooting");
    nix::unistd::sync();
    // Returns only on failure (reboot(2) does not come back when it works).
    let Err(e) = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    con.say(&format!("reboot failed: {e}"));
}

/// The screen after a failure: show it, then retry on `r` or after a while, reboot on `b`.
pub fn fatal(con: &mut Console, msg: &str) {
    con.say(&format!("error: {msg}"));
    con.say(&format!(
        "press r to retry, b to reboot (retrying by itself in {}s)",
        AUTO_RETRY.as_secs()
    ));
    let t0 = Instant::now();
    while t0.elapsed() < AUTO_RETRY {
        for k in con.keys(AUTO_RETRY.saturating_sub(t0.elapsed())) {
            match k {
                Key::Refresh => return,
                Key::Reboot => reboot(con),
                _ => {}
            }
        }
    }
}
