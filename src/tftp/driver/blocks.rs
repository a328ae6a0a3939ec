//! Where a transfer's DATA packets come from and how they leave: the file as is or
//! converted to netascii, read ahead of the window into one buffer, and sent a window at
//! a time (one GSO `sendmsg` where the kernel has it). Apart from the transfer's state
//! handling so each reads alone; the transfer only asks for blocks and sends them.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::fs::FileExt;

use tracing::debug;

use crate::tftp::codec;

/// Where DATA payloads come from: the file as is, or converted to netascii.
pub(super) enum Source {
    Octet { file: File, blksize: u64 },
    Netascii(Netascii),
}

impl Source {
    /// Fills consecutive packets of `seg` bytes in `buf` (payload after each 4-byte
    /// header) with blocks `first`, `first + 1`, ... Returns how many blocks were filled
    /// and the length of the last one; every block before it is full, and a short last
    /// one is the end of the file. Octet data comes in with one `preadv` for all of them.
    fn blocks(&mut self, first: u64, buf: &mut [u8], seg: usize) -> io::Result<(usize, usize)> {
        let bs = seg - 4;
        let want = buf.len() / seg;
        match self {
            Source::Octet { file, blksize } => {
                let mut iov: Vec<io::IoSliceMut<'_>> = buf
                    .chunks_mut(seg)
                    .map(|c| io::IoSliceMut::new(&mut c[4..]))
                    .collect();
                let off = ((first - 1) * *blksize) as nix::libc::off_t;
                let mut n = loop {
                    match nix::sys::uio::preadv(&*file, &mut iov, off) {
                        Ok(n) => break n,
                        Err(nix::errno::Errno::EINTR) => continue,
                        Err(e) => return Err(e.into()),
                    }
                };
                drop(iov);
                // preadv may stop short of EOF (a signal, a huge request); finish with
                // plain reads so a short block really means the end of the file.
                while n < want * bs {
                    let (k, r) = (n / bs, n % bs);
                    let start = k * seg + 4 + r;
                    let end = k * seg + 4 + bs;
                    let got =
                        file.read_at(&mut buf[start..end], ((first - 1) * *blksize) + n as u64)?;
                    if got == 0 {
                        break;
                    }
                    n += got;
                }
                if n == want * bs {
                    Ok((want, bs))
                } else {
                    Ok((n / bs + 1, n % bs))
                }
            }
            Source::Netascii(a) => {
                for k in 0..want {
                    let len = a.block(first + k as u64, &mut buf[k * seg + 4..(k + 1) * seg])?;
                    if len < bs {
                        return Ok((k + 1, len));
                    }
                }
                Ok((want, bs))
            }
        }
    }

    /// Blocks up to `acked` will never be asked again.
    pub(super) fn release(&mut self, acked: u64) {
        if let Source::Netascii(a) = self {
            while a.cache.front().is_some_and(|(i, _)| *i <= acked) {
                a.cache.pop_front();
            }
        }
    }
}

/// Netascii conversion of a file, one block at a time. Converted blocks of the current
/// window are kept, because a retransmission must resend the same bytes and the
/// conversion is not seekable.
pub(super) struct Netascii {
    file: File,
    blksize: usize,
    raw: Vec<u8>,
    raw_pos: usize,
    raw_off: u64,
    /// The second byte of a CR LF / CR NUL pair that did not fit into the last block.
    pending: Option<u8>,
    /// Index of the next block to convert.
    next: u64,
    cache: VecDeque<(u64, Vec<u8>)>,
}

impl Netascii {
    pub(super) fn new(file: File, blksize: u16) -> Netascii {
        Netascii {
            file,
            blksize: usize::from(blksize),
            raw: Vec::new(),
            raw_pos: 0,
            raw_off: 0,
            pending: None,
            next: 1,
            cache: VecDeque::new(),
        }
    }

