//! The thin client's DHCPv4 client (RFC 2131 section 4.4, client state diagram: INIT ->
//! SELECTING -> REQUESTING -> BOUND; retransmission per 4.1; options per RFC 2132).
//!
//! Two layers as in the house style: [`Client`] is pure (packet or timeout + `now` ->
//! packets to send + next deadline), and [`run`] is a small blocking driver on a UDP socket
//! bound to the interface. A bound lease is kept alive through RENEWING (unicast REQUEST to
//! the server at T1) and REBINDING (broadcast at T2), RFC 2131 4.4.5; if it cannot be kept,
//! the driver reports it lost and PID 1 starts over, since a session must not go on with
//! an address the server may hand to another seat.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable};

/// First retransmission delay; RFC 2131 4.1 says 4 s, doubling to 64 s.
const FIRST_RETRY: Duration = Duration::from_secs(4);
const MAX_RETRY: Duration = Duration::from_secs(64);
/// REQUESTs sent before giving up on an offer and starting over from INIT (4.4.1).
const MAX_REQUESTS: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open the DHCP socket on {0}")]
    Socket(String, #[source] std::io::Error),
    #[error("cannot send a DHCP packet")]
    Send(#[source] std::io::Error),
    #[error("no DHCP lease within {0:?}")]
    Timeout(Duration),
    #[error("DHCP lease lost: {0}")]
    Lost(&'static str),
}

/// What we were given, in the terms PID 1 needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub router: Option<Ipv4Addr>,
    pub server: Ipv4Addr,
    /// `siaddr`: where the server says the next stage lives (used when no vdd.server).
    pub next_server: Ipv4Addr,
    pub dns: Vec<Ipv4Addr>,
    pub lease_secs: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    Init,
    Selecting {
        attempt: u32,
        deadline: Instant,
    },
    Requesting {
        offer: Lease,
        attempt: u32,
        deadline: Instant,
    },
    Bound(Times),
    Renewing {
        times: Times,
        deadline: Instant,
    },
    Rebinding {
        times: Times,
        deadline: Instant,
    },
}

/// A lease and the instants that govern it (RFC 2131 4.4.5). `None` times: an infinite
/// lease (0xffffffff) or none given, which needs no renewal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Times {
    pub lease: Lease,
    pub t1: Option<Instant>,
    pub t2: Option<Instant>,
    pub expiry: Option<Instant>,
}

/// Shortest wait between renewal retransmissions (RFC 2131 4.4.5: "down to a minimum of
/// 60 seconds").
const MIN_RENEW_RETRY: Duration = Duration::from_secs(60);

