//! Disk helpers of the image builders, pure or nearly: sizes and alignment, the sparse
//! copy of a partition image into a disk, and sector 0 (the MBR).

use std::path::Path;

use anyhow::{bail, Context, Result};

/// Where the first partition starts: 1 MiB, as partitioning tools align today.
pub(super) const FIRST_LBA: u64 = 2048;
pub(super) const SECTOR: u64 = 512;
pub(super) const MIB: u64 = 1 << 20;

pub(super) fn round_up(n: u64, to: u64) -> u64 {
    n.div_ceil(to) * to
}

/// Copies `src` into `dst` at `offset`, skipping all-zero chunks so the disk stays sparse
/// (an ext4 image is mostly zeros; writing them would cost gigabytes for nothing).
pub(super) fn splice(dst: &mut std::fs::File, offset: u64, src: &Path) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let mut buf = vec![0u8; MIB as usize];
    let mut at = offset;
    loop {
        let mut n = 0;
        while n < buf.len() {
            match f.read(&mut buf[n..])? {
                0 => break,
                k => n += k,
            }
        }
        if n == 0 {
            return Ok(());
        }
        if buf[..n].iter().any(|&b| b != 0) {
            dst.seek(SeekFrom::Start(at))?;
            dst.write_all(&buf[..n])?;
        }
        at += n as u64;
    }
}

/// One primary partition of an MBR.
#[derive(Clone, Copy, Debug)]
pub struct Partition {
    pub bootable: bool,
    /// The partition type byte (0x0e FAT16 LBA, 0x83 Linux).
    pub kind: u8,
    pub start_lba: u64,
    pub sectors: u64,
}

/// Sector 0 of a disk: `boot_code` (syslinux's mbr.bin, at most 440 bytes), the disk
/// signature, up to four primary partitions and the 0x55AA mark. The CHS fields say
/// "beyond CHS" (as fdisk writes for LBA partitions): every BIOS SeaBIOS-era and later
/// reads by LBA, and so does mbr.bin.
pub fn mbr(boot_code: &[u8], parts: &[Partition], signature: u32) -> Result<[u8; 512]> {
    if boot_code.len() > 440 {
        bail!("MBR boot code is {} bytes, more than 440", boot_code.len());
    }
    if parts.len() > 4 {
        bail!("an MBR holds 4 primary partitions, not {}", parts.len());
    }
    let mut s = [0u8; 512];
    s[..boot_code.len()].copy_from_slice(boot_code);
    s[440..444].copy_from_slice(&signature.to_le_bytes());
    for (i, p) in parts.iter().enumerate() {
        let (Ok(start), Ok(len)) = (u32::try_from(p.start_lba), u32::try_from(p.sectors)) else {
            bail!("partition {} does not fit an MBR (2 TiB)", i + 1);
        };
        let e = &mut s[446 + 16 * i..446 + 16 * (i + 1)];
        e[0] = if p.bootable { 0x80 } else { 0 };
        e[1..4].copy_from_slice(&[0xfe, 0xff, 0xff]);
        e[4] = p.kind;
        e[5..8].copy_from_slice(&[0xfe, 0xff, 0xff]);
        e[8..12].copy_from_slice(&start.to_le_bytes());
        e[12..16].copy_from_slice(&len.to_le_bytes());
    }
    s[510] = 0x55;
    s[511] = 0xaa;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mbr_has_code_table_and_mark() {
        let code = [0xfau8; 440];
        let s = mbr(
            &code,
            &[
                Partition {
                    bootable: true,
                    kind: 0x0e,
                    start_lba: 2048,
                    sectors: 65536,
                },
                Partition {
                    bootable: false,
                    kind: 0x83,
                    start_lba: 67584,
                    sectors: 1 << 21,
                },
            ],
            0x1234_5678,
        )
        .unwrap();
        assert_eq!(&s[..440], &code[..]);
        assert_eq!(&s[440..444], &[0x78, 0x56, 0x34, 0x12]);
        assert_eq!(
            &s[446..462],
            &[
                0x80, 0xfe, 0xff, 0xff, 0x0e, 0xfe, 0xff, 0xff, 0x00, 0x08, 0, 0, 0x00, 0x00, 0x01,
                0x00
            ]
        );
        assert_eq!(s[462 + 4], 0x83);
        assert_eq!(&s[462 + 8..462 + 12], &67584u32.to_le_bytes());
        assert!(s[478..510].iter().all(|&b| b == 0));
        assert_eq!(&s[510..], &[0x55, 0xaa]);
    }

    #[test]
    fn mbr_refuses_what_does_not_fit() {
        let p = Partition {
            bootable: false,
            kind: 0x83,
            start_lba: 2048,
            sectors: 1 << 33,
        };
        assert!(mbr(&[], &[p], 0).is_err());
        assert!(mbr(&[0; 441], &[], 0).is_err());
        assert!(mbr(&[], &[p; 5], 0).is_err());
    }
}
