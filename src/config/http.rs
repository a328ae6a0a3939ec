//! `[http]`: iPXE's scripts and files, the API and its admin token.

use std::path::PathBuf;

use serde::Deserialize;

use super::types::at_least_one;
use super::{invalid, ConfigError, Cx};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WireHttp {
    enabled: Option<bool>,
    port: Option<u16>,
    root: Option<String>,
    admin_token: Option<String>,
    sendfile: Option<bool>,
    max_per_address: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Http {
    pub enabled: bool,
    pub port: u16,
    /// Extra files served under /files/ (default: the TFTP root).
    pub root: PathBuf,
    /// `Authorization: Bearer` token of the admin API routes; `None` disables them.
    pub admin_token: Option<String>,
    /// Send file bodies with sendfile(2) (default); `false` copies through user space,
    /// for file systems that do not support sendfile.
    pub sendfile: bool,
    /// Connections one client address may hold at once.
    pub max_per_address: usize,
}

impl TryFrom<(WireHttp, &Cx<'_>)> for Http {
    type Error = ConfigError;

    fn try_from((w, cx): (WireHttp, &Cx<'_>)) -> Result<Http, ConfigError> {
        Ok(Http {
            enabled: w.enabled.unwrap_or(true),
            port: w.port.unwrap_or(80),
            root: w
                .root
                .as_deref()
                .map(|p| cx.resolve(p))
                .unwrap_or_else(|| cx.tftp_root.clone()),
            admin_token: match w.admin_token {
                Some(t) if t.len() < 16 || !t.chars().all(|c| c.is_ascii_graphic()) => {
                    return Err(invalid(
                        "http.admin_token",
                        "(hidden)",
                        "at least 16 printable characters without spaces; `openssl rand -hex 16` makes one",
                    ))
                }
                t => t,
            },
            sendfile: w.sendfile.unwrap_or(true),
            // iPXE opens one or two connections, a browser on the admin panel six.
            max_per_address: at_least_one(
                "http.max_per_address",
                w.max_per_address,
                16,
                "at least 1; the default 16 leaves room for iPXE and a browser",
            )?,
        })
    }
}
