//! Who a seat is: the request's source address looked up in the server's neighbour
//! (ARP) table on the LAN interface.

use std::net::IpAddr;

use crate::config::Mac;

/// Maps a request's source address to the seat (MAC) it belongs to.
pub trait SeatLookup: Send + Sync {
    fn seat_of(&self, ip: IpAddr) -> Option<Mac>;
}

/// The server's neighbour table (`/proc/net/arp`) on the LAN interface: every thin client
/// that talks to us over the LAN is in it, in full and in proxy DHCP mode alike. A host
/// behind another interface of the server (an uplink, the guests' own bridge) is no seat,
/// whatever its MAC.
pub struct Neighbours {
    /// `server.interface`.
    pub interface: String,
}

impl SeatLookup for Neighbours {
    fn seat_of(&self, ip: IpAddr) -> Option<Mac> {
        let IpAddr::V4(v4) = ip else { return None };
        let table = std::fs::read_to_string("/proc/net/arp").ok()?;
        parse_arp(&table, v4, &self.interface)
    }
}

/// Finds `ip` on `device` in the text of /proc/net/arp: complete entries only (flag
/// ATF_COM, 0x2), permanent ones (ATF_PERM, 0x4: `ip neigh add ... nud permanent`, the
/// usual guard against ARP spoofing) included.
fn parse_arp(table: &str, ip: std::net::Ipv4Addr, device: &str) -> Option<Mac> {
    const ATF_COM: u32 = 0x2;
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let flags = f
            .get(2)
            .and_then(|x| u32::from_str_radix(x.trim_start_matches("0x"), 16).ok())
            .unwrap_or(0);
        if f.len() >= 6 && f[0].parse().ok() == Some(ip) && flags & ATF_COM != 0 && f[5] == device {
            f[3].parse().ok()
        } else {
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    #[test]
    fn arp_table() {
        let t = "IP address       HW type     Flags       HW address            Mask     Device\n\
                 10.77.0.50       0x1         0x2         52:54:00:e2:e0:01     *        br0\n\
                 10.77.0.51       0x1         0x0         00:00:00:00:00:00     *        br0\n\
                 10.77.0.53       0x1         0x6         52:54:00:e2:e0:03     *        br0\n\
                 10.1.0.9         0x1         0x2         52:54:00:e2:e0:09     *        eth1\n";
        let parse_arp = |t, ip| super::parse_arp(t, ip, "br0");
        assert_eq!(
            parse_arp(t, Ipv4Addr::new(10, 77, 0, 50)),
            Some("52:54:00:e2:e0:01".parse().unwrap())
        );
        assert_eq!(
            parse_arp(t, Ipv4Addr::new(10, 77, 0, 51)),
            None,
            "incomplete entry"
        );
        assert_eq!(parse_arp(t, Ipv4Addr::new(10, 77, 0, 52)), None);
        assert_eq!(
            parse_arp(t, Ipv4Addr::new(10, 77, 0, 53)),
            Some("52:54:00:e2:e0:03".parse().unwrap()),
            "a static (permanent) entry is a seat too"
        );
        assert_eq!(
            parse_arp(t, Ipv4Addr::new(10, 1, 0, 9)),
            None,
            "a neighbour on another interface is no seat"
        );
    }
}
