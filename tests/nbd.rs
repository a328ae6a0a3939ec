//! The NBD service against real clients (nbdinfo, nbdcopy, qemu-img, qemu-io, libnbd's
//! Python bindings) and a raw client for what real clients refuse to send: the server runs
//! in-process on 127.0.0.1:0.
//!
//! Spec: NetworkBlockDevice/nbd `doc/proto.md`.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use vdd::config::Config;
use vdd::nbd::codec::{self, Request};
use xtask::lab;

/// The Debian python3 that has python3-libnbd (a pyenv shim may shadow it on PATH).
const PYTHON: &str = "/usr/bin/python3";

struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("vdd-nbd-it-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), so images and fuzz runs repeat.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

const IMAGE_SIZE: usize = 8 << 20;

/// A running server and the files it serves; stopped and removed on Drop.
struct Server {
    addr: SocketAddr,
    dir: TempDir,
    image: PathBuf,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(tag: &str) -> Server {
        Server::start_with(tag, 200)
    }

    fn start_with(tag: &str, max_connections: usize) -> Server {
        // Every test client comes from 127.0.0.1: the per-address cap as high as the cap.
        Server::start_caps(tag, max_connections, max_connections)
    }

    fn start_caps(tag: &str, max_connections: usize, max_per_address: usize) -> Server {
        let dir = TempDir::new(tag);
        let image = dir.0.join("base.img");
        std::fs::write(&image, Rng(7).bytes(IMAGE_SIZE)).unwrap();
        let text = format!(
            r#"
[server]
interface = "lo"
state_dir = "{state}"
[dhcp]
mode = "off"
[nbd]
max_connections = {max_connections}
max_per_address = {max_per_address}
[[nbd.export]]
name = "ro"
path = "base.img"
description = "the read-only base"
[[nbd.export]]
name = "ov"
path = "base.img"
mode = "overlay"
description = "per-client overlay"
[[nbd.export]]
name = "keep"
path = "base.img"
mode = "overlay"
persist = true
[[nbd.export]]
name = "missing"
path = "nope.img"
"#,
            state = dir.0.join("state").display(),
        );
        let cfg = Arc::new(Config::parse(&text, &dir.0.join("config.toml")).unwrap());
        let stop = CancellationToken::new();
        let (tx, rx) = std::sync::mpsc::channel();
        let token = stop.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let s = vdd::nbd::Service::bind_addr(cfg, "127.0.0.1:0".parse().unwrap())
                    .await
                    .unwrap();
                tx.send(s.local_addr()).unwrap();
                s.run(token).await.unwrap();
            });
        });
        let addr = rx.recv_timeout(Duration::from_secs(30)).unwrap();
        Server {
            addr,
            dir,
            image,
            stop,
            thread: Some(thread),
        }
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.addr.port())
    }

    fn overlay_dir(&self) -> PathBuf {
        self.dir.0.join("state/nbd/ov")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed: {text}");
    text
}

fn sha256(path: &Path) -> String {
    run(Command::new("sha256sum").arg(path))
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Drops one file's clean pages from the page cache (only that file: other users of the
/// machine are not affected).
fn evict(path: &Path) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: advisory syscall on our own fd.
    let r =
        unsafe { nix::libc::posix_fadvise(f.as_raw_fd(), 0, 0, nix::libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0);
}

/// These tests need tools but not root (everything is on loopback), so they check the
/// tools themselves rather than through `lab::missing`, with the same rule: under
/// `CI=true` a missing tool fails the test instead of skipping it.
fn skip(test: &str, tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| lab::which(t).is_none())
        .collect();
    if missing.is_empty() {
        return false;
    }
    let why = format!("not installed: {}", missing.join(", "));
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI must provide everything {test} needs, but {why}"
    );
    eprintln!("skipping {test}: {why}");
    true
}

