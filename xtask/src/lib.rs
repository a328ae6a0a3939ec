//! Shared pieces of `cargo xtask` that the integration tests use too.

pub mod e2e;
pub mod image;
pub mod lab;
pub mod qemu;
