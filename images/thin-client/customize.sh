#!/bin/sh
# mmdebstrap customize hook: $1 is the root. Trim what a read-only thin-client root never
# uses, so the squashfs stays small; the package lists and caches are not needed either.
set -eu
root="$1"
rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* \
       "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
       "$root"/usr/share/locale/* "$root"/var/log/*
# The root is mounted read-only under a tmpfs overlay; Xorg wants these to exist.
mkdir -p "$root"/tmp "$root"/run "$root"/var/log
chmod 1777 "$root"/tmp
# mmdebstrap leaves the build host's name server behind; the thin client has no use for it.
: > "$root"/etc/resolv.conf
# Marker boot-menu and tests read to know which image they mounted.
echo "vdd-thin-client" > "$root"/etc/vdd-thin-client
