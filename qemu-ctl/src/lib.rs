//! What the server (`vdd`) and its development tasks (`xtask`) both need of QEMU, kept once:
//! whether KVM really runs a guest here ([`accel`]), a QMP client ([`qmp`]), and the
//! decoder of its screendumps ([`ppm`]).

pub mod accel;
pub mod ppm;
pub mod qmp;
