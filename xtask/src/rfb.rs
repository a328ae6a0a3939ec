//! The client half of RFB 3.8 (RFC 6143) up to the security result and the init messages:
//! enough to prove a VNC server takes a given password and refuses others, and to be a
//! connected viewer, as the session tests need.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use des::cipher::{BlockEncrypt, KeyInit};

/// Connects and authenticates with VNC authentication (security type 2). `Ok(true)` when
/// the server accepts the password. Fails if the server offers no-authentication access
/// (type 1): a session's display must never be reachable without its password.
pub fn vnc_auth(addr: SocketAddr, password: Option<&str>) -> Result<bool> {
    Ok(authenticate(addr, password)?.1)
}

/// A viewer that stays: authenticates, sends ClientInit (shared) and reads ServerInit;
/// the server counts it as connected until the stream is dropped.
pub fn vnc_viewer(addr: SocketAddr, password: &str) -> Result<TcpStream> {
    let (mut s, ok) = authenticate(addr, Some(password))?;
    if !ok {
        bail!("{addr} refused the password");
    }
    s.write_all(&[1])?;
    let mut init = [0u8; 24];
    s.read_exact(&mut init)?;
    let mut name = vec![0u8; u32::from_be_bytes([init[20], init[21], init[22], init[23]]) as usize];
    s.read_exact(&mut name)?;
    Ok(s)
}

fn authenticate(addr: SocketAddr, password: Option<&str>) -> Result<(TcpStream, bool)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .with_context(|| format!("connecting to VNC {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut version = [0u8; 12];
    s.read_exact(&mut version)?;
    if &version[..4] != b"RFB " {
        bail!("{addr} is not an RFB server");
    }
    s.write_all(b"RFB 003.008\n")?;
    let mut n = [0u8; 1];
    s.read_exact(&mut n)?;
    if n[0] == 0 {
        bail!("{addr} refused the connection before authentication");
    }
    let mut types = vec![0u8; n[0] as usize];
    s.read_exact(&mut types)?;
    if types.contains(&1) {
        bail!("{addr} offers access without a password (security types {types:?})");
    }
    if !types.contains(&2) {
        bail!("{addr} does not offer VNC authentication (security types {types:?})");
    }
    s.write_all(&[2])?;
    let mut challenge = [0u8; 16];
    s.read_exact(&mut challenge)?;
    // VNC's DES key: the password's first 8 bytes, each with its bits reversed (every
    // implementation does this; RFC 6143 7.2.2 leaves it unsaid).
    let mut key = [0u8; 8];
    for (k, b) in key.iter_mut().zip(password.unwrap_or("").bytes()) {
        *k = b.reverse_bits();
    }
    let cipher = des::Des::new_from_slice(&key).expect("8-byte key");
    for block in challenge.chunks_mut(8) {
        cipher.encrypt_block(block.into());
    }
    s.write_all(&challenge)?;
    let mut result = [0u8; 4];
    s.read_exact(&mut result)?;
    let ok = u32::from_be_bytes(result) == 0;
    Ok((s, ok))
}
