//! What the subcommands do; the command line itself (`Cli`, `Cmd`) and the loading of
//! the config are in main.rs.

pub mod admin;
pub mod check;
pub mod serve;