/// What the state machine asks of its driver.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Broadcast to 255.255.255.255:67.
    Send(Box<Message>),
    /// Unicast to the server (RENEWING).
    SendTo(Box<Message>, Ipv4Addr),
    Bound(Lease),
    /// The server extended the lease.
    Renewed(Lease),
    /// The lease ended (NAK on renewal, or expiry); the address must go.
    Lost(&'static str),
    /// Only from the driver: it was asked to stop.
    Timeout,
    /// A packet we dropped, with why; the driver logs it.
    Ignored(&'static str),
    /// Our offer was refused (DHCPNAK) or never acknowledged; back to INIT.
    Restarted(&'static str),
}

pub struct Client {
    mac: [u8; 6],
    xid: u32,
    started: Option<Instant>,
    pub state: State,
}

impl Client {
    /// `xid` comes from the driver so that this stays deterministic in tests.
    pub fn new(mac: [u8; 6], xid: u32) -> Client {
        Client {
            mac,
            xid,
            started: None,
            state: State::Init,
        }
    }

    pub fn xid(&self) -> u32 {
        self.xid
    }

    /// When the driver must call [`Client::timeout`] if no packet came.
    pub fn deadline(&self) -> Option<Instant> {
        match &self.state {
            State::Selecting { deadline, .. }
            | State::Requesting { deadline, .. }
            | State::Renewing { deadline, .. }
            | State::Rebinding { deadline, .. } => Some(*deadline),
            State::Bound(t) => t.t1,
            State::Init => None,
        }
    }

    /// INIT: send DHCPDISCOVER and move to SELECTING.
    pub fn start(&mut self, now: Instant) -> Vec<Output> {
        self.started.get_or_insert(now);
        self.state = State::Selecting {
            attempt: 0,
            deadline: now + self.backoff(0),
        };
        vec![Output::Send(Box::new(self.discover(now)))]
    }

    pub fn timeout(&mut self, now: Instant) -> Vec<Output> {
        match self.state.clone() {
            State::Selecting { attempt, deadline } if now >= deadline => {
                let attempt = attempt + 1;
                self.state = State::Selecting {
                    attempt,
                    deadline: now + self.backoff(attempt),
                };
                vec![Output::Send(Box::new(self.discover(now)))]
            }
            State::Requesting {
                offer,
                attempt,
                deadline,
            } if now >= deadline => {
                if attempt + 1 >= MAX_REQUESTS {
                    return self.restart(now, "no DHCPACK for our DHCPREQUEST");
                }
                let attempt = attempt + 1;
                let req = self.request(&offer, now);
                self.state = State::Requesting {
                    offer,
                    attempt,
                    deadline: now + self.backoff(attempt),
                };
                vec![Output::Send(Box::new(req))]
            }
            State::Bound(times) if times.t1.is_some_and(|t1| now >= t1) => {
                self.xid = self.xid.wrapping_add(0x9e37_79b9);
                let to = times.lease.server;
                let deadline = retry_until(now, times.t2);
                self.state = State::Renewing {
                    times: times.clone(),
                    deadline,
                };
                vec![Output::SendTo(Box::new(self.renew(&times.lease, now)), to)]
            }
            State::Renewing { times, deadline } if now >= deadline => {
                if times.t2.is_some_and(|t2| now >= t2) {
                    let deadline = retry_until(now, times.expiry);
                    let m = self.renew(&times.lease, now);
                    self.state = State::Rebinding { times, deadline };
                    return vec![Output::Send(Box::new(m))];
                }
                let to = times.lease.server;
                let m = self.renew(&times.lease, now);
                self.state = State::Renewing {
                    deadline: retry_until(now, times.t2),
                    times,
                };
                vec![Output::SendTo(Box::new(m), to)]
            }
            State::Rebinding { times, deadline } if now >= deadline => {
                if times.expiry.is_some_and(|e| now >= e) {
                    self.state = State::Init;
                    return vec![Output::Lost("lease expired without DHCPACK")];
                }
                let m = self.renew(&times.lease, now);
                self.state = State::Rebinding {
                    deadline: retry_until(now, times.expiry),
                    times,
                };
                vec![Output::Send(Box::new(m))]
            }
            _ => Vec::new(),
        }
    }

    /// REQUEST of RENEWING/REBINDING: `ciaddr` is our address, no server identifier or
    /// requested address (RFC 2131 4.3.2 table 4), and no broadcast flag since we can
    /// receive unicast now.
    fn renew(&self, lease: &Lease, now: Instant) -> Message {
        let mut m = self.base(now);
        m.set_flags(Flags::default());
        m.set_ciaddr(lease.ip);
        m.opts_mut()
            .insert(DhcpOption::MessageType(MessageType::Request));
        m
    }

    pub fn packet(&mut self, msg: &Message, now: Instant) -> Vec<Output> {
        if msg.opcode() != Opcode::BootReply {
            return vec![Output::Ignored("not a BOOTREPLY")];
        }
        if msg.xid() != self.xid {
            return vec![Output::Ignored("xid is not ours")];
        }
        // hlen first: dhcproto's `chaddr()` slices its 16-byte array by hlen and panics
        // past 16, and only Ethernet's 6 can be ours anyway.
        if msg.hlen() != 6 || msg.chaddr() != &self.mac[..] {
            return vec![Output::Ignored("chaddr is not ours")];
        }
        let kind = msg.opts().msg_type();
        match (self.state.clone(), kind) {
            (State::Selecting { .. }, Some(MessageType::Offer)) => {
                let Some(offer) = lease_of(msg) else {
                    return vec![Output::Ignored(
                        "DHCPOFFER without server identifier or address",
                    )];
                };
                // RFC 2131 4.4.1: take the first acceptable offer; REQUEST it by broadcast
                // so other servers learn they were not chosen.
                let req = self.request(&offer, now);
                self.state = State::Requesting {
                    offer,
                    attempt: 0,
                    deadline: now + self.backoff(0),
                };
                vec![Output::Send(Box::new(req))]
            }
            (State::Requesting { offer, .. }, Some(MessageType::Ack)) => {
                match lease_of(msg) {
                    Some(l) if l.server == offer.server => {
                        self.state = State::Bound(times(l.clone(), msg, now));
                        vec![Output::Bound(l)]
                    }
                    // An ACK from a server we did not choose is not for our REQUEST.
                    _ => vec![Output::Ignored("DHCPACK from another server")],
                }
            }
            (State::Requesting { offer, .. }, Some(MessageType::Nak)) => {
                match msg.opts().get(OptionCode::ServerIdentifier) {
                    Some(DhcpOption::ServerIdentifier(s)) if *s == offer.server => {
                        self.restart(now, "DHCPNAK")
                    }
                    _ => vec![Output::Ignored("DHCPNAK from another server")],
                }
            }
            (
                State::Renewing { times: old, .. } | State::Rebinding { times: old, .. },
                Some(MessageType::Ack),
            ) => match lease_of(msg) {
                Some(l) if l.ip == old.lease.ip => {
                    self.state = State::Bound(times(l.clone(), msg, now));
                    vec![Output::Renewed(l)]
                }
                Some(_) => {
                    self.state = State::Init;
                    vec![Output::Lost("the server moved us to another address")]
                }
                None => vec![Output::Ignored(
                    "DHCPACK without server identifier or address",
                )],
            },
            (State::Renewing { .. } | State::Rebinding { .. }, Some(MessageType::Nak)) => {
                self.state = State::Init;
                vec![Output::Lost("DHCPNAK on renewal")]
            }
            _ => vec![Output::Ignored("unexpected message in this state")],
        }
    }

    /// Back to INIT with a fresh xid, as RFC 2131 4.4.1 asks after a NAK.
    fn restart(&mut self, now: Instant, why: &'static str) -> Vec<Output> {
        self.xid = self.xid.wrapping_add(0x9e37_79b9);
        let mut out = vec![Output::Restarted(why)];
        out.extend(self.start(now));
        out
    }

    /// 4 s, 8 s, ... 64 s, each moved by up to +-1 s (RFC 2131 4.1) so that a room of
    /// clients powered on together does not retransmit in lockstep. The jitter comes from
    /// the xid, which is random per client, to keep this function pure.
    fn backoff(&self, attempt: u32) -> Duration {
        let base = FIRST_RETRY
            .saturating_mul(1 << attempt.min(4))
            .min(MAX_RETRY);
        let j = (self.xid.rotate_left(attempt * 7) % 2001) as u64;
        (base + Duration::from_millis(j)).saturating_sub(Duration::from_millis(1000))
    }

    fn base(&self, now: Instant) -> Message {
        let mut m = Message::new_with_id(
            self.xid,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &self.mac,
        );
        // We cannot receive unicast before we have an address: ask for broadcast replies.
        m.set_flags(Flags::default().set_broadcast());
        let secs = self
            .started
            .map(|s| now.saturating_duration_since(s).as_secs())
            .unwrap_or(0);
        m.set_secs(secs.min(u16::MAX as u64) as u16);
        let mut cid = vec![1u8];
        cid.extend_from_slice(&self.mac);
        let o = m.opts_mut();
        o.insert(DhcpOption::ClientIdentifier(cid));
        o.insert(DhcpOption::ClassIdentifier(
            vdd_api::DHCP_CLASS.as_bytes().to_vec(),
        ));
        o.insert(DhcpOption::ParameterRequestList(vec![
            OptionCode::SubnetMask,
            OptionCode::Router,
            OptionCode::DomainNameServer,
            OptionCode::AddressLeaseTime,
            OptionCode::ServerIdentifier,
        ]));
        o.insert(DhcpOption::MaxMessageSize(1500));
        m
    }

    fn discover(&self, now: Instant) -> Message {
        let mut m = self.base(now);
        m.opts_mut()
            .insert(DhcpOption::MessageType(MessageType::Discover));
        m
    }

    fn request(&self, offer: &Lease, now: Instant) -> Message {
        let mut m = self.base(now);
        let o = m.opts_mut();
        o.insert(DhcpOption::MessageType(MessageType::Request));
        o.insert(DhcpOption::RequestedIpAddress(offer.ip));
        o.insert(DhcpOption::ServerIdentifier(offer.server));
        m
    }
}

/// Half the time left until `end`, at least [`MIN_RENEW_RETRY`], never past `end`.
/// Why a datagram on port 68 is no reply we read.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("{0} bytes, shorter than the 240-byte DHCP header")]
    Short(usize),
    #[error("not an Ethernet BOOTREPLY with the DHCP magic cookie")]
    NotReply,
    #[error("option {code} of length {len} runs past the end or has a length RFC 2132 forbids")]
    Option { code: u8, len: usize },
    #[error("undecodable: {0}")]
    Codec(String),
}

/// Decodes a reply from the network for [`Client::packet`]. `dhcproto` 0.12 trusts what
/// it reads: an `unwrap` on option 121's prefix length, `assert!`s on option lengths,
/// and `chaddr()` slicing by hlen all panic, and a panic here is PID 1's, so the kernel's.
/// As vdd's server codec does (src/dhcp/codec.rs), the raw bytes are walked first and
/// only the options the client reads, with the lengths RFC 2132 gives them, reach it.
pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
    const MAGIC: [u8; 4] = [99, 130, 83, 99];
    if bytes.len() < 240 {
        return Err(DecodeError::Short(bytes.len()));
    }
    if bytes[0] != 2 || bytes[1] != 1 || bytes[2] != 6 || bytes[236..240] != MAGIC {
        return Err(DecodeError::NotReply);
    }
    let mut clean = bytes[..240].to_vec();
    let mut b = &bytes[240..];
    while let Some((&code, rest)) = b.split_first() {
        match code {
            0 => {
                b = rest;
                continue;
            }
            255 => break,
            _ => {}
        }
        let bad = |len| DecodeError::Option { code, len };
        let (&len, rest) = rest.split_first().ok_or(bad(0))?;
        let len = usize::from(len);
        let data = rest.get(..len).ok_or(bad(len))?;
        b = &rest[len..];
        let ok = match code {
            53 => len == 1,
            // Subnet mask, server identifier, lease time, T1, T2.
            1 | 54 | 51 | 58 | 59 => len == 4,
            // Routers, DNS servers: one or more addresses.
            3 | 6 => len >= 4 && len % 4 == 0,
            _ => continue, // not read by the client: not passed on
        };
        if !ok {
            return Err(bad(len));
        }
        clean.push(code);
        clean.push(len as u8);
        clean.extend_from_slice(data);
    }
    clean.push(255);
    Message::decode(&mut Decoder::new(&clean)).map_err(|e| DecodeError::Codec(e.to_string()))
}