#[test]
fn nbdinfo_lists_exports_with_sizes_and_descriptions() {
    if skip("nbdinfo_list", &["nbdinfo"]) {
        return;
    }
    let s = Server::start("list");
    let out = run(Command::new("nbdinfo")
        .args(["--list", "--json"])
        .arg(s.uri("")));
    for want in [
        "\"ro\"",
        "\"ov\"",
        "the read-only base",
        "per-client overlay",
        &format!("{IMAGE_SIZE}"),
    ] {
        assert!(out.contains(want), "{want} missing from: {out}");
    }
    // One export's own view: read-only flag and size.
    let out = run(Command::new("nbdinfo").arg(s.uri("ro")));
    assert!(out.contains(&format!("export-size: {IMAGE_SIZE}")), "{out}");
    assert!(out.contains("is_read_only: true"), "{out}");
}

#[test]
fn nbdcopy_and_qemu_img_see_the_image() {
    if skip(
        "nbdcopy_and_qemu_img",
        &["nbdcopy", "qemu-img", "sha256sum"],
    ) {
        return;
    }
    let s = Server::start("copy");
    let out = s.dir.0.join("copy.img");
    run(Command::new("nbdcopy").arg(s.uri("ro")).arg(&out));
    assert_eq!(sha256(&out), sha256(&s.image));
    // Again with the image out of the page cache: reads take the pread path on the
    // blocking pool instead of sendfile from cached pages.
    evict(&s.image);
    std::fs::remove_file(&out).unwrap();
    run(Command::new("nbdcopy").arg(s.uri("ov")).arg(&out));
    assert_eq!(sha256(&out), sha256(&s.image));
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(s.uri("ro"))
        .arg(&s.image));
    // The overlay export reads as the base while nothing was written.
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(s.uri("ov"))
        .arg(&s.image));
}

#[test]
fn qemu_io_writes_to_overlay_read_back_and_spare_the_base() {
    if skip("qemu_io_overlay", &["qemu-io", "sha256sum"]) {
        return;
    }
    let s = Server::start("qio");
    let before = sha256(&s.image);
    let out = run(Command::new("qemu-io")
        .args(["-f", "raw"])
        .arg(s.uri("ov"))
        .args([
            "-c",
            "write -P 0xab 4000 10000",
            "-c",
            "read -P 0xab 4000 10000",
            "-c",
            "write -z 1048576 65536",
            "-c",
            "read -P 0 1048576 65536",
            "-c",
            "discard 2097152 4096",
            "-c",
            "flush",
        ]));
    assert!(!out.contains("verification failed"), "{out}");
    assert!(!out.contains("failed"), "{out}");
    assert_eq!(sha256(&s.image), before, "the base file changed");
    // The client disconnected: its overlay is gone, and a new connection sees the base.
    let left: Vec<_> = std::fs::read_dir(s.overlay_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(left.is_empty(), "overlay kept after disconnect: {left:?}");
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(s.uri("ov"))
        .arg(&s.image));
    // Writes to the read-only export are refused by the server (qemu-io honours the flag
    // first, so it cannot even try: the precise EPERM check is in python_checks).
    let out = Command::new("qemu-io")
        .args(["-f", "raw"])
        .arg(s.uri("ro"))
        .args(["-c", "write -P 1 0 512"])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("ermission") || text.contains("read-only") || text.contains("Read-only"),
        "{text}"
    );
}

/// Precise checks with libnbd: errno values, per-client overlays by source address.
const PY_CHECKS: &str = r#"
import errno, socket, sys, nbd, os
port = int(sys.argv[1]); ovdir = sys.argv[2]; size = int(sys.argv[3])

def conn(export, src="127.0.0.1", strict=True):
    h = nbd.NBD()
    if not strict:
        h.set_strict_mode(0)
    h.set_export_name(export)
    s = socket.socket()
    s.bind((src, 0))
    s.connect(("127.0.0.1", port))
    h.connect_socket(s.detach())
    return h

def expect_errno(fn, want, what):
    try:
        fn()
    except nbd.Error as e:
        # libnbd gives the errno as a name ("EPERM").
        got = e.errno if isinstance(e.errno, int) else getattr(errno, e.errno)
        assert got == want, f"{what}: errno {e.errno}, wanted {want}: {e}"
        return
    raise AssertionError(f"{what}: succeeded")

