//! DHCP codec: bytes to a checked request and replies back to bytes, on top of `dhcproto`.
//!
//! RFC 2131 section 2 (message format), RFC 2132 (options, magic cookie 99.130.83.99),
//! RFC 4578 (options 93, 94 for PXE), RFC 3004 (option 77 user class).
//!
//! `dhcproto` decodes leniently: it stops reading options at the first one it cannot
//! parse and keeps the rest silently, and `Message::chaddr` panics when `hlen` > 16. A
//! server must not act on half a packet, so [`decode`] first walks the raw bytes itself
//! (fixed header, cookie, every option's length) and refuses anything malformed before
//! `dhcproto` sees it.

use dhcproto::v4::{DhcpOption, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable};

use crate::boot::ClientFirmware;
use crate::config::Mac;

/// Fixed BOOTP header (236 bytes) plus the magic cookie.
pub const HEADER_LEN: usize = 240;
/// RFC 2131 section 3: the options field of a reply is padded so the message is at least
/// the 300 bytes of a BOOTP message; some PXE ROMs drop shorter ones.
pub const MIN_REPLY_LEN: usize = 300;
/// RFC 2132 section 2.
pub const MAGIC: [u8; 4] = [99, 130, 83, 99];

/// Why a packet was refused before any policy looked at it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// Shorter than the fixed header and cookie.
    #[error("packet of {0} bytes is shorter than the 240-byte DHCP header")]
    TooShort(usize),
    /// The four bytes after the header are not 99.130.83.99 (a plain BOOTP or garbage packet).
    #[error("bad magic cookie {0:?}")]
    BadCookie([u8; 4]),
    /// op is not BOOTREQUEST; servers only answer requests.
    #[error("op {0} is not BOOTREQUEST")]
    NotRequest(u8),
    /// Only Ethernet (htype 1, hlen 6) clients are served.
    #[error("hardware type {htype} / length {hlen} is not Ethernet")]
    NotEthernet { htype: u8, hlen: u8 },
    /// An option's length runs past the end of the packet.
    #[error("option {code} of length {len} runs past the end of the packet")]
    OptionOverrun { code: u8, len: usize },
    /// An option we act on has the wrong length.
    #[error("option {code} has length {len}, which its definition forbids")]
    OptionLength { code: u8, len: usize },
    /// No option 53, or one with an unknown value.
    #[error("no valid DHCP message type (option 53)")]
    NoMessageType,
    /// `dhcproto` refused what the walk accepted.
    #[error("undecodable: {0}")]
    Codec(String),
}

/// A request that passed every check.
#[derive(Clone, Debug)]
pub struct Packet {
    pub msg: Message,
    /// chaddr, checked to be 6 bytes of Ethernet.
    pub mac: Mac,
    pub kind: MessageType,
    /// What options 93, 77 and 175 say about the boot firmware.
    pub fw: ClientFirmware,
    /// Option 60 starts with "PXEClient": a PXE ROM (or iPXE) that wants boot information.
    pub pxe: bool,
    /// Option 82 as a relay agent added it (RFC 3046): echoed verbatim in every reply.
    pub relay_info: Option<Vec<u8>>,
}