fn retry_until(now: Instant, end: Option<Instant>) -> Instant {
    match end {
        Some(e) => (now + (e.saturating_duration_since(now) / 2).max(MIN_RENEW_RETRY)).min(e),
        None => now + MIN_RENEW_RETRY,
    }
}

/// T1, T2 and expiry of an ACK received at `now`: options 58/59 when given, else 1/2 and
/// 7/8 of the lease (RFC 2131 4.4.5). The clock starts at the ACK, a little later than the
/// REQUEST the RFC counts from; the error is one round trip, on the safe side of T1.
fn times(lease: Lease, msg: &Message, now: Instant) -> Times {
    let secs = lease.lease_secs;
    if secs == 0 || secs == u32::MAX {
        return Times {
            lease,
            t1: None,
            t2: None,
            expiry: None,
        };
    }
    let opt = |code, def: u32| match msg.opts().get(code) {
        Some(DhcpOption::Renewal(t)) | Some(DhcpOption::Rebinding(t)) if *t < secs => *t,
        _ => def,
    };
    let t1 = opt(OptionCode::Renewal, secs / 2);
    let t2 = opt(OptionCode::Rebinding, secs / 8 * 7).max(t1);
    let at = |s: u32| Some(now + Duration::from_secs(s as u64));
    Times {
        lease,
        t1: at(t1),
        t2: at(t2),
        expiry: at(secs),
    }
}