# Read-only export: writes EPERM, out of range EINVAL, and the connection goes on.
ro = conn("ro", strict=False)
base = ro.pread(4096, 0)
expect_errno(lambda: ro.pwrite(b"x" * 512, 0), errno.EPERM, "write to read-only")
expect_errno(lambda: ro.trim(4096, 0), errno.EPERM, "trim on read-only")
expect_errno(lambda: ro.zero(4096, 0), errno.EPERM, "zero on read-only")
expect_errno(lambda: ro.pread(512, size - 256), errno.EINVAL, "read past the end")
expect_errno(lambda: ro.pread(1, size), errno.EINVAL, "read at the end")
assert ro.pread(4096, 0) == base, "connection unusable after refusals"
ro.flush()
ro.cache(65536, 0)
ro.shutdown()

# Overlay export, by source address: 127.0.0.1 writes, its second connection sees it,
# 127.0.0.2 does not.
a1 = conn("ov", "127.0.0.1")
a2 = conn("ov", "127.0.0.1")
b = conn("ov", "127.0.0.2")
assert a1.can_multi_conn() and a1.can_flush() and a1.can_fua() and a1.can_trim()
assert not a1.is_read_only()
a1.pwrite(b"\xab" * 8192, 4096 + 10, nbd.CMD_FLAG_FUA)
assert a1.pread(8192, 4096 + 10) == b"\xab" * 8192
assert a2.pread(8192, 4096 + 10) == b"\xab" * 8192, "same client, other connection"
ref = conn("ro")
orig = ref.pread(8192, 4096 + 10)
assert orig != b"\xab" * 8192
assert b.pread(8192, 4096 + 10) == orig, "another client saw the first one's writes"
assert a1.pread(10, 4096) == ref.pread(10, 4096), "bytes before the write changed"
ref.shutdown()
names = sorted(os.listdir(ovdir))
assert names == ["127.0.0.1.overlay", "127.0.0.2.overlay"], names
loose = conn("ov", strict=False)
expect_errno(lambda: loose.pwrite(b"x", size), errno.ENOSPC, "write past the end")
expect_errno(lambda: loose.zero(2, size - 1), errno.ENOSPC, "zero past the end")
expect_errno(lambda: loose.trim(2, size - 1), errno.EINVAL, "trim past the end")
expect_errno(lambda: loose.pread(2, size - 1), errno.EINVAL, "read past the end")
assert loose.pread(8192, 4096 + 10) == b"\xab" * 8192
loose.shutdown()
a1.zero(65536, 8192)
assert a1.pread(65536, 8192) == b"\0" * 65536
a1.shutdown(); a2.shutdown(); b.shutdown()

# persist = true: a client's writes survive its disconnect, and stay its own.
k = conn("keep")
k.pwrite(b"\x5a" * 5000, 12345)
k.flush()
k.shutdown()
k = conn("keep")
assert k.pread(5000, 12345) == b"\x5a" * 5000, "persisted writes lost"
k.shutdown()
other = conn("keep", "127.0.0.3")
assert other.pread(5000, 12345) != b"\x5a" * 5000, "persisted overlay leaked to another client"
other.shutdown()
print("ok")
"#;

