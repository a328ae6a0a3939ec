#!/usr/bin/env python3
"""Writes fuzz/seeds/<target>/ from the tests' real captures (tests/data/*.bin) and the
literal packets of the unit tests (iPXE, udhcpc and PXE ROM DISCOVERs, tftp-hpa / iPXE
RRQs, nbdinfo's handshake, curl's request head, ...). Deterministic; rerun after
changing it. The fuzzers' working corpora grow under fuzz/corpus/ (not committed).
Crash inputs kept as regressions live next to these as seeds/<target>/crash-*."""
import os, struct

ROOT = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(ROOT, "..", "tests", "data")
SEP = b"\n--vdd--\n"


def write(target, name, data):
    d = os.path.join(ROOT, "seeds", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def cap(name):
    with open(os.path.join(DATA, name), "rb") as f:
        return f.read()


MAC = bytes([0x52, 0x54, 0x00, 0x12, 0x34, 0x56])


def bootp(op, kind, opts=b"", xid=0x12345678, yiaddr=b"\0" * 4, ciaddr=b"\0" * 4, siaddr=b"\0" * 4):
    h = bytearray(236)
    h[0], h[1], h[2] = op, 1, 6
    h[4:8] = struct.pack(">I", xid)
    h[10:12] = struct.pack(">H", 0x8000)
    h[12:16], h[16:20], h[20:24] = ciaddr, yiaddr, siaddr
    h[28:34] = MAC
    return bytes(h) + b"\x63\x82\x53\x63" + bytes([53, 1, kind]) + opts + b"\xff"


def ip(*o):
    return bytes(o)


# --- dhcp: flag byte (0 full, 1 proxy, +4 port 4011), then datagrams.
ipxe, udhcpc = cap("ipxe-discover.bin"), cap("udhcpc-discover.bin")
cls = b"PXEClient:Arch:00000:UNDI:002001"
pxe = bytes([93, 2, 0, 0, 94, 3, 1, 2, 1, 60, len(cls)]) + cls
pxe_discover = bootp(1, 1, pxe)
req = bytes([50, 4]) + ip(10, 77, 0, 100) + bytes([54, 4]) + ip(10, 77, 0, 1)
write("dhcp", "ipxe-discover", b"\x00" + ipxe)
write("dhcp", "udhcpc-discover", b"\x00" + udhcpc)
write("dhcp", "pxe-rom-dora", b"\x00" + pxe_discover + SEP + bootp(1, 3, req + pxe))
write("dhcp", "udhcpc-dora-release", b"\x00" + udhcpc + SEP + bootp(1, 3, req) + SEP
      + bootp(1, 7, bytes([54, 4]) + ip(10, 77, 0, 1), ciaddr=ip(10, 77, 0, 100)))
write("dhcp", "renew-inform-decline", b"\x00" + bootp(1, 3, b"", ciaddr=ip(10, 77, 0, 50)) + SEP
      + bootp(1, 8, b"", ciaddr=ip(10, 77, 0, 9)) + SEP + bootp(1, 4, req))
write("dhcp", "proxy-pxe", b"\x01" + pxe_discover)
write("dhcp", "proxy-4011", b"\x05" + bootp(1, 3, pxe, ciaddr=ip(10, 77, 0, 100)))

# --- tftp: 3 bytes of file size, then datagrams (empty = the deadline passed).
def ack(n):
    return struct.pack(">HH", 4, n)

size = lambda n: struct.pack(">I", n)[1:]
write("tftp", "pxe-rom-tsize-then-error", size(70000) + b"\x00\x01undionly.kpxe\x00octet\x00tsize\x000\x00"
      + SEP + b"\x00\x05\x00\x08tsize only\x00")
write("tftp", "ipxe-blksize", size(5000) + b"\x00\x01ipxe.efi\x00octet\x00blksize\x001432\x00tsize\x000\x00"
      + SEP + ack(0) + SEP + ack(1) + SEP + ack(1) + SEP + ack(2) + SEP + ack(3) + SEP + ack(4))
write("tftp", "tftp-hpa-plain", size(1024) + b"\x00\x01pxelinux.0\x00octet\x00" + SEP + ack(1) + SEP + b"" + SEP + ack(2) + SEP + ack(3))
write("tftp", "atftp-window", size(40000) + b"\x00\x01boot/vmlinuz\x00octet\x00blksize\x00512\x00windowsize\x0016\x00timeout\x002\x00"
      + SEP + ack(0) + SEP + ack(16) + SEP + ack(20) + SEP + b"" + SEP + ack(36) + SEP + ack(79))
write("tftp", "netascii", size(600) + b"\x00\x01f\x00NetASCII\x00BlkSize\x00512\x00" + SEP + ack(0) + SEP + ack(1) + SEP + ack(2))
write("tftp", "padded-rrq", size(10) + b"\x00\x01f\x00octet\x00tsize\x000\x00\x00\x00\x00")
write("tftp", "other-packets", size(10) + b"\x00\x02up\x00octet\x00" + SEP + b"\x00\x06blksize\x001024\x00"
      + SEP + b"\x00\x03\x00\x01data" + SEP + b"\x00\x01f\x00octet\x00" + SEP + b"\x00\x05\x00\x00")

# --- nbd: client flags, options, then requests.
def opt(o, data=b""):
    return b"IHAVEOPT" + struct.pack(">II", o, len(data)) + data

def nreq(kind, off, ln, flags=0, cookie=1):
    return struct.pack(">IHHQQI", 0x25609513, flags, kind, cookie, off, ln)

FLAGS = struct.pack(">I", 3)
go = lambda name, reqs=(3,): struct.pack(">I", len(name)) + name + struct.pack(">H", len(reqs)) + b"".join(struct.pack(">H", r) for r in reqs)
write("nbd", "nbdinfo-list-go", FLAGS + opt(8) + opt(3) + opt(6, go(b"base", (1, 2, 3))) + opt(7, go(b"seat"))
      + nreq(0, 0, 4096, 4) + nreq(1, 4096, 4, 1) + b"DATA" + nreq(4, 0, 512) + nreq(6, 8192, 4096)
      + nreq(3, 0, 0) + nreq(5, 0, 65536) + nreq(0, (1 << 20), 8) + nreq(2, 0, 0))
write("nbd", "qemu-export-name", struct.pack(">I", 1) + opt(1, b"base") + nreq(0, 0, 512) + nreq(1, 0, 4) + b"DATA" + nreq(2, 0, 0))
write("nbd", "bad-options", FLAGS + opt(5) + opt(3, b"x") + opt(6, b"\x00\x00") + opt(42) + opt(7, go(b"nope")) + opt(2))

# --- http: 2 bytes of file length, then the request head.
L = b"\x10\x00"
write("http", "curl-range", L + b"GET /files/a%20b?x=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: curl/7.88.1\r\nRange: bytes=0-9\r\n\r\nGET /next")
write("http", "ipxe-script", L + b"GET /boot.ipxe?mac=52%3a54%3a00%3a12%3a34%3a56 HTTP/1.1\r\nConnection: keep-alive\r\nUser-Agent: iPXE/1.21.1\r\nHost: 10.77.0.1\r\n\r\n")
write("http", "ipxe-kernel", L + b"GET /boot/52:54:00:12:34:56/kernel HTTP/1.1\r\nHost: 10.77.0.1\r\nRange: bytes=-500\r\n\r\n")
write("http", "if-range", L + b"GET http://10.77.0.1/files/initrd.img HTTP/1.1\r\nRange: bytes=100-\r\nIf-Range: \"1000-0\"\r\nIf-None-Match: W/\"x\"\r\n\r\n")
write("http", "head-10", L + b"HEAD /files/x HTTP/1.0\r\nContent-Length: 3\r\nRange: bytes=5-1,7-9\r\n\r\n")

# --- xdmcp: Willing and Unwilling as xdm / lightdm answer.
def xd(op, fields):
    body = b"".join(struct.pack(">H", len(f)) + f for f in fields)
    return struct.pack(">HHH", 1, op, len(body)) + body

write("xdmcp", "willing", xd(5, [b"", b"debian-guest", b"Linux 6.1.0 0.15"]))
write("xdmcp", "unwilling", xd(6, [b"debian-guest", b"Host unwilling"]))

# --- ndp: selector byte, then the ICMPv6 message (iPXE's solicitation, with and without SLLA).
rs = bytes([133, 0, 0x12, 0x34, 0, 0, 0, 0])
write("ndp", "ipxe-rs", b"\x00" + rs + bytes([1, 1]) + MAC)
write("ndp", "rs-bare", b"\x00" + rs)
write("ndp", "rs-unspecified", b"\x80" + rs + bytes([3, 1, 0, 0, 0, 0, 0, 0]))

# --- qmp: the lines QEMU 7/8 writes.
for name, line in [
    ("greeting", b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7"}, "capabilities": ["oob"]}}\r\n'),
    ("return", b'{"return": {}}\r\n'),
    ("status", b'{"return": {"status": "running", "singlestep": false, "running": true}}\r\n'),
    ("error", b'{"error": {"class": "GenericError", "desc": "Parameter \'x\' is missing"}}\r\n'),
    ("event", b'{"timestamp": {"seconds": 1700000000, "microseconds": 1}, "event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}}\r\n'),
]:
    write("qmp", name, line)

# --- bootmenu_dhcp: vdd's OFFER and ACK to boot-menu (xid 0x12345678), a NAK, timeouts.
reply = bytes([54, 4]) + ip(10, 77, 0, 1) + bytes([1, 4, 255, 255, 255, 0, 3, 4]) + ip(10, 77, 0, 1) \
    + bytes([6, 4]) + ip(10, 77, 0, 1) + bytes([51, 4, 0, 0, 0x0e, 0x10])
offer = bootp(2, 2, reply, yiaddr=ip(10, 77, 0, 100), siaddr=ip(10, 77, 0, 1))
ackm = bootp(2, 5, reply + bytes([58, 4, 0, 0, 7, 8, 59, 4, 0, 0, 0x0c, 0x4e]), yiaddr=ip(10, 77, 0, 100))
write("bootmenu_dhcp", "offer-ack-renew", offer + SEP + ackm + SEP + b"" + SEP + ackm)
write("bootmenu_dhcp", "offer-nak", offer + SEP + bootp(2, 6, bytes([54, 4]) + ip(10, 77, 0, 1)) + SEP + b"")
write("bootmenu_dhcp", "timeouts", b"" + SEP + b"" + SEP + offer + SEP + b"" + SEP + b"" + SEP + b"" + SEP + b"")

# --- bootmenu_json: selector (0 list, 1 session, 2 sessions), then vdd's whole response.
def resp(body, status=b"200 OK", chunked=False):
    if chunked:
        b = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        return b"HTTP/1.1 " + status + b"\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n" + b
    return b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body

guests = b'[{"name":"debian","label":"Debian 12","display":"x11","description":"desktop","extra":1},{"name":"dos"}]'
session = b'{"id":"s-1","guest":"debian","protocol":"vnc","host":"10.77.0.1","port":5901,"password":"abcd1234","state":"ready","key":"k"}'
write("bootmenu_json", "guests", b"\x00" + resp(guests))
write("bootmenu_json", "guests-chunked", b"\x00" + resp(guests, chunked=True))
write("bootmenu_json", "session", b"\x01" + resp(session))
write("bootmenu_json", "sessions", b"\x02" + resp(b"[" + session + b',{"id":"s-2","guest":"x","protocol":"xdmcp","port":177,"state":"starting"}]'))
write("bootmenu_json", "refused", b"\x01" + resp(b'{"error":"no such guest"}', b"404 Not Found"))

# --- config: the repository's own config.toml and a proxy-mode one.
with open(os.path.join(ROOT, "..", "config.toml"), "rb") as f:
    write("config", "config.toml", f.read())
write("config", "proxy.toml", b'[server]\ninterface = "br0"\naddress = "10.77.0.1/24"\n[dhcp]\nmode = "proxy"\n'
      b'[[dhcp.host]]\nmac = "52:54:00:00:00:01"\naddress = "10.77.0.50"\nhostname = "seat-01"\n'
      b'[dispatch]\nmax_vms = 4\nvnc_ports = "5901-5904"\nmemory_budget = "8G"\n')
