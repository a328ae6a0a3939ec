//! In-process tests of the TFTP service (RFC 1350, 2347, 2348, 2349, 7440): the real
//! `Service` on 127.0.0.1:0, real clients (tftp-hpa, atftp, curl) and raw packets from
//! a tokio socket for the refusals and the error paths. Every download is compared with
//! its source by sha256.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use vdd::config::Config;
use vdd::tftp::codec::{self, Packet, OP_RRQ, OP_WRQ};
use vdd::tftp::{Metrics, Service};

/// A scratch folder removed on Drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("vdd-tftp-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running server with a root (`dir/root`) and an iPXE folder (`dir/ipxe`).
struct Server {
    dir: TempDir,
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Server {
    async fn start(tag: &str, max_transfers: usize) -> Server {
        Server::start_caps(tag, max_transfers, 4).await
    }

    /// Every test client comes from 127.0.0.1: `max_per_address` is its share.
    async fn start_caps(tag: &str, max_transfers: usize, max_per_address: usize) -> Server {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter("vdd=info")
            .try_init();
        let dir = TempDir::new(tag);
        let root = dir.0.join("root");
        let ipxe = dir.0.join("ipxe");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&ipxe).unwrap();
        let text = format!(
            "[server]\ninterface=\"lo\"\n[dhcp]\nmode=\"off\"\n[boot]\nipxe_dir=\"{}\"\n[tftp]\nroot=\"{}\"\nmax_transfers={max_transfers}\nmax_per_address={max_per_address}\n",
            ipxe.display(),
            root.display()
        );
        let cfg = Arc::new(Config::parse(&text, &dir.0.join("config.toml")).unwrap());
        let svc = Service::bind_addr(cfg, "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = svc.local_addr().unwrap();
        let metrics = svc.metrics();
        let stop = CancellationToken::new();
        let t = stop.clone();
        tokio::spawn(async move { svc.run(t).await.unwrap() });
        Server {
            dir,
            addr,
            metrics,
            stop,
        }
    }

    fn root(&self) -> PathBuf {
        self.dir.0.join("root")
    }

    fn out(&self, name: &str) -> PathBuf {
        self.dir.0.join(name)
    }

    /// Waits (bounded) until no transfer task is alive.
    async fn idle(&self, within: Duration) -> bool {
        let end = Instant::now() + within;
        while Instant::now() < end {
            if self.metrics.active() == 0 {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }
}

/// Deterministic pseudo-random bytes (xorshift), so files are not compressible patterns.
fn random_file(path: &Path, len: usize, seed: u64) {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    std::fs::write(path, v).unwrap();
}

fn sha256(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "sha256sum {}", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Runs a client to the end (bounded by a generous timeout), asserting success.
async fn client(prog: &str, args: &[&str]) {
    let mut cmd = tokio::process::Command::new(prog);
    cmd.args(args).kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{prog} {args:?} took over 120 s"))
        .unwrap();
    assert!(
        out.status.success(),
        "{prog} {args:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

macro_rules! need {
    ($($tool:expr),*) => {
        if let Some(why) = xtask::lab::missing(&[$($tool),*]) {
            eprintln!("skipping {}: {why}", module_path!());
            return;
        }
    };
}

async fn raw_socket() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").await.unwrap()
}

async fn send_rrq(s: &UdpSocket, to: SocketAddr, name: &[u8], mode: &str, opts: &[(&str, &str)]) {
    let mut v = Vec::new();
    codec::encode_request(&mut v, OP_RRQ, name, mode, opts);
    s.send_to(&v, to).await.unwrap();
}

async fn recv(s: &UdpSocket, within: Duration) -> Option<(Vec<u8>, SocketAddr)> {
    let mut buf = vec![0u8; 70000];
    match tokio::time::timeout(within, s.recv_from(&mut buf)).await {
        Ok(Ok((n, from))) => Some((buf[..n].to_vec(), from)),
        _ => None,
    }
}

fn error_code(b: &[u8]) -> Option<u16> {
    match Packet::parse(b) {
        Ok(Packet::Error { code, .. }) => Some(code),
        _ => None,
    }
}

async fn ack(s: &UdpSocket, to: SocketAddr, block: u16) {
    let mut v = Vec::new();
    codec::encode_ack(&mut v, block);
    s.send_to(&v, to).await.unwrap();
}

async fn send_error(s: &UdpSocket, to: SocketAddr, code: u16) {
    let mut v = Vec::new();
    codec::encode_error(&mut v, code, "abort");
    s.send_to(&v, to).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tftp_hpa_octet_and_netascii() {
    need!("tftp", "sha256sum");
    let srv = Server::start("hpa", 16).await;
    // Odd size, several blocks, and an exact multiple of 512 (ends with an empty block).
    for (name, len) in [("a.bin", 300_001usize), ("b.bin", 512 * 40), ("e.bin", 0)] {
        random_file(&srv.root().join(name), len, len as u64 + 7);
        let out = srv.out(name);
        let port = srv.addr.port().to_string();
        client(
            "tftp",
            &[
                "-m",
                "binary",
                "127.0.0.1",
                &port,
                "-c",
                "get",
                name,
                out.to_str().unwrap(),
            ],
        )
        .await;
        assert_eq!(sha256(&out), sha256(&srv.root().join(name)), "{name}");
    }
    // netascii: LF and lone CR are converted on the wire and back by the client.
    let mut text = Vec::new();
    for i in 0..5000 {
        text.extend_from_slice(format!("line {i}\n").as_bytes());
        if i % 7 == 0 {
            text.extend_from_slice(b"carriage\rreturn\n");
        }
    }
    std::fs::write(srv.root().join("t.txt"), &text).unwrap();
    let out = srv.out("t.txt");
    let port = srv.addr.port().to_string();
    client(
        "tftp",
        &[
            "-m",
            "netascii",
            "127.0.0.1",
            &port,
            "-c",
            "get",
            "t.txt",
            out.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(sha256(&out), sha256(&srv.root().join("t.txt")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netascii_on_the_wire() {
    need!();
    let srv = Server::start("na", 4).await;
    std::fs::write(srv.root().join("n.txt"), b"a\nb\rc").unwrap();
    let s = raw_socket().await;
    // tsize is not answered for netascii (size on the wire unknown); blksize is.
    send_rrq(
        &s,
        srv.addr,
        b"n.txt",
        "netascii",
        &[("tsize", "0"), ("blksize", "8")],
    )
    .await;
    let (b, from) = recv(&s, Duration::from_secs(10)).await.unwrap();
    assert_eq!(
        Packet::parse(&b).unwrap(),
        Packet::Oack(vec![("blksize".into(), "8".into())])
    );
    ack(&s, from, 0).await;
    let (b, _) = recv(&s, Duration::from_secs(10)).await.unwrap();
    assert_eq!(
        Packet::parse(&b).unwrap(),
        Packet::Data {
            block: 1,
            data: b"a\r\nb\r\0c"
        }
    );
    ack(&s, from, 1).await;
    assert!(srv.idle(Duration::from_secs(10)).await);
    assert_eq!(
        srv.metrics
            .completed
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
}

/// Finding 6 of the hardening audit: netascii keeps its whole window for retransmission,
/// and a client asking for blksize 65464 and windowsize 65535 that then never acknowledged
/// made vdd convert and keep the whole 64 MiB file (four such RRQs: 265 MB RSS). The
/// server now answers a smaller windowsize (RFC 7440 section 4) and sends no more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netascii_window_memory_is_bounded() {
    need!();
    let srv = Server::start("nawin", 4).await;
    std::fs::write(srv.root().join("big.txt"), "line\n".repeat(1 << 20)).unwrap();
    let s = raw_socket().await;
    socket2::SockRef::from(&s)
        .set_recv_buffer_size(8 << 20)
        .unwrap();
    send_rrq(
        &s,
        srv.addr,
        b"big.txt",
        "netascii",
        &[("blksize", "65464"), ("windowsize", "65535")],
    )
    .await;
    let (b, from) = recv(&s, Duration::from_secs(10)).await.unwrap();
    assert_eq!(
        Packet::parse(&b).unwrap(),
        Packet::Oack(vec![
            ("blksize".into(), "65464".into()),
            ("windowsize".into(), "16".into())
        ])
    );
    ack(&s, from, 0).await;
    // One window arrives, then nothing until it is acknowledged (the first
    // retransmission of the same window comes after the 1 s timeout).
    let mut blocks = Vec::new();
    while let Some((b, _)) = recv(&s, Duration::from_millis(500)).await {
        if let Ok(Packet::Data { block, .. }) = Packet::parse(&b) {
            blocks.push(block);
        }
    }
    assert_eq!(blocks.first(), Some(&1));
    assert!(blocks.iter().all(|b| (1..=16).contains(b)), "{blocks:?}");
    send_error(&s, from, 0).await;
}

/// The netascii windows of all transfers together are bounded too: 40 transfers asking
/// for the largest window get 32 MiB between them (and one block each past that), not
/// 40 MiB (`cargo xtask bench floods`: 256 transfers held 316 MiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netascii_windows_share_one_budget() {
    need!();
    let srv = Server::start_caps("nabudget", 64, 64).await;
    std::fs::write(srv.root().join("big.txt"), "line\n".repeat(1 << 20)).unwrap();
    let mut socks = Vec::new();
    let mut bytes = 0u64;
    let mut last = 0u64;
    for _ in 0..40 {
        let s = raw_socket().await;
        send_rrq(
            &s,
            srv.addr,
            b"big.txt",
            "netascii",
            &[("blksize", "65464"), ("windowsize", "65535")],
        )
        .await;
        let (b, _) = recv(&s, Duration::from_secs(10)).await.unwrap();
        let Ok(Packet::Oack(opts)) = Packet::parse(&b) else {
            panic!("no OACK: {:?}", Packet::parse(&b));
        };
        let w: u64 = opts
            .iter()
            .find(|(k, _)| k == "windowsize")
            .map(|(_, v)| v.parse().unwrap())
            .unwrap();
        last = w;
        bytes += w * 65464;
        socks.push(s);
    }
    assert!(bytes <= (32 << 20) + 40 * 65464, "{bytes} bytes of windows");
    assert_eq!(last, 1, "the budget was spent: one block each");
    let held = srv
        .metrics
        .netascii_bytes
        .load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(held, bytes);
    // Every transfer ends (ERROR from the client): the budget is whole again.
    for s in &socks {
        let mut v = Vec::new();
        codec::encode_error(&mut v, 0, "abort");
        let _ = s.send(&v).await;
    }
    drop(socks);
    assert!(srv.idle(Duration::from_secs(40)).await);
    assert_eq!(
        srv.metrics
            .netascii_bytes
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn atftp_blksize_and_windowsize() {
    need!("atftp", "sha256sum");
    let srv = Server::start("atftp", 16).await;
    random_file(&srv.root().join("w.bin"), 3_000_017, 11);
    let port = srv.addr.port().to_string();
    for (i, opts) in [
        vec!["--option", "blksize 1468"],
        vec!["--option", "blksize 1468", "--option", "windowsize 16"],
        vec!["--option", "windowsize 16"],
        vec![
            "--option",
            "blksize 8192",
            "--option",
            "windowsize 4",
            "--option",
            "tsize 0",
        ],
    ]
    .into_iter()
    .enumerate()
    {
        let out = srv.out(&format!("w{i}.bin"));
        let mut args = opts.clone();
        args.extend([
            "-g",
            "-r",
            "w.bin",
            "-l",
            out.to_str().unwrap(),
            "127.0.0.1",
            &port,
        ]);
        client("atftp", &args).await;
        assert_eq!(sha256(&out), sha256(&srv.root().join("w.bin")), "{opts:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_with_and_without_blksize_and_boot_file_fallback() {
    need!("curl", "sha256sum");
    let srv = Server::start("curl", 16).await;
    random_file(&srv.root().join("c.bin"), 1_000_003, 5);
    // Only in the iPXE folder: served because it is the configured [boot] bios file.
    random_file(&srv.dir.0.join("ipxe/undionly.kpxe"), 70_000, 9);
    for (i, (name, src, extra)) in [
        ("c.bin", srv.root().join("c.bin"), vec![]),
        (
            "c.bin",
            srv.root().join("c.bin"),
            vec!["--tftp-blksize", "1468"],
        ),
        (
            "c.bin",
            srv.root().join("c.bin"),
            vec!["--tftp-blksize", "65464"],
        ),
        (
            "undionly.kpxe",
            srv.dir.0.join("ipxe/undionly.kpxe"),
            vec!["--tftp-blksize", "1432"],
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let out = srv.out(&format!("c{i}.out"));
        let url = format!("tftp://127.0.0.1:{}/{name}", srv.addr.port());
        let mut args = vec!["-sS", "--max-time", "100", "-o", out.to_str().unwrap()];
        args.extend(extra);
        args.push(&url);
        client("curl", &args).await;
        assert_eq!(sha256(&out), sha256(&src), "{name} {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollover_64_mib_at_512_bytes() {
    need!("curl", "sha256sum");
    let srv = Server::start("roll", 4).await;
    // 131073 blocks of 512 bytes: the block number wraps 65535 -> 0 twice.
    random_file(&srv.root().join("big.bin"), 64 << 20, 3);
    let out = srv.out("big.out");
    let url = format!("tftp://127.0.0.1:{}/big.bin", srv.addr.port());
    client(
        "curl",
        &[
            "-sS",
            "--max-time",
            "110",
            "--tftp-blksize",
            "512",
            "-o",
            out.to_str().unwrap(),
            &url,
        ],
    )
    .await;
    assert_eq!(sha256(&out), sha256(&srv.root().join("big.bin")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tsize_then_error_8_ends_without_retransmits() {
    need!();
    let srv = Server::start("tsize", 4).await;
    random_file(&srv.root().join("p.bin"), 123_457, 1);
    let s = raw_socket().await;
    // What a PXE ROM does: ask tsize, read the OACK, abort with ERROR 8, then ask again.
    send_rrq(
        &s,
        srv.addr,
        b"p.bin",
        "octet",
        &[("tsize", "0"), ("blksize", "1456")],
    )
    .await;
    let (b, from) = recv(&s, Duration::from_secs(10)).await.unwrap();
    assert_eq!(
        Packet::parse(&b).unwrap(),
        Packet::Oack(vec![
            ("tsize".into(), "123457".into()),
            ("blksize".into(), "1456".into())
        ])
    );
    assert_ne!(from, srv.addr, "the transfer must use a new TID");
    send_error(&s, from, 8).await;
    // The retransmit timeout is 1 s: 3.5 s of silence shows nothing was resent.
    assert!(recv(&s, Duration::from_millis(3500)).await.is_none());
    assert!(srv.idle(Duration::from_secs(5)).await);
    // The second request downloads the file.
    send_rrq(&s, srv.addr, b"p.bin", "octet", &[("blksize", "1456")]).await;
    let (b, from) = recv(&s, Duration::from_secs(10)).await.unwrap();
    assert!(matches!(Packet::parse(&b).unwrap(), Packet::Oack(_)));
    let mut got = Vec::new();
    let mut block = 0u16;
    ack(&s, from, 0).await;
    loop {
        let (b, _) = recv(&s, Duration::from_secs(10)).await.unwrap();
        let Packet::Data { block: n, data } = Packet::parse(&b).unwrap() else {
            panic!("not DATA")
        };
        if n == block.wrapping_add(1) {
            block = n;
            got.extend_from_slice(data);
        }
        ack(&s, from, n).await;
        if data.len() < 1456 {
            break;
        }
    }
    assert_eq!(got, std::fs::read(srv.root().join("p.bin")).unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_ack_and_stranger_tid() {
    need!();
    let srv = Server::start("dup", 4).await;
    random_file(&srv.root().join("d.bin"), 512 * 5, 2);
    let s = raw_socket().await;
    // A 5 s retransmit timeout (RFC 2349), so the silence checked below cannot be
    // broken by a legitimate retransmission on a slow machine.
    send_rrq(&s, srv.addr, b"d.bin", "octet", &[("timeout", "5")]).await;
    let (b, from) = recv(&s, Duration::from_secs(10)).await.unwrap();
    assert_eq!(
        Packet::parse(&b).unwrap(),
        Packet::Oack(vec![("timeout".into(), "5".into())])
    );
    ack(&s, from, 0).await;
    let (b, _) = recv(&s, Duration::from_secs(10)).await.unwrap();
    assert!(matches!(
        Packet::parse(&b).unwrap(),
        Packet::Data { block: 1, .. }
    ));
    ack(&s, from, 1).await;
    ack(&s, from, 1).await;
    let (b, _) = recv(&s, Duration::from_secs(10)).await.unwrap();
    assert!(matches!(
        Packet::parse(&b).unwrap(),
        Packet::Data { block: 2, .. }
    ));
    // The duplicate ACK 1 must not produce a second DATA 2 (Sorcerer's Apprentice).
    assert!(recv(&s, Duration::from_millis(1500)).await.is_none());
    // A packet from another port gets ERROR 5 and the transfer goes on.
    let stranger = raw_socket().await;
    ack(&stranger, from, 2).await;
    let (b, _) = recv(&stranger, Duration::from_secs(10)).await.unwrap();
    assert_eq!(error_code(&b), Some(5));
    ack(&s, from, 2).await;
    let (b, _) = recv(&s, Duration::from_secs(10)).await.unwrap();
    assert!(matches!(
        Packet::parse(&b).unwrap(),
        Packet::Data { block: 3, .. }
    ));
    send_error(&s, from, 0).await;
    assert!(srv.idle(Duration::from_secs(5)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_requests_and_bad_modes_are_refused() {
    need!();
    let srv = Server::start("wrq", 4).await;
    std::fs::write(srv.root().join("x"), b"x").unwrap();
    let s = raw_socket().await;
    let mut v = Vec::new();
    codec::encode_request(&mut v, OP_WRQ, b"x", "octet", &[]);
    s.send_to(&v, srv.addr).await.unwrap();
    let (b, _) = recv(&s, Duration::from_secs(10)).await.unwrap();
    assert_eq!(error_code(&b), Some(2));
    send_rrq(&s, srv.addr, b"x", "mail", &[]).await;
    let (b, _) = recv(&s, Duration::from_secs(10)).await.unwrap();
    assert_eq!(error_code(&b), Some(4));
    s.send_to(b"\x00\x01no-terminator", srv.addr).await.unwrap();
    let (b, _) = recv(&s, Duration::from_secs(10)).await.unwrap();
    assert_eq!(error_code(&b), Some(4));
    // An ERROR sent to the listener is never answered.
    send_error(&s, srv.addr, 0).await;
    assert!(recv(&s, Duration::from_millis(500)).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traversal_and_special_files_are_refused() {
    need!();
    let srv = Server::start("trav", 64).await;
    let root = srv.root();
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::write(root.join("sub/f"), b"fine").unwrap();
    std::fs::write(srv.dir.0.join("secret"), b"secret").unwrap();
    std::fs::write(srv.dir.0.join("ipxe/ipxe.lkrn"), b"not configured").unwrap();
    let sym =
        |target: &Path, link: &str| std::os::unix::fs::symlink(target, root.join(link)).unwrap();
    sym(&srv.dir.0.join("secret"), "out");
    sym(Path::new("../secret"), "relout");
    sym(Path::new("../../secret"), "sub/up");
    sym(Path::new("/etc"), "etcdir");
    sym(Path::new("/dev/zero"), "zero");
    sym(Path::new("nowhere"), "dangling");
    sym(Path::new("loop"), "loop");
    sym(Path::new("sub/f"), "inside");
    nix::unistd::mkfifo(&root.join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    nix::sys::stat::mknod(
        &root.join("null"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::S_IRUSR,
        nix::sys::stat::makedev(1, 3),
    )
    .unwrap();
    let long = "a".repeat(1500);
    let cases: Vec<(&[u8], u16)> = vec![
        (b"../secret", 2),
        (b"/../secret", 2),
        (b"//../secret", 2),
        (b"..", 2),
        (b"./..", 2),
        (b"sub/../../secret", 2),
        (b"sub/./../..", 2),
        (b"sub/../../../etc/passwd", 2),
        (b"..\\secret", 2),
        (b"sub\\f", 2),
        (b"\\etc\\passwd", 2),
        (b"C:\\secret", 2),
        (b"a\nb", 2),
        (b"\x1b[2J", 2),
        (b"tab\there", 2),
        (b"\xff\xfe", 2),
        (long.as_bytes(), 2),
        (b"", 2),
        (b"/", 2),
        (b".", 2),
        (b"sub", 2),
        (b"sub/", 2),
        (b"out", 2),
        (b"relout", 2),
        (b"sub/up", 2),
        (b"etcdir/passwd", 2),
        (b"etcdir", 2),
        (b"zero", 2),
        (b"fifo", 2),
        (b"null", 2),
        (b"dangling", 1),
        (b"loop", 1),
        (b"/etc/passwd", 1),
        (b"/proc/self/environ", 1),
        (b"..%2fsecret", 1),
        (b"....//secret", 1),
        (b"~root/.ssh/id_rsa", 1),
        (b"ipxe.lkrn", 1),
        (b"secret", 1),
        (b"SUB/F", 1),
    ];
    assert!(cases.len() >= 30);
    let s = raw_socket().await;
    for (name, want) in &cases {
        send_rrq(&s, srv.addr, name, "octet", &[]).await;
        let (b, _) = recv(&s, Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("no answer for {:?}", String::from_utf8_lossy(name)));
        assert_eq!(
            error_code(&b),
            Some(*want),
            "{:?} got {:?}",
            String::from_utf8_lossy(name),
            Packet::parse(&b)
        );
    }
    // The controls are served: a name inside the root, with a leading '/', via a symlink
    // that stays inside.
    for name in [&b"sub/f"[..], b"/sub/f", b"inside"] {
        send_rrq(&s, srv.addr, name, "octet", &[]).await;
        let (b, from) = recv(&s, Duration::from_secs(10)).await.unwrap();
        assert_eq!(
            Packet::parse(&b).unwrap(),
            Packet::Data {
                block: 1,
                data: b"fine"
            }
        );
        ack(&s, from, 1).await;
    }
    assert!(srv.idle(Duration::from_secs(10)).await);
    // Also the fifo was never opened for reading (a blocking open would hang the task).
    assert_eq!(srv.metrics.active(), 0);
}

/// The local ports of UDP sockets in this network namespace, from /proc.
fn udp_ports() -> Vec<u16> {
    std::fs::read_to_string("/proc/self/net/udp")
        .unwrap()
        .lines()
        .skip(1)
        .filter_map(|l| {
            let local = l.split_whitespace().nth(1)?;
            u16::from_str_radix(local.rsplit(':').next()?, 16).ok()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vanished_client_is_cleaned_up() {
    need!();
    let srv = Server::start("gone", 4).await;
    random_file(&srv.root().join("v.bin"), 100_000, 4);
    let s = raw_socket().await;
    send_rrq(&s, srv.addr, b"v.bin", "octet", &[]).await;
    let (b, from) = recv(&s, Duration::from_secs(10)).await.unwrap();
    assert!(matches!(
        Packet::parse(&b).unwrap(),
        Packet::Data { block: 1, .. }
    ));
    assert_eq!(srv.metrics.active(), 1);
    assert!(udp_ports().contains(&from.port()), "transfer socket open");
    // The client never answers: the server resends DATA 1 with backoff, then gives up.
    let mut resent = 0;
    let end = Instant::now() + Duration::from_secs(60);
    while Instant::now() < end && srv.metrics.active() > 0 {
        if let Some((b, _)) = recv(&s, Duration::from_millis(200)).await {
            assert!(matches!(
                Packet::parse(&b).unwrap(),
                Packet::Data { block: 1, .. }
            ));
            resent += 1;
        }
    }
    assert_eq!(
        srv.metrics.active(),
        0,
        "transfer task still alive after 60 s"
    );
    assert_eq!(resent, 5, "bounded retransmissions");
    assert!(
        !udp_ports().contains(&from.port()),
        "transfer socket still open"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_transfers_are_capped() {
    need!();
    let srv = Server::start("cap", 2).await;
    random_file(&srv.root().join("k.bin"), 10_000, 6);
    let a = raw_socket().await;
    let b = raw_socket().await;
    let c = raw_socket().await;
    send_rrq(&a, srv.addr, b"k.bin", "octet", &[]).await;
    let (_, ta) = recv(&a, Duration::from_secs(10)).await.unwrap();
    send_rrq(&b, srv.addr, b"k.bin", "octet", &[]).await;
    let (_, tb) = recv(&b, Duration::from_secs(10)).await.unwrap();
    assert_eq!(srv.metrics.active(), 2);
    send_rrq(&c, srv.addr, b"k.bin", "octet", &[]).await;
    let (p, _) = recv(&c, Duration::from_secs(10)).await.unwrap();
    assert_eq!(error_code(&p), Some(0), "{:?}", Packet::parse(&p));
    assert_eq!(
        srv.metrics
            .refused_busy
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    // Ending both frees their permits; the third client then gets its file.
    send_error(&a, ta, 0).await;
    send_error(&b, tb, 0).await;
    assert!(srv.idle(Duration::from_secs(10)).await);
    send_rrq(&c, srv.addr, b"k.bin", "octet", &[]).await;
    let (p, from) = recv(&c, Duration::from_secs(10)).await.unwrap();
    assert!(
        matches!(Packet::parse(&p), Ok(Packet::Data { block: 1, .. })),
        "{:?}",
        Packet::parse(&p)
    );
    send_error(&c, from, 0).await;
}

/// Issue 17, finding 2: one host took every `max_transfers` slot with RRQs it never
/// acknowledged. One address gets `tftp.max_per_address` transfers (4); the next is refused at once,
/// and another address is still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_take_every_slot() {
    need!();
    let srv = Server::start("peraddr", 8).await;
    random_file(&srv.root().join("k.bin"), 10_000, 7);
    let mut held = Vec::new();
    for _ in 0..4 {
        let s = raw_socket().await;
        send_rrq(&s, srv.addr, b"k.bin", "octet", &[]).await;
        let (p, tid) = recv(&s, Duration::from_secs(10)).await.unwrap();
        assert!(matches!(
            Packet::parse(&p),
            Ok(Packet::Data { block: 1, .. })
        ));
        held.push((s, tid));
    }
    let greedy = raw_socket().await;
    send_rrq(&greedy, srv.addr, b"k.bin", "octet", &[]).await;
    let (p, _) = recv(&greedy, Duration::from_secs(10)).await.unwrap();
    match Packet::parse(&p) {
        Ok(Packet::Error { code: 0, message }) => {
            assert!(message.contains("Too many transfers"), "{message}")
        }
        other => panic!("expected ERROR 0, got {other:?}"),
    }
    let o = std::sync::atomic::Ordering::SeqCst;
    assert_eq!(srv.metrics.refused_per_address.load(o), 1);
    assert_eq!(srv.metrics.refused_busy.load(o), 0);
    // Another host (127.0.0.2 reaches the server on lo) still gets its file.
    let other = UdpSocket::bind("127.0.0.2:0").await.unwrap();
    send_rrq(&other, srv.addr, b"k.bin", "octet", &[]).await;
    let (p, tid) = recv(&other, Duration::from_secs(10)).await.unwrap();
    assert!(
        matches!(Packet::parse(&p), Ok(Packet::Data { block: 1, .. })),
        "{:?}",
        Packet::parse(&p)
    );
    send_error(&other, tid, 0).await;
    for (s, tid) in &held {
        send_error(s, *tid, 0).await;
    }
    assert!(srv.idle(Duration::from_secs(10)).await);
}

/// A client that asked for `timeout=255` and went silent held its slot for ~81 minutes;
/// now for `MAX_SILENCE`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_with_timeout_255_frees_its_slot() {
    need!();
    let srv = Server::start("t255", 1).await;
    random_file(&srv.root().join("k.bin"), 10_000, 8);
    let s = raw_socket().await;
    send_rrq(&s, srv.addr, b"k.bin", "octet", &[("timeout", "255")]).await;
    let (p, _) = recv(&s, Duration::from_secs(10)).await.unwrap();
    assert!(
        matches!(Packet::parse(&p), Ok(Packet::Oack(_))),
        "{:?}",
        Packet::parse(&p)
    );
    let t0 = Instant::now();
    let limit = vdd::tftp::session::MAX_SILENCE + Duration::from_secs(10);
    assert!(srv.idle(limit).await, "slot still held after {limit:?}");
    assert!(t0.elapsed() >= vdd::tftp::session::MAX_SILENCE - Duration::from_secs(1));
}

/// ICMP port unreachable for the server's DATA ends the transfer at the next resend,
/// not after five of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_client_port_ends_the_transfer() {
    need!();
    let srv = Server::start("icmp", 4).await;
    random_file(&srv.root().join("k.bin"), 10_000, 9);
    let s = raw_socket().await;
    send_rrq(&s, srv.addr, b"k.bin", "octet", &[]).await;
    let (p, _) = recv(&s, Duration::from_secs(10)).await.unwrap();
    assert!(matches!(
        Packet::parse(&p),
        Ok(Packet::Data { block: 1, .. })
    ));
    drop(s);
    let t0 = Instant::now();
    // The first resend is 1 s after DATA 1; five resends with backoff would take 19 s.
    assert!(
        srv.idle(Duration::from_secs(8)).await,
        "transfer alive after its client's port closed"
    );
    eprintln!(
        "ended {:.1} s after the client's port closed",
        t0.elapsed().as_secs_f64()
    );
}
