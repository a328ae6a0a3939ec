//! Shared pieces of `cargo xtask` that the integration tests use too.

pub mod bench;
pub mod deps;
pub mod e2e;
pub mod e2e_guest_x11;
pub mod e2e_initramfs;
pub mod e2e_x11;
pub mod image;
pub mod initramfs;
pub mod lab;
pub mod qemu;
pub mod rfb;
