//! The lease store: an in-memory table the policy reads, and the append-only journal in
//! `state_dir` that makes every binding durable (RFC 2131 section 4.3: a server must
//! remember its bindings across restarts so it never hands one address to two clients).
//!
//! Why a journal with group commit and not an embedded database: the workload is tiny
//! records written at up to thousands per second, each of which must be on disk before
//! its ACK leaves. One fdatasync per lease caps the server at the disk's sync rate
//! (a few hundred per second on many disks); an append-only file lets one writer batch
//! every lease that arrived during the previous sync into the next one (group commit),
//! so the rate grows with load while each ACK still waits for its own record. The file is
//! plain text (`vdd leases` and an admin's `less` can read it), a torn last line after a
//! crash is simply dropped on replay (its ACK never left), and compaction rewrites the
//! live set into a temp file, fsyncs it, renames it over the journal and fsyncs the
//! directory, so a crash at any point leaves either the old or the new journal whole.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use crate::config::{Mac, Pool};

/// File name of the journal inside `state_dir`.
pub const JOURNAL: &str = "dhcp-leases.journal";
/// Space set aside beside the journal (a file of its own, allocated at start): guest
/// overlays share the state disk, and when they fill it the journal gives this back and
/// goes on, so ACKs keep leaving. 16 MiB is some 150,000 lease records.
pub const RESERVE: &str = "dhcp-leases.reserve";
pub const RESERVE_BYTES: u64 = 16 << 20;

/// Why the lease store could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Opening, reading or writing the journal failed.
    #[error("lease journal {path}")]
    Journal {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What an address is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Offered, not yet requested; memory only (an offer binds nothing).
    Offered,
    /// ACKed: journaled before the ACK left.
    Bound,
    /// A client said someone else uses it (DECLINE); set aside until `until`.
    Declined,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    pub ip: Ipv4Addr,
    /// `None` for declined addresses.
    pub mac: Option<Mac>,
    pub state: State,
    /// Unix seconds; wall clock, because expiry must mean the same after a restart.
    pub until: u64,
}

impl Lease {
    /// True while nobody else may get this address.
    pub fn active(&self, now: u64) -> bool {
        self.until > now
    }
}

/// A change the policy asks for; the driver applies it and journals the durable ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    Offer {
        ip: Ipv4Addr,
        mac: Mac,
        until: u64,
    },
    Bind {
        ip: Ipv4Addr,
        mac: Mac,
        until: u64,
    },
    /// RELEASE, or a client that chose another server's offer.
    Free {
        ip: Ipv4Addr,
        mac: Mac,
    },
    Decline {
        ip: Ipv4Addr,
        until: u64,
    },
}

impl Change {
    /// Whether this change must reach the journal (offers live only in memory).
    pub fn durable(&self) -> bool {
        !matches!(self, Change::Offer { .. })
    }

    /// The journal line, newline included.
    pub fn record(&self) -> String {
        match *self {
            Change::Offer { ip, mac, until } => format!("O {ip} {mac} {until}\n"),
            Change::Bind { ip, mac, until } => format!("B {ip} {mac} {until}\n"),
            Change::Free { ip, mac } => format!("F {ip} {mac}\n"),
            Change::Decline { ip, until } => format!("D {ip} {until}\n"),
        }
    }

    /// Parses one journal line (without its newline); `None` for a damaged line.
    pub fn parse(line: &str) -> Option<Change> {
        let f: Vec<&str> = line.split(' ').collect();
        let ip = || f.get(1)?.parse::<Ipv4Addr>().ok();
        let mac = || f.get(2)?.parse::<Mac>().ok();
        match (f.first().copied(), f.len()) {
            (Some("B"), 4) => Some(Change::Bind {
                ip: ip()?,
                mac: mac()?,
                until: f[3].parse().ok()?,
            }),
            (Some("F"), 3) => Some(Change::Free {
                ip: ip()?,
                mac: mac()?,
            }),
            (Some("D"), 3) => Some(Change::Decline {
                ip: ip()?,
                until: f[2].parse().ok()?,
            }),
            _ => None,
        }
    }
}

/// Every address we know something about, indexed both ways.
#[derive(Clone, Debug, Default)]
pub struct LeaseTable {
    by_ip: HashMap<Ipv4Addr, Lease>,
    by_mac: HashMap<Mac, Ipv4Addr>,
    /// Where the next free-address search starts: just past the last offer, so a busy
    /// server finds a free address in O(1) instead of rescanning the leased front.
    cursor: u32,
}

impl LeaseTable {
    pub fn get(&self, ip: Ipv4Addr) -> Option<&Lease> {
        self.by_ip.get(&ip)
    }

