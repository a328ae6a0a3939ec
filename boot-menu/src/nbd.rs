//! The thin client's NBD root: the fixed-newstyle handshake in user space (NBD protocol,
//! doc/proto.md: "Fixed newstyle negotiation", NBD_OPT_GO, NBD_OPT_EXPORT_NAME), then the
//! socket handed to the kernel's NBD driver with the NBD ioctls on /dev/nbdN.
//!
//! The kernel client only does transmission; negotiation is ours, which is why nbd-client
//! is not needed in the initramfs.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const FLAG_NO_ZEROES: u16 = 1 << 1;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_GO: u32 = 7;

const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) | 1;
const REP_ERR_UNKNOWN: u32 = (1 << 31) | 6;

const INFO_EXPORT: u16 = 0;

/// Transmission flag: the export is read-only (proto.md "Transmission flags").
pub const TFLAG_READ_ONLY: u16 = 1 << 1;

/// Why attaching the root failed; each message says what the admin can check.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connecting to the NBD server {0}")]
    Connect(SocketAddr, #[source] io::Error),
    #[error("NBD handshake with {0}")]
    Io(SocketAddr, #[source] io::Error),
    #[error("{0} is not an NBD server with the fixed newstyle handshake (is [nbd] enabled in vdd's config?)")]
    NotNbd(SocketAddr),
    #[error(
        "the NBD server has no export {0:?}: check [boot] root and [[nbd.export]] in vdd's config"
    )]
    UnknownExport(String),
    #[error("the NBD server refused export {0:?} (reply type {1:#x})")]
    Refused(String, u32),
    #[error("{0}")]
    Device(String, #[source] nix::Error),
    #[error("opening {0} (is the nbd module loaded?)")]
    Open(String, #[source] io::Error),
}

/// What the negotiation learned about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
}

/// Connects and negotiates `export`; returns the socket, ready for transmission.
pub fn negotiate(addr: SocketAddr, export: &str) -> Result<(TcpStream, ExportInfo), Error> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| Error::Connect(addr, e))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| Error::Io(addr, e))?;
    s.set_nodelay(true).map_err(|e| Error::Io(addr, e))?;
    let info = handshake(&mut s, export).map_err(|e| match e {
        HandshakeError::Io(e) => Error::Io(addr, e),
        HandshakeError::NotNbd => Error::NotNbd(addr),
        HandshakeError::Unknown => Error::UnknownExport(export.to_string()),
        HandshakeError::Refused(t) => Error::Refused(export.to_string(), t),
    })?;
    // The kernel owns the socket from here; it must block without a timeout.
    s.set_read_timeout(None).map_err(|e| Error::Io(addr, e))?;
    Ok((s, info))
}

#[derive(Debug)]
enum HandshakeError {
    Io(io::Error),
    NotNbd,
    Unknown,
    Refused(u32),
}

impl From<io::Error> for HandshakeError {
    fn from(e: io::Error) -> Self {
        HandshakeError::Io(e)
    }
}

fn handshake<S: Read + Write>(s: &mut S, export: &str) -> Result<ExportInfo, HandshakeError> {
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello)?;
    let magic = u64::from_be_bytes(hello[0..8].try_into().expect("8 bytes"));
    let opt = u64::from_be_bytes(hello[8..16].try_into().expect("8 bytes"));
    let hflags = u16::from_be_bytes([hello[16], hello[17]]);
    if magic != NBDMAGIC || opt != IHAVEOPT || hflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(HandshakeError::NotNbd);
    }
    let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
    let cflags = u32::from(FLAG_FIXED_NEWSTYLE | (hflags & FLAG_NO_ZEROES));
    s.write_all(&cflags.to_be_bytes())?;

    // NBD_OPT_GO: name length, name, no info requests (NBD_INFO_EXPORT always comes).
    let mut data = Vec::with_capacity(6 + export.len());
    data.extend_from_slice(&(export.len() as u32).to_be_bytes());
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&0u16.to_be_bytes());
    send_option(s, OPT_GO, &data)?;
    let mut info = None;
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h)?;
        let magic = u64::from_be_bytes(h[0..8].try_into().expect("8 bytes"));
        let rtype = u32::from_be_bytes(h[12..16].try_into().expect("4 bytes"));
        let len = u32::from_be_bytes(h[16..20].try_into().expect("4 bytes"));
        if magic != REPLY_MAGIC || len > 1 << 20 {
            return Err(HandshakeError::NotNbd);
        }
        let mut body = vec![0u8; len as usize];
        s.read_exact(&mut body)?;
        match rtype {
            REP_INFO
                if body.len() >= 12 && u16::from_be_bytes([body[0], body[1]]) == INFO_EXPORT =>
            {
                info = Some(ExportInfo {
                    size: u64::from_be_bytes(body[2..10].try_into().expect("8 bytes")),
                    flags: u16::from_be_bytes([body[10], body[11]]),
                });
            }
            REP_INFO => {}
            REP_ACK => return info.ok_or(HandshakeError::NotNbd),
            REP_ERR_UNKNOWN => return Err(HandshakeError::Unknown),
            // A server without NBD_OPT_GO: the older EXPORT_NAME, which ends negotiation.
            REP_ERR_UNSUP => return export_name(s, export, no_zeroes),
            t if t & (1 << 31) != 0 => return Err(HandshakeError::Refused(t)),
            _ => {}
        }
    }
}

