//! boot-menu: `/init` of the thin-client initramfs (PID 1). The thin-client issue fills it in:
//! mounts, NIC modules, DHCP, the menu of guests, the NBD root and the session.

#[allow(dead_code)]
mod nbd;
#[allow(dead_code)]
mod root;

fn main() {
    println!("vdd-boot-menu: not built yet (see the thin-client issue)");
}
