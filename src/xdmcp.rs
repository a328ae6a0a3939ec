//! XDMCP, just enough to ask a guest's display manager whether it is up: Query out,
//! Willing or Unwilling back (X Display Manager Control Protocol, version 1.1, X.Org:
//! section 8 "Protocol Encoding" for the header and data types, section 9 for the
//! Query / Willing / Unwilling messages).
//!
//! Hand-written on purpose: it is ~100 lines of a tiny UDP protocol of which vdd needs two
//! messages, and no maintained crate implements it. The codec is pure and bounds-checked
//! (it returns an error for any byte string, never panics); [`probe`] is the thin I/O loop.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

/// The display manager's UDP port (XDMCP spec, section 8).
pub const PORT: u16 = 177;
/// Protocol version 1: the header's first CARD16.
const VERSION: u16 = 1;
const QUERY: u16 = 2;
const WILLING: u16 = 5;
const UNWILLING: u16 = 6;

/// What a display manager answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// It will manage a display: its hostname and status line (xdm: the load average).
    Willing {
        auth_name: String,
        hostname: String,
        status: String,
    },
    /// It is up but refuses us (for xdm: not allowed by its Xaccess).
    Unwilling { hostname: String, status: String },
}

/// Why bytes are no Willing or Unwilling.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("shorter than the 6-byte XDMCP header")]
    Short,
    #[error("XDMCP version {0}, not 1")]
    Version(u16),
    #[error("the header's length {0} does not match the {1} bytes that follow it")]
    Length(u16, usize),
    #[error("opcode {0} is neither Willing (5) nor Unwilling (6)")]
    Opcode(u16),
    #[error("an ARRAY8 runs past the end of the message")]
    Truncated,
    #[error("{0} trailing bytes after the message's fields")]
    Trailing(usize),
}

/// A Query with an empty list of authentication names (section 9, "Query"): header
/// (version 1, opcode 2, length 1) and the ARRAYofARRAY8 count 0.
pub fn query() -> [u8; 7] {
    let mut b = [0u8; 7];
    b[0..2].copy_from_slice(&VERSION.to_be_bytes());
    b[2..4].copy_from_slice(&QUERY.to_be_bytes());
    b[4..6].copy_from_slice(&1u16.to_be_bytes());
    b[6] = 0;
    b
}

/// A cursor over the message body; every read is bounds-checked.
struct Body<'a>(&'a [u8]);

impl Body<'_> {
    /// ARRAY8: a CARD16 length, then that many bytes (shown lossily: names are ASCII).
    fn array8(&mut self) -> Result<String, DecodeError> {
        let (len, rest) = self.0.split_at_checked(2).ok_or(DecodeError::Truncated)?;
        let n = u16::from_be_bytes([len[0], len[1]]) as usize;
        let (data, rest) = rest.split_at_checked(n).ok_or(DecodeError::Truncated)?;
        self.0 = rest;
        Ok(String::from_utf8_lossy(data).into_owned())
    }
}

/// Parses a Willing or Unwilling.
pub fn decode(bytes: &[u8]) -> Result<Reply, DecodeError> {
    let (h, body) = bytes.split_at_checked(6).ok_or(DecodeError::Short)?;
    let version = u16::from_be_bytes([h[0], h[1]]);
    let opcode = u16::from_be_bytes([h[2], h[3]]);
    let length = u16::from_be_bytes([h[4], h[5]]);
    if version != VERSION {
        return Err(DecodeError::Version(version));
    }
    if length as usize != body.len() {
        return Err(DecodeError::Length(length, body.len()));
    }
    let mut b = Body(body);
    let reply = match opcode {
        WILLING => Reply::Willing {
            auth_name: b.array8()?,
            hostname: b.array8()?,
            status: b.array8()?,
        },
        UNWILLING => Reply::Unwilling {
            hostname: b.array8()?,
            status: b.array8()?,
        },
        other => return Err(DecodeError::Opcode(other)),
    };
    if !b.0.is_empty() {
        return Err(DecodeError::Trailing(b.0.len()));
    }
    Ok(reply)
}

/// How a probe ended without a Willing.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("the guest's display manager did not answer XDMCP at {addr} within {}", humantime::format_duration(*.limit))]
    Timeout { addr: SocketAddr, limit: Duration },
    #[error("the guest's display manager at {addr} refused XDMCP (Unwilling: {status:?})")]
    Unwilling { addr: SocketAddr, status: String },
    #[error("cannot open a UDP socket for XDMCP")]
    Socket(#[source] std::io::Error),
}