    fn raw_byte(&mut self) -> io::Result<Option<u8>> {
        if self.raw_pos == self.raw.len() {
            self.raw.resize(64 * 1024, 0);
            let n = self.file.read_at(&mut self.raw, self.raw_off)?;
            self.raw.truncate(n);
            self.raw_off += n as u64;
            self.raw_pos = 0;
            if n == 0 {
                return Ok(None);
            }
        }
        self.raw_pos += 1;
        Ok(Some(self.raw[self.raw_pos - 1]))
    }

    fn convert_next(&mut self) -> io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(self.blksize);
        while out.len() < self.blksize {
            if let Some(p) = self.pending.take() {
                out.push(p);
                continue;
            }
            match self.raw_byte()? {
                None => break,
                Some(b'\n') => {
                    out.push(b'\r');
                    self.pending = Some(b'\n');
                }
                Some(b'\r') => {
                    out.push(b'\r');
                    self.pending = Some(0);
                }
                Some(b) => out.push(b),
            }
        }
        Ok(out)
    }

    fn block(&mut self, index: u64, out: &mut [u8]) -> io::Result<usize> {
        while self.next <= index {
            let b = self.convert_next()?;
            self.cache.push_back((self.next, b));
            self.next += 1;
        }
        let b = self
            .cache
            .iter()
            .find(|(i, _)| *i == index)
            .map(|(_, b)| b)
            .ok_or_else(|| io::Error::other("netascii block no longer cached"))?;
        out[..b.len()].copy_from_slice(b);
        Ok(b.len())
    }
}

/// DATA packets read ahead of the window, back to back in one buffer, each `seg` bytes
/// (4-byte header, then the block) but the file's last one.
///
/// One `preadv` fills many packets, and the buffer is refilled right after a window
/// leaves, while the client is busy with it, so the time from an ACK to the next DATA
/// holds no file read. A window that sits in the buffer leaves in one GSO `sendmsg`
/// (`UDP_SEGMENT`, Linux 4.18): the kernel cuts it into packets, one syscall instead of
/// one per packet.
pub(super) struct Ahead {
    buf: Vec<u8>,
    seg: usize,
    /// Blocks per refill: a multiple of `per`, so windows do not straddle refills.
    cap: usize,
    /// Packets per send: what one GSO send can carry, at most a window.
    pub(super) per: usize,
    gso: bool,
    /// Index of the first block held (0: none).
    first: u64,
    /// Blocks held.
    pub(super) count: usize,
    /// Payload length of the last block held.
    pub(super) last_len: usize,
}

/// The kernel's bounds for one GSO send: 64 segments, one IP datagram of payload.
const GSO_MAX_SEGMENTS: usize = 64;
const GSO_MAX_BYTES: usize = 65000;
/// How much one refill reads. 64 KiB is 44 blocks of 1468 bytes: the read costs a
/// fraction of a syscall per block, and the buffer stays within L2.
const AHEAD_BYTES: usize = 64 * 1024;

impl Ahead {
    pub(super) fn new(window: usize, seg: usize) -> Ahead {
        let per = (GSO_MAX_BYTES / seg)
            .clamp(1, GSO_MAX_SEGMENTS)
            .min(window.max(1));
        let cap = ((AHEAD_BYTES / seg) / per * per).max(per);
        Ahead {
            buf: Vec::with_capacity(cap * seg),
            seg,
            cap,
            per,
            // One packet per send gains nothing from GSO.
            gso: per > 1,
            first: 0,
            count: 0,
            last_len: 0,
        }
    }

    pub(super) fn holds(&self, i: u64) -> bool {
        self.count > 0 && i >= self.first && i < self.first + self.count as u64
    }

    /// Index of the last block held.
    pub(super) fn end(&self) -> u64 {
        self.first + self.count as u64 - 1
    }

    /// The last block held is short: it is the file's last.
    pub(super) fn at_eof(&self) -> bool {
        self.count > 0 && self.last_len < self.seg - 4
    }

