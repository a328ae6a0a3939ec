"""Flood clients of `cargo xtask bench floods`: each mode sends a bounded number of
requests to one server address, holds what it opened for a bounded time, never
acknowledges, then prints one summary line and exits (closing everything)."""
import os, random, resource, select, socket, struct, sys, time


def tftp(server, port, fname, n, secs, sources, window):
    socks = []
    for i in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((sources[i % len(sources)], 0))
        s.setblocking(False)
        if window:
            mode, opts = b"netascii", [b"blksize", b"65464", b"windowsize", b"65535"]
        else:
            mode, opts = b"octet", [b"timeout", b"255"]
        pkt = b"\x00\x01" + fname.encode() + b"\0" + mode + b"\0" + b"".join(o + b"\0" for o in opts)
        s.sendto(pkt, (server, port))
        socks.append(s)
    print("ready", flush=True)
    oack = err = data = 0
    acked = set()
    end = time.monotonic() + secs
    while time.monotonic() < end:
        r, _, _ = select.select(socks, [], [], 0.2)
        for s in r:
            try:
                b, peer = s.recvfrom(65536)
            except OSError:
                continue
            if b[:2] == b"\x00\x06":
                oack += 1
                # Acknowledge the OACK only: the server then sends its first window, and
                # nothing more is ever acknowledged.
                if window and s not in acked:
                    s.sendto(b"\x00\x04\x00\x00", peer)
                    acked.add(s)
            elif b[:2] == b"\x00\x03":
                data += len(b) - 4
            elif b[:2] == b"\x00\x05":
                err += 1
    print(f"rrq={n} oack={oack} error={err} data_bytes={data}")


def raise_nofile(n):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 64), hard))


def hold(socks, secs, events):
    """Polls until `secs` pass; counts connections the server closed."""
    p = select.poll()
    fds = {}
    for s in socks:
        p.register(s, events)
        fds[s.fileno()] = s
    closed = 0
    end = time.monotonic() + secs
    while time.monotonic() < end and fds:
        for fd, ev in p.poll(200):
            s = fds.get(fd)
            if s is None:
                continue
            gone = ev & (select.POLLERR | select.POLLHUP | select.POLLRDHUP)
            if not gone and ev & select.POLLIN:
                try:
                    gone = s.recv(65536) == b""
                except OSError:
                    gone = True
            if gone:
                closed += 1
                p.unregister(fd)
                del fds[fd]
    return closed, len(fds)


def tcp_idle(server, port, n, secs, sources):
    raise_nofile(n)
    socks, failed = [], 0
    for i in range(n):
        s = socket.socket()
        s.bind((sources[i % len(sources)], 0))
        s.setblocking(False)
        try:
            s.connect((server, port))
        except BlockingIOError:
            pass
        except OSError:
            failed += 1
            s.close()
            continue
        socks.append(s)
    print("ready", flush=True)
    closed, still = hold(socks, secs, select.POLLIN | select.POLLRDHUP)
    print(f"connects={n} failed={failed} closed_by_server={closed + failed} open_at_end={still}")


def http_slow(server, port, path, secs, src):
    s = socket.socket()
    # A small receive buffer, so the server's sends stall instead of filling our memory.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.bind((src, 0))
    s.settimeout(5)
    s.connect((server, port))
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: {server}\r\n\r\n".encode())
    print("ready", flush=True)
    got, closed = 0, False
    end = time.monotonic() + secs
    while time.monotonic() < end:
        try:
            b = s.recv(1)
        except socket.timeout:
            continue
        except OSError:
            closed = True
            break
        if not b:
            closed = True
            break
        got += 1
        time.sleep(1)
    print(f"slow_reader_bytes={got} server_closed={closed}")


def recvn(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise OSError("closed")
        b += c
    return b


def nbd_noread(server, port, export, n, reads, length, size, secs, sources):
    socks, ok, refused, sent = [], 0, 0, 0
    for i in range(n):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.bind((sources[i % len(sources)], 0))
        s.settimeout(5)
        try:
            s.connect((server, port))
            recvn(s, 18)  # NBDMAGIC, IHAVEOPT, handshake flags
            s.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
            name = export.encode()
            data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
            s.sendall(b"IHAVEOPT" + struct.pack(">II", 7, len(data)) + data)  # NBD_OPT_GO
            while True:
                _, _, rtype, rlen = struct.unpack(">QIII", recvn(s, 20))
                recvn(s, rlen)
                if rtype & 0x80000000:
                    raise OSError("option refused")
                if rtype == 1:  # NBD_REP_ACK: transmission phase
                    break
        except OSError:
            refused += 1
            s.close()
            continue
        ok += 1
        s.settimeout(2)
        try:
            for j in range(reads):
                off = (j * length) % max(size - length, 1)
                s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, j, off, length))
                sent += 1
        except OSError:
            pass
        socks.append(s)
    print("ready", flush=True)
    closed, still = hold(socks, secs, select.POLLRDHUP)
    print(f"conns={n} handshakes={ok} refused={refused} reads_sent={sent} closed_by_server={closed} open_at_end={still}")


def dhcp(n, kind, first, last):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"eth0")
    s.bind(("0.0.0.0", 68))
    lo, hi = int.from_bytes(socket.inet_aton(first), "big"), int.from_bytes(socket.inet_aton(last), "big")
    print("ready", flush=True)
    rnd = random.Random(0x5eed)
    for i in range(n):
        h = bytearray(236)
        h[0], h[1], h[2] = 1, 1, 6
        h[4:8] = struct.pack(">I", rnd.getrandbits(32))
        h[10] = 0x80  # broadcast flag: replies need no ARP for an address never taken
        h[28:34] = bytes([0x02] + [rnd.getrandbits(8) for _ in range(5)])
        if kind == "request":
            # INIT-REBOOT: requested address, no server identifier, no ciaddr.
            want = rnd.randint(lo, hi).to_bytes(4, "big")
            opts = b"\x35\x01\x03" + b"\x32\x04" + want + b"\xff"
        else:
            opts = b"\x35\x01\x01\xff"
        s.sendto(bytes(h) + b"\x63\x82\x53\x63" + opts, ("255.255.255.255", 67))
        time.sleep(0.005)
    print(f"{kind}s_sent={n}")


def main():
    a = sys.argv[1:]
    m = a[0]
    if m in ("tftp-window", "tftp-hold"):
        tftp(a[1], int(a[2]), a[3], int(a[4]), float(a[5]), a[6].split(","), m == "tftp-window")
    elif m == "tcp-idle":
        tcp_idle(a[1], int(a[2]), int(a[3]), float(a[4]), a[5].split(","))
    elif m == "http-slow":
        http_slow(a[1], int(a[2]), a[3], float(a[4]), a[5])
    elif m == "nbd-noread":
        nbd_noread(a[1], int(a[2]), a[3], int(a[4]), int(a[5]), int(a[6]), int(a[7]), float(a[8]), a[9].split(","))
    elif m in ("dhcp-request", "dhcp-discover"):
        dhcp(int(a[1]), m[5:], a[2], a[3])
    else:
        sys.exit(f"unknown mode {m}")


main()