#[test]
fn python_checks() {
    if skip("python_checks", &[PYTHON]) {
        return;
    }
    let ok = Command::new(PYTHON)
        .args(["-c", "import nbd"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "python3-libnbd missing under CI"
        );
        eprintln!("skipping python_checks: python3-libnbd not installed");
        return;
    }
    let s = Server::start("py");
    let out = run(Command::new(PYTHON)
        .args(["-c", PY_CHECKS])
        .arg(s.addr.port().to_string())
        .arg(s.overlay_dir())
        .arg(IMAGE_SIZE.to_string()));
    assert!(out.contains("ok"), "{out}");
    let kept = s.dir.0.join("state/nbd/keep");
    assert!(kept.join("127.0.0.1.overlay").is_file());
    assert!(kept.join("127.0.0.1.map").is_file());
    // Every client disconnected: both overlays discarded.
    std::thread::sleep(Duration::from_millis(200));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::fs::read_dir(s.overlay_dir()).unwrap().count() != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "overlays kept after the last connection"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------
// A raw client, for what real clients will not send.

struct Raw(TcpStream);

impl Raw {
    fn connect(addr: SocketAddr) -> Raw {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
        Raw(s)
    }

    /// Fixed newstyle + NO_ZEROES, then NBD_OPT_GO on `export`; returns the size.
    fn go(addr: SocketAddr, export: &str) -> (Raw, u64) {
        let mut r = Raw::connect(addr);
        let mut g = [0u8; 18];
        r.0.read_exact(&mut g).unwrap();
        assert_eq!(g, codec::greeting());
        r.0.write_all(&3u32.to_be_bytes()).unwrap();
        let mut data = (export.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        r.option(codec::OPT_GO, &data);
        let mut size = None;
        loop {
            let (kind, data) = r.option_reply();
            match kind {
                codec::REP_INFO if data[..2] == [0, 0] => {
                    size = Some(u64::from_be_bytes(data[2..10].try_into().unwrap()))
                }
                codec::REP_INFO => {}
                codec::REP_ACK => break,
                other => panic!("GO answered {other:#x}"),
            }
        }
        (r, size.unwrap())
    }

    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = codec::IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.0.write_all(&b).unwrap();
    }

    fn option_reply(&mut self) -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.0.read_exact(&mut h).unwrap();
        assert_eq!(h[..8], codec::REPLY_MAGIC.to_be_bytes());
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let mut d = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
        self.0.read_exact(&mut d).unwrap();
        (kind, d)
    }

    fn request(&mut self, kind: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) {
        let r = Request {
            flags: 0,
            kind,
            cookie,
            offset,
            len,
        };
        self.0.write_all(&r.encode()).unwrap();
        self.0.write_all(payload).unwrap();
    }

    /// A simple reply: (error, cookie), then `data_len` bytes when error is 0.
    fn reply(&mut self, data_len: usize) -> (u32, u64, Vec<u8>) {
        let mut h = [0u8; 16];
        self.0.read_exact(&mut h).unwrap();
        assert_eq!(h[..4], codec::SIMPLE_REPLY_MAGIC.to_be_bytes());
        let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let mut d = vec![0u8; if err == 0 { data_len } else { 0 }];
        self.0.read_exact(&mut d).unwrap();
        (err, cookie, d)
    }
}

