//! The filter on X11 guests' taps: a guest on the LAN bridge may send and receive exactly
//! what README's table "X11 guests: what the network must allow" lists (DHCP from vdd,
//! XDMCP on UDP 177, X11 to the thin clients' TCP 6000, and ARP), from the MAC vdd gave
//! it, and nothing else. Without it a guest is a host on the LAN like any other: it could
//! reach every service on the LAN, take another MAC (a seat's, to pass for that seat), or
//! answer DHCP itself.
//!
//! One nftables table of the bridge family, `bridge vdd_guests`, hooked where every frame
//! of a bridge port passes (prerouting: frames from a port; postrouting: frames to a port,
//! forwarded or sent by the server itself). It applies to every port named `vdt-*` (all
//! of vdd's taps, see `lan::TAP_PREFIX`), so a tap vdd has not admitted with its MAC is
//! dropped entirely: the filter fails closed.
//!
//! Why the `nft` program rather than netlink from Rust: nftables rules are bytecode for
//! the kernel's VM, which `nft` compiles from this text; the Rust crates that build it
//! (rustables, nftnl) are thin, little-used bindings, and the text below is what an admin
//! reads with `nft list table bridge vdd_guests`. The script reaches `nft` on its stdin.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::config::Mac;
use crate::lan::TAP_PREFIX;

/// The table's name, for `nft list table bridge vdd_guests`.
pub const TABLE: &str = "vdd_guests";

/// Why the filter could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("running nft (Debian package nftables) to filter the X11 guests' taps")]
    Spawn(#[source] std::io::Error),
    #[error("nft refused {what}: {stderr}")]
    Refused { what: String, stderr: String },
}

/// The whole table. Replaced atomically: `nft -f` applies a file as one transaction, and
/// the first two lines make `delete` succeed whether or not the table exists.
fn table() -> String {
    let p = TAP_PREFIX;
    format!(
        r#"table bridge {TABLE}
delete table bridge {TABLE}
table bridge {TABLE} {{
    # (tap name, MAC vdd gave its guest): frames from any other MAC are dropped.
    set guests {{
        type ifname . ether_addr
    }}
    chain from_guests {{
        type filter hook prerouting priority -200; policy accept;
        iifname != "{p}*" accept
        iifname . ether saddr != @guests drop
        ether type arp accept
        udp sport 68 udp dport 67 accept
        udp sport 177 accept
        tcp dport 6000 accept
        drop
    }}
    chain to_guests {{
        type filter hook postrouting priority 200; policy accept;
        oifname != "{p}*" accept
        ether type arp accept
        udp sport 67 udp dport 68 accept
        udp dport 177 accept
        tcp sport 6000 accept
        drop
    }}
}}
"#
    )
}

fn nft(what: &str, script: &str) -> Result<(), Error> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(Error::Spawn)?;
    let mut stdin = child.stdin.take().expect("piped");
    let wrote = stdin.write_all(script.as_bytes());
    drop(stdin);
    let out = child.wait_with_output().map_err(Error::Spawn)?;
    if !out.status.success() || wrote.is_err() {
        return Err(Error::Refused {
            what: what.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Puts the table in place, empty of guests (a restarted vdd admits the guests it adopts
/// again). Run before any X11 guest starts.
pub fn install() -> Result<(), Error> {
    nft(&format!("the table bridge {TABLE}"), &table())
}

/// Lets the guest with `mac` behind `tap` through. Before its VM starts.
pub fn admit(tap: &str, mac: Mac) -> Result<(), Error> {
    nft(
        &format!("admitting {tap} ({mac})"),
        &format!("add element bridge {TABLE} guests {{ \"{tap}\" . {mac} }}\n"),
    )
}

/// Takes the guest out again, when its session ends. An element already gone is no error.
pub fn forget(tap: &str, mac: Mac) -> Result<(), Error> {
    let r = nft(
        &format!("forgetting {tap} ({mac})"),
        &format!("delete element bridge {TABLE} guests {{ \"{tap}\" . {mac} }}\n"),
    );
    match r {
        Err(Error::Refused { stderr, .. }) if stderr.contains("No such file") => Ok(()),
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_names_every_allowed_flow_and_ends_in_drop() {
        let t = table();
        for rule in [
            "iifname != \"vdt-*\" accept",
            "iifname . ether saddr != @guests drop",
            "udp sport 68 udp dport 67 accept",
            "udp sport 177 accept",
            "tcp dport 6000 accept",
            "udp sport 67 udp dport 68 accept",
            "udp dport 177 accept",
            "tcp sport 6000 accept",
        ] {
            assert!(t.contains(rule), "{rule}");
        }
        // Both chains end in drop: whatever the list does not allow is refused.
        for chain in t.split("chain ").skip(1) {
            let last = chain
                .lines()
                .map(str::trim)
                .rfind(|l| !l.is_empty() && *l != "}");
            assert_eq!(last, Some("drop"), "{chain}");
        }
    }
}