    /// Reads blocks `first`, `first + 1`, ... as far as the buffer goes or the file ends.
    pub(super) fn fill(&mut self, src: &mut Source, first: u64) -> io::Result<()> {
        self.count = 0;
        self.buf.resize(self.cap * self.seg, 0);
        let (count, last_len) = src.blocks(first, &mut self.buf, self.seg)?;
        for k in 0..count {
            codec::data_header(&mut self.buf[k * self.seg..], (first + k as u64) as u16);
        }
        self.first = first;
        self.count = count;
        self.last_len = last_len;
        Ok(())
    }

    /// The packets of blocks `i..=j`, all held.
    fn packets(&self, i: u64, j: u64) -> &[u8] {
        let a = (i - self.first) as usize * self.seg;
        let k = (j - self.first) as usize;
        let b = if k + 1 == self.count {
            k * self.seg + 4 + self.last_len
        } else {
            (k + 1) * self.seg
        };
        &self.buf[a..b]
    }

    pub(super) fn send(
        &mut self,
        sock: &UdpSocket,
        i: u64,
        j: u64,
        peer: SocketAddr,
    ) -> io::Result<()> {
        let seg = self.seg;
        let p = self.packets(i, j);
        if self.gso && p.len() > seg {
            match send_gso(sock, p, seg, peer) {
                Ok(()) => return Ok(()),
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(
                            nix::libc::EINVAL
                                | nix::libc::EIO
                                | nix::libc::ENOPROTOOPT
                                | nix::libc::EOPNOTSUPP
                        )
                    ) =>
                {
                    debug!(%peer, error = %e, "no UDP GSO for this transfer; one packet per send");
                    self.gso = false;
                }
                Err(e) => return Err(e),
            }
        }
        for c in self.packets(i, j).chunks(seg) {
            sock.send_to(c, peer)?;
        }
        Ok(())
    }
}

