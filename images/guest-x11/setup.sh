#!/bin/sh
# mmdebstrap setup hook: $1 is the empty root, $2 this recipe folder. The initramfs
# settings go in before any package, so the kernel's postinst builds the small initrd
# once (a rebuild in the customize hook would cost another minute).
set -eu
root="$1"; recipe="$2"
mkdir -p "$root"/etc/initramfs-tools/conf.d "$root"/etc/initramfs-tools/hooks
cp "$recipe"/initramfs.conf "$root"/etc/initramfs-tools/conf.d/vdd.conf
cp "$recipe"/hook-modules "$root"/etc/initramfs-tools/hooks/vdd-modules
chmod 755 "$root"/etc/initramfs-tools/hooks/vdd-modules
