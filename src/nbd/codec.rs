//! NBD wire format, pure on bytes: the fixed newstyle handshake (options and option
//! replies), transmission requests, simple and structured replies.
//!
//! Spec: NetworkBlockDevice/nbd `doc/proto.md`, sections "Fixed newstyle negotiation",
//! "Option types", "Transmission", "Simple reply message", "Structured reply chunk message".
//! Everything on the wire is big-endian.

/// "NBDMAGIC": first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle marker from the server, and the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Option types.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;

// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;

// Info types (NBD_OPT_INFO / NBD_OPT_GO).
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
pub const CMD_FLAGS_KNOWN: u16 =
    CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE | CMD_FLAG_FAST_ZERO;

// Structured reply chunk types and flags.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

// Error values (the spec's own numbering, equal to Linux errno).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const ENOTSUP: u32 = 95;

/// Sizes of fixed headers.
pub const OPTION_HEADER_LEN: usize = 16;
pub const REQUEST_LEN: usize = 28;
pub const SIMPLE_REPLY_LEN: usize = 16;
pub const STRUCTURED_HEADER_LEN: usize = 20;

/// Bytes that are not NBD.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// An option did not start with IHAVEOPT.
    #[error("option magic {0:#018x} is not IHAVEOPT")]
    OptionMagic(u64),
    /// A request did not start with the request magic.
    #[error("request magic {0:#010x} is not NBD_REQUEST_MAGIC")]
    RequestMagic(u32),
    /// An option's data does not have the layout its type demands.
    #[error("option {opt} data is malformed")]
    OptionData { opt: u32 },
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

/// The server's first 18 bytes: NBDMAGIC, IHAVEOPT, handshake flags.
pub fn greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// An option header: (option type, data length).
pub fn parse_option_header(b: &[u8; OPTION_HEADER_LEN]) -> Result<(u32, u32), CodecError> {
    let magic = be64(&b[..8]);
    if magic != IHAVEOPT {
        return Err(CodecError::OptionMagic(magic));
    }
    Ok((be32(&b[8..12]), be32(&b[12..16])))
}

/// One client option, with its data decoded.
#[derive(Debug, PartialEq, Eq)]
pub enum Opt {
    /// Old way to pick an export: no error reply is possible, the server just closes.
    ExportName(Vec<u8>),
    Abort,
    List,
    StartTls,
    /// INFO (`go == false`) or GO: export name and the info types asked for.
    Info {
        go: bool,
        name: Vec<u8>,
        requests: Vec<u16>,
    },
    StructuredReply,
    /// An option we do not implement (answered NBD_REP_ERR_UNSUP).
    Unknown(u32),
}

impl Opt {
    /// Decodes an option from its type and data. Options that carry no data must
    /// have none (the spec asks for NBD_REP_ERR_INVALID otherwise).
    pub fn parse(opt: u32, data: &[u8]) -> Result<Opt, CodecError> {
        let bad = || CodecError::OptionData { opt };
        let empty = |o: Opt| if data.is_empty() { Ok(o) } else { Err(bad()) };
        match opt {
            OPT_EXPORT_NAME => Ok(Opt::ExportName(data.to_vec())),
            OPT_ABORT => Ok(Opt::Abort),
            OPT_LIST => empty(Opt::List),
            OPT_STARTTLS => empty(Opt::StartTls),
            OPT_STRUCTURED_REPLY => empty(Opt::StructuredReply),
            OPT_INFO | OPT_GO => {
                if data.len() < 4 {
                    return Err(bad());
                }
                let n = be32(data) as usize;
                let rest = &data[4..];
                if rest.len() < n + 2 {
                    return Err(bad());
                }
                let name = rest[..n].to_vec();
                let count = be16(&rest[n..]) as usize;
                let reqs = &rest[n + 2..];
                if reqs.len() != count * 2 {
                    return Err(bad());
                }
                Ok(Opt::Info {
                    go: opt == OPT_GO,
                    name,
                    requests: reqs.chunks_exact(2).map(be16).collect(),
                })
            }
            other => Ok(Opt::Unknown(other)),
        }
    }
}

/// Appends one option reply.
pub fn put_option_reply(out: &mut Vec<u8>, opt: u32, reply: u32, data: &[u8]) {
    out.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// Data of an NBD_REP_SERVER reply to NBD_OPT_LIST: name length, name, description.
pub fn server_entry(name: &str, description: &str) -> Vec<u8> {
    let mut d = Vec::with_capacity(4 + name.len() + description.len());
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(description.as_bytes());
    d
}

/// Data of NBD_INFO_EXPORT.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut d = Vec::with_capacity(12);
    d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    d.extend_from_slice(&size.to_be_bytes());
    d.extend_from_slice(&flags.to_be_bytes());
    d
}

/// Data of NBD_INFO_NAME or NBD_INFO_DESCRIPTION.
pub fn info_text(kind: u16, text: &str) -> Vec<u8> {
    let mut d = Vec::with_capacity(2 + text.len());
    d.extend_from_slice(&kind.to_be_bytes());
    d.extend_from_slice(text.as_bytes());
    d
}

/// Data of NBD_INFO_BLOCK_SIZE.
pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut d = Vec::with_capacity(14);
    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    for v in [min, preferred, max] {
        d.extend_from_slice(&v.to_be_bytes());
    }
    d
}

/// The answer to NBD_OPT_EXPORT_NAME: size, transmission flags, and 124 zero bytes unless
/// the client asked for NO_ZEROES.
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut d = Vec::with_capacity(134);
    d.extend_from_slice(&size.to_be_bytes());
    d.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        d.resize(d.len() + 124, 0);
    }
    d
}

/// A transmission request header (any WRITE payload follows it on the wire).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;

