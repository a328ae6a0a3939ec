//! `[boot]`: what each kind of firmware boots, and what the iPXE script boots.

use std::path::PathBuf;

use serde::Deserialize;

use super::{invalid, ConfigError, Cx, DhcpMode};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WireBoot {
    root: Option<String>,
    bios: Option<String>,
    uefi: Option<String>,
    ipxe_dir: Option<String>,
    kernel: Option<String>,
    initrd: Option<String>,
    cmdline: Option<String>,
    ipv6_ra: Option<bool>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Boot {
    /// Boot file for legacy BIOS PXE ROMs (arch 0), served over TFTP.
    pub bios: String,
    /// Boot file for UEFI x64 PXE clients (arch 7, 9), served over TFTP.
    pub uefi: String,
    /// Where Debian's `ipxe` package keeps undionly.kpxe and ipxe.efi.
    pub ipxe_dir: PathBuf,
    /// What the iPXE script boots, served over HTTP.
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    /// The NBD export the thin clients mount as their root (an `[[nbd.export]]` name,
    /// checked against `[nbd]` by [`super::Config`]).
    pub root: Option<String>,
    /// Answer IPv6 router solicitations with an advertisement that offers nothing, so
    /// iPXE stops waiting for an IPv6 router (see src/ndp.rs).
    pub ipv6_ra: bool,
}

fn boot_file(key: &str, v: Option<String>, default: &str) -> Result<String, ConfigError> {
    let v = v.unwrap_or_else(|| default.to_string());
    if v.is_empty() || v.len() > 127 || v.contains('\0') {
        return Err(invalid(
            key,
            &v,
            "a file name in the TFTP root or the iPXE folder, such as \"undionly.kpxe\"",
        ));
    }
    Ok(v)
}

impl TryFrom<(WireBoot, &Cx<'_>)> for Boot {
    type Error = ConfigError;

    fn try_from((w, cx): (WireBoot, &Cx<'_>)) -> Result<Boot, ConfigError> {
        Ok(Boot {
            bios: boot_file("boot.bios", w.bios, "undionly.kpxe")?,
            uefi: boot_file("boot.uefi", w.uefi, "ipxe.efi")?,
            ipxe_dir: cx.resolve(w.ipxe_dir.as_deref().unwrap_or("/usr/lib/ipxe")),
            kernel: w.kernel.as_deref().map(|p| cx.resolve(p)),
            initrd: w.initrd.as_deref().map(|p| cx.resolve(p)),
            cmdline: w.cmdline.unwrap_or_default(),
            root: w.root,
            // Where vdd runs the LAN's DHCP it may speak for the LAN's IPv6 too; beside
            // another DHCP server there may be a real IPv6 router, so only when asked.
            ipv6_ra: w.ipv6_ra.unwrap_or(cx.dhcp_mode == DhcpMode::Full),
        })
    }
}
