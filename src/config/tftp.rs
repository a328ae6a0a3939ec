//! `[tftp]`: the read-only TFTP server of the PXE ROMs.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::types::at_least_one;
use super::{resolve, ConfigError, Cx};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WireTftp {
    enabled: Option<bool>,
    port: Option<u16>,
    root: Option<String>,
    max_transfers: Option<usize>,
    max_per_address: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tftp {
    pub enabled: bool,
    pub port: u16,
    pub root: PathBuf,
    pub max_transfers: usize,
    /// Transfers one client address may run at once.
    pub max_per_address: usize,
}

impl WireTftp {
    /// `tftp.root`, by default `STATE_DIR/tftp`; HTTP's `/files/` default too.
    pub(super) fn root(&self, base: &Path, state_dir: &Path) -> PathBuf {
        self.root
            .as_deref()
            .map(|p| resolve(base, p))
            .unwrap_or_else(|| state_dir.join("tftp"))
    }
}

impl TryFrom<(WireTftp, &Cx<'_>)> for Tftp {
    type Error = ConfigError;

    fn try_from((w, cx): (WireTftp, &Cx<'_>)) -> Result<Tftp, ConfigError> {
        Ok(Tftp {
            enabled: w.enabled.unwrap_or(true),
            port: w.port.unwrap_or(69),
            root: cx.tftp_root.clone(),
            max_transfers: at_least_one(
                "tftp.max_transfers",
                w.max_transfers,
                256,
                "at least 1; the default 256 suits a classroom",
            )?,
            // A PXE ROM runs one transfer at a time (its tsize probe ends before the file
            // starts), a UEFI loader at most two.
            max_per_address: at_least_one(
                "tftp.max_per_address",
                w.max_per_address,
                4,
                "at least 1; the default 4 leaves room for any PXE or UEFI client",
            )?,
        })
    }
}
