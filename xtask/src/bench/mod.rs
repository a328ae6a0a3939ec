//! `cargo xtask bench <service>`: each service's benchmark against the established
//! servers, in one run on loopback or in lab namespaces.

pub mod nbd;