/// Decodes and checks one request.
pub fn decode(bytes: &[u8]) -> Result<Packet, DecodeError> {
    if bytes.len() < HEADER_LEN {
        return Err(DecodeError::TooShort(bytes.len()));
    }
    if bytes[0] != 1 {
        return Err(DecodeError::NotRequest(bytes[0]));
    }
    let (htype, hlen) = (bytes[1], bytes[2]);
    if htype != 1 || hlen != 6 {
        return Err(DecodeError::NotEthernet { htype, hlen });
    }
    let cookie: [u8; 4] = bytes[236..240].try_into().expect("length checked");
    if cookie != MAGIC {
        return Err(DecodeError::BadCookie(cookie));
    }
    let mut clean = bytes[..HEADER_LEN].to_vec();
    let (opts, relay_info) = walk_options(&bytes[HEADER_LEN..])?;
    clean.extend(opts);
    let msg = Message::decode(&mut Decoder::new(&clean))
        .map_err(|e| DecodeError::Codec(e.to_string()))?;
    if msg.opcode() != Opcode::BootRequest {
        return Err(DecodeError::NotRequest(bytes[0]));
    }
    let kind = match msg.opts().msg_type() {
        Some(MessageType::Unknown(_)) | None => return Err(DecodeError::NoMessageType),
        Some(k) => k,
    };
    let mac = Mac(bytes[28..34].try_into().expect("length checked"));
    let opts = msg.opts();
    let arch = match opts.get(OptionCode::ClientSystemArchitecture) {
        Some(DhcpOption::ClientSystemArchitecture(a)) => Some(u16::from(*a)),
        _ => None,
    };
    let class = match opts.get(OptionCode::ClassIdentifier) {
        Some(DhcpOption::ClassIdentifier(c)) => c.as_slice(),
        _ => &[],
    };
    let pxe = class.starts_with(b"PXEClient");
    let ipxe = opts.get(OptionCode::Unknown(175)).is_some()
        || match opts.get(OptionCode::UserClass) {
            Some(DhcpOption::UserClass(u)) => user_class_is_ipxe(u),
            _ => false,
        };
    Ok(Packet {
        msg,
        mac,
        kind,
        fw: ClientFirmware { arch, ipxe },
        pxe,
        relay_info,
    })
}

/// RFC 3004 wants option 77 as length-prefixed class strings, but iPXE sends the bare
/// string "iPXE" (as ISC dhcpd and dnsmasq both accept); take either form.
fn user_class_is_ipxe(u: &[u8]) -> bool {
    if u == b"iPXE" {
        return true;
    }
    let mut rest = u;
    while let Some((&len, tail)) = rest.split_first() {
        let len = len as usize;
        if len == 0 || len > tail.len() {
            return false;
        }
        if &tail[..len] == b"iPXE" {
            return true;
        }
        rest = &tail[len..];
    }
    false
}

/// Checks that every option fits in the packet and that the options we act on have the
/// lengths RFC 2132 / 4578 give them, and returns the options to hand to `dhcproto`:
/// only those we act on. `dhcproto` 0.12 trusts option lengths (debug assertions, an
/// `unwrap` on option 121's prefix, fixed-size reads that desynchronise the rest), and
/// the fuzz test below found those; options we never read are simply not given to it.
/// Option 82 comes back separately: it is only ever echoed, never interpreted.
type Walked = (Vec<u8>, Option<Vec<u8>>);

fn walk_options(mut b: &[u8]) -> Result<Walked, DecodeError> {
    let mut keep = Vec::with_capacity(b.len());
    let mut relay_info = None;
    while let Some((&code, rest)) = b.split_first() {
        match code {
            0 => {
                b = rest;
                continue;
            }
            255 => break,
            _ => {}
        }
        let Some((&len, rest)) = rest.split_first() else {
            return Err(DecodeError::OptionOverrun { code, len: 0 });
        };
        let len = len as usize;
        if len > rest.len() {
            return Err(DecodeError::OptionOverrun { code, len });
        }
        let data = &rest[..len];
        b = &rest[len..];
        let ok = match code {
            53 => len == 1,
            50 | 54 => len == 4,
            57 => len == 2,
            // A list of architectures (RFC 4578 2.1); we boot by the first.
            93 => len >= 2 && len % 2 == 0,
            60 | 61 | 77 | 55 | 175 => len >= 1,
            82 => {
                relay_info = Some(data.to_vec());
                continue;
            }
            _ => continue, // not ours to read: not passed on
        };
        if !ok {
            return Err(DecodeError::OptionLength { code, len });
        }
        let data = if code == 93 { &data[..2] } else { data };
        keep.push(code);
        keep.push(data.len() as u8);
        keep.extend_from_slice(data);
    }
    // RFC 2131 says options end with 255; many clients pad instead, so running out is fine.
    keep.push(255);
    Ok((keep, relay_info))
}

