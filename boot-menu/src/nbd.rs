//! The NBD root of the thin client: the fixed-newstyle handshake in user space (NBD protocol,
//! doc/proto.md of NetworkBlockDevice/nbd: "Fixed newstyle negotiation", NBD_OPT_GO with a
//! fallback to NBD_OPT_EXPORT_NAME), then the connected socket is handed to the kernel's
//! client with the ioctls of linux/nbd.h (NBD_SET_SIZE, NBD_SET_FLAGS, NBD_SET_SOCK,
//! NBD_DO_IT in its own thread, NBD_DISCONNECT to end).
//!
//! The handshake is a codec plus a blocking driver generic over `Read + Write`, so it is
//! tested against a scripted server and against real nbdkit.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, IntoRawFd};
use std::path::Path;
use std::time::{Duration, Instant};

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const FLAG_NO_ZEROES: u16 = 2;
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_GO: u32 = 7;
pub const REP_ACK: u32 = 1;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = (1 << 31) | 1;
pub const INFO_EXPORT: u16 = 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// How long the kernel client may take to come up after NBD_DO_IT.
const START_LIMIT: Duration = Duration::from_secs(30);
/// Largest option reply we accept; real ones are a few dozen bytes.
const MAX_REPLY: u32 = 64 * 1024;

/// ioctl numbers: _IO(0xab, n).
const NBD_SET_SOCK: u64 = 0xab00;
const NBD_SET_SIZE: u64 = 0xab02;
const NBD_DO_IT: u64 = 0xab03;
const NBD_CLEAR_SOCK: u64 = 0xab04;
const NBD_CLEAR_QUE: u64 = 0xab05;
const NBD_DISCONNECT: u64 = 0xab08;
const NBD_SET_TIMEOUT: u64 = 0xab09;
const NBD_SET_FLAGS: u64 = 0xab0a;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to NBD server {0}")]
    Connect(SocketAddr, #[source] std::io::Error),
    #[error("NBD handshake I/O")]
    Io(#[from] std::io::Error),
    #[error("not an NBD fixed-newstyle server: {0}")]
    Protocol(&'static str),
    #[error("server refused export {name:?} (reply {code:#x}: {msg})")]
    Refused {
        name: String,
        code: u32,
        msg: String,
    },
    #[error("export of {0} bytes is smaller than one 512-byte sector")]
    TooSmall(u64),
    #[error("cannot open {0}")]
    Device(String, #[source] std::io::Error),
    #[error("ioctl {0} on the NBD device failed")]
    Ioctl(&'static str, #[source] std::io::Error),
    #[error("the kernel NBD client did not start within {0:?}")]
    NotStarted(Duration),
}

/// What the handshake learnt about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Export {
    pub size: u64,
    pub flags: u16,
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}
fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_be_bytes(b[i..i + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_be_bytes(b[i..i + 8].try_into().unwrap())
}

/// The server's first 18 bytes -> its handshake flags.
pub fn parse_greeting(b: &[u8; 18]) -> Result<u16, Error> {
    if u64_at(b, 0) != NBDMAGIC {
        return Err(Error::Protocol("bad NBDMAGIC"));
    }
    if u64_at(b, 8) != IHAVEOPT {
        return Err(Error::Protocol("oldstyle server (no IHAVEOPT)"));
    }
    let flags = u16_at(b, 16);
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(Error::Protocol("server lacks fixed newstyle"));
    }
    Ok(flags)
}

/// An option request: IHAVEOPT, option, length, data.
pub fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 + data.len());
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// NBD_OPT_GO for `name` with no information requests (the server always sends
/// NBD_INFO_EXPORT, which is all the kernel needs).
pub fn opt_go(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    option(OPT_GO, &d)
}

/// Runs the handshake on `s`; on success `s` is in the transmission phase.
pub fn handshake<S: Read + Write>(s: &mut S, name: &str) -> Result<Export, Error> {
    let mut g = [0u8; 18];
    s.read_exact(&mut g)?;
    let flags = parse_greeting(&g)?;
    let no_zeroes = flags & FLAG_NO_ZEROES != 0;
    let cflags = FLAG_FIXED_NEWSTYLE as u32 | if no_zeroes { FLAG_NO_ZEROES as u32 } else { 0 };
    s.write_all(&cflags.to_be_bytes())?;
    s.write_all(&opt_go(name))?;
    let mut export = None;
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h)?;
        if u64_at(&h, 0) != REPLY_MAGIC {
            return Err(Error::Protocol("bad option reply magic"));
        }
        if u32_at(&h, 8) != OPT_GO {
            return Err(Error::Protocol("reply to an option we did not send"));
        }
        let (typ, len) = (u32_at(&h, 12), u32_at(&h, 16));
        if len > MAX_REPLY {
            return Err(Error::Protocol("option reply too long"));
        }
        let mut d = vec![0u8; len as usize];
        s.read_exact(&mut d)?;
        match typ {
            REP_INFO if len >= 2 && u16_at(&d, 0) == INFO_EXPORT => {
                if len != 12 {
                    return Err(Error::Protocol("NBD_INFO_EXPORT of wrong length"));
                }
                export = Some(Export {
                    size: u64_at(&d, 2),
                    flags: u16_at(&d, 10),
                });
            }
            // Other information (block sizes, names) is optional to understand.
            REP_INFO => {}
            REP_ACK => {
                return export.ok_or(Error::Protocol("NBD_OPT_GO acked without export info"))
            }
            // An old server without NBD_OPT_GO: the older option, which ends negotiation
            // at once and cannot report errors except by closing.
            REP_ERR_UNSUP => return export_name(s, name, no_zeroes),
            code if code & (1 << 31) != 0 => {
                return Err(Error::Refused {
                    name: name.to_string(),
                    code,
                    msg: String::from_utf8_lossy(&d).into_owned(),
                })
            }
            _ => return Err(Error::Protocol("unknown option reply type")),
        }
    }
}