fn export_name<S: Read + Write>(
    s: &mut S,
    export: &str,
    no_zeroes: bool,
) -> Result<ExportInfo, HandshakeError> {
    send_option(s, OPT_EXPORT_NAME, export.as_bytes())?;
    let mut r = [0u8; 10];
    s.read_exact(&mut r).map_err(|e| {
        // The server closes the connection for an unknown name (proto.md).
        if e.kind() == io::ErrorKind::UnexpectedEof {
            HandshakeError::Unknown
        } else {
            HandshakeError::Io(e)
        }
    })?;
    if !no_zeroes {
        let mut z = [0u8; 124];
        s.read_exact(&mut z)?;
    }
    Ok(ExportInfo {
        size: u64::from_be_bytes(r[0..8].try_into().expect("8 bytes")),
        flags: u16::from_be_bytes([r[8], r[9]]),
    })
}

fn send_option<S: Write>(s: &mut S, opt: u32, data: &[u8]) -> io::Result<()> {
    let mut m = Vec::with_capacity(16 + data.len());
    m.extend_from_slice(&IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m)
}

// The NBD ioctls of <linux/nbd.h>: _IO(0xab, n).
mod ioctl {
    nix::ioctl_write_int_bad!(set_sock, nix::request_code_none!(0xab, 0));
    nix::ioctl_write_int_bad!(set_blksize, nix::request_code_none!(0xab, 1));
    nix::ioctl_none_bad!(do_it, nix::request_code_none!(0xab, 3));
    nix::ioctl_none_bad!(clear_sock, nix::request_code_none!(0xab, 4));
    nix::ioctl_none_bad!(clear_que, nix::request_code_none!(0xab, 5));
    nix::ioctl_write_int_bad!(set_size_blocks, nix::request_code_none!(0xab, 7));
    nix::ioctl_none_bad!(disconnect, nix::request_code_none!(0xab, 8));
    nix::ioctl_write_int_bad!(set_timeout, nix::request_code_none!(0xab, 9));
    nix::ioctl_write_int_bad!(set_flags, nix::request_code_none!(0xab, 10));
}

/// A block device served by the kernel's NBD client. NBD_DO_IT blocks for the life of the
/// connection, so it runs on its own thread; [`Attached::detach`] ends it.
pub struct Attached {
    pub device: String,
    dev: std::fs::File,
    thread: Option<std::thread::JoinHandle<()>>,
    _sock: TcpStream,
}

/// Hands a negotiated socket to `/dev/nbdN`.
pub fn attach(device: &str, sock: TcpStream, info: ExportInfo) -> Result<Attached, Error> {
    let err = |what: &str, e: nix::Error| Error::Device(format!("{device}: {what}"), e);
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(device)
        .map_err(|e| Error::Open(device.to_string(), e))?;
    let fd = dev.as_raw_fd();
    const BLKSIZE: u64 = 4096;
    // SAFETY: plain integer ioctls on an open NBD device, as <linux/nbd.h> documents.
    unsafe {
        ioctl::clear_sock(fd).ok();
        ioctl::set_blksize(fd, BLKSIZE as i32).map_err(|e| err("NBD_SET_BLKSIZE", e))?;
        ioctl::set_size_blocks(fd, (info.size / BLKSIZE) as i32)
            .map_err(|e| err("NBD_SET_SIZE_BLOCKS", e))?;
        ioctl::set_flags(fd, i32::from(info.flags)).map_err(|e| err("NBD_SET_FLAGS", e))?;
        // A server that vanishes must not hang the client forever: the kernel errors out
        // requests after this many seconds and boot-menu can show the menu again.
        ioctl::set_timeout(fd, 60).map_err(|e| err("NBD_SET_TIMEOUT", e))?;
        ioctl::set_sock(fd, sock.as_raw_fd()).map_err(|e| err("NBD_SET_SOCK", e))?;
    }
    let thread_fd = dev
        .try_clone()
        .map_err(|e| Error::Open(device.to_string(), e))?;
    let thread = std::thread::spawn(move || {
        // SAFETY: see above; returns when the connection ends.
        let _ = unsafe { ioctl::do_it(thread_fd.as_raw_fd()) };
        let _ = unsafe { ioctl::clear_que(thread_fd.as_raw_fd()) };
        let _ = unsafe { ioctl::clear_sock(thread_fd.as_raw_fd()) };
    });
    Ok(Attached {
        device: device.to_string(),
        dev,
        thread: Some(thread),
        _sock: sock,
    })
}