fn send_gso(sock: &UdpSocket, buf: &[u8], seg: usize, peer: SocketAddr) -> io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, SockaddrStorage};
    use std::os::unix::io::AsRawFd;
    let addr = SockaddrStorage::from(peer);
    let seg = seg as u16;
    let iov = [io::IoSlice::new(buf)];
    loop {
        match sendmsg(
            sock.as_raw_fd(),
            &iov,
            &[ControlMessage::UdpGsoSegments(&seg)],
            MsgFlags::empty(),
            Some(&addr),
        ) {
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn netascii_of(data: &[u8], blksize: u16) -> Vec<Vec<u8>> {
        let p = std::env::temp_dir().join(format!(
            "vdd-na-{}-{}",
            std::process::id(),
            data.len() * 1000 + usize::from(blksize)
        ));
        std::fs::write(&p, data).unwrap();
        let mut a = Netascii::new(File::open(&p).unwrap(), blksize);
        let _ = std::fs::remove_file(&p);
        let mut out = Vec::new();
        let mut buf = vec![0u8; usize::from(blksize)];
        for i in 1.. {
            let n = a.block(i, &mut buf).unwrap();
            out.push(buf[..n].to_vec());
            if n < usize::from(blksize) {
                break;
            }
        }
        out
    }

    #[test]
    fn netascii_converts_line_ends() {
        let b = netascii_of(b"a\nb\rc\r\n", 512);
        assert_eq!(b, vec![b"a\r\nb\r\0c\r\0\r\n".to_vec()]);
    }

    #[test]
    fn netascii_pair_split_across_blocks() {
        // blksize 8: "abcdefg\n" -> "abcdefg\r" | "\n" (short, last).
        let b = netascii_of(b"abcdefg\n", 8);
        assert_eq!(b, vec![b"abcdefg\r".to_vec(), b"\n".to_vec()]);
        // Exactly one block of output: an empty last block follows.
        let b = netascii_of(b"abcdef\n", 8);
        assert_eq!(b, vec![b"abcdef\r\n".to_vec(), Vec::new()]);
    }

    #[test]
    fn netascii_blocks_are_repeatable_until_released() {
        let p = std::env::temp_dir().join(format!("vdd-na-rep-{}", std::process::id()));
        std::fs::write(&p, b"x\n".repeat(100)).unwrap();
        let mut s = Source::Netascii(Netascii::new(File::open(&p).unwrap(), 16));
        let _ = std::fs::remove_file(&p);
        let mut a = [0u8; 20];
        let mut b = [0u8; 20];
        assert_eq!(s.blocks(3, &mut a, 20).unwrap(), (1, 16));
        s.blocks(2, &mut b, 20).unwrap();
        s.blocks(2, &mut a, 20).unwrap();
        assert_eq!(a, b);
        s.release(2);
        assert!(s.blocks(2, &mut a, 20).is_err());
        assert_eq!(s.blocks(3, &mut a, 20).unwrap(), (1, 16));
    }

    #[test]
    fn read_ahead_holds_whole_windows_and_finds_the_end() {
        let p = std::env::temp_dir().join(format!("vdd-ahead-{}", std::process::id()));
        // 10 blocks of 4 bytes and a short one of 2.
        let data: Vec<u8> = (0..42u8).collect();
        std::fs::write(&p, &data).unwrap();
        let mut src = Source::Octet {
            file: File::open(&p).unwrap(),
            blksize: 4,
        };
        let _ = std::fs::remove_file(&p);
        let mut a = Ahead::new(3, 8);
        // Refills are whole windows: 64 KiB / 8 bytes, rounded down to a multiple of 3.
        assert_eq!(a.cap % 3, 0);
        a.cap = 6;
        a.fill(&mut src, 1).unwrap();
        assert!(a.holds(1) && a.holds(6) && !a.holds(7) && !a.at_eof());
        // Blocks 2..=3: two packets back to back, headers in place.
        assert_eq!(
            a.packets(2, 3),
            &[0, 3, 0, 2, 4, 5, 6, 7, 0, 3, 0, 3, 8, 9, 10, 11]
        );
        a.fill(&mut src, 7).unwrap();
        assert_eq!((a.first, a.end(), a.last_len), (7, 11, 2));
        assert!(a.at_eof());
        assert_eq!(a.packets(11, 11), &[0, 3, 0, 11, 40, 41]);
    }

    #[test]
    fn octet_windows_come_in_one_read() {
        let p = std::env::temp_dir().join(format!("vdd-oct-{}", std::process::id()));
        std::fs::write(&p, b"0123456789").unwrap();
        let mut s = Source::Octet {
            file: File::open(&p).unwrap(),
            blksize: 4,
        };
        let _ = std::fs::remove_file(&p);
        let mut buf = [0xaau8; 8 * 4];
        // Blocks 1..=3 of a 10-byte file at blksize 4: two full, one of 2 bytes.
        assert_eq!(s.blocks(1, &mut buf, 8).unwrap(), (3, 2));
        assert_eq!(&buf[4..8], b"0123");
        assert_eq!(&buf[12..16], b"4567");
        assert_eq!(&buf[20..22], b"89");
        // Starting in the middle.
        assert_eq!(s.blocks(2, &mut buf[..16], 8).unwrap(), (2, 2));
        assert_eq!(&buf[4..8], b"4567");
        let p = std::env::temp_dir().join(format!("vdd-oct8-{}", std::process::id()));
        std::fs::write(&p, b"01234567").unwrap();
        let mut s = Source::Octet {
            file: File::open(&p).unwrap(),
            blksize: 4,
        };
        let _ = std::fs::remove_file(&p);
        // A size that is a multiple of the block size ends with an empty block.
        assert_eq!(s.blocks(1, &mut buf, 8).unwrap(), (3, 0));
        assert_eq!(s.blocks(3, &mut buf[..8], 8).unwrap(), (1, 0));
        assert_eq!(s.blocks(1, &mut buf[..16], 8).unwrap(), (2, 4));
    }
}
