//! boot-menu as a library: the pure parts of the thin client's PID 1 (command line, module
//! index, DHCP client, netlink messages, guest list, menu), kept apart from `main.rs` so
//! they are unit-tested on the build host.

pub mod cmdline;
pub mod dhcp;
pub mod guests;
pub mod menu;
pub mod modules;
pub mod nbd;
pub mod net;
pub mod report;
pub mod screen;
pub mod session;
pub mod sessions;