impl Attached {
    /// Disconnects and waits for the kernel to let go of the device.
    pub fn detach(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        // SAFETY: integer ioctl on the open device.
        let _ = unsafe { ioctl::disconnect(self.dev.as_raw_fd()) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A scripted server side: what it says, and what the client must write.
    struct Script {
        input: Cursor<Vec<u8>>,
        written: Vec<u8>,
    }
    impl Read for Script {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            self.input.read(b)
        }
    }
    impl Write for Script {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.written.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn hello(flags: u16) -> Vec<u8> {
        let mut v = NBDMAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&flags.to_be_bytes());
        v
    }

    fn reply(opt: u32, rtype: u32, data: &[u8]) -> Vec<u8> {
        let mut v = REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&opt.to_be_bytes());
        v.extend_from_slice(&rtype.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn go_with_info_export() {
        let mut input = hello(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        let mut info = INFO_EXPORT.to_be_bytes().to_vec();
        info.extend_from_slice(&(1u64 << 30).to_be_bytes());
        info.extend_from_slice(&(1u16 | TFLAG_READ_ONLY).to_be_bytes());
        input.extend(reply(OPT_GO, REP_INFO, &info));
        input.extend(reply(OPT_GO, REP_ACK, &[]));
        let mut s = Script {
            input: Cursor::new(input),
            written: Vec::new(),
        };
        let got = handshake(&mut s, "thin-client").unwrap();
        assert_eq!(
            got,
            ExportInfo {
                size: 1 << 30,
                flags: 1 | TFLAG_READ_ONLY
            }
        );
        // client flags, then IHAVEOPT, GO, len, name len, name, 0 info requests
        let w = &s.written;
        assert_eq!(&w[0..4], &3u32.to_be_bytes());
        assert_eq!(&w[4..12], &IHAVEOPT.to_be_bytes());
        assert_eq!(&w[12..16], &OPT_GO.to_be_bytes());
        assert_eq!(&w[16..20], &(4 + 11 + 2u32).to_be_bytes());
        assert_eq!(&w[20..24], &11u32.to_be_bytes());
        assert_eq!(&w[24..35], b"thin-client");
        assert_eq!(&w[35..37], &[0, 0]);
    }

    #[test]
    fn unknown_export_and_not_nbd() {
        let mut input = hello(FLAG_FIXED_NEWSTYLE);
        input.extend(reply(OPT_GO, REP_ERR_UNKNOWN, b"no such export"));
        let mut s = Script {
            input: Cursor::new(input),
            written: Vec::new(),
        };
        assert!(matches!(
            handshake(&mut s, "x"),
            Err(HandshakeError::Unknown)
        ));

        let mut s = Script {
            input: Cursor::new(b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec()),
            written: Vec::new(),
        };
        assert!(matches!(
            handshake(&mut s, "x"),
            Err(HandshakeError::NotNbd)
        ));

        // oldstyle servers are refused: no IHAVEOPT
        let mut input = NBDMAGIC.to_be_bytes().to_vec();
        input.extend_from_slice(&0x0000_4202_8186_1253u64.to_be_bytes());
        input.extend_from_slice(&[0; 2]);
        let mut s = Script {
            input: Cursor::new(input),
            written: Vec::new(),
        };
        assert!(matches!(
            handshake(&mut s, "x"),
            Err(HandshakeError::NotNbd)
        ));
    }

    #[test]
    fn falls_back_to_export_name() {
        let mut input = hello(FLAG_FIXED_NEWSTYLE);
        input.extend(reply(OPT_GO, REP_ERR_UNSUP, &[]));
        input.extend_from_slice(&4096u64.to_be_bytes());
        input.extend_from_slice(&1u16.to_be_bytes());
        input.extend_from_slice(&[0u8; 124]);
        let mut s = Script {
            input: Cursor::new(input),
            written: Vec::new(),
        };
        assert_eq!(
            handshake(&mut s, "x").unwrap(),
            ExportInfo {
                size: 4096,
                flags: 1
            }
        );
    }

    /// Against a real server: nbdkit on loopback.
    #[test]
    fn negotiates_with_nbdkit() {
        if std::process::Command::new("nbdkit")
            .arg("--version")
            .output()
            .is_err()
        {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("CI must install nbdkit");
            }
            eprintln!("skipping negotiates_with_nbdkit: nbdkit not installed");
            return;
        }
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut child = std::process::Command::new("nbdkit")
            .args([
                "-f",
                "-i",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-r",
                "--filter=exportname",
                "memory",
                "size=1M",
            ])
            .args(["exportname=root", "exportname-strict=true"])
            .spawn()
            .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut result = None;
        for _ in 0..100 {
            match negotiate(addr, "root") {
                Err(Error::Connect(..)) => std::thread::sleep(Duration::from_millis(100)),
                r => {
                    result = Some(r);
                    break;
                }
            }
        }
        let unknown = negotiate(addr, "nope");
        let _ = child.kill();
        let _ = child.wait();
        let (_, info) = result.expect("nbdkit came up").unwrap();
        assert_eq!(info.size, 1 << 20);
        assert_ne!(info.flags & TFLAG_READ_ONLY, 0);
        assert!(
            matches!(unknown, Err(Error::UnknownExport(_))),
            "{unknown:?}"
        );
    }
}