/// The lease an OFFER/ACK describes, or `None` if it lacks what RFC 2131 requires.
fn lease_of(msg: &Message) -> Option<Lease> {
    let o = msg.opts();
    let server = match o.get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(s)) => *s,
        _ => return None,
    };
    let ip = msg.yiaddr();
    if ip.is_unspecified() || ip.is_broadcast() {
        return None;
    }
    let prefix = match o.get(OptionCode::SubnetMask) {
        Some(DhcpOption::SubnetMask(m)) => u32::from(*m).leading_ones() as u8,
        // RFC 2131 leaves the mask optional; a classful guess is what old clients did.
        _ => match ip.octets()[0] {
            0..=127 => 8,
            128..=191 => 16,
            _ => 24,
        },
    };
    let router = match o.get(OptionCode::Router) {
        Some(DhcpOption::Router(r)) => r.first().copied(),
        _ => None,
    };
    let dns = match o.get(OptionCode::DomainNameServer) {
        Some(DhcpOption::DomainNameServer(d)) => d.clone(),
        _ => Vec::new(),
    };
    let lease_secs = match o.get(OptionCode::AddressLeaseTime) {
        Some(DhcpOption::AddressLeaseTime(t)) => *t,
        _ => 0,
    };
    Some(Lease {
        ip,
        prefix,
        router,
        server,
        next_server: msg.siaddr(),
        dns,
        lease_secs,
    })
}

/// A UDP socket on port 68 bound to `iface`, able to broadcast from 0.0.0.0 before the
/// interface has an address (SO_BINDTODEVICE picks the way out; SO_BROADCAST allows
/// 255.255.255.255).
pub fn socket(iface: &str) -> Result<UdpSocket, Error> {
    use nix::sys::socket::{
        bind, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn,
    };
    let err = |e: nix::Error| Error::Socket(iface.to_string(), e.into());
    let fd: OwnedFd = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(err)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(err)?;
    setsockopt(&fd, sockopt::Broadcast, &true).map_err(err)?;
    setsockopt(&fd, sockopt::BindToDevice, &std::ffi::OsString::from(iface)).map_err(err)?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68)),
    )
    .map_err(err)?;
    Ok(UdpSocket::from(fd))
}

/// A bound lease and what keeps it: the socket and the state machine.
pub struct Holder {
    sock: UdpSocket,
    client: Client,
}

/// Runs the client until BOUND or `limit`, calling `log` for each step worth printing.
pub fn run(
    iface: &str,
    mac: [u8; 6],
    xid: u32,
    limit: Duration,
    log: &mut dyn FnMut(String),
) -> Result<(Lease, Holder), Error> {
    let sock = socket(iface)?;
    let now = Instant::now();
    let mut client = Client::new(mac, xid);
    let out = client.start(now);
    match drive_until(&sock, &mut client, out, Some(now + limit), None, log)? {
        Output::Bound(l) => Ok((l, Holder { sock, client })),
        _ => Err(Error::Timeout(limit)),
    }
}