/// Sends a Query to `ip`:177 every `every` until a Willing comes back from there, an
/// Unwilling does, or `limit` has passed. Answers from other addresses and packets that do
/// not decode are ignored (a guest still booting answers nothing, or ICMP errors).
pub async fn probe(
    ip: Ipv4Addr,
    port: u16,
    every: Duration,
    limit: Duration,
) -> Result<Reply, ProbeError> {
    let addr = SocketAddr::V4(SocketAddrV4::new(ip, port));
    let sock = tokio::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
        .await
        .map_err(ProbeError::Socket)?;
    let q = query();
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = [0u8; 1024];
    loop {
        // A send can fail while the guest's address has no neighbour yet; try again later.
        let _ = sock.send_to(&q, addr).await;
        let round = (tokio::time::Instant::now() + every).min(deadline);
        loop {
            match tokio::time::timeout_at(round, sock.recv_from(&mut buf)).await {
                Err(_) => break,
                // ECONNREFUSED from an earlier send: nothing listens yet.
                Ok(Err(_)) => {
                    tokio::time::sleep_until(round).await;
                    break;
                }
                Ok(Ok((n, from))) if from == addr => match decode(&buf[..n]) {
                    Ok(r @ Reply::Willing { .. }) => return Ok(r),
                    Ok(Reply::Unwilling { status, .. }) => {
                        return Err(ProbeError::Unwilling { addr, status })
                    }
                    Err(_) => {}
                },
                Ok(Ok(_)) => {}
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ProbeError::Timeout { addr, limit });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn array8(s: &str) -> Vec<u8> {
        let mut v = (s.len() as u16).to_be_bytes().to_vec();
        v.extend_from_slice(s.as_bytes());
        v
    }

    fn msg(opcode: u16, fields: &[&str]) -> Vec<u8> {
        let body: Vec<u8> = fields.iter().flat_map(|f| array8(f)).collect();
        let mut v = vec![0, 1];
        v.extend_from_slice(&opcode.to_be_bytes());
        v.extend_from_slice(&(body.len() as u16).to_be_bytes());
        v.extend(body);
        v
    }

    #[test]
    fn query_bytes() {
        assert_eq!(query(), [0, 1, 0, 2, 0, 1, 0]);
    }

    #[test]
    fn willing_and_unwilling() {
        // As xdm sends it: no authentication, the host's name, its load average.
        let w = msg(5, &["", "guest-x11", "Linux 6.1.0 load: 0.05"]);
        assert_eq!(
            decode(&w),
            Ok(Reply::Willing {
                auth_name: String::new(),
                hostname: "guest-x11".into(),
                status: "Linux 6.1.0 load: 0.05".into()
            })
        );
        let u = msg(6, &["guest-x11", "Host unwilling"]);
        assert_eq!(
            decode(&u),
            Ok(Reply::Unwilling {
                hostname: "guest-x11".into(),
                status: "Host unwilling".into()
            })
        );
    }

    #[test]
    fn refusals() {
        let w = msg(5, &["", "h", "s"]);
        assert_eq!(decode(&w[..5]), Err(DecodeError::Short));
        let mut v2 = w.clone();
        v2[1] = 2;
        assert_eq!(decode(&v2), Err(DecodeError::Version(2)));
        assert!(matches!(
            decode(&w[..w.len() - 1]),
            Err(DecodeError::Length(..))
        ));
        assert_eq!(decode(&query()), Err(DecodeError::Opcode(2)));
        // The header's length agrees, but an ARRAY8 claims more than there is.
        let mut bad = vec![0, 1, 0, 5, 0, 2, 0, 9];
        assert_eq!(decode(&bad), Err(DecodeError::Truncated));
        bad = msg(6, &["h", "s", "extra"]);
        assert_eq!(decode(&bad), Err(DecodeError::Trailing(7)));
    }

    #[test]
    fn garbage_never_panics() {
        // xorshift: deterministic, no extra crate.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let good = msg(5, &["", "guest", "load 0.1"]);
        for i in 0..5000 {
            let r = next();
            let bytes: Vec<u8> = match i % 3 {
                // Every prefix of a good message, truncated anywhere.
                0 => good[..(r as usize % (good.len() + 1))].to_vec(),
                // A good header over random bodies (lengths that agree or not).
                1 => {
                    let n = (r % 64) as usize;
                    let mut v = vec![0, 1, 0, 5 + (r % 2) as u8];
                    v.extend_from_slice(&(n as u16).to_be_bytes());
                    v.extend((0..n).map(|_| next() as u8));
                    v
                }
                // Anything at all.
                _ => (0..(r % 40) as usize).map(|_| next() as u8).collect(),
            };
            let _ = decode(&bytes);
        }
        // A truncated good message is always refused, never half-parsed.
        for n in 0..good.len() {
            assert!(decode(&good[..n]).is_err(), "prefix {n}");
        }
    }
}