    /// The address this MAC last had (offered, bound or expired), if we still remember it.
    pub fn of_mac(&self, mac: &Mac) -> Option<&Lease> {
        let ip = self.by_mac.get(mac)?;
        self.by_ip.get(ip).filter(|l| l.mac == Some(*mac))
    }

    /// True when `mac` may have `ip` now: nobody else holds it.
    pub fn available_to(&self, ip: Ipv4Addr, mac: &Mac, now: u64) -> bool {
        match self.by_ip.get(&ip) {
            None => true,
            Some(l) => l.mac == Some(*mac) && l.state != State::Declined || !l.active(now),
        }
    }

    /// A free pool address, scanning at most the whole pool once from the cursor.
    pub fn find_free(&self, pool: &Pool, now: u64) -> Option<Ipv4Addr> {
        let first = u32::from(pool.first);
        let n = pool.len();
        let start = self.cursor.wrapping_sub(first) % n;
        (0..n)
            .map(|i| Ipv4Addr::from(first + (start + i) % n))
            .find(|ip| self.by_ip.get(ip).is_none_or(|l| !l.active(now)))
    }

    pub fn apply(&mut self, c: &Change) {
        match *c {
            Change::Offer { ip, mac, until } | Change::Bind { ip, mac, until } => {
                let state = if matches!(c, Change::Offer { .. }) {
                    State::Offered
                } else {
                    State::Bound
                };
                self.unlink(ip);
                if let Some(old) = self.by_mac.insert(mac, ip) {
                    if old != ip {
                        // The client moved: its old address is free again.
                        self.by_ip.remove(&old);
                    }
                }
                self.by_ip.insert(
                    ip,
                    Lease {
                        ip,
                        mac: Some(mac),
                        state,
                        until,
                    },
                );
                self.cursor = u32::from(ip).wrapping_add(1);
            }
            Change::Free { ip, mac } => {
                if self.by_ip.get(&ip).is_some_and(|l| l.mac == Some(mac)) {
                    // Keep the MAC's memory so it gets the same address back, but
                    // expired, so anyone may take it.
                    if let Some(l) = self.by_ip.get_mut(&ip) {
                        l.until = 0;
                        l.state = State::Bound;
                    }
                }
            }
            Change::Decline { ip, until } => {
                self.unlink(ip);
                self.by_ip.insert(
                    ip,
                    Lease {
                        ip,
                        mac: None,
                        state: State::Declined,
                        until,
                    },
                );
            }
        }
    }

    fn unlink(&mut self, ip: Ipv4Addr) {
        if let Some(Lease { mac: Some(m), .. }) = self.by_ip.remove(&ip) {
            if self.by_mac.get(&m) == Some(&ip) {
                self.by_mac.remove(&m);
            }
        }
    }

    /// Every lease, sorted by address.
    pub fn all(&self) -> Vec<Lease> {
        let mut v: Vec<Lease> = self.by_ip.values().copied().collect();
        v.sort_by_key(|l| l.ip);
        v
    }

    /// The records that recreate the durable part of this table (for compaction).
    pub fn snapshot(&self, now: u64) -> String {
        let mut s = String::new();
        for l in self.all() {
            let c = match (l.state, l.mac) {
                (State::Bound, Some(mac)) => Change::Bind {
                    ip: l.ip,
                    mac,
                    until: l.until,
                },
                // An expired declined address needs no memory.
                (State::Declined, _) if l.active(now) => Change::Decline {
                    ip: l.ip,
                    until: l.until,
                },
                _ => continue,
            };
            s.push_str(&c.record());
        }
        s
    }
}

/// What a replay read.
#[derive(Debug, Default)]
pub struct Replayed {
    pub table: LeaseTable,
    /// Byte length of the good records.
    pub good: u64,
    /// Good records.
    pub records: u64,
    /// Whole lines that were not a record (damaged), skipped.
    pub damaged: u64,
}

/// Reads a journal: the table it describes. A torn tail (a crash mid-write, no newline
/// yet) is dropped: its ACK never left. A damaged line in the middle is skipped and
/// counted, and the records after it still count: stopping there lost every lease after
/// it, and the next compaction then wrote the journal without them.
pub fn replay(bytes: &[u8]) -> Replayed {
    let mut r = Replayed::default();
    for line in bytes.split_inclusive(|&b| b == b'\n') {
        let Some(body) = line.strip_suffix(b"\n") else {
            break; // torn
        };
        let Some(c) = std::str::from_utf8(body).ok().and_then(Change::parse) else {
            r.damaged += 1;
            continue;
        };
        r.table.apply(&c);
        r.good += line.len() as u64;
        r.records += 1;
    }
    r
}

