//! Shared pieces of `cargo xtask` that the integration tests use too.

pub mod lab;