#[test]
fn raw_refusals_keep_the_connection() {
    let s = Server::start("raw");
    let image = std::fs::read(&s.image).unwrap();

    // Handshake refusals.
    let mut r = Raw::connect(s.addr);
    let mut g = [0u8; 18];
    r.0.read_exact(&mut g).unwrap();
    r.0.write_all(&1u32.to_be_bytes()).unwrap();
    r.option(codec::OPT_STARTTLS, &[]);
    assert_eq!(r.option_reply().0, codec::REP_ERR_UNSUP);
    r.option(77, b"what");
    assert_eq!(r.option_reply().0, codec::REP_ERR_UNSUP);
    r.option(codec::OPT_INFO, b"\x00\x00\x00\x04nope\x00\x00");
    assert_eq!(r.option_reply().0, codec::REP_ERR_UNKNOWN);
    r.option(codec::OPT_INFO, b"\x00\x00\x00\x07missing\x00\x00");
    assert_eq!(
        r.option_reply().0,
        codec::REP_ERR_UNKNOWN,
        "file absent: export not offered"
    );
    r.option(codec::OPT_LIST, &[]);
    assert_eq!(r.option_reply().0, codec::REP_SERVER);
    r.option(codec::OPT_ABORT, &[]);
    loop {
        let (k, _) = r.option_reply();
        if k == codec::REP_ACK {
            break;
        }
    }

    // Transmission refusals on the read-only export; each followed by a good read.
    let (mut r, size) = Raw::go(s.addr, "ro");
    assert_eq!(size, IMAGE_SIZE as u64);
    let check_alive = |r: &mut Raw, cookie: u64| {
        r.request(codec::CMD_READ, cookie, 512, 100, &[]);
        let (e, c, d) = r.reply(100);
        assert_eq!((e, c), (0, cookie));
        assert_eq!(d, image[512..612]);
    };
    r.request(codec::CMD_WRITE, 1, 0, 4, b"abcd");
    assert_eq!(r.reply(0).0, codec::EPERM);
    check_alive(&mut r, 2);
    r.request(codec::CMD_READ, 3, size - 1, 2, &[]);
    assert_eq!(r.reply(2).0, codec::EINVAL);
    check_alive(&mut r, 4);
    r.request(codec::CMD_READ, 5, 0, (32 << 20) + 1, &[]);
    assert_eq!(r.reply(0).0, codec::EINVAL, "oversized read");
    check_alive(&mut r, 6);
    // An oversized write: its payload is consumed, the next request is read correctly.
    let big = vec![0x5au8; (32 << 20) + 7];
    r.request(codec::CMD_WRITE, 7, 0, big.len() as u32, &big);
    assert_eq!(r.reply(0).0, codec::EPERM);
    check_alive(&mut r, 8);
    r.request(42, 9, 0, 0, &[]);
    assert_eq!(r.reply(0).0, codec::EINVAL, "unknown command");
    check_alive(&mut r, 10);

    // Oversized write on a writable export: EINVAL, payload consumed.
    let (mut w, _) = Raw::go(s.addr, "ov");
    w.request(codec::CMD_WRITE, 11, 0, big.len() as u32, &big);
    assert_eq!(w.reply(0).0, codec::EINVAL);
    check_alive(&mut w, 12);
    // Pipelined: many requests sent before any reply is read; every cookie answered once.
    for c in 100..164u64 {
        w.request(codec::CMD_READ, c, c * 4096, 4096, &[]);
    }
    let mut seen: Vec<u64> = (0..64)
        .map(|_| {
            let (e, c, d) = w.reply(4096);
            assert_eq!(e, 0);
            assert_eq!(d, image[(c * 4096) as usize..(c * 4096 + 4096) as usize]);
            c
        })
        .collect();
    seen.sort();
    assert_eq!(seen, (100..164).collect::<Vec<_>>());

    // Garbage ends that connection only.
    r.0.write_all(b"this is not an NBD request header").unwrap();
    let mut rest = Vec::new();
    let _ = r.0.read_to_end(&mut rest);
    assert!(rest.is_empty(), "garbage earned a reply");
    check_alive(&mut w, 13);
    w.request(codec::CMD_DISC, 14, 0, 0, &[]);
    let mut rest = Vec::new();
    let _ = w.0.read_to_end(&mut rest);
    assert!(rest.is_empty());
}

