//! The client half of RFB 3.8 (RFC 6143): the security handshake, enough to prove a VNC
//! server takes a given password and refuses others, and to be a connected viewer, as the
//! session tests need; and raw-encoded framebuffer updates (7.5, 7.6.1, 7.7.1,
//! DesktopSize 7.8.2), enough to see what a guest shows and when, as `cargo xtask bench
//! pick` needs.

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

/// The handshake up to the security result: the stream, and whether it passed.
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

/// What the server's screen shows: 4 bytes a pixel (blue, green, red, unused: the pixel
/// format [`watch`] asks for), row by row.
#[derive(Clone, Debug)]
pub struct Frame {
    pub width: usize,
    pub height: usize,
    pub bgrx: Vec<u8>,
}

impl Frame {
    /// The share of pixels for which `f(r, g, b)` holds, counted on every third pixel
    /// (a screen's worth of calls per update is slow in an unoptimised build).
    pub fn share(&self, f: impl Fn(u8, u8, u8) -> bool) -> f64 {
        let (mut n, mut all) = (0usize, 0usize);
        for p in self.bgrx.chunks_exact(4).step_by(3) {
            all += 1;
            n += f(p[2], p[1], p[0]) as usize;
        }
        n as f64 / all.max(1) as f64
    }

    /// The share of the demo guest's magenta ([`crate::e2e::is_magenta`]).
    pub fn magenta_share(&self) -> f64 {
        self.share(|r, g, b| crate::e2e::is_magenta(&[r, g, b]))
    }
}

/// Connects with `password` and follows the screen until `until` holds for a frame, or
/// `limit` has passed. Asks for raw pixels (32 bits, little-endian BGRX) and takes
/// desktop resizes; returns the frame `until` accepted.
pub fn watch(
    addr: SocketAddr,
    password: &str,
    limit: Duration,
    mut until: impl FnMut(&Frame) -> bool,
) -> Result<Frame> {
    let end = std::time::Instant::now() + limit;
    let (mut s, ok) = authenticate(addr, Some(password))?;
    if !ok {
        bail!("{addr} refused the password");
    }
    s.write_all(&[1])?; // ClientInit: shared
    let mut init = [0u8; 24];
    s.read_exact(&mut init)?;
    let (mut w, mut h) = (
        u16::from_be_bytes([init[0], init[1]]) as usize,
        u16::from_be_bytes([init[2], init[3]]) as usize,
    );
    let mut name = vec![0u8; u32::from_be_bytes([init[20], init[21], init[22], init[23]]) as usize];
    s.read_exact(&mut name)?;
    // SetPixelFormat: 32 bpp, depth 24, little-endian, true colour, 8 bits each, red at
    // bit 16, green at 8, blue at 0.
    let mut pf = vec![
        0u8, 0, 0, 0, 32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0,
    ];
    s.write_all(&pf)?;
    // SetEncodings: Raw (0) and the DesktopSize pseudo-encoding (-223).
    pf.clear();
    pf.extend_from_slice(&[2, 0, 0, 2]);
    pf.extend_from_slice(&0i32.to_be_bytes());
    pf.extend_from_slice(&(-223i32).to_be_bytes());
    s.write_all(&pf)?;
    let mut fb = Frame {
        width: w,
        height: h,
        bgrx: vec![0; w * h * 4],
    };
    let request = |s: &mut TcpStream, incremental: bool, w: usize, h: usize| {
        let mut r = vec![3u8, incremental as u8, 0, 0, 0, 0];
        r.extend_from_slice(&(w as u16).to_be_bytes());
        r.extend_from_slice(&(h as u16).to_be_bytes());
        s.write_all(&r)
    };
    request(&mut s, false, w, h)?;
    loop {
        if std::time::Instant::now() > end {
            bail!("{addr}: the screen did not show what was awaited within {limit:?}");
        }
        s.set_read_timeout(Some(
            end.saturating_duration_since(std::time::Instant::now())
                .max(Duration::from_millis(10)),
        ))?;
        let mut t = [0u8; 1];
        s.read_exact(&mut t)?;
        match t[0] {
            0 => {
                let mut hd = [0u8; 3];
                s.read_exact(&mut hd)?;
                let rects = u16::from_be_bytes([hd[1], hd[2]]);
                let mut resized = false;
                for _ in 0..rects {
                    let mut r = [0u8; 12];
                    s.read_exact(&mut r)?;
                    let be = |i: usize| u16::from_be_bytes([r[i], r[i + 1]]) as usize;
                    let (x, y, rw, rh) = (be(0), be(2), be(4), be(6));
                    match i32::from_be_bytes([r[8], r[9], r[10], r[11]]) {
                        0 => {
                            let mut px = vec![0u8; rw * rh * 4];
                            s.read_exact(&mut px)?;
                            // Row by row, clipped to the screen.
                            let cols = rw.min(w.saturating_sub(x));
                            for row in 0..rh.min(h.saturating_sub(y)) {
                                let o = ((y + row) * w + x) * 4;
                                fb.bgrx[o..o + cols * 4]
                                    .copy_from_slice(&px[row * rw * 4..][..cols * 4]);
                            }
                        }
                        -223 => {
                            (w, h) = (rw, rh);
                            fb = Frame {
                                width: w,
                                height: h,
                                bgrx: vec![0; w * h * 4],
                            };
                            resized = true;
                        }
                        e => bail!("{addr} sent encoding {e}, which was not asked for"),
                    }
                }
                if !resized && until(&fb) {
                    return Ok(fb);
                }
                request(&mut s, !resized, w, h)?;
            }
            1 => {
                let mut hd = [0u8; 5];
                s.read_exact(&mut hd)?;
                let n = u16::from_be_bytes([hd[3], hd[4]]) as usize;
                s.read_exact(&mut vec![0u8; n * 6])?;
            }
            2 => {}
            3 => {
                let mut hd = [0u8; 7];
                s.read_exact(&mut hd)?;
                let n = u32::from_be_bytes([hd[3], hd[4], hd[5], hd[6]]) as usize;
                s.read_exact(&mut vec![0u8; n.min(1 << 20)])?;
            }
            other => bail!("{addr} sent message type {other}"),
        }
    }
}