impl Holder {
    /// Waits for T1 and one renewal; for tests and `boot-menu dhcp IFACE renew`.
    pub fn renew_once(
        &mut self,
        limit: Duration,
        log: &mut dyn FnMut(String),
    ) -> Result<Lease, Error> {
        let until = Instant::now() + limit;
        match drive_until(
            &self.sock,
            &mut self.client,
            Vec::new(),
            Some(until),
            None,
            log,
        )? {
            Output::Renewed(l) => Ok(l),
            Output::Lost(why) => Err(Error::Lost(why)),
            _ => Err(Error::Timeout(limit)),
        }
    }

    /// Renews for as long as the server agrees; returns why the lease was lost. Meant for
    /// a thread of its own.
    /// `stop` ends it (a new boot attempt holds a new lease).
    pub fn keep(mut self, stop: &AtomicBool, log: &mut dyn FnMut(String)) -> &'static str {
        loop {
            if stop.load(Ordering::Relaxed) {
                return "stopped";
            }
            match drive(&self.sock, &mut self.client, Vec::new(), Some(stop), log) {
                Ok(Output::Timeout) => {}
                Ok(Output::Renewed(l)) => log(format!(
                    "dhcp: lease of {} renewed for {}s",
                    l.ip, l.lease_secs
                )),
                Ok(Output::Lost(why)) => return why,
                Ok(_) => {}
                Err(e) => {
                    // A send error (link down for a moment) is retried at the next
                    // deadline; the expiry still bounds how long we hold on.
                    log(format!("dhcp: {e}"));
                    std::thread::sleep(Duration::from_secs(5));
                }
            }
            if self.client.deadline().is_none() && !matches!(self.client.state, State::Bound(_)) {
                return "lease state lost";
            }
        }
    }
}

/// Sends what the machine asks, waits for packets or its deadline, until it yields Bound,
/// Renewed or Lost, or `limit` passes (an error), or `stop` is set (`Output::Timeout`).
fn drive(
    sock: &UdpSocket,
    c: &mut Client,
    out: Vec<Output>,
    stop: Option<&AtomicBool>,
    log: &mut dyn FnMut(String),
) -> Result<Output, Error> {
    drive_until(sock, c, out, None, stop, log)
}

