//! vdd, the Virtual Distro Dispatcher: one server for diskless thin clients.
//!
//! `ls src` is the architecture: one folder per service (`dhcp`, `tftp`, `http`, `nbd`),
//! `boot` for the policy they share, `config` for the admin's file, `lan` for the bridge
//! and taps of X11 guests, `xdmcp` for asking their display managers whether they are up,
//! `telemetry` for what the admin sees of the seats (boot timelines, recent events) and
//! `metrics` for `/metrics`.
//!
//! Every service has the same shape: `Service::bind(config)` takes its sockets (so a port
//! in use stops `vdd serve` before anything is served) and `Service::run(shutdown)` serves
//! until the token is cancelled. The config is a `config::Live`: a reload (`reload.rs`)
//! swaps it, and each service takes the current one per request.

pub mod beneath;
pub mod boot;
pub mod config;
pub mod dhcp;
pub mod dispatch;
pub mod http;
pub mod lan;
pub mod metrics;
pub mod nbd;
pub mod ndp;
pub mod netif;
pub mod peers;
pub mod reload;
pub mod tapfilter;
pub mod telemetry;
pub mod tftp;
pub mod warnlimit;
pub mod xdmcp;
