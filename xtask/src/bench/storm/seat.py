#!/usr/bin/python3
"""One seat of `cargo xtask bench storm` (xtask/src/bench/storm/): a thin client's boot
with real clients, run inside the seat's own network namespace.

  1. DHCP: busybox udhcpc, saying what iPXE says (option 60 PXEClient, 93 BIOS, 77 iPXE);
  2. iPXE's part: the boot script, kernel and initrd, with curl (HTTP from vdd; TFTP
     from the LTSP peer, whose dnsmasq names a TFTP boot file as LTSP's does);
  3. boot-menu's part: GET /api/v1/guests (vdd only: the peer has no API), then the NBD
     reads of a recorded thin-client boot, in order and size, through python3-libnbd,
     each sent only when fewer requests are in flight than the kernel client had then.

It starts when SIGUSR1 says so (after it wrote its ready file), at the time in the go
file plus its ramp offset, and ends with one JSON line in its result file. Every wait is
bounded: a SIGALRM at --deadline seconds ends a stuck seat as failed.
"""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time

import nbd

CLOCK = time.CLOCK_MONOTONIC


def now():
    return time.clock_gettime(CLOCK)


class Failed(Exception):
    pass


def run(cmd, timeout):
    try:
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        raise Failed(f"{cmd[0]} {cmd[1]} gave up after {timeout} s")
    return p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")


def dhcp(a, res):
    """DISCOVER to ACK with udhcpc; its script configures the address and writes what
    the server answered to the lease file. As patient as a PXE ROM (4 DISCOVERs over 60
    s): a DISCOVER or REQUEST every 3 s, for 90 s."""
    lease = a.work + f"/lease-{a.seat}"
    env_script = a.udhcpc_script
    cmd = ["busybox", "udhcpc", "-i", "eth0", "-f", "-q", "-n",
           "-t", str(a.dhcp_tries), "-T", "3", "-A", "1", "-s", env_script,
           "-V", "PXEClient:Arch:00000:UNDI:002001",
           "-x", "0x4d:69505845", "-x", "0x5d:0000"]
    os.environ["SEAT_LEASE"] = lease
    code, out, err = run(cmd, a.dhcp_tries * 4 + 10)
    text = out + err
    low = text.lower()
    res["discovers"] = low.count("sending discover") + low.count("broadcasting discover")
    res["requests"] = low.count("sending select") + low.count("broadcasting select")
    res["naks"] = low.count("received dhcp nak")
    if code != 0:
        raise Failed(f"udhcpc exit {code}: {text.strip()[-200:]}")
    got = {}
    with open(lease) as f:
        for line in f:
            k, _, v = line.rstrip("\n").partition("=")
            got[k] = v
    res["ip"] = got.get("ip")
    return got


def fetch(url, a, what):
    """One file with curl; returns its bytes (to /dev/null, sizes checked by the caller)."""
    cmd = ["curl", "-sS", "--fail", "-o", "/dev/null", "-w", "%{size_download}",
           "--max-time", str(a.file_timeout)]
    if url.startswith("tftp:"):
        cmd += ["--tftp-blksize", str(a.tftp_blksize)]
    code, out, err = run(cmd + [url], a.file_timeout + 5)
    if code != 0:
        raise Failed(f"{what} {url}: curl exit {code}: {err.strip()[-200:]}")
    return int(out.strip() or 0)


def text_of(url, a):
    cmd = ["curl", "-sS", "--fail", "--max-time", str(a.file_timeout), url]
    if url.startswith("tftp:"):
        cmd[1:1] = ["--tftp-blksize", str(a.tftp_blksize)]
    code, out, err = run(cmd, a.file_timeout + 5)
    if code != 0:
        raise Failed(f"script {url}: curl exit {code}: {err.strip()[-200:]}")
    return out


def ipxe(lease, a, res, mac):
    """The boot file: an iPXE script (over HTTP from vdd, TFTP from the peer) naming the
    kernel and initrd, fetched as iPXE would."""
    boot = lease.get("boot_file", "")
    server = lease.get("siaddr") or lease.get("serverid") or a.server
    if boot.startswith("http://"):
        url = boot.replace("${net0/mac}", mac)
    else:
        url = f"tftp://{server}/{boot}"
    script = text_of(url, a)
    kernel = initrd = None
    for line in script.splitlines():
        words = line.split()
        urls = [w for w in words[1:] if "://" in w]
        if words[:1] == ["kernel"] and urls:
            kernel = urls[0]
        if words[:1] == ["initrd"] and urls:
            initrd = urls[0]
    if not kernel or not initrd:
        raise Failed(f"no kernel and initrd in the boot script {url}: {script[:200]!r}")
    got = fetch(kernel, a, "kernel") + fetch(initrd, a, "initrd")
    if got != a.file_bytes:
        raise Failed(f"kernel + initrd were {got} bytes, not {a.file_bytes}")
    return got


