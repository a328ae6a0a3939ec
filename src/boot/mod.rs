//! Boot policy, in one place: which file a client's firmware gets. DHCP and HTTP ask it
//! and know nothing of each other.
//!
//! Client architectures are the IANA "Processor Architecture Types" of RFC 4578 section
//! 2.1 (DHCP option 93).

use std::net::Ipv4Addr;

use crate::config::Config;

/// What the DHCP server learned about a booting client.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientFirmware {
    /// Option 93, the first architecture listed. `None` when absent.
    pub arch: Option<u16>,
    /// Option 77 user class "iPXE", or option 175 present: the client already runs iPXE.
    pub ipxe: bool,
}

/// The boot answer for one client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BootFile {
    /// A file fetched over TFTP from next-server (option 66/67, siaddr/file).
    Tftp(String),
    /// A URL iPXE fetches itself.
    Url(String),
    /// An architecture we have nothing for: no boot information, and a log line.
    Unsupported(u16),
}

/// x86 BIOS (RFC 4578).
pub const ARCH_BIOS: u16 = 0;
/// EFI x86-64 (RFC 4578, and the IANA registry: 7 = EFI BC, 9 = EFI x86-64).
pub const ARCH_EFI_BC: u16 = 7;
pub const ARCH_EFI_X64: u16 = 9;

/// Picks the boot file: iPXE gets the HTTP script, BIOS the BIOS loader, UEFI x64 the EFI one.
pub fn boot_file(cfg: &Config, server: Ipv4Addr, fw: &ClientFirmware) -> BootFile {
    if fw.ipxe {
        return BootFile::Url(script_url(cfg, server));
    }
    match fw.arch.unwrap_or(ARCH_BIOS) {
        ARCH_BIOS => BootFile::Tftp(cfg.boot.bios.clone()),
        ARCH_EFI_BC | ARCH_EFI_X64 => BootFile::Tftp(cfg.boot.uefi.clone()),
        other => BootFile::Unsupported(other),
    }
}

/// The URL of the per-client iPXE script. iPXE substitutes `${net0/mac}` itself.
pub fn script_url(cfg: &Config, server: Ipv4Addr) -> String {
    let port = cfg.http.port;
    if port == 80 {
        format!("http://{server}/boot.ipxe?mac=${{net0/mac}}")
    } else {
        format!("http://{server}:{port}/boot.ipxe?mac=${{net0/mac}}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn cfg() -> Config {
        Config::parse(
            "[server]\ninterface=\"vdd0\"\naddress=\"10.77.0.1/24\"\n[dhcp]\npool=\"10.77.0.100-10.77.0.110\"\n",
            Path::new("/tmp/c.toml"),
        )
        .unwrap()
    }

    #[test]
    fn picks_by_arch() {
        let c = cfg();
        let s = Ipv4Addr::new(10, 77, 0, 1);
        let fw = |arch, ipxe| ClientFirmware { arch, ipxe };
        assert_eq!(
            boot_file(&c, s, &fw(None, false)),
            BootFile::Tftp("undionly.kpxe".into())
        );
        assert_eq!(
            boot_file(&c, s, &fw(Some(0), false)),
            BootFile::Tftp("undionly.kpxe".into())
        );
        assert_eq!(
            boot_file(&c, s, &fw(Some(7), false)),
            BootFile::Tftp("ipxe.efi".into())
        );
        assert_eq!(
            boot_file(&c, s, &fw(Some(9), false)),
            BootFile::Tftp("ipxe.efi".into())
        );
        assert_eq!(
            boot_file(&c, s, &fw(Some(6), false)),
            BootFile::Unsupported(6)
        );
        assert_eq!(
            boot_file(&c, s, &fw(Some(0), true)),
            BootFile::Url("http://10.77.0.1/boot.ipxe?mac=${net0/mac}".into())
        );
    }
}
