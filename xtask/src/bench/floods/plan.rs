//! The floods of `cargo xtask bench floods`, in the order they run: what each sends, from
//! which addresses, and which control client checks the service during it.

use super::control::Control;
use super::{Args, Flood, BIG, EXPORT, POOL};
use crate::lab::SERVER_IP;

/// The floods, in the order they run.
pub(super) fn plan(a: &Args, sources: &[String]) -> Vec<Flood> {
    let server = SERVER_IP.to_string();
    let secs = a.hold.to_string();
    let all = sources.join(",");
    let one = sources[0].clone();
    let other = sources.get(1).unwrap_or(&sources[0]).clone();
    let half = sources.len().div_ceil(2);
    let (idle_src, noread_src) = if sources.len() > 1 {
        (sources[..half].join(","), sources[half..].join(","))
    } else {
        (all.clone(), all.clone())
    };
    let n_idle = half * 8;
    let n_noread = (sources.len() - half).max(1) * 4;
    let (reads, len) = (32usize, 4usize << 20);
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    vec![
        Flood {
            key: "tftp-window",
            what: format!(
                "{} netascii RRQs, blksize 65464 windowsize 65535, OACK acked, no DATA acked, from {} addresses",
                a.rrqs,
                sources.len()
            ),
            procs: vec![s(&["tftp-window", &server, "69", "big.bin", &a.rrqs.to_string(), &secs, &all])],
            control: Control::Tftp,
        },
        Flood {
            key: "tftp-hold",
            what: format!(
                "{} octet RRQs with timeout=255, never acknowledged, from {} addresses",
                2 * a.rrqs,
                sources.len()
            ),
            procs: vec![s(&["tftp-hold", &server, "69", "big.bin", &(2 * a.rrqs).to_string(), &secs, &all])],
            control: Control::Tftp,
        },
        Flood {
            key: "http",
            what: format!(
                "{} idle TCP connections from {one}, and a reader of /files/big.bin at 1 byte/s from {other}",
                a.http_conns
            ),
            procs: vec![
                s(&["tcp-idle", &server, "80", &a.http_conns.to_string(), &secs, &one]),
                s(&["http-slow", &server, "80", "/files/big.bin", &secs, &other]),
            ],
            control: Control::Http,
        },
        Flood {
            key: "nbd",
            what: format!(
                "{n_idle} idle connections (no handshake), and {n_noread} that negotiate, send {reads} reads of {} MiB each and never read a reply",
                len >> 20
            ),
            procs: vec![
                s(&["tcp-idle", &server, "10809", &n_idle.to_string(), &secs, &idle_src]),
                s(&[
                    "nbd-noread",
                    &server,
                    "10809",
                    EXPORT,
                    &n_noread.to_string(),
                    &reads.to_string(),
                    &len.to_string(),
                    &BIG.to_string(),
                    &secs,
                    &noread_src,
                ]),
            ],
            control: Control::Nbd,
        },
        Flood {
            key: "dhcp-request",
            what: format!(
                "{} blind INIT-REBOOT REQUESTs (option 50, no server id), random MACs",
                a.dhcp_macs
            ),
            procs: vec![s(&["dhcp-request", &a.dhcp_macs.to_string(), POOL.0, POOL.1])],
            control: Control::Dhcp,
        },
        Flood {
            key: "dhcp-discover",
            what: format!("{} DISCOVERs, random MACs", a.dhcp_macs),
            procs: vec![s(&["dhcp-discover", &a.dhcp_macs.to_string(), POOL.0, POOL.1])],
            control: Control::Dhcp,
        },
    ]
}