/// The journal file, owned by the one writer.
pub struct Journal {
    path: PathBuf,
    dir: PathBuf,
    file: File,
    /// The table as the journal describes it, for compaction snapshots.
    mirror: LeaseTable,
    /// Records appended since the last compaction.
    records: u64,
    /// The reserve's size, 0 once given back.
    reserve_bytes: u64,
}

fn jerr(path: &Path) -> impl FnOnce(std::io::Error) -> LeaseError + '_ {
    move |source| LeaseError::Journal {
        path: path.to_path_buf(),
        source,
    }
}

impl Journal {
    /// Opens (or creates) the journal in `dir`, replays it, and compacts it so the file
    /// starts clean (a torn tail is cut off before anything is appended after it).
    pub fn open(dir: &Path, now: u64) -> Result<(Journal, LeaseTable), LeaseError> {
        Journal::open_with_reserve(dir, now, RESERVE_BYTES)
    }

    /// [`Journal::open`] with a reserve of `reserve_bytes` (tests use a small one).
    pub fn open_with_reserve(
        dir: &Path,
        now: u64,
        reserve_bytes: u64,
    ) -> Result<(Journal, LeaseTable), LeaseError> {
        let path = dir.join(JOURNAL);
        std::fs::create_dir_all(dir).map_err(jerr(dir))?;
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(jerr(&path))?;
        let mut bytes = Vec::new();
        file.seek(SeekFrom::Start(0)).map_err(jerr(&path))?;
        file.read_to_end(&mut bytes).map_err(jerr(&path))?;
        let Replayed { table, damaged, .. } = replay(&bytes);
        if damaged > 0 {
            tracing::warn!(path = %path.display(), damaged, "lease journal: damaged records skipped; the leases around them are kept");
        }
        let mut j = Journal {
            path: path.clone(),
            dir: dir.to_path_buf(),
            file,
            mirror: table.clone(),
            records: 0,
            reserve_bytes,
        };
        j.compact(now)?;
        j.refill_reserve();
        Ok((j, table))
    }

    /// Allocates the reserve (again), when there is room for it.
    fn refill_reserve(&mut self) {
        let path = self.dir.join(RESERVE);
        let made = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .and_then(|f| {
                nix::fcntl::fallocate(
                    std::os::fd::AsRawFd::as_raw_fd(&f),
                    nix::fcntl::FallocateFlags::empty(),
                    0,
                    self.reserve_bytes as i64,
                )
                .map_err(std::io::Error::from)
            });
        if let Err(e) = made {
            tracing::warn!(path = %path.display(), "lease journal: no room for its {} MiB reserve: {e}", self.reserve_bytes >> 20);
        }
    }

    /// On a full disk: gives the reserve back, once. True when there was one to give.
    fn release_reserve(&mut self) -> bool {
        let path = self.dir.join(RESERVE);
        let had = std::fs::metadata(&path).is_ok_and(|m| m.len() > 0);
        if had && std::fs::write(&path, b"").is_ok() {
            tracing::error!(state_dir = %self.dir.display(), "the state disk is full: the lease journal gave back its reserve and goes on; free space there (guest overlays?) now");
            return true;
        }
        false
    }

    /// Appends records and waits until they are on disk: the group commit point.
    pub fn commit(&mut self, changes: &[Change]) -> Result<(), LeaseError> {
        let mut buf = String::new();
        let durable: Vec<&Change> = changes.iter().filter(|c| c.durable()).collect();
        for c in &durable {
            buf.push_str(&c.record());
        }
        if buf.is_empty() {
            return Ok(());
        }
        let before = self.file.metadata().map_err(jerr(&self.path))?.len();
        let mut retried = false;
        loop {
            // fdatasync, not fsync: the file's size is data for fdatasync, and mtime is
            // not worth a second disk write per batch.
            let written = self
                .file
                .write_all(buf.as_bytes())
                .and_then(|()| self.file.sync_data());
            let Err(e) = written else { break };
            // A short write (disk full) must not leave half a record for the next
            // append to run into: cut the file back to its last whole record.
            let _ = self.file.set_len(before);
            let full = e.raw_os_error() == Some(nix::libc::ENOSPC);
            if full && !retried && self.release_reserve() {
                retried = true;
                continue;
            }
            return Err(jerr(&self.path)(e));
        }
        for c in durable {
            self.mirror.apply(c);
            self.records += 1;
        }
        Ok(())
    }

    /// Whether the journal has grown enough past the live set to be worth rewriting.
    pub fn wants_compaction(&self) -> bool {
        self.records > 10_000 && self.records > 2 * self.mirror.by_ip.len() as u64
    }

