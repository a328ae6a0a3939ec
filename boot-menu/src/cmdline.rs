//! The kernel command line of the thin client: `vdd.server=ADDRESS:PORT`, `vdd.autopick=NAME`,
//! `vdd.seat=NAME`, and where the thin-client root comes from: `vdd.nbd=ADDRESS[:PORT]`,
//! `vdd.export=NAME`. Tokenised like the kernel's own `next_arg()` (lib/cmdline.c,
//! Documentation/admin-guide/kernel-parameters.rst): words split on spaces, double quotes
//! group spaces and are removed, and for a repeated key the last one wins.

use std::net::{IpAddr, SocketAddr};

/// Port of the vdd HTTP API when `vdd.server` names only an address.
pub const DEFAULT_PORT: u16 = 80;
/// The IANA port of NBD, and the default of vdd's `[nbd] port`.
pub const NBD_PORT: u16 = 10809;
/// The export of the thin-client root in vdd's example config.
pub const DEFAULT_EXPORT: &str = "thin-client";

/// What the server put on our kernel command line (through its iPXE script / PXE config).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BootArgs {
    /// Where the vdd HTTP API lives; `None` means "ask DHCP" (the server identifier).
    pub server: Option<SocketAddr>,
    /// Guest to pick without asking, once, at the first menu.
    pub autopick: Option<String>,
    /// Name of this seat, sent to the server with a session request.
    pub seat: Option<String>,
    /// NBD server of the thin-client root; `None`: the vdd server's address, port 10809.
    pub nbd: Option<SocketAddr>,
    /// NBD export name of the thin-client root; `None`: [`DEFAULT_EXPORT`].
    pub export: Option<String>,
    /// Things we ignored and why; PID 1 prints them, a typo must not stop a boot.
    pub warnings: Vec<String>,
}

/// Splits a command line into words the way the kernel does: a double quote toggles
/// "inside quotes" and is dropped, so both `a="b c"` and `"a=b c"` give `a=b c`.
pub fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for ch in line.chars() {
        match ch {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

/// Parses `ADDRESS[:PORT]`, including `[v6]:port`.
pub fn parse_server(v: &str) -> Option<SocketAddr> {
    parse_addr(v, DEFAULT_PORT)
}

fn parse_addr(v: &str, port: u16) -> Option<SocketAddr> {
    if let Ok(sa) = v.parse::<SocketAddr>() {
        return Some(sa);
    }
    v.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, port))
}

/// Reads our keys out of a whole command line; unknown words belong to the kernel or other
/// programs and are skipped silently.
pub fn parse(line: &str) -> BootArgs {
    let mut args = BootArgs::default();
    for w in words(line) {
        let (key, val) = match w.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (w.as_str(), None),
        };
        if !matches!(
            key,
            "vdd.server" | "vdd.autopick" | "vdd.seat" | "vdd.nbd" | "vdd.export"
        ) {
            continue;
        }
        let Some(val) = val.filter(|v| !v.is_empty()) else {
            args.warnings.push(format!("{key} has no value, ignored"));
            continue;
        };
        match key {
            "vdd.server" => match parse_server(val) {
                Some(sa) => args.server = Some(sa),
                None => args
                    .warnings
                    .push(format!("vdd.server={val} is not ADDRESS:PORT, ignored")),
            },
            "vdd.nbd" => match parse_addr(val, NBD_PORT) {
                Some(sa) => args.nbd = Some(sa),
                None => args
                    .warnings
                    .push(format!("vdd.nbd={val} is not ADDRESS[:PORT], ignored")),
            },
            "vdd.export" => args.export = Some(val.to_string()),
            "vdd.autopick" => args.autopick = Some(val.to_string()),
            _ => args.seat = Some(val.to_string()),
        }
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_all_keys_among_kernel_words() {
        let a = parse("BOOT_IMAGE=/vmlinuz console=ttyS0 vdd.server=10.0.2.2:8080 quiet vdd.autopick=x vdd.seat=lab-3\n");
        assert_eq!(a.server, Some("10.0.2.2:8080".parse().unwrap()));
        assert_eq!(a.autopick.as_deref(), Some("x"));
        assert_eq!(a.seat.as_deref(), Some("lab-3"));
        assert!(a.warnings.is_empty());
    }

    #[test]
    fn quotes_group_spaces_and_are_removed() {
        assert_eq!(
            words(r#"a vdd.seat="room 12" "vdd.autopick=deb ian" b"#),
            ["a", "vdd.seat=room 12", "vdd.autopick=deb ian", "b"]
        );
        let a = parse(r#"vdd.seat="room 12" "vdd.autopick=deb ian""#);
        assert_eq!(a.seat.as_deref(), Some("room 12"));
        assert_eq!(a.autopick.as_deref(), Some("deb ian"));
        // An empty quoted value is still a word, and still an empty value.
        assert_eq!(words(r#"x="""#), ["x="]);
    }

    #[test]
    fn last_repeated_key_wins() {
        let a = parse("vdd.server=10.0.0.1:1 vdd.server=10.0.0.2:2 vdd.autopick=a vdd.autopick=b");
        assert_eq!(a.server, Some("10.0.0.2:2".parse().unwrap()));
        assert_eq!(a.autopick.as_deref(), Some("b"));
    }

    #[test]
    fn missing_or_bad_values_warn_and_keep_earlier() {
        let a =
            parse("vdd.server=10.0.0.1:81 vdd.server vdd.server= vdd.server=nope:80 vdd.autopick=");
        assert_eq!(a.server, Some("10.0.0.1:81".parse().unwrap()));
        assert_eq!(a.autopick, None);
        assert_eq!(a.warnings.len(), 4, "{:?}", a.warnings);
    }

    #[test]
    fn server_port_is_optional_and_v6_works() {
        assert_eq!(
            parse_server("10.1.2.3"),
            Some("10.1.2.3:80".parse().unwrap())
        );
        assert_eq!(
            parse_server("[fe80::1]:8080"),
            Some("[fe80::1]:8080".parse().unwrap())
        );
        assert_eq!(parse_server("10.1.2.3:99999"), None);
        assert_eq!(parse(""), BootArgs::default());
    }

    #[test]
    fn nbd_root_keys() {
        let a = parse("vdd.nbd=10.0.2.2 vdd.export=root-v2");
        assert_eq!(a.nbd, Some("10.0.2.2:10809".parse().unwrap()));
        assert_eq!(a.export.as_deref(), Some("root-v2"));
        let a = parse("vdd.nbd=10.0.2.2:4000 vdd.nbd=bad");
        assert_eq!(a.nbd, Some("10.0.2.2:4000".parse().unwrap()));
        assert_eq!(a.warnings.len(), 1);
    }

    #[test]
    fn similar_keys_are_not_ours() {
        let a = parse("vdd.serverx=1.2.3.4:5 xvdd.seat=a vdd.seat.x=b");
        assert_eq!(a, BootArgs::default());
    }
}
