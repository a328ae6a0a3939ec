//! TFTP packets <-> bytes: RRQ/WRQ with options, DATA, ACK, ERROR, OACK.
//!
//! RFC 1350 section 5 (packet formats), RFC 2347 (option extension, OACK opcode 6).
//! Pure: no sockets, no clock. Parsing borrows from the datagram; encoding writes into a
//! caller's buffer so the driver can reuse one buffer per transfer.

use std::fmt;

/// Opcodes of RFC 1350 section 5 and RFC 2347.
pub const OP_RRQ: u16 = 1;
pub const OP_WRQ: u16 = 2;
pub const OP_DATA: u16 = 3;
pub const OP_ACK: u16 = 4;
pub const OP_ERROR: u16 = 5;
pub const OP_OACK: u16 = 6;

/// Error codes of RFC 1350 appendix and RFC 2347 (8).
pub const ERR_UNDEFINED: u16 = 0;
pub const ERR_NOT_FOUND: u16 = 1;
pub const ERR_ACCESS: u16 = 2;
pub const ERR_ILLEGAL_OP: u16 = 4;
pub const ERR_UNKNOWN_TID: u16 = 5;
pub const ERR_OPTIONS: u16 = 8;

/// Why a datagram is not a TFTP packet we understand.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// Fewer bytes than the packet's fixed part.
    #[error("packet too short ({0} bytes)")]
    Short(usize),
    /// Opcode outside 1..=6.
    #[error("unknown opcode {0}")]
    Opcode(u16),
    /// A request field (file name, mode, option) lacks its terminating NUL.
    #[error("request field not NUL-terminated")]
    Unterminated,
    /// An option name without its value.
    #[error("option {0:?} has no value")]
    OptionWithoutValue(String),
    /// Mode, option name or option value that is not ASCII text.
    #[error("request field is not ASCII")]
    NotAscii,
}

/// Transfer mode of a request (RFC 1350 section 1). "mail" is obsolete and refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Octet,
    Netascii,
    /// Any other mode string, kept so the refusal can name it.
    Other,
}

/// A read or write request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<'a> {
    /// The file name as sent: raw bytes, checked later by `paths`.
    pub filename: &'a [u8],
    pub mode: Mode,
    /// The mode string as sent, for log lines.
    pub mode_text: String,
    /// RFC 2347 options in the order sent; names lower-cased (they are case-insensitive).
    pub options: Vec<(String, String)>,
}

/// One parsed TFTP packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet<'a> {
    Rrq(Request<'a>),
    Wrq(Request<'a>),
    Data { block: u16, data: &'a [u8] },
    Ack(u16),
    Error { code: u16, message: String },
    Oack(Vec<(String, String)>),
}

impl fmt::Display for Packet<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Packet::Rrq(r) => write!(f, "RRQ {}", printable(r.filename)),
            Packet::Wrq(r) => write!(f, "WRQ {}", printable(r.filename)),
            Packet::Data { block, data } => write!(f, "DATA {block} ({} bytes)", data.len()),
            Packet::Ack(b) => write!(f, "ACK {b}"),
            Packet::Error { code, message } => write!(f, "ERROR {code} {message:?}"),
            Packet::Oack(o) => write!(f, "OACK {o:?}"),
        }
    }
}

/// A file name from the network, safe for a log line: control characters and quotes
/// escaped, so a name cannot forge log lines or terminal sequences.
pub fn printable(name: &[u8]) -> String {
    String::from_utf8_lossy(name).escape_debug().to_string()
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

/// Splits off one NUL-terminated field.
fn field(b: &[u8]) -> Result<(&[u8], &[u8]), CodecError> {
    let n = b
        .iter()
        .position(|&c| c == 0)
        .ok_or(CodecError::Unterminated)?;
    Ok((&b[..n], &b[n + 1..]))
}

fn ascii(b: &[u8]) -> Result<String, CodecError> {
    if b.is_ascii() {
        Ok(String::from_utf8_lossy(b).into_owned())
    } else {
        Err(CodecError::NotAscii)
    }
}

fn parse_options(mut rest: &[u8]) -> Result<Vec<(String, String)>, CodecError> {
    let mut out = Vec::new();
    while !rest.is_empty() {
        let (name, r) = field(rest)?;
        let name = ascii(name)?.to_ascii_lowercase();
        if r.is_empty() {
            return Err(CodecError::OptionWithoutValue(name));
        }
        let (value, r) = field(r)?;
        out.push((name, ascii(value)?));
        rest = r;
    }
    Ok(out)
}

fn parse_request(b: &[u8]) -> Result<Request<'_>, CodecError> {
    let (filename, rest) = field(b)?;
    let (mode, rest) = field(rest)?;
    let mode_text = ascii(mode)?;
    let mode = match mode_text.to_ascii_lowercase().as_str() {
        "octet" => Mode::Octet,
        "netascii" => Mode::Netascii,
        _ => Mode::Other,
    };
    // Some old PXE ROMs pad requests with extra NULs after the last option; RFC 2347 gives
    // no meaning to them, so trailing NULs are dropped rather than refused.
    let end = rest.iter().rposition(|&c| c != 0).map_or(0, |i| i + 1);
    let rest = if end == 0 {
        &rest[..0]
    } else {
        &rest[..(end + 1).min(rest.len())]
    };
    Ok(Request {
        filename,
        mode,
        mode_text,
        options: parse_options(rest)?,
    })
}

