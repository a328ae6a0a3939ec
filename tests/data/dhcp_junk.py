#!/usr/bin/env python3
"""Sends malformed DHCP packets to a server: hand-made breakages, then N seeded random
byte strings (bounded in count; paced so the kernel does not just drop them).
Usage: dhcp_junk.py SERVER_IP COUNT"""
import random, socket, struct, sys, time

server, count = sys.argv[1], int(sys.argv[2])
rng = random.Random(4711)

def discover(opts=b""):
    h = bytearray(236)
    h[0], h[1], h[2] = 1, 1, 6
    h[4:8] = struct.pack(">I", 0xdeadbeef)
    h[28:34] = bytes([2, 0, 0, 0, 0x99, 0x99])
    return bytes(h) + b"\x63\x82\x53\x63" + b"\x35\x01\x01" + opts + b"\xff"

good = discover()
cases = [
    b"",
    good[:10],                           # truncated header
    good[:239],                          # truncated before the cookie ends
    good[:236] + b"\x00\x00\x00\x00" + good[240:],  # bad magic cookie
    discover(b"\x0c\x50abc"),            # option 12 claims 80 bytes
    discover(b"\x32\x03\x01\x02\x03"),   # option 50 of length 3
    discover(b"\x5d\x00"),               # option 93 of length 0
    discover(b"\x79\x05\x40\x01\x02\x03\x04"),  # option 121 with a prefix of 64
    discover(b"\x33\x02\x01\x02"),       # option 51 of length 2
    discover(b"\x0c"),                   # option code without a length
    bytes([2]) + good[1:],               # a BOOTREPLY
    good[:2] + bytes([17]) + good[3:],   # hlen 17
]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
n = 0
for c in cases:
    s.sendto(c, (server, 67)); n += 1
for i in range(count):
    if i % 2:
        b = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 600)))
    else:
        b = bytearray(discover(bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 80)))))
        for _ in range(rng.randrange(0, 8)):
            b[rng.randrange(len(b))] = rng.getrandbits(8)
        b = bytes(b)
    s.sendto(b, (server, 67)); n += 1
    if i % 200 == 0:
        time.sleep(0.01)
print(f"sent {n}")