fn drive_until(
    sock: &UdpSocket,
    c: &mut Client,
    mut out: Vec<Output>,
    limit: Option<Instant>,
    stop: Option<&AtomicBool>,
    log: &mut dyn FnMut(String),
) -> Result<Output, Error> {
    let mut buf = vec![0u8; 1500];
    loop {
        for o in out.drain(..) {
            let (m, dst) = match o {
                Output::Send(m) => (m, Ipv4Addr::BROADCAST),
                Output::SendTo(m, ip) => (m, ip),
                done @ (Output::Bound(_) | Output::Renewed(_) | Output::Lost(_)) => {
                    return Ok(done)
                }
                Output::Ignored(why) => {
                    log(format!("dhcp: ignored a packet: {why}"));
                    continue;
                }
                Output::Restarted(why) => {
                    log(format!("dhcp: starting over: {why}"));
                    continue;
                }
                Output::Timeout => continue,
            };
            let bytes = m
                .to_vec()
                .map_err(|e| Error::Send(std::io::Error::other(e.to_string())))?;
            log(format!(
                "dhcp: send {:?} xid={:#010x} to {dst}",
                m.opts().msg_type().unwrap_or(MessageType::Unknown(0)),
                m.xid()
            ));
            sock.send_to(&bytes, SocketAddrV4::new(dst, 67))
                .map_err(Error::Send)?;
        }
        let now = Instant::now();
        if let Some(l) = limit.filter(|l| now >= *l) {
            return Err(Error::Timeout(l.saturating_duration_since(now)));
        }
        if stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
            return Ok(Output::Timeout);
        }
        let mut until = c.deadline().unwrap_or(now + Duration::from_secs(3600));
        until = limit.map_or(until, |l| until.min(l));
        if stop.is_some() {
            // Look at `stop` at least once a second.
            until = until.min(now + Duration::from_secs(1));
        }
        let wait = until
            .saturating_duration_since(now)
            .max(Duration::from_millis(10));
        sock.set_read_timeout(Some(wait)).map_err(Error::Send)?;
        match sock.recv_from(&mut buf) {
            Ok((n, _)) => match decode(&buf[..n]) {
                Ok(m) => out = c.packet(&m, Instant::now()),
                Err(e) => log(format!("dhcp: undecodable packet of {n} bytes: {e}")),
            },
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                out = c.timeout(Instant::now())
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::Send(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    const SRV: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);

    fn reply(kind: MessageType, xid: u32, server: Ipv4Addr) -> Message {
        let mut m = Message::new_with_id(
            xid,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::new(10, 0, 2, 15),
            SRV,
            Ipv4Addr::UNSPECIFIED,
            &MAC,
        );
        m.set_opcode(Opcode::BootReply);
        let o = m.opts_mut();
        o.insert(DhcpOption::MessageType(kind));
        o.insert(DhcpOption::ServerIdentifier(server));
        o.insert(DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)));
        o.insert(DhcpOption::Router(vec![SRV]));
        o.insert(DhcpOption::AddressLeaseTime(86400));
        m
    }

    /// Wire round trip, so the tests see what a server would see.
    fn wire(o: &Output) -> Message {
        let Output::Send(m) = o else {
            panic!("expected a packet, got {o:?}")
        };
        Message::decode(&mut Decoder::new(&m.to_vec().unwrap())).unwrap()
    }

    #[test]
    fn discover_offer_request_ack() {
        let t = Instant::now();
        let mut c = Client::new(MAC, 0x1234_5678);
        let out = c.start(t);
        let d = wire(&out[0]);
        assert_eq!(d.opts().msg_type(), Some(MessageType::Discover));
        assert_eq!(d.xid(), 0x1234_5678);
        assert!(d.flags().broadcast());
        assert_eq!(&d.chaddr()[..6], &MAC);
        assert!(matches!(c.state, State::Selecting { attempt: 0, .. }));

        let out = c.packet(&reply(MessageType::Offer, c.xid(), SRV), t);
        let r = wire(&out[0]);
        assert_eq!(r.opts().msg_type(), Some(MessageType::Request));
        assert_eq!(
            r.opts().get(OptionCode::RequestedIpAddress),
            Some(&DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 0, 2, 15)))
        );
        assert_eq!(
            r.opts().get(OptionCode::ServerIdentifier),
            Some(&DhcpOption::ServerIdentifier(SRV))
        );
        assert!(r.ciaddr().is_unspecified());

        let out = c.packet(&reply(MessageType::Ack, c.xid(), SRV), t);
        let Output::Bound(l) = &out[0] else {
            panic!("{out:?}")
        };
        assert_eq!(l.ip, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(l.prefix, 24);
        assert_eq!(l.router, Some(SRV));
        assert_eq!(l.lease_secs, 86400);
        // The next thing to do is renewing at T1 = half the lease.
        assert_eq!(c.deadline(), Some(t + Duration::from_secs(43200)));
    }

    /// A client bound at `t` to 10.0.2.15 with a lease of `secs`.
    fn bound(t: Instant, secs: u32, extra: &[DhcpOption]) -> Client {
        let mut c = Client::new(MAC, 9);
        c.start(t);
        c.packet(&reply(MessageType::Offer, 9, SRV), t);
        let mut ack = reply(MessageType::Ack, 9, SRV);
        ack.opts_mut().insert(DhcpOption::AddressLeaseTime(secs));
        for o in extra {
            ack.opts_mut().insert(o.clone());
        }
        assert!(matches!(c.packet(&ack, t)[0], Output::Bound(_)));
        c
    }

    #[test]
    fn renews_by_unicast_at_t1() {
        let t = Instant::now();
        let mut c = bound(t, 3600, &[]);
        assert!(c.timeout(t + Duration::from_secs(1799)).is_empty());
        let t1 = t + Duration::from_secs(1800);
        let out = c.timeout(t1);
        let Output::SendTo(m, to) = &out[0] else {
            panic!("{out:?}")
        };
        assert_eq!(*to, SRV);
        assert_eq!(m.opts().msg_type(), Some(MessageType::Request));
        assert_eq!(m.ciaddr(), Ipv4Addr::new(10, 0, 2, 15));
        assert!(!m.flags().broadcast());
        assert!(m.opts().get(OptionCode::ServerIdentifier).is_none());
        assert!(m.opts().get(OptionCode::RequestedIpAddress).is_none());
        let xid = m.xid();
        assert_ne!(xid, 9, "a renewal is a new transaction");
        // Retransmission: half the time to T2 (3150 s), here 675 s.
        assert_eq!(c.deadline(), Some(t1 + Duration::from_secs(675)));
        let later = t1 + Duration::from_secs(10);
        let out = c.packet(&reply(MessageType::Ack, xid, SRV), later);
        // The server's new answer (a day) sets the new T1.
        assert!(matches!(&out[0], Output::Renewed(l) if l.lease_secs == 86400));
        assert_eq!(c.deadline(), Some(later + Duration::from_secs(43200)));
    }

    #[test]
    fn rebinds_by_broadcast_at_t2_then_expires() {
        let t = Instant::now();
        let mut c = bound(t, 1000, &[]);
        c.timeout(t + Duration::from_secs(500));
        // Retransmissions while RENEWING stay unicast and at least 60 s apart.
        let t2 = t + Duration::from_secs(875);
        let mut d = c.deadline().unwrap();
        assert_eq!(d, t + Duration::from_millis(500_000 + 187_500));
        while d < t2 {
            let prev = d;
            assert!(matches!(c.timeout(d)[0], Output::SendTo(..)));
            d = c.deadline().unwrap();
            assert!(d - prev >= MIN_RENEW_RETRY || d == t2, "{:?}", d - prev);
        }
        assert_eq!(d, t2, "retransmissions never pass T2");
        let out = c.timeout(d);
        let Output::Send(m) = &out[0] else {
            panic!("{out:?}")
        };
        assert_eq!(m.ciaddr(), Ipv4Addr::new(10, 0, 2, 15));
        assert!(matches!(c.state, State::Rebinding { .. }));
        let mut last = Vec::new();
        for _ in 0..10 {
            let d = c.deadline().unwrap();
            last = c.timeout(d);
            if matches!(last[0], Output::Lost(_)) {
                break;
            }
            assert!(matches!(last[0], Output::Send(_)));
        }
        assert_eq!(last, [Output::Lost("lease expired without DHCPACK")]);
        assert_eq!(c.state, State::Init);
    }

    #[test]
    fn nak_or_new_address_on_renewal_loses_the_lease() {
        let t = Instant::now();
        let mut c = bound(t, 3600, &[]);
        let out = c.timeout(t + Duration::from_secs(1800));
        let Output::SendTo(m, _) = &out[0] else {
            panic!()
        };
        let xid = m.xid();
        assert_eq!(
            c.packet(&reply(MessageType::Nak, xid, SRV), t),
            [Output::Lost("DHCPNAK on renewal")]
        );
        let mut c = bound(t, 3600, &[]);
        let out = c.timeout(t + Duration::from_secs(1800));
        let Output::SendTo(m, _) = &out[0] else {
            panic!()
        };
        let mut ack = reply(MessageType::Ack, m.xid(), SRV);
        ack.set_yiaddr(Ipv4Addr::new(10, 0, 2, 99));
        assert!(matches!(c.packet(&ack, t)[0], Output::Lost(_)));
    }

    #[test]
    fn renewal_times_from_options_and_infinite_leases() {
        let t = Instant::now();
        let c = bound(
            t,
            3600,
            &[DhcpOption::Renewal(100), DhcpOption::Rebinding(200)],
        );
        assert_eq!(c.deadline(), Some(t + Duration::from_secs(100)));
        let State::Bound(times) = &c.state else {
            panic!()
        };
        assert_eq!(times.t2, Some(t + Duration::from_secs(200)));
        assert_eq!(times.expiry, Some(t + Duration::from_secs(3600)));
        // T1 beyond the lease is nonsense: the defaults apply.
        let c = bound(t, 3600, &[DhcpOption::Renewal(9999)]);
        assert_eq!(c.deadline(), Some(t + Duration::from_secs(1800)));
        let c = bound(t, u32::MAX, &[]);
        assert_eq!(c.deadline(), None);
    }

    #[test]
    fn retransmits_with_doubling_backoff() {
        let t = Instant::now();
        let mut c = Client::new(MAC, 42);
        c.start(t);
        let mut prev = t;
        let mut gaps = Vec::new();
        for _ in 0..7 {
            let d = c.deadline().unwrap();
            // Nothing happens before the deadline.
            assert!(c.timeout(d - Duration::from_millis(1)).is_empty());
            let out = c.timeout(d);
            assert_eq!(wire(&out[0]).opts().msg_type(), Some(MessageType::Discover));
            gaps.push(d - prev);
            prev = d;
        }
        let s: Vec<u64> = gaps
            .iter()
            .map(|g| (g.as_millis() as u64 + 500) / 1000)
            .collect();
        for (g, want) in s.iter().zip([4u64, 8, 16, 32, 64, 64, 64]) {
            assert!(g.abs_diff(want) <= 1, "gaps {s:?}");
        }
        // secs counts from the first DISCOVER.
        let out = c.timeout(c.deadline().unwrap());
        assert!(wire(&out[0]).secs() > 200);
    }

    #[test]
    fn foreign_and_broken_replies_are_ignored() {
        let t = Instant::now();
        let mut c = Client::new(MAC, 7);
        c.start(t);
        let before = c.state.clone();
        assert_eq!(
            c.packet(&reply(MessageType::Offer, 8, SRV), t),
            [Output::Ignored("xid is not ours")]
        );
        let mut req = reply(MessageType::Offer, 7, SRV);
        req.set_opcode(Opcode::BootRequest);
        assert!(matches!(c.packet(&req, t)[0], Output::Ignored(_)));
        let mut other = reply(MessageType::Offer, 7, SRV);
        other.set_chaddr(&[1, 2, 3, 4, 5, 6]);
        assert!(matches!(c.packet(&other, t)[0], Output::Ignored(_)));
        let mut noid = reply(MessageType::Offer, 7, SRV);
        noid.opts_mut().remove(OptionCode::ServerIdentifier);
        assert!(matches!(c.packet(&noid, t)[0], Output::Ignored(_)));
        // An ACK while SELECTING is not an answer to anything we sent.
        assert!(matches!(
            c.packet(&reply(MessageType::Ack, 7, SRV), t)[0],
            Output::Ignored(_)
        ));
        assert_eq!(c.state, before);
        // Garbage bytes do not decode; the driver logs and goes on.
        assert!(Message::decode(&mut Decoder::new(&[1, 2, 3])).is_err());
    }

    /// A BOOTREPLY to `MAC` built byte by byte (RFC 2131 figure 1), `opts` after the cookie.
    fn raw_reply(xid: u32, hlen: u8, opts: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 236];
        b[0] = 2;
        b[1] = 1;
        b[2] = hlen;
        b[4..8].copy_from_slice(&xid.to_be_bytes());
        b[16..20].copy_from_slice(&[10, 0, 2, 15]);
        b[28..34].copy_from_slice(&MAC);
        b.extend_from_slice(&[99, 130, 83, 99]);
        b.extend_from_slice(opts);
        b
    }

    #[test]
    fn replies_that_made_dhcproto_panic_are_refused_or_cleaned() {
        let t = Instant::now();
        let mut c = Client::new(MAC, 0x1234_5678);
        c.start(t);
        // cargo fuzz (bootmenu_dhcp): option 154 with length 0 hit dhcproto's
        // `debug_assert!(len == 4)`, and in a release build it read four bytes of the
        // next option instead. Options the client does not read are dropped now.
        let m = decode(&raw_reply(0x1234_5678, 6, &[0x9a, 0x00])).unwrap();
        assert!(m.opts().get(OptionCode::Unknown(154)).is_none());
        assert!(matches!(c.packet(&m, t)[0], Output::Ignored(_)));
        // hlen 17 made `chaddr()` panic in `packet` (release builds too).
        let b = raw_reply(0x1234_5678, 17, &[53, 1, 2, 54, 4, 10, 0, 2, 2, 255]);
        assert_eq!(decode(&b), Err(DecodeError::NotReply));
        let m = Message::decode(&mut Decoder::new(&b)).unwrap();
        assert!(matches!(c.packet(&m, t)[0], Output::Ignored(_)));
        // Lengths RFC 2132 forbids for what the client does read, and overruns.
        for opts in [
            &[53, 1, 2, 54, 3, 10, 0, 2][..],
            &[53, 1, 2, 3, 6, 10, 0, 2, 2, 0, 0],
            &[53, 2, 2, 2],
            &[53, 1, 2, 51, 40, 0],
            &[53],
        ] {
            assert!(
                matches!(
                    decode(&raw_reply(1, 6, opts)),
                    Err(DecodeError::Option { .. })
                ),
                "{opts:?}"
            );
        }
        assert_eq!(decode(&[2; 100]), Err(DecodeError::Short(100)));
        // What vdd sends decodes as before.
        let offer = reply(MessageType::Offer, c.xid(), SRV).to_vec().unwrap();
        assert_eq!(
            decode(&offer).unwrap(),
            Message::decode(&mut Decoder::new(&offer)).unwrap()
        );
    }

    #[test]
    fn nak_restarts_with_new_xid_and_other_servers_are_ignored() {
        let t = Instant::now();
        let mut c = Client::new(MAC, 100);
        c.start(t);
        c.packet(&reply(MessageType::Offer, 100, SRV), t);
        let other = Ipv4Addr::new(10, 0, 2, 3);
        assert!(matches!(
            c.packet(&reply(MessageType::Nak, 100, other), t)[0],
            Output::Ignored(_)
        ));
        assert!(matches!(
            c.packet(&reply(MessageType::Ack, 100, other), t)[0],
            Output::Ignored(_)
        ));
        let out = c.packet(&reply(MessageType::Nak, 100, SRV), t);
        assert_eq!(out[0], Output::Restarted("DHCPNAK"));
        let d = wire(&out[1]);
        assert_eq!(d.opts().msg_type(), Some(MessageType::Discover));
        assert_ne!(d.xid(), 100);
        assert!(matches!(c.state, State::Selecting { .. }));
    }

    #[test]
    fn unanswered_requests_fall_back_to_init() {
        let t = Instant::now();
        let mut c = Client::new(MAC, 5);
        c.start(t);
        c.packet(&reply(MessageType::Offer, 5, SRV), t);
        let mut kinds = Vec::new();
        for _ in 0..MAX_REQUESTS {
            let out = c.timeout(c.deadline().unwrap());
            kinds.push(
                out.iter()
                    .map(|o| match o {
                        Output::Send(m) => format!("{:?}", m.opts().msg_type().unwrap()),
                        o => format!("{o:?}"),
                    })
                    .collect::<Vec<_>>()
                    .join(","),
            );
        }
        assert_eq!(kinds[0], "Request");
        assert!(kinds.last().unwrap().ends_with("Discover"), "{kinds:?}");
    }

    #[test]
    fn mask_to_prefix_and_classful_default() {
        let mut m = reply(MessageType::Ack, 1, SRV);
        m.opts_mut()
            .insert(DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 240, 0)));
        assert_eq!(lease_of(&m).unwrap().prefix, 20);
        m.opts_mut().remove(OptionCode::SubnetMask);
        assert_eq!(lease_of(&m).unwrap().prefix, 8);
    }
}
