//! boot-menu: `/init` of the thin-client initramfs (PID 1). The thin-client issue fills it in:
//! mounts, NIC modules, DHCP, the menu of guests, the NBD root and the session.

fn main() {
    println!("vdd-boot-menu: not built yet (see the thin-client issue)");
}