def replay(a, trace, image):
    """The recorded NBD reads, in order; each waits until fewer requests are in flight
    than were when the kernel client sent it."""
    h = nbd.NBD()
    h.set_export_name(a.export)
    h.connect_tcp(a.server, str(a.nbd_port))
    state = {"out": 0, "err": 0}
    checks = []

    def done(buf, off, check):
        def cb(err):
            state["out"] -= 1
            if err.value:
                state["err"] += 1
            elif check:
                checks.append((buf, off))
            return 1
        return cb

    total = 0
    for i, (off, ln, depth) in enumerate(trace):
        while state["out"] >= depth:
            h.poll(-1)
        buf = nbd.Buffer(ln)
        # Every 64th reply is compared with the image, so wrong bytes cannot pass.
        h.aio_pread(buf, off, completion=done(buf, off, i % 64 == 0))
        state["out"] += 1
        total += ln
        while checks:
            b, o = checks.pop()
            want = os.pread(image, len(b.to_bytearray()), o)
            if b.to_bytearray() != want:
                raise Failed(f"NBD read at {o} returned wrong bytes")
    while state["out"] > 0:
        h.poll(-1)
    for b, o in checks:
        if b.to_bytearray() != os.pread(image, len(b.to_bytearray()), o):
            raise Failed(f"NBD read at {o} returned wrong bytes")
    if state["err"]:
        raise Failed(f"{state['err']} NBD reads failed")
    h.shutdown()
    return total


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seat", type=int, required=True)
    p.add_argument("--mode", choices=["vdd", "ltsp"], required=True)
    p.add_argument("--server", required=True)
    p.add_argument("--mac", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--trace", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--export", required=True)
    p.add_argument("--nbd-port", type=int, default=10809)
    p.add_argument("--file-bytes", type=int, required=True)
    p.add_argument("--udhcpc-script", required=True)
    p.add_argument("--offset", type=float, default=0.0)
    p.add_argument("--deadline", type=int, default=600)
    p.add_argument("--dhcp-tries", type=int, default=30)
    p.add_argument("--file-timeout", type=int, default=300)
    p.add_argument("--tftp-blksize", type=int, default=1432)
    p.add_argument("--tries", type=int, default=3)
    a = p.parse_args()

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    trace = []
    with open(a.trace) as f:
        for line in f:
            off, ln, depth = line.split()
            trace.append((int(off), int(ln), int(depth)))
    image = os.open(a.image, os.O_RDONLY)
    res = {"seat": a.seat, "ip": None, "retries": 0, "error": None}
    out_path = f"{a.work}/result-{a.seat}.json"
    with open(f"{a.work}/ready-{a.seat}", "w"):
        pass
    signal.sigwait({signal.SIGUSR1})
    with open(f"{a.work}/go") as f:
        start = float(f.read()) + a.offset
    time.sleep(max(0.0, start - now()))

    def alarm(*_):
        raise Failed(f"seat not done after {a.deadline} s")

    signal.signal(signal.SIGALRM, alarm)
    signal.alarm(a.deadline)
    res["t0"] = now()
    stage = "dhcp"
    try:
        lease = dhcp(a, res)
        res["t_dhcp"] = now()
        if res["discovers"] > 1:
            res["retries"] += res["discovers"] - 1
        # iPXE retries nothing of its own; a seat that fails here is rebooted by hand.
        # We try a stage again (counted) so one lost file does not hide the rest.
        for stage in ["files", "api", "nbd"]:
            for attempt in range(a.tries):
                try:
                    if stage == "files":
                        res["file_bytes"] = ipxe(lease, a, res, a.mac)
                    elif stage == "api" and a.mode == "vdd":
                        body = text_of(f"http://{a.server}/api/v1/guests", a)
                        if not json.loads(body):
                            raise Failed("no guests in the menu")
                    elif stage == "nbd":
                        res["nbd_bytes"] = replay(a, trace, image)
                    break
                except (Failed, nbd.Error) as e:
                    if attempt + 1 == a.tries:
                        raise Failed(f"{stage}: {e}")
                    res["retries"] += 1
            res["t_" + stage] = now()
    except (Failed, nbd.Error) as e:
        res["error"] = f"{stage}: {e}"
    signal.alarm(0)
    with open(out_path + ".tmp", "w") as f:
        json.dump(res, f)
    os.rename(out_path + ".tmp", out_path)


if __name__ == "__main__":
    sys.exit(main())