impl Request {
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Result<Request, CodecError> {
        let magic = be32(b);
        if magic != REQUEST_MAGIC {
            return Err(CodecError::RequestMagic(magic));
        }
        Ok(Request {
            flags: be16(&b[4..]),
            kind: be16(&b[6..]),
            cookie: be64(&b[8..]),
            offset: be64(&b[16..]),
            len: be32(&b[24..]),
        })
    }

    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// A simple reply header; READ data follows it when `error == 0`.
pub fn simple_reply(cookie: u64, error: u32) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured reply chunk header; `len` bytes of payload follow.
pub fn structured_header(
    cookie: u64,
    flags: u16,
    kind: u16,
    len: u32,
) -> [u8; STRUCTURED_HEADER_LEN] {
    let mut b = [0u8; STRUCTURED_HEADER_LEN];
    b[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// A whole NBD_REPLY_TYPE_ERROR chunk (with DONE) carrying `error` and no message.
pub fn structured_error(cookie: u64, error: u32) -> [u8; STRUCTURED_HEADER_LEN + 6] {
    let mut b = [0u8; STRUCTURED_HEADER_LEN + 6];
    b[..STRUCTURED_HEADER_LEN].copy_from_slice(&structured_header(
        cookie,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        6,
    ));
    b[STRUCTURED_HEADER_LEN..STRUCTURED_HEADER_LEN + 4].copy_from_slice(&error.to_be_bytes());
    // Message length 0: the errno says it all.
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_bytes() {
        assert_eq!(
            greeting(),
            *b"NBDMAGICIHAVEOPT\x00\x03",
            "fixed newstyle + no zeroes"
        );
    }

    #[test]
    fn option_header() {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(b"IHAVEOPT");
        b[8..12].copy_from_slice(&7u32.to_be_bytes());
        b[12..16].copy_from_slice(&9u32.to_be_bytes());
        assert_eq!(parse_option_header(&b), Ok((OPT_GO, 9)));
        b[0] = b'X';
        assert!(matches!(
            parse_option_header(&b),
            Err(CodecError::OptionMagic(_))
        ));
    }

    #[test]
    fn go_option_as_libnbd_sends_it() {
        // NBD_OPT_GO for "disk" asking for NBD_INFO_BLOCK_SIZE, as nbdinfo sends it.
        let data = b"\x00\x00\x00\x04disk\x00\x01\x00\x03";
        assert_eq!(
            Opt::parse(OPT_GO, data),
            Ok(Opt::Info {
                go: true,
                name: b"disk".to_vec(),
                requests: vec![INFO_BLOCK_SIZE]
            })
        );
        // Count says 2 requests, only one present.
        let short = b"\x00\x00\x00\x04disk\x00\x02\x00\x03";
        assert!(Opt::parse(OPT_GO, short).is_err());
        // Name length beyond the data.
        assert!(Opt::parse(OPT_INFO, b"\xff\xff\xff\xff\x00\x00").is_err());
        assert!(Opt::parse(OPT_INFO, b"\x00\x00").is_err());
    }

    #[test]
    fn dataless_options_refuse_data() {
        assert_eq!(Opt::parse(OPT_LIST, b""), Ok(Opt::List));
        assert!(Opt::parse(OPT_LIST, b"x").is_err());
        assert!(Opt::parse(OPT_STRUCTURED_REPLY, b"x").is_err());
        assert_eq!(Opt::parse(OPT_STARTTLS, b""), Ok(Opt::StartTls));
        assert_eq!(Opt::parse(42, b"whatever"), Ok(Opt::Unknown(42)));
        assert_eq!(
            Opt::parse(OPT_EXPORT_NAME, b"x"),
            Ok(Opt::ExportName(b"x".to_vec()))
        );
    }

    #[test]
    fn option_reply_layout() {
        let mut out = Vec::new();
        put_option_reply(&mut out, OPT_LIST, REP_SERVER, &server_entry("a", "d"));
        assert_eq!(
            out,
            b"\x00\x03\xe8\x89\x04\x55\x65\xa9\x00\x00\x00\x03\x00\x00\x00\x02\x00\x00\x00\x06\x00\x00\x00\x01ad"
        );
    }

    #[test]
    fn infos() {
        assert_eq!(
            info_export(0x1_0000_0000, 0x0103),
            b"\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00\x01\x03"
        );
        assert_eq!(info_text(INFO_NAME, "x"), b"\x00\x01x");
        assert_eq!(
            info_block_size(1, 4096, 1 << 25),
            b"\x00\x03\x00\x00\x00\x01\x00\x00\x10\x00\x02\x00\x00\x00"
        );
        assert_eq!(export_name_reply(1, 3, true).len(), 10);
        assert_eq!(export_name_reply(1, 3, false).len(), 134);
    }

    #[test]
    fn request_round_trip_and_magic() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            kind: CMD_WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 4096,
            len: 512,
        };
        let b = r.encode();
        assert_eq!(&b[..4], b"\x25\x60\x95\x13");
        assert_eq!(Request::parse(&b), Ok(r));
        let mut bad = b;
        bad[3] = 0;
        assert_eq!(
            Request::parse(&bad),
            Err(CodecError::RequestMagic(0x2560_9500))
        );
    }

    #[test]
    fn replies() {
        assert_eq!(
            simple_reply(7, EPERM),
            *b"\x67\x44\x66\x98\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x07"
        );
        let e = structured_error(7, EINVAL);
        assert_eq!(&e[..4], b"\x66\x8e\x33\xef");
        assert_eq!(&e[4..8], b"\x00\x01\x80\x01");
        assert_eq!(&e[16..20], b"\x00\x00\x00\x06");
        assert_eq!(&e[20..], b"\x00\x00\x00\x16\x00\x00");
    }
}