/// 10,000 seeded random conversations: garbage handshakes, random options, then random
/// request streams after a good handshake. The server must neither crash nor hang, and
/// still serve afterwards.
#[test]
fn random_streams_never_break_the_server() {
    let s = Server::start("fuzz");
    let addr = s.addr;
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            std::thread::spawn(move || {
                let mut rng = Rng(0x5eed_0000 + t);
                for _ in 0..2500 {
                    fuzz_once(addr, &mut rng);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a fuzz connection hung or failed");
    }
    let (mut r, size) = Raw::go(addr, "ro");
    assert_eq!(size, IMAGE_SIZE as u64);
    r.request(codec::CMD_READ, 1, 0, 16, &[]);
    let image = std::fs::read(&s.image).unwrap();
    assert_eq!(r.reply(16).2, image[..16]);
}

fn fuzz_once(addr: SocketAddr, rng: &mut Rng) {
    let mut s = TcpStream::connect(addr).unwrap();
    // Generous: a hang shows as a panic, not as a slow test.
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut b = Vec::new();
    match rng.below(4) {
        // Raw garbage from the first byte.
        0 => {
            let n = rng.below(200) as usize;
            b.extend(rng.bytes(n))
        }
        // Good flags, then options with random numbers and data (sometimes a bad magic).
        1 => {
            b.extend_from_slice(&(rng.below(4) as u32).to_be_bytes());
            for _ in 0..rng.below(6) {
                let magic = if rng.below(8) == 0 {
                    rng.next()
                } else {
                    codec::IHAVEOPT
                };
                b.extend_from_slice(&magic.to_be_bytes());
                b.extend_from_slice(&(rng.below(12) as u32).to_be_bytes());
                let n = rng.below(40) as usize;
                let claimed = if rng.below(10) == 0 {
                    rng.next() as u32
                } else {
                    n as u32
                };
                b.extend_from_slice(&claimed.to_be_bytes());
                b.extend(rng.bytes(n));
            }
        }
        // A good handshake, then random requests, mostly well-formed headers.
        _ => {
            b.extend_from_slice(&3u32.to_be_bytes());
            if rng.below(2) == 0 {
                b.extend_from_slice(&codec::IHAVEOPT.to_be_bytes());
                b.extend_from_slice(&codec::OPT_STRUCTURED_REPLY.to_be_bytes());
                b.extend_from_slice(&0u32.to_be_bytes());
            }
            let export: &[u8] = if rng.below(2) == 0 { b"ro" } else { b"ov" };
            b.extend_from_slice(&codec::IHAVEOPT.to_be_bytes());
            b.extend_from_slice(&codec::OPT_GO.to_be_bytes());
            b.extend_from_slice(&(4 + export.len() as u32 + 2).to_be_bytes());
            b.extend_from_slice(&(export.len() as u32).to_be_bytes());
            b.extend_from_slice(export);
            b.extend_from_slice(&0u16.to_be_bytes());
            for _ in 0..rng.below(8) {
                if rng.below(10) == 0 {
                    b.extend(rng.bytes(28));
                    continue;
                }
                let kind = rng.below(9) as u16;
                let len = match rng.below(4) {
                    0 => rng.next() as u32,
                    _ => rng.below(3 * 4096) as u32,
                };
                let offset = match rng.below(4) {
                    0 => rng.next(),
                    _ => rng.below(IMAGE_SIZE as u64),
                };
                let r = Request {
                    flags: rng.below(64) as u16,
                    kind,
                    cookie: rng.next(),
                    offset,
                    len,
                };
                b.extend_from_slice(&r.encode());
                if kind == codec::CMD_WRITE {
                    // Often the whole payload, sometimes a cut-off one.
                    let n = (len as usize).min(3 * 4096);
                    b.extend(rng.bytes(n));
                }
            }
        }
    }
    let _ = s.write_all(&b);
    let _ = s.shutdown(Shutdown::Write);
    let mut sink = [0u8; 65536];
    loop {
        match s.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                panic!("the server did not close a fuzz connection in 60 s")
            }
            Err(_) => break,
        }
    }
}

/// A classroom: 100 connections at once (the overlay half share 127.0.0.1's overlay), all served.
#[test]
fn a_classroom_of_clients_at_once() {
    let s = Server::start("class");
    let image = std::fs::read(&s.image).unwrap();
    // 256 KiB: large enough to go out with sendfile, with simple replies.
    const READ: usize = 256 << 10;
    let mut clients: Vec<Raw> = (0..100)
        .map(|i| Raw::go(s.addr, if i % 2 == 0 { "ro" } else { "ov" }).0)
        .collect();
    // Every client has a request in flight before any answer is read.
    for (i, c) in clients.iter_mut().enumerate() {
        let off = ((i * READ) % (IMAGE_SIZE - READ)) as u64;
        c.request(codec::CMD_READ, i as u64, off, READ as u32, &[]);
    }
    for (i, c) in clients.iter_mut().enumerate() {
        let off = (i * READ) % (IMAGE_SIZE - READ);
        let (e, cookie, d) = c.reply(READ);
        assert_eq!((e, cookie), (0, i as u64));
        assert!(d == image[off..off + READ], "client {i} got wrong data");
    }
}

/// `nbd.max_connections`: a client over the cap waits (no greeting) until a slot frees.
#[test]
fn connections_over_the_cap_wait_for_a_slot() {
    let s = Server::start_with("cap", 2);
    let (a, _) = Raw::go(s.addr, "ro");
    let (_b, _) = Raw::go(s.addr, "ro");
    let mut c = Raw::connect(s.addr);
    c.0.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut g = [0u8; 18];
    assert!(
        c.0.read_exact(&mut g).is_err(),
        "a third client was greeted with max_connections = 2"
    );
    drop(a);
    c.0.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    c.0.read_exact(&mut g).unwrap();
    assert_eq!(g, codec::greeting());
}

