#!/bin/sh
# mmdebstrap customize hook: $1 is the root, $2 this recipe folder. Makes the root an XDMCP
# server (xdm, no local X server), adds user guest, trims what a throwaway VM never uses,
# and masks the services that only slow its boot under TCG.
set -eu
root="$1"; recipe="$2"
in_root() { chroot "$root" "$@"; }

echo vdd-guest-x11 > "$root"/etc/hostname
printf '127.0.0.1\tlocalhost\n127.0.1.1\tvdd-guest-x11\n' > "$root"/etc/hosts
# No name server: mmdebstrap leaves the build host's resolv.conf behind, and xdm looks up
# the name of every display that queries it, blocking its one loop (and every other
# Query) for the resolver's timeouts when that server is out of reach, as it is on a lab
# or seat LAN. Without one, the lookup fails at once and xdm names the display by address.
: > "$root"/etc/resolv.conf
# Root by label, no fsck, no swap: the disk is always a fresh qcow2 overlay of this image.
printf 'LABEL=vdd-x11-root / ext4 rw,noatime 0 0\n' > "$root"/etc/fstab

# xdm: XDMCP on, any host may ask, no local display, the blue root behind the greeter.
for f in xdm-config Xaccess Xservers Xsetup; do
	install -m 644 "$recipe/$f" "$root/etc/X11/xdm/$f"
done
chmod 755 "$root"/etc/X11/xdm/Xsetup
# The greeter's resources, decided here once rather than by cpp for every display: xdm runs
# xrdb for each display it manages, and xrdb runs the C preprocessor (cc1, 30 MB) to pick
# the fonts by the screen's width, the colours by its depth, and to name the host in the
# greeting. Under TCG that is a good part of a seat's wait for its greeter. Chosen: the
# small fonts (Debian takes 24-point ones above 800 pixels, too wide for a 1024x768 seat:
# the logo is cut off), colour, the colour logo. Any other directive stops the build.
awk -v host=vdd-guest-x11 '
/^#if WIDTH > 800$/ { inif = 1; keep = 0; next }
/^#ifdef COLOR$/ || /^#if PLANES >= 8$/ { inif = 1; keep = 1; next }
/^#else$/ && inif { keep = !keep; next }
/^#endif$/ && inif { inif = 0; next }
/^#/ { print "Xresources: no choice made for " $0 > "/dev/stderr"; bad = 1; exit 1 }
!inif || keep { gsub(/CLIENTHOST/, host); print }
END { if (bad || inif) exit 1 }
' "$root"/etc/X11/xdm/Xresources > "$root"/etc/X11/xdm/Xresources.vdd
mv "$root"/etc/X11/xdm/Xresources.vdd "$root"/etc/X11/xdm/Xresources
grep -q '^xlogin\*greeting: Welcome to vdd-guest-x11$' "$root"/etc/X11/xdm/Xresources
echo /usr/bin/xdm > "$root"/etc/X11/default-display-manager
install -m 644 "$recipe"/xdm.service "$root"/etc/systemd/system/xdm.service
ln -sf /etc/systemd/system/xdm.service "$root"/etc/systemd/system/display-manager.service
in_root systemctl set-default graphical.target

# Network: systemd-networkd, DHCP on the one NIC; nothing waits for "online".
install -m 644 "$recipe"/20-wired.network "$root"/etc/systemd/network/20-wired.network
in_root systemctl enable systemd-networkd.service
in_root systemctl mask systemd-networkd-wait-online.service

# The user of the sessions.
in_root useradd --create-home --shell /bin/bash guest
echo guest:guest | in_root chpasswd
install -m 755 "$recipe"/xsession "$root"/home/guest/.xsession
in_root chown guest:guest /home/guest/.xsession

# Services a throwaway session VM never needs (masking a unit that is absent is harmless).
in_root systemctl mask \
	apt-daily.timer apt-daily-upgrade.timer apt-daily.service apt-daily-upgrade.service \
	man-db.timer man-db.service dpkg-db-backup.timer dpkg-db-backup.service \
	e2scrub_all.timer e2scrub_reap.service fstrim.timer logrotate.timer \
	systemd-timesyncd.service systemd-fsck-root.service systemd-remount-fs.service \
	systemd-journal-flush.service systemd-random-seed.service \
	systemd-tmpfiles-clean.timer systemd-hwdb-update.service \
	systemd-pstore.service ldconfig.service \
	getty-static.service modprobe@dm_mod.service modprobe@fuse.service \
	modprobe@loop.service
install -m 644 "$recipe"/modprobe-blacklist.conf "$root"/etc/modprobe.d/vdd-guest.conf

# Kernel modules a QEMU guest cannot use: GPUs, sound, radios, cameras, exotic buses.
for kdir in "$root"/lib/modules/*; do
	k="$kdir/kernel"
	rm -rf "$k"/drivers/gpu "$k"/sound "$k"/drivers/media "$k"/drivers/net/wireless \
	       "$k"/drivers/infiniband "$k"/drivers/staging "$k"/drivers/bluetooth \
	       "$k"/drivers/iio "$k"/drivers/isdn "$k"/drivers/nfc "$k"/drivers/mtd \
	       "$k"/drivers/net/can "$k"/drivers/usb/gadget \
	       "$k"/drivers/hwmon "$k"/drivers/platform/chrome "$k"/drivers/thunderbolt \
	       "$k"/net/wireless "$k"/net/mac80211 "$k"/net/bluetooth "$k"/fs/ocfs2 \
	       "$k"/fs/xfs "$k"/fs/btrfs "$k"/fs/nfsd "$k"/fs/gfs2 "$k"/fs/ceph \
	       "$k"/fs/smb "$k"/fs/ntfs3
	# NICs: virtio-net is what vdd gives; keep Intel's e1000 family as the fallback.
	find "$k"/drivers/net/ethernet -mindepth 1 -maxdepth 1 ! -name intel -exec rm -rf {} +
	in_root depmod "$(basename "$kdir")"
done
# Firmware for hardware that is not there.
rm -rf "$root"/lib/firmware/*

# Docs, locales, caches: the image is copied to every session's overlay base.
rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* \
       "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
       "$root"/usr/share/locale/* "$root"/var/log/*.log "$root"/var/log/apt
# Marker for tests and admins.
echo vdd-guest-x11 > "$root"/etc/vdd-guest-x11
