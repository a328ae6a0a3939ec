//! The filter on X11 guests' taps (`vdd::tapfilter`) in a lab namespace, with the frames a
//! guest would send written straight into a real tap on the lab bridge: DHCP to vdd
//! passes, anything else is dropped, and so is every frame from another MAC or from a tap
//! that was never admitted. Frames to the guest: DHCP answers and XDMCP pass, the rest is
//! dropped.

use std::net::UdpSocket;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use vdd::config::Mac;
use xtask::lab::{self, Lab};

const GUEST: &str = "52:54:00:6b:00:01";
const OTHER: &str = "52:54:00:6b:00:99";

fn mac(s: &str) -> Mac {
    s.parse().unwrap()
}

/// An Ethernet broadcast carrying IPv4/UDP from 10.77.0.50:`sport` to
/// 255.255.255.255:`dport` (UDP checksum 0: none, RFC 768).
fn frame(src: Mac, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = vec![
        0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 77, 0, 50, 255, 255, 255, 255,
    ];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    let sum = ip
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum::<u32>();
    let sum = !(((sum & 0xffff) + (sum >> 16)) as u16);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    f
}

fn received(s: &UdpSocket, payload: &[u8]) -> bool {
    let mut buf = [0u8; 1500];
    let end = Instant::now() + Duration::from_millis(700);
    while Instant::now() < end {
        match s.recv_from(&mut buf) {
            Ok((n, _)) if &buf[..n] == payload => return true,
            Ok(_) => {}
            Err(_) => {}
        }
    }
    false
}

/// Reads frames from the tap (what the bridge delivers to the guest) for a while and
/// says whether one carries `payload`.
fn guest_sees(tap: &OwnedFd, payload: &[u8]) -> bool {
    let end = Instant::now() + Duration::from_millis(700);
    let mut buf = [0u8; 2048];
    while Instant::now() < end {
        // The tap is non-blocking (set below): EAGAIN means nothing yet.
        match nix::unistd::read(tap.as_raw_fd(), &mut buf) {
            Ok(n) if buf[..n].ends_with(payload) => return true,
            Ok(_) => {}
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    false
}

#[test]
fn guests_reach_only_what_the_table_allows() {
    if let Some(why) = lab::missing(&["nft"]) {
        eprintln!("skipping: {why}");
        return;
    }
    let lab = Lab::new("tapf").unwrap();
    let ns = lab.server_ns.clone();
    // Everything below runs in the lab's server namespace: a thread of its own enters it,
    // so the tap, the sockets and nft (a child of this thread) are all there.
    std::thread::spawn(move || {
        let f = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let tap = rt.block_on(vdd::lan::open_tap("vdt-tapf1", "br0")).unwrap();
        let fl = nix::fcntl::fcntl(tap.fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL).unwrap();
        let fl = nix::fcntl::OFlag::from_bits_retain(fl) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(tap.fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(fl)).unwrap();
        vdd::tapfilter::install().unwrap();
        let listen = |port| {
            let s = UdpSocket::bind(("0.0.0.0", port)).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            s
        };
        let (dhcp, other) = (listen(67), listen(9999));
        let send = |f: Vec<u8>| {
            nix::unistd::write(&tap.fd, &f).unwrap();
        };
        // The tap was never admitted: even DHCP from it is dropped (fails closed).
        send(frame(mac(GUEST), 68, 67, b"unadmitted"));
        assert!(
            !received(&dhcp, b"unadmitted"),
            "a tap never admitted got through"
        );

        vdd::tapfilter::admit("vdt-tapf1", mac(GUEST)).unwrap();
        send(frame(mac(GUEST), 68, 67, b"dhcp"));
        assert!(
            received(&dhcp, b"dhcp"),
            "the guest's DHCP did not reach the server"
        );
        send(frame(mac(GUEST), 5000, 9999, b"elsewhere"));
        assert!(
            !received(&other, b"elsewhere"),
            "a port not in the table got through"
        );
        send(frame(mac(OTHER), 68, 67, b"spoofed"));
        assert!(
            !received(&dhcp, b"spoofed"),
            "a frame from another MAC got through"
        );

        // Towards the guest: a DHCP answer and XDMCP pass, other ports do not.
        dhcp.set_broadcast(true).unwrap();
        dhcp.send_to(b"offer", "10.77.0.255:68").unwrap();
        assert!(
            guest_sees(&tap.fd, b"offer"),
            "the guest missed a DHCP answer"
        );
        let any = UdpSocket::bind(("10.77.0.1", 0)).unwrap();
        any.set_broadcast(true).unwrap();
        any.send_to(b"xdmcp", "10.77.0.255:177").unwrap();
        assert!(guest_sees(&tap.fd, b"xdmcp"), "the guest missed XDMCP");
        any.send_to(b"nope", "10.77.0.255:9999").unwrap();
        assert!(
            !guest_sees(&tap.fd, b"nope"),
            "a port not in the table reached the guest"
        );

        // Forgotten at the session's end: dropped again, and a second forget is no error.
        vdd::tapfilter::forget("vdt-tapf1", mac(GUEST)).unwrap();
        vdd::tapfilter::forget("vdt-tapf1", mac(GUEST)).unwrap();
        send(frame(mac(GUEST), 68, 67, b"after"));
        assert!(!received(&dhcp, b"after"), "a forgotten tap got through");
    })
    .join()
    .unwrap();
    drop(lab);
}