/// Issue 17, finding 4: four idle clients with `max_connections = 4` made nbdinfo hang.
/// One address holds `nbd.max_per_address` connections; one more is closed at once
/// (before the greeting), and another address is still greeted.
#[test]
fn one_address_cannot_take_every_connection() {
    let s = Server::start_caps("peraddr", 8, 2);
    let (_a, _) = Raw::go(s.addr, "ro");
    let (_b, _) = Raw::go(s.addr, "ro");
    let mut c = Raw::connect(s.addr);
    let mut g = [0u8; 18];
    let r = c.0.read(&mut g);
    assert!(
        matches!(r, Ok(0)) || r.is_err(),
        "a third connection from one address was greeted: {r:?}"
    );
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&SocketAddr::from(([127, 0, 0, 2], 0)).into())
        .unwrap();
    sock.connect(&s.addr.into()).unwrap();
    let mut other: TcpStream = sock.into();
    other
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    other.read_exact(&mut g).unwrap();
    assert_eq!(g, codec::greeting());
}

/// A client that negotiates an export and then never sends a request gives its slot
/// back after `FIRST_REQUEST_TIMEOUT`; one that has read stays, however quiet.
#[test]
fn a_client_that_never_asks_is_closed() {
    let s = Server::start("idle");
    let (mut idle, _) = Raw::go(s.addr, "ro");
    let (mut quiet, _) = Raw::go(s.addr, "ro");
    quiet.request(codec::CMD_READ, 1, 0, 512, &[]);
    assert_eq!(quiet.reply(512).0, 0);
    let limit = vdd::nbd::session::FIRST_REQUEST_TIMEOUT + Duration::from_secs(15);
    idle.0.set_read_timeout(Some(limit)).unwrap();
    let t0 = std::time::Instant::now();
    let mut b = [0u8; 1];
    assert!(
        matches!(idle.0.read(&mut b), Ok(0)),
        "the idle client was not closed"
    );
    assert!(t0.elapsed() >= vdd::nbd::session::FIRST_REQUEST_TIMEOUT - Duration::from_secs(2));
    // The quiet client is still served.
    quiet.request(codec::CMD_READ, 2, 512, 512, &[]);
    assert_eq!(quiet.reply(512).0, 0);
}

/// Finding 10 of the hardening audit: a connection joins the overlay that its address
/// already has open, made over the base as it was then; the size it was told came from
/// the file now. After the image was replaced by a larger one, a read past the old end
/// indexed past the overlay's block map and panicked the connection's task. Such a read
/// is now refused (EINVAL) and the connection goes on.
#[test]
fn a_larger_replaced_image_is_refused_past_the_old_end() {
    let s = Server::start("grown");
    let image = std::fs::read(&s.image).unwrap();
    let (mut first, size) = Raw::go(s.addr, "ov");
    assert_eq!(size, IMAGE_SIZE as u64);
    // Replaced as an admin would: a new file renamed over the old one.
    let new = s.dir.0.join("base.img.new");
    std::fs::write(&new, Rng(8).bytes(2 * IMAGE_SIZE)).unwrap();
    std::fs::rename(&new, &s.image).unwrap();
    let (mut second, told) = Raw::go(s.addr, "ov");
    assert_eq!(told, 2 * IMAGE_SIZE as u64);
    second.request(codec::CMD_READ, 1, IMAGE_SIZE as u64 + 4096, 4096, &[]);
    assert_eq!(second.reply(0).0, codec::EINVAL);
    // Both connections still serve the overlay they share, over the old base.
    for r in [&mut second, &mut first] {
        r.request(codec::CMD_READ, 2, 4096, 512, &[]);
        let (e, c, d) = r.reply(512);
        assert_eq!((e, c), (0, 2));
        assert_eq!(d, image[4096..4608]);
    }
}