fn export_name<S: Read + Write>(s: &mut S, name: &str, no_zeroes: bool) -> Result<Export, Error> {
    s.write_all(&option(OPT_EXPORT_NAME, name.as_bytes()))?;
    let mut b = [0u8; 10];
    s.read_exact(&mut b).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => Error::Refused {
            name: name.to_string(),
            code: 0,
            msg: "connection closed on NBD_OPT_EXPORT_NAME".into(),
        },
        _ => Error::Io(e),
    })?;
    if !no_zeroes {
        let mut z = [0u8; 124];
        s.read_exact(&mut z)?;
    }
    Ok(Export {
        size: u64_at(&b, 0),
        flags: u16_at(&b, 8),
    })
}

/// A kernel NBD device serving one export; dropping it disconnects and frees the device.
pub struct Attached {
    dev: File,
    pub path: String,
    pub export: Export,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn ioctl(f: &File, what: &'static str, req: u64, arg: u64) -> Result<(), Error> {
    // SAFETY: the nbd ioctls used here take an integer argument by value, never a pointer.
    let r = unsafe { nix::libc::ioctl(f.as_raw_fd(), req as _, arg as nix::libc::c_ulong) };
    if r < 0 {
        return Err(Error::Ioctl(what, std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Connects to `server`, negotiates `name`, and gives the socket to `/dev/nbdN`.
pub fn attach(
    server: SocketAddr,
    name: &str,
    dev: &str,
    timeout: Duration,
) -> Result<Attached, Error> {
    let mut s =
        TcpStream::connect_timeout(&server, timeout).map_err(|e| Error::Connect(server, e))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    let export = handshake(&mut s, name)?;
    if export.size < 512 {
        return Err(Error::TooSmall(export.size));
    }
    // The kernel applies its own timeout (NBD_SET_TIMEOUT); the socket must block.
    s.set_read_timeout(None)?;
    s.set_write_timeout(None)?;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev)
        .map_err(|e| Error::Device(dev.to_string(), e))?;
    // A device left behind by an earlier attempt: clear it first (errors ignored).
    let _ = ioctl(&f, "NBD_CLEAR_SOCK", NBD_CLEAR_SOCK, 0);
    ioctl(&f, "NBD_SET_SIZE", NBD_SET_SIZE, export.size)?;
    ioctl(&f, "NBD_SET_FLAGS", NBD_SET_FLAGS, export.flags as u64)?;
    ioctl(&f, "NBD_SET_TIMEOUT", NBD_SET_TIMEOUT, 30)?;
    let sock = s.into_raw_fd();
    let r = ioctl(&f, "NBD_SET_SOCK", NBD_SET_SOCK, sock as u64);
    // The kernel holds its own reference to the socket now (or failed to take one).
    let _ = nix::unistd::close(sock);
    r?;
    let f2 = f
        .try_clone()
        .map_err(|e| Error::Device(dev.to_string(), e))?;
    // NBD_DO_IT blocks for the life of the connection, so it gets a thread of its own.
    let thread = std::thread::spawn(move || {
        let _ = ioctl(&f2, "NBD_DO_IT", NBD_DO_IT, 0);
        let _ = ioctl(&f2, "NBD_CLEAR_QUE", NBD_CLEAR_QUE, 0);
        let _ = ioctl(&f2, "NBD_CLEAR_SOCK", NBD_CLEAR_SOCK, 0);
    });
    let a = Attached {
        dev: f,
        path: dev.to_string(),
        export,
        thread: Some(thread),
    };
    // NBD_DO_IT creates /sys/block/nbdN/pid first and applies the size last
    // (nbd_start_device in drivers/block/nbd.c); I/O before that sees a disk of 0 sectors
    // and fails, so wait for both.
    let sys = Path::new("/sys/block").join(dev.trim_start_matches("/dev/"));
    let want_sectors = export.size / 512;
    let t0 = Instant::now();
    loop {
        let sectors = std::fs::read_to_string(sys.join("size"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if sys.join("pid").exists() && sectors >= want_sectors.max(1) {
            break;
        }
        if t0.elapsed() > START_LIMIT {
            return Err(Error::NotStarted(START_LIMIT));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(a)
}

impl Drop for Attached {
    fn drop(&mut self) {
        let _ = ioctl(&self.dev, "NBD_DISCONNECT", NBD_DISCONNECT, 0);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A scripted peer: reads come from `input`, writes are recorded.
    struct Fake {
        input: Cursor<Vec<u8>>,
        sent: Vec<u8>,
    }
    impl Read for Fake {
        fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
            self.input.read(b)
        }
    }
    impl Write for Fake {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.sent.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn greeting(flags: u16) -> Vec<u8> {
        let mut v = NBDMAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&flags.to_be_bytes());
        v
    }

    fn reply(opt: u32, typ: u32, data: &[u8]) -> Vec<u8> {
        let mut v = REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&opt.to_be_bytes());
        v.extend_from_slice(&typ.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    fn info_export(size: u64, flags: u16) -> Vec<u8> {
        let mut d = INFO_EXPORT.to_be_bytes().to_vec();
        d.extend_from_slice(&size.to_be_bytes());
        d.extend_from_slice(&flags.to_be_bytes());
        d
    }

    fn run(input: Vec<u8>) -> (Result<Export, Error>, Vec<u8>) {
        let mut f = Fake {
            input: Cursor::new(input),
            sent: Vec::new(),
        };
        let r = handshake(&mut f, "thin-client");
        (r, f.sent)
    }

    #[test]
    fn go_with_info_then_ack() {
        let mut i = greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        // An info type we do not ask about (block size) is skipped.
        i.extend(reply(
            OPT_GO,
            REP_INFO,
            &[0, 3, 0, 0, 2, 0, 0, 0, 16, 0, 0, 0, 0, 0x20, 0, 0, 0, 0],
        ));
        i.extend(reply(
            OPT_GO,
            REP_INFO,
            &info_export(1 << 30, 1 | TFLAG_READ_ONLY),
        ));
        i.extend(reply(OPT_GO, REP_ACK, &[]));
        let (r, sent) = run(i);
        assert_eq!(
            r.unwrap(),
            Export {
                size: 1 << 30,
                flags: 3
            }
        );
        // Client flags, then NBD_OPT_GO with the name and zero info requests.
        assert_eq!(&sent[..4], &[0, 0, 0, 3]);
        assert_eq!(&sent[4..], &opt_go("thin-client")[..]);
        assert_eq!(&sent[4 + 12..4 + 16], &(4 + 11 + 2u32).to_be_bytes());
    }

    #[test]
    fn falls_back_to_export_name() {
        let mut i = greeting(FLAG_FIXED_NEWSTYLE);
        i.extend(reply(OPT_GO, REP_ERR_UNSUP, b""));
        i.extend(4096u64.to_be_bytes());
        i.extend(1u16.to_be_bytes());
        i.extend([0u8; 124]);
        let (r, sent) = run(i);
        assert_eq!(
            r.unwrap(),
            Export {
                size: 4096,
                flags: 1
            }
        );
        assert_eq!(
            &sent[..4],
            &[0, 0, 0, 1],
            "no NO_ZEROES when the server lacks it"
        );
        assert!(sent.ends_with(&option(OPT_EXPORT_NAME, b"thin-client")));
    }

    #[test]
    fn refusals_and_garbage() {
        let mut i = greeting(3);
        i.extend(reply(OPT_GO, (1 << 31) | 6, b"no such export"));
        assert!(
            matches!(run(i).0, Err(Error::Refused { code, ref msg, .. }) if code == (1 << 31) | 6 && msg == "no such export")
        );
        assert!(matches!(
            run(b"HTTP/1.1 400 Bad Request\r\n".to_vec()).0,
            Err(Error::Protocol(_))
        ));
        assert!(matches!(run(greeting(0)).0, Err(Error::Protocol(_))));
        let mut i = greeting(3);
        i.extend(reply(OPT_GO, REP_ACK, &[]));
        assert!(
            matches!(run(i).0, Err(Error::Protocol(_))),
            "ACK without size"
        );
        let mut i = greeting(3);
        i.extend(reply(OPT_GO, REP_INFO, &[0u8; 0]).iter().take(16).copied());
        i.extend((MAX_REPLY + 1).to_be_bytes());
        assert!(matches!(run(i).0, Err(Error::Protocol(_))), "huge reply");
        let mut i = greeting(3);
        i.extend(reply(OPT_GO, REP_INFO, &info_export(1, 1)[..6]));
        assert!(matches!(run(i).0, Err(Error::Protocol(_))), "short info");
        // Truncated stream: an I/O error, not a hang or panic.
        assert!(matches!(
            run(greeting(3)[..10].to_vec()).0,
            Err(Error::Io(_))
        ));
        // Old server closing on an unknown export name.
        let mut i = greeting(1);
        i.extend(reply(OPT_GO, REP_ERR_UNSUP, b""));
        assert!(matches!(run(i).0, Err(Error::Refused { .. })));
    }

    /// Against real nbdkit on loopback, when installed.
    #[test]
    fn handshake_with_nbdkit() {
        let Some(nbdkit) = ["/usr/bin/nbdkit", "/usr/sbin/nbdkit"]
            .into_iter()
            .find(|p| Path::new(p).exists())
        else {
            eprintln!("skip: nbdkit not installed");
            return;
        };
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        struct Kill(std::process::Child);
        impl Drop for Kill {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let _guard = Kill(
            std::process::Command::new(nbdkit)
                .args([
                    "-f",
                    "-r",
                    "-i",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                    "memory",
                    "1M",
                ])
                .spawn()
                .unwrap(),
        );
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let t0 = Instant::now();
        let mut s = loop {
            match TcpStream::connect(addr) {
                Ok(s) => break s,
                Err(e) if t0.elapsed() > Duration::from_secs(30) => panic!("nbdkit: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let e = handshake(&mut s, "thin-client").unwrap();
        assert_eq!(e.size, 1 << 20);
        assert_ne!(e.flags & TFLAG_READ_ONLY, 0, "nbdkit -r exports read-only");
    }
}
