//! `[nbd]` and its `[[nbd.export]]` images.

use std::path::PathBuf;

use serde::Deserialize;

use super::types::at_least_one;
use super::{invalid, ConfigError, Cx};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WireNbd {
    enabled: Option<bool>,
    port: Option<u16>,
    max_connections: Option<usize>,
    max_per_address: Option<usize>,
    #[serde(default)]
    export: Vec<WireExport>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireExport {
    name: String,
    path: String,
    mode: Option<String>,
    persist: Option<bool>,
    description: Option<String>,
}

/// How an NBD export treats writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportMode {
    /// The file is served read-only.
    ReadOnly,
    /// Writes go to a per-client sparse overlay in the state directory; the base is never written.
    Overlay,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Export {
    pub name: String,
    pub path: PathBuf,
    pub mode: ExportMode,
    pub persist: bool,
    pub description: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nbd {
    pub enabled: bool,
    pub port: u16,
    pub max_connections: usize,
    /// Connections one client address may hold at once.
    pub max_per_address: usize,
    pub exports: Vec<Export>,
}

impl TryFrom<(WireNbd, &Cx<'_>)> for Nbd {
    type Error = ConfigError;

    fn try_from((w, cx): (WireNbd, &Cx<'_>)) -> Result<Nbd, ConfigError> {
        let mut exports: Vec<Export> = Vec::new();
        for (i, e) in w.export.iter().enumerate() {
            let key = |k: &str| format!("nbd.export[{i}].{k}");
            if e.name.is_empty()
                || e.name.len() > 64
                || !e
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-/".contains(c))
            {
                return Err(invalid(
                    key("name"),
                    &e.name,
                    "letters, digits, '.', '_', '-' and '/', at most 64, such as \"thin-client\"",
                ));
            }
            if exports.iter().any(|x| x.name == e.name) {
                return Err(invalid(
                    key("name"),
                    &e.name,
                    "another export has this name; names must be unique",
                ));
            }
            let mode = match e.mode.as_deref().unwrap_or("readonly") {
                "readonly" => ExportMode::ReadOnly,
                "overlay" => ExportMode::Overlay,
                other => return Err(invalid(key("mode"), other, "\"readonly\" or \"overlay\"")),
            };
            if e.persist.is_some() && mode != ExportMode::Overlay {
                return Err(invalid(
                    key("persist"),
                    e.persist.unwrap_or_default(),
                    "persist only applies to mode = \"overlay\"",
                ));
            }
            exports.push(Export {
                name: e.name.clone(),
                path: cx.resolve(&e.path),
                mode,
                persist: e.persist.unwrap_or(false),
                description: e.description.clone().unwrap_or_default(),
            });
        }
        Ok(Nbd {
            enabled: w.enabled.unwrap_or(!exports.is_empty()),
            port: w.port.unwrap_or(10809),
            max_connections: at_least_one(
                "nbd.max_connections",
                w.max_connections,
                512,
                "at least 1; the default 512 suits a classroom",
            )?,
            // A thin client's kernel client opens one connection, nbdcopy up to four.
            max_per_address: at_least_one(
                "nbd.max_per_address",
                w.max_per_address,
                4,
                "at least 1; the default 4 suits a thin client (1) and nbdcopy (4)",
            )?,
            exports,
        })
    }
}