    /// Rewrites the journal as a snapshot of the live leases: tmp file, fsync, rename,
    /// fsync of the directory (so the rename itself survives a crash).
    pub fn compact(&mut self, now: u64) -> Result<(), LeaseError> {
        let tmp = self.dir.join(format!("{JOURNAL}.tmp"));
        let snap = self.mirror.snapshot(now);
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(snap.as_bytes())?;
            f.sync_all()
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_file(&tmp);
            // A full disk: the reserve pays for the snapshot, as for an append.
            let full = e.raw_os_error() == Some(nix::libc::ENOSPC);
            if !(full && self.release_reserve()) {
                return Err(jerr(&tmp)(e));
            }
            write().map_err(jerr(&tmp))?;
        }
        std::fs::rename(&tmp, &self.path).map_err(jerr(&self.path))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(jerr(&self.dir))?;
        self.file = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(jerr(&self.path))?;
        // Rebuild the mirror from what is now on disk, dropping forgotten entries.
        self.mirror = replay(snap.as_bytes()).table;
        self.records = 0;
        Ok(())
    }
}

/// Reads the journal without changing it (for `vdd leases`).
pub fn read_table(dir: &Path) -> Result<LeaseTable, LeaseError> {
    let path = dir.join(JOURNAL);
    let f = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(LeaseTable::default()),
        Err(e) => return Err(jerr(&path)(e)),
    };
    let mut bytes = Vec::new();
    let mut r = BufReader::new(f);
    loop {
        let n = r.read_until(b'\n', &mut bytes).map_err(jerr(&path))?;
        if n == 0 {
            break;
        }
    }
    Ok(replay(&bytes).table)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(n: u8) -> Mac {
        Mac([2, 0, 0, 0, 0, n])
    }
    fn ip(n: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, 0, n)
    }
    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vdd-leases-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn records_round_trip() {
        for c in [
            Change::Bind {
                ip: ip(5),
                mac: mac(1),
                until: 99,
            },
            Change::Free {
                ip: ip(5),
                mac: mac(1),
            },
            Change::Decline {
                ip: ip(6),
                until: 7,
            },
        ] {
            let r = c.record();
            assert_eq!(Change::parse(r.trim_end()), Some(c));
        }
        assert_eq!(Change::parse("B 10.77.0.5 02:00:00:00:00:01"), None);
        assert_eq!(Change::parse("X junk"), None);
    }

    #[test]
    fn torn_tail_is_dropped() {
        let j = "B 10.77.0.5 02:00:00:00:00:01 100\nB 10.77.0.6 02:00:00:00:00:02 100\nB 10.77.0.7 02:00:0";
        let r = replay(j.as_bytes());
        assert_eq!((r.records, r.damaged), (2, 0));
        assert_eq!(r.good as usize, j.rfind('\n').unwrap() + 1);
        assert!(r.table.get(ip(6)).is_some());
        assert!(r.table.get(ip(7)).is_none());
    }

    /// Issue 17, finding 8: a record cut short in the middle stopped the replay, and
    /// the leases after it vanished.
    #[test]
    fn a_damaged_record_in_the_middle_is_skipped() {
        let j = "B 10.77.0.5 02:00:00:00:00:01 100\nB 10.77.0.6 02:0B 10.77.0.9 02:00:00:00:00:09 100\nB 10.77.0.7 02:00:00:00:00:03 100\n";
        let r = replay(j.as_bytes());
        assert_eq!((r.records, r.damaged), (2, 1));
        assert!(r.table.get(ip(5)).is_some());
        assert!(
            r.table.get(ip(7)).is_some(),
            "the lease after the damage was lost"
        );
    }

    #[test]
    fn free_search_skips_active_and_declined() {
        let pool = Pool {
            first: ip(100),
            last: ip(102),
        };
        let mut t = LeaseTable::default();
        assert_eq!(t.find_free(&pool, 10), Some(ip(100)));
        t.apply(&Change::Bind {
            ip: ip(100),
            mac: mac(1),
            until: 50,
        });
        t.apply(&Change::Decline {
            ip: ip(101),
            until: 50,
        });
        assert_eq!(t.find_free(&pool, 10), Some(ip(102)));
        t.apply(&Change::Offer {
            ip: ip(102),
            mac: mac(3),
            until: 50,
        });
        assert_eq!(t.find_free(&pool, 10), None, "exhausted");
        // After expiry everything is free again, and the cursor wraps.
        assert!(t.find_free(&pool, 60).is_some());
        assert!(!t.available_to(ip(100), &mac(2), 10));
        assert!(t.available_to(ip(100), &mac(1), 10));
        assert!(!t.available_to(ip(101), &mac(1), 10), "declined");
    }

    #[test]
    fn moving_client_frees_old_address() {
        let mut t = LeaseTable::default();
        t.apply(&Change::Bind {
            ip: ip(100),
            mac: mac(1),
            until: 50,
        });
        t.apply(&Change::Bind {
            ip: ip(101),
            mac: mac(1),
            until: 50,
        });
        assert!(t.get(ip(100)).is_none());
        assert_eq!(t.of_mac(&mac(1)).unwrap().ip, ip(101));
        t.apply(&Change::Free {
            ip: ip(101),
            mac: mac(1),
        });
        assert!(!t.of_mac(&mac(1)).unwrap().active(10));
    }

    /// Finding 8 of the hardening audit: guest overlays filled the state disk and every
    /// ACK waited on a journal write that could not happen. On a 1 MiB tmpfs filled to
    /// the last byte, the journal gives back its reserve and its commit succeeds.
    #[test]
    fn a_full_disk_takes_the_reserve_and_acks_go_on() {
        if !xtask::lab::is_root() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI must run this as root"
            );
            eprintln!("skipping: not root (mounts a tmpfs)");
            return;
        }
        let d = tmpdir("full");
        std::fs::create_dir_all(&d).unwrap();
        struct Mounted(PathBuf);
        impl Drop for Mounted {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg(&self.0).status();
                let _ = std::fs::remove_dir(&self.0);
            }
        }
        let st = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                "size=1m",
                "vdd-test",
                d.to_str().unwrap(),
            ])
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs");
        let _m = Mounted(d.clone());
        let (mut j, _) = Journal::open_with_reserve(&d, 0, 256 << 10).unwrap();
        assert_eq!(std::fs::metadata(d.join(RESERVE)).unwrap().len(), 256 << 10);
        // Everything else the disk has goes to an overlay.
        let mut filler = File::create(d.join("overlay.qcow2")).unwrap();
        while filler.write_all(&[0u8; 4096]).is_ok() {}
        let bind = |n| Change::Bind {
            ip: ip(100 + n),
            mac: mac(n),
            until: 3600,
        };
        assert!(
            filler.write_all(&[0u8; 4096]).is_err(),
            "the disk is full now"
        );
        j.commit(&[bind(1)]).expect("the reserve pays for this ACK");
        assert_eq!(std::fs::metadata(d.join(RESERVE)).unwrap().len(), 0);
        // What was acknowledged is on disk, whole.
        let table = read_table(&d).unwrap();
        assert_eq!(table.of_mac(&mac(1)).map(|l| l.ip), Some(ip(101)));
    }

    #[test]
    fn journal_survives_reopen_and_compaction() {
        let d = tmpdir("reopen");
        let (mut j, t) = Journal::open(&d, 0).unwrap();
        assert!(t.all().is_empty());
        let binds: Vec<Change> = (1..=50)
            .map(|n| Change::Bind {
                ip: ip(n),
                mac: mac(n),
                until: 1000,
            })
            .collect();
        j.commit(&binds).unwrap();
        j.commit(&[
            Change::Free {
                ip: ip(1),
                mac: mac(1),
            },
            Change::Decline {
                ip: ip(60),
                until: 1000,
            },
            Change::Offer {
                ip: ip(61),
                mac: mac(61),
                until: 1000,
            },
        ])
        .unwrap();
        drop(j);
        // A crash mid-append leaves a torn line; reopening cuts it off and keeps the rest.
        let path = d.join(JOURNAL);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"B 10.77.0.99 02:00").unwrap();
        drop(f);
        let (mut j, t) = Journal::open(&d, 10).unwrap();
        assert_eq!(t.get(ip(50)).unwrap().mac, Some(mac(50)));
        assert_eq!(t.get(ip(1)).unwrap().until, 0, "released");
        assert_eq!(t.get(ip(60)).unwrap().state, State::Declined);
        assert!(t.get(ip(61)).is_none(), "offers are not durable");
        assert!(t.get(ip(99)).is_none(), "torn record dropped");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.ends_with('\n'), "compaction cut the torn tail");
        j.commit(&[Change::Bind {
            ip: ip(70),
            mac: mac(70),
            until: 1000,
        }])
        .unwrap();
        j.compact(10).unwrap();
        let t = read_table(&d).unwrap();
        assert_eq!(t.get(ip(70)).unwrap().mac, Some(mac(70)));
        assert_eq!(t.get(ip(2)).unwrap().until, 1000);
        assert!(!d.join(format!("{JOURNAL}.tmp")).exists());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
