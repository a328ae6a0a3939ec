#!/usr/bin/env python3
"""A PXE client (RFC 2131 + PXE 2.1 proxyDHCP) for tests: broadcasts a PXE DISCOVER,
collects every OFFER for 4 s, takes the address from the offer that has one, configures
it, then asks the proxy server on port 4011 for the boot file. Prints key=value lines;
exits 1 if any step is missing.
Usage: pxe_client.py IFACE PROXY_IP"""
import socket, struct, subprocess, sys, time, os

iface, proxy = sys.argv[1], sys.argv[2]
mac = open(f"/sys/class/net/{iface}/address").read().strip()
hw = bytes(int(x, 16) for x in mac.split(":"))
xid = struct.unpack(">I", os.urandom(4))[0]

def packet(kind, ciaddr=b"\0" * 4, extra=b""):
    h = bytearray(236)
    h[0], h[1], h[2] = 1, 1, 6
    h[4:8] = struct.pack(">I", xid)
    h[10:12] = struct.pack(">H", 0x8000)
    h[12:16] = ciaddr
    h[28:34] = hw
    cls = b"PXEClient:Arch:00000:UNDI:002001"
    o = bytes([53, 1, kind, 93, 2, 0, 0, 94, 3, 1, 2, 1, 60, len(cls)]) + cls + extra + b"\xff"
    return bytes(h) + b"\x63\x82\x53\x63" + o

def parse(d):
    opts, i = {}, 240
    while i < len(d) and d[i] != 255:
        if d[i] == 0:
            i += 1; continue
        opts[d[i]] = d[i + 2:i + 2 + d[i + 1]]; i += 2 + d[i + 1]
    return {"yiaddr": socket.inet_ntoa(d[16:20]), "siaddr": socket.inet_ntoa(d[20:24]),
            "file": d[108:236].split(b"\0")[0].decode(), "opts": opts, "xid": d[4:8]}

s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, iface.encode())
s.bind(("0.0.0.0", 68))
s.settimeout(0.5)
s.sendto(packet(1), ("255.255.255.255", 67))
offers, end = [], time.time() + 4
while time.time() < end:
    try:
        d, a = s.recvfrom(2000)
    except socket.timeout:
        continue
    if len(d) >= 240 and d[0] == 2 and d[4:8] == struct.pack(">I", xid):
        offers.append(parse(d))
addr = [o for o in offers if o["yiaddr"] != "0.0.0.0"]
prox = [o for o in offers if o["yiaddr"] == "0.0.0.0"]
if not addr or not prox:
    print(f"offers={offers}"); sys.exit(1)
a, p = addr[0], prox[0]
print(f"address={a['yiaddr']}")
print(f"address_from={socket.inet_ntoa(a['opts'][54])}")
print(f"proxy_offer_yiaddr={p['yiaddr']}")
print(f"proxy_offer_file={p['opts'].get(67, b'').decode()}")
print(f"proxy_offer_class={p['opts'].get(60, b'').decode()}")
print(f"proxy_offer_43={p['opts'].get(43, b'').hex()}")
# The PXE ROM's REQUEST/ACK with the primary is not what this test is about; it takes
# the address, then asks the boot server (PXE 2.1: REQUEST to port 4011 from port 68).
subprocess.run(["ip", "addr", "add", a["yiaddr"] + "/24", "dev", iface], check=True)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
u.bind((a["yiaddr"], 68))
u.settimeout(2)
for _ in range(3):
    u.sendto(packet(3, socket.inet_aton(a["yiaddr"])), (proxy, 4011))
    try:
        d, _ = u.recvfrom(2000)
    except socket.timeout:
        continue
    ack = parse(d)
    print(f"proxy_ack_file={ack['opts'].get(67, b'').decode()}")
    print(f"proxy_ack_next_server={ack['siaddr']}")
    print(f"proxy_ack_type={ack['opts'].get(53, b'').hex()}")
    sys.exit(0)
print("no ACK from port 4011"); sys.exit(1)