/// Encodes a reply, padded to [`MIN_REPLY_LEN`].
pub fn encode(msg: &Message) -> Vec<u8> {
    encode_with_relay_info(msg, None)
}

/// Encodes a reply with the request's option 82 echoed last, before End (RFC 3046 2.2:
/// the relay agent strips it again before the reply goes to the client).
pub fn encode_with_relay_info(msg: &Message, relay_info: Option<&[u8]>) -> Vec<u8> {
    // Encoding into a Vec fails only on lengths dhcproto cannot express, and replies are
    // built by us from bounded pieces (see policy), so a failure means a dropped reply.
    let mut v = msg.to_vec().unwrap_or_default();
    if let Some(info) = relay_info.filter(|i| i.len() <= 255) {
        if v.last() == Some(&255) {
            v.pop();
            v.push(82);
            v.push(info.len() as u8);
            v.extend_from_slice(info);
            v.push(255);
        }
    }
    if !v.is_empty() && v.len() < MIN_REPLY_LEN {
        v.resize(MIN_REPLY_LEN, 0);
    }
    v
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    /// A DISCOVER built byte by byte from RFC 2131 figure 1, with `opts` after the cookie.
    pub fn raw(op53: u8, mac: [u8; 6], opts: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 236];
        b[0] = 1; // BOOTREQUEST
        b[1] = 1; // Ethernet
        b[2] = 6;
        b[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        b[28..34].copy_from_slice(&mac);
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&[53, 1, op53]);
        b.extend_from_slice(opts);
        b.push(255);
        b
    }

    #[test]
    fn udhcpc_capture_decodes() {
        let b = include_bytes!("../../tests/data/udhcpc-discover.bin");
        let p = decode(b).expect("a real udhcpc DISCOVER decodes");
        assert_eq!(p.kind, MessageType::Discover);
        assert!(!p.pxe);
        assert_eq!(p.fw, ClientFirmware::default());
    }

    #[test]
    fn ipxe_discover_decodes() {
        // iPXE 1.21 DISCOVER as its source (src/net/udp/dhcp.c) builds it: option 60
        // "PXEClient:Arch:00000:UNDI:002001", 93 = 0, 77 = "iPXE", 175 = encapsulated
        // iPXE features.
        let b = include_bytes!("../../tests/data/ipxe-discover.bin");
        let p = decode(b).expect("iPXE DISCOVER decodes");
        assert_eq!(p.kind, MessageType::Discover);
        assert!(p.pxe);
        assert_eq!(
            p.fw,
            ClientFirmware {
                arch: Some(0),
                ipxe: true
            }
        );
        assert_eq!(p.mac.to_string(), "52:54:00:12:34:56");
    }

    #[test]
    fn pxe_options_are_read() {
        let mut o = vec![93, 2, 0, 7, 60, 9];
        o.extend_from_slice(b"PXEClient");
        let p = decode(&raw(1, [2, 0, 0, 0, 0, 1], &o)).unwrap();
        assert!(p.pxe);
        assert_eq!(p.fw.arch, Some(7));
        assert!(!p.fw.ipxe);
        // RFC 3004 form of the user class.
        let p = decode(&raw(1, [2; 6], &[77, 5, 4, b'i', b'P', b'X', b'E'])).unwrap();
        assert!(p.fw.ipxe);
        let p = decode(&raw(1, [2; 6], &[175, 3, 1, 1, 1])).unwrap();
        assert!(p.fw.ipxe);
    }

    #[test]
    fn malformed_is_refused() {
        let good = raw(1, [2; 6], &[]);
        assert!(decode(&good).is_ok());
        assert_eq!(
            decode(&good[..100]).unwrap_err(),
            DecodeError::TooShort(100)
        );
        let mut bad = good.clone();
        bad[236] = 0;
        assert!(matches!(decode(&bad), Err(DecodeError::BadCookie(_))));
        let mut bad = good.clone();
        bad[0] = 2;
        assert_eq!(decode(&bad).unwrap_err(), DecodeError::NotRequest(2));
        let mut bad = good.clone();
        bad[2] = 200;
        assert!(matches!(decode(&bad), Err(DecodeError::NotEthernet { .. })));
        // Option 12 claims 40 bytes, the packet ends after 3.
        let mut bad = good.clone();
        bad.pop();
        bad.extend_from_slice(&[12, 40, b'a', b'b', b'c']);
        assert_eq!(
            decode(&bad).unwrap_err(),
            DecodeError::OptionOverrun { code: 12, len: 40 }
        );
        // A length byte missing entirely.
        let mut bad = good.clone();
        bad.pop();
        bad.push(12);
        assert!(matches!(
            decode(&bad),
            Err(DecodeError::OptionOverrun { .. })
        ));
        assert!(matches!(
            decode(&raw(1, [2; 6], &[50, 3, 1, 2, 3])),
            Err(DecodeError::OptionLength { code: 50, len: 3 })
        ));
        assert_eq!(
            decode(&raw(0, [2; 6], &[])).unwrap_err(),
            DecodeError::NoMessageType
        );
        let mut no53 = good[..240].to_vec();
        no53.push(255);
        assert_eq!(decode(&no53).unwrap_err(), DecodeError::NoMessageType);
    }

    #[test]
    fn random_bytes_never_panic() {
        // A small xorshift so the test needs no rand crate and is reproducible.
        let mut s: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let base = raw(3, [2; 6], &[50, 4, 10, 77, 0, 100, 93, 2, 0, 0]);
        for i in 0..20_000 {
            let mut b = if i % 2 == 0 {
                base.clone()
            } else {
                vec![0u8; (next() % 600) as usize]
            };
            let flips = (next() % 16) as usize;
            for _ in 0..flips.min(b.len()) {
                let at = (next() as usize) % b.len().max(1);
                if !b.is_empty() {
                    b[at] = next() as u8;
                }
            }
            if i % 2 == 1 {
                for x in b.iter_mut() {
                    *x = next() as u8;
                }
            }
            let _ = decode(&b);
        }
    }

    #[test]
    fn relay_agent_information_is_echoed() {
        // Circuit id "eth1" (sub-option 1), as a relay agent adds it.
        let info = [1, 4, b'e', b't', b'h', b'1'];
        let mut o = vec![82, info.len() as u8];
        o.extend_from_slice(&info);
        let p = decode(&raw(1, [2; 6], &o)).unwrap();
        assert_eq!(p.relay_info.as_deref(), Some(&info[..]));
        let mut m = Message::default();
        m.set_opcode(Opcode::BootReply);
        m.set_chaddr(&[2; 6]);
        m.opts_mut()
            .insert(DhcpOption::MessageType(MessageType::Offer));
        let v = encode_with_relay_info(&m, p.relay_info.as_deref());
        let at = v
            .windows(2)
            .position(|w| w == [82, 6])
            .expect("option 82 in reply");
        assert_eq!(&v[at + 2..at + 8], &info);
        assert_eq!(v[at + 8], 255, "option 82 comes last, before End");
        assert!(decode(&raw(1, [2; 6], &[])).unwrap().relay_info.is_none());
    }

    #[test]
    fn replies_are_padded() {
        let mut m = Message::default();
        m.set_opcode(Opcode::BootReply);
        m.set_chaddr(&[2; 6]);
        m.set_yiaddr(Ipv4Addr::new(10, 77, 0, 100));
        m.opts_mut()
            .insert(DhcpOption::MessageType(MessageType::Offer));
        let v = encode(&m);
        assert_eq!(v.len(), MIN_REPLY_LEN);
        assert_eq!(&v[236..240], &MAGIC);
        assert_eq!(&v[16..20], &[10, 77, 0, 100]);
    }
}
