//! `cargo xtask bench <service>`: benchmarks of vdd against the real peers, on the lab
//! network, bounded in count and time.

pub mod dhcp;
