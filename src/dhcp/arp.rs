//! The ARP entry that lets a DHCP reply go to the one client it is for.
//!
//! RFC 2131 section 4.1: with giaddr and ciaddr zero and the broadcast bit clear, "the
//! server unicasts DHCPOFFER and DHCPACK messages to the client's hardware address and
//! 'yiaddr' address". The kernel cannot resolve an address that nobody answers ARP for
//! yet, so the entry is written first (SIOCSARP, arp(7)), as ISC dhcpd does. Broadcasting
//! instead reached every seat of a booting room with every other seat's answers: 300
//! seats at once flooded the bridge with 300 copies of each of about 700 replies, and
//! replies were lost (`cargo xtask bench storm --seats 300`).

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::RawFd;

use nix::libc;

use crate::config::Mac;

/// Writes (or replaces) the entry `ip` -> `mac` on `interface`, through the socket `fd`.
pub fn set(fd: RawFd, interface: &str, ip: Ipv4Addr, mac: &Mac) -> io::Result<()> {
    let name = interface.as_bytes();
    // SAFETY: arpreq is plain old data; all-zero is a valid value of it.
    let mut req: libc::arpreq = unsafe { std::mem::zeroed() };
    if name.len() >= req.arp_dev.len() {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16 bytes; arp_pa holds an AF_INET address
    // as sockaddr_in (arp(7)).
    unsafe {
        std::ptr::copy_nonoverlapping(
            (&sin as *const libc::sockaddr_in).cast::<u8>(),
            (&mut req.arp_pa as *mut libc::sockaddr).cast::<u8>(),
            std::mem::size_of::<libc::sockaddr_in>(),
        );
    }
    req.arp_ha.sa_family = libc::ARPHRD_ETHER;
    for (d, s) in req.arp_ha.sa_data.iter_mut().zip(mac.0) {
        *d = s as libc::c_char;
    }
    req.arp_flags = libc::ATF_COM;
    for (d, s) in req.arp_dev.iter_mut().zip(name) {
        *d = *s as libc::c_char;
    }
    // SAFETY: `req` is a valid arpreq that outlives the call.
    let r = unsafe { libc::ioctl(fd, libc::SIOCSARP, &req) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