impl<'a> Packet<'a> {
    /// Parses one datagram.
    pub fn parse(b: &'a [u8]) -> Result<Packet<'a>, CodecError> {
        if b.len() < 2 {
            return Err(CodecError::Short(b.len()));
        }
        let op = be16(b);
        let body = &b[2..];
        match op {
            OP_RRQ => Ok(Packet::Rrq(parse_request(body)?)),
            OP_WRQ => Ok(Packet::Wrq(parse_request(body)?)),
            OP_DATA | OP_ACK if body.len() < 2 => Err(CodecError::Short(b.len())),
            OP_DATA => Ok(Packet::Data {
                block: be16(body),
                data: &body[2..],
            }),
            OP_ACK => Ok(Packet::Ack(be16(body))),
            OP_ERROR => {
                if body.len() < 2 {
                    return Err(CodecError::Short(b.len()));
                }
                // Clients often omit the message's NUL; accept what is there.
                let msg = &body[2..];
                let msg = match msg.iter().position(|&c| c == 0) {
                    Some(n) => &msg[..n],
                    None => msg,
                };
                Ok(Packet::Error {
                    code: be16(body),
                    message: String::from_utf8_lossy(msg).into_owned(),
                })
            }
            OP_OACK => Ok(Packet::Oack(parse_options(body)?)),
            other => Err(CodecError::Opcode(other)),
        }
    }
}

/// Writes the 4-byte DATA header; the caller puts the payload after it.
pub fn data_header(buf: &mut [u8], block: u16) {
    buf[0..2].copy_from_slice(&OP_DATA.to_be_bytes());
    buf[2..4].copy_from_slice(&block.to_be_bytes());
}

/// Encodes an ERROR packet.
pub fn encode_error(out: &mut Vec<u8>, code: u16, message: &str) {
    out.clear();
    out.extend_from_slice(&OP_ERROR.to_be_bytes());
    out.extend_from_slice(&code.to_be_bytes());
    // NUL would end the message early on the wire; the messages are ours, but be safe.
    out.extend(message.bytes().filter(|&c| c != 0));
    out.push(0);
}

/// Encodes an OACK packet (RFC 2347).
pub fn encode_oack(out: &mut Vec<u8>, options: &[(String, String)]) {
    out.clear();
    out.extend_from_slice(&OP_OACK.to_be_bytes());
    for (k, v) in options {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
}

/// Encodes an ACK (used by tests and clients).
pub fn encode_ack(out: &mut Vec<u8>, block: u16) {
    out.clear();
    out.extend_from_slice(&OP_ACK.to_be_bytes());
    out.extend_from_slice(&block.to_be_bytes());
}

/// Encodes an RRQ or WRQ (used by tests and clients).
pub fn encode_request(
    out: &mut Vec<u8>,
    op: u16,
    filename: &[u8],
    mode: &str,
    options: &[(&str, &str)],
) {
    out.clear();
    out.extend_from_slice(&op.to_be_bytes());
    out.extend_from_slice(filename);
    out.push(0);
    out.extend_from_slice(mode.as_bytes());
    out.push(0);
    for (k, v) in options {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rrq_plain() {
        let b = b"\x00\x01undionly.kpxe\x00octet\x00";
        let Packet::Rrq(r) = Packet::parse(b).unwrap() else {
            panic!()
        };
        assert_eq!(r.filename, b"undionly.kpxe");
        assert_eq!(r.mode, Mode::Octet);
        assert!(r.options.is_empty());
    }

    #[test]
    fn rrq_with_options_like_ipxe() {
        // As sent by iPXE: blksize then tsize, mode in lower case.
        let b = b"\x00\x01ipxe.efi\x00octet\x00blksize\x001432\x00tsize\x000\x00";
        let Packet::Rrq(r) = Packet::parse(b).unwrap() else {
            panic!()
        };
        assert_eq!(
            r.options,
            vec![
                ("blksize".to_string(), "1432".to_string()),
                ("tsize".to_string(), "0".to_string())
            ]
        );
    }

    #[test]
    fn mode_and_option_names_are_case_insensitive() {
        let b = b"\x00\x01f\x00NetASCII\x00BlkSize\x00512\x00";
        let Packet::Rrq(r) = Packet::parse(b).unwrap() else {
            panic!()
        };
        assert_eq!(r.mode, Mode::Netascii);
        assert_eq!(r.options[0].0, "blksize");
        let b = b"\x00\x01f\x00mail\x00";
        let Packet::Rrq(r) = Packet::parse(b).unwrap() else {
            panic!()
        };
        assert_eq!(r.mode, Mode::Other);
        assert_eq!(r.mode_text, "mail");
    }

    #[test]
    fn trailing_padding_nuls_are_tolerated() {
        let b = b"\x00\x01f\x00octet\x00tsize\x000\x00\x00\x00\x00";
        let Packet::Rrq(r) = Packet::parse(b).unwrap() else {
            panic!()
        };
        assert_eq!(r.options, vec![("tsize".into(), "0".into())]);
        let b = b"\x00\x01f\x00octet\x00\x00";
        let Packet::Rrq(r) = Packet::parse(b).unwrap() else {
            panic!()
        };
        assert!(r.options.is_empty());
    }

    #[test]
    fn names_are_escaped_for_logs() {
        assert_eq!(printable(b"a\nb\x1b[2J"), "a\\nb\\u{1b}[2J");
    }

    #[test]
    fn wrq_parses() {
        let b = b"\x00\x02up.bin\x00octet\x00";
        assert!(matches!(Packet::parse(b).unwrap(), Packet::Wrq(_)));
    }

    #[test]
    fn malformed_requests_are_errors() {
        assert_eq!(Packet::parse(b""), Err(CodecError::Short(0)));
        assert_eq!(Packet::parse(b"\x00"), Err(CodecError::Short(1)));
        assert_eq!(Packet::parse(b"\x00\x09"), Err(CodecError::Opcode(9)));
        assert_eq!(Packet::parse(b"\x00\x00"), Err(CodecError::Opcode(0)));
        assert_eq!(
            Packet::parse(b"\x00\x01file"),
            Err(CodecError::Unterminated)
        );
        assert_eq!(
            Packet::parse(b"\x00\x01file\x00octet"),
            Err(CodecError::Unterminated)
        );
        assert_eq!(
            Packet::parse(b"\x00\x01f\x00octet\x00blksize\x00"),
            Err(CodecError::OptionWithoutValue("blksize".into()))
        );
        assert_eq!(
            Packet::parse(b"\x00\x01f\x00oct\xffet\x00"),
            Err(CodecError::NotAscii)
        );
        assert_eq!(Packet::parse(b"\x00\x04\x00"), Err(CodecError::Short(3)));
        assert_eq!(Packet::parse(b"\x00\x03"), Err(CodecError::Short(2)));
        assert_eq!(Packet::parse(b"\x00\x05\x00"), Err(CodecError::Short(3)));
    }

    #[test]
    fn data_ack_error() {
        assert_eq!(
            Packet::parse(b"\x00\x03\xff\xfeabc").unwrap(),
            Packet::Data {
                block: 65534,
                data: b"abc"
            }
        );
        assert_eq!(
            Packet::parse(b"\x00\x04\x01\x00").unwrap(),
            Packet::Ack(256)
        );
        assert_eq!(
            Packet::parse(b"\x00\x05\x00\x08tsize refused\x00").unwrap(),
            Packet::Error {
                code: 8,
                message: "tsize refused".into()
            }
        );
        // No terminating NUL, as some PXE ROMs send it.
        assert_eq!(
            Packet::parse(b"\x00\x05\x00\x00abort").unwrap(),
            Packet::Error {
                code: 0,
                message: "abort".into()
            }
        );
    }

    #[test]
    fn encodings_are_byte_exact() {
        let mut v = Vec::new();
        encode_error(&mut v, ERR_NOT_FOUND, "File not found");
        assert_eq!(v, b"\x00\x05\x00\x01File not found\x00");
        encode_oack(
            &mut v,
            &[
                ("blksize".into(), "1468".into()),
                ("tsize".into(), "7".into()),
            ],
        );
        assert_eq!(v, b"\x00\x06blksize\x001468\x00tsize\x007\x00");
        encode_ack(&mut v, 65535);
        assert_eq!(v, b"\x00\x04\xff\xff");
        let mut d = [0u8; 6];
        data_header(&mut d, 258);
        assert_eq!(&d[..4], b"\x00\x03\x01\x02");
    }

    #[test]
    fn round_trips() {
        let mut v = Vec::new();
        let opts = [("blksize", "1468"), ("windowsize", "16"), ("tsize", "0")];
        for op in [OP_RRQ, OP_WRQ] {
            encode_request(&mut v, op, b"dir/file.bin", "octet", &opts);
            let p = Packet::parse(&v).unwrap();
            let r = match p {
                Packet::Rrq(r) | Packet::Wrq(r) => r,
                _ => panic!(),
            };
            assert_eq!(r.filename, b"dir/file.bin");
            assert_eq!(r.options.len(), 3);
            assert_eq!(r.options[1], ("windowsize".into(), "16".into()));
        }
        let o = vec![("windowsize".to_string(), "16".to_string())];
        encode_oack(&mut v, &o);
        assert_eq!(Packet::parse(&v).unwrap(), Packet::Oack(o));
        for code in 0..9 {
            encode_error(&mut v, code, "m");
            assert_eq!(
                Packet::parse(&v).unwrap(),
                Packet::Error {
                    code,
                    message: "m".into()
                }
            );
        }
    }
}