/// A client that sends reads and never takes their replies is closed once a reply has
/// waited WRITE_TIMEOUT, and its slot is free again (`cargo xtask bench floods` found such
/// connections open for good: the writer gave up, the reader waited on).
#[test]
fn a_client_that_takes_no_replies_is_closed() {
    let s = Server::start_caps("deaf", 8, 1);
    let (mut deaf, _) = Raw::go(s.addr, "ro");
    for c in 0..32u64 {
        deaf.request(codec::CMD_READ, c, 0, 4 << 20, &[]);
    }
    let t0 = std::time::Instant::now();
    let limit = vdd::nbd::session::WRITE_TIMEOUT + Duration::from_secs(35);
    // Its address may hold one connection: a newcomer is closed at once until the deaf
    // one is gone, then greeted.
    let greeted = loop {
        let mut g = [0u8; 18];
        let mut r = Raw::connect(s.addr);
        r.0.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        if r.0.read_exact(&mut g).is_ok() {
            break true;
        }
        if t0.elapsed() > limit {
            break false;
        }
        std::thread::sleep(Duration::from_secs(3));
    };
    assert!(
        greeted,
        "the deaf client still holds its slot after {limit:?}"
    );
    assert!(t0.elapsed() >= vdd::nbd::session::WRITE_TIMEOUT - Duration::from_secs(5));
    drop(deaf);
}

/// Many requests in one burst, more than a connection serves at once (64), of every size
/// the driver treats apart (inline from the page cache, sendfile, refused, a refused
/// WRITE whose payload must be skipped), sent while the replies are read: every reply
/// comes, once, with its own data.
#[test]
fn a_burst_of_mixed_requests_is_answered_in_full() {
    let s = Server::start("burst");
    let image = std::fs::read(&s.image).unwrap();
    let (mut c, _) = Raw::go(s.addr, "ro");
    let sizes = [512u32, 4096, 4096, 65536, 256 << 10, 1 << 20, 3000];
    // cookie -> (expected error, offset, length)
    let mut want = std::collections::HashMap::new();
    let mut wire = Vec::new();
    for i in 0..600u64 {
        let len = sizes[i as usize % sizes.len()];
        let off = (i * 7919 * 512) % (IMAGE_SIZE as u64 - u64::from(len));
        let (kind, err, payload) = match i % 50 {
            17 => (codec::CMD_READ, codec::EINVAL, 0),
            33 => (codec::CMD_WRITE, codec::EPERM, 4096),
            _ => (codec::CMD_READ, 0, 0),
        };
        let off = if err == codec::EINVAL {
            IMAGE_SIZE as u64
        } else {
            off
        };
        let r = Request {
            flags: 0,
            kind,
            cookie: i,
            offset: off,
            len: if kind == codec::CMD_WRITE {
                payload
            } else {
                len
            },
        };
        wire.extend_from_slice(&r.encode());
        wire.extend(std::iter::repeat_n(0xa5u8, payload as usize));
        want.insert(
            i,
            (
                err,
                off as usize,
                if kind == codec::CMD_READ { len } else { 0 },
            ),
        );
    }
    let mut w = c.0.try_clone().unwrap();
    let sender = std::thread::spawn(move || w.write_all(&wire).unwrap());
    for _ in 0..600 {
        let mut h = [0u8; 16];
        c.0.read_exact(&mut h).unwrap();
        assert_eq!(h[..4], codec::SIMPLE_REPLY_MAGIC.to_be_bytes());
        let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let (e, off, len) = want.remove(&cookie).expect("a reply to each request, once");
        assert_eq!(err, e, "cookie {cookie}");
        if err == 0 {
            let mut d = vec![0u8; len as usize];
            c.0.read_exact(&mut d).unwrap();
            assert!(
                d == image[off..off + len as usize],
                "cookie {cookie}: wrong data"
            );
        }
    }
    sender.join().unwrap();
    assert!(want.is_empty());
    // The connection is still in step.
    c.request(codec::CMD_READ, 9999, 4096, 512, &[]);
    assert_eq!(c.reply(512), (0, 9999, image[4096..4608].to_vec()));
}
