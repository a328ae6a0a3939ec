//! Shared pieces of `cargo xtask` that the integration tests use too.

pub mod bench;
pub mod lab;
