//! What the server (`vdd`) and its development tasks (`xtask`) both need of QEMU, kept once:
//! whether KVM really runs a guest here ([`accel`]) and a QMP client ([`qmp`]).

pub mod accel;
pub mod qmp;
