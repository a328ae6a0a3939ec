//! `cargo xtask bench <service>`: vdd against the usual peers on the same machine, in one
//! run, inside a lab namespace. Each benchmark prints medians and the ratios to its peers.

use anyhow::Result;
use clap::Subcommand;

pub mod tftp;

#[derive(Subcommand)]
pub enum Bench {
    /// TFTP: vdd vs dnsmasq, tftpd-hpa and atftpd; 1 and N clients, lockstep and windowsize.
    Tftp(tftp::Args),
}

pub fn run(b: Bench) -> Result<()> {
    match b {
        Bench::Tftp(a) => tftp::run(a),
    }
}
