#!/usr/bin/env bash
# Build (once) the Vagrant box the lab uses with the libvirt provider: a bootable
# Debian 12 disk made from the same rootfs `make test-kernels` boots
# (scripts/vm/build-image.sh, in CACHE/rootfs), plus what a Vagrant base box needs.
# No box can be downloaded here, so this is the only way to get one.
#
#   scripts/vm/build-box.sh [CACHE_DIR]      (root; default /var/cache/tlscap-vm)
#
# Output in CACHE_DIR/box/: tlscap-bookworm64-libvirt.box (metadata.json + box.img,
# qcow2, uncompressed tar), tlscap-bookworm64.json (the box catalog Vagrant adds it
# from: name tlscap/bookworm64, a version per build), and STAMP, the hash of this
# script, the image's own STAMP and Vagrant's insecure public key.  A run whose inputs hash to the STAMP already
# there does nothing (FORCE=1 rebuilds).
#
# What the box adds to the rootfs:
#   - systemd as init, openssh-server, sudo, rsync (the synced folder), ifupdown +
#     isc-dhcp-client (eth0 by DHCP; Vagrant writes the private network's static
#     address into /etc/network/interfaces), dbus (hostnamectl);
#   - Debian 12's generic kernel (linux-image-amd64) with its own headers
#     (linux-headers-amd64, what bootstrap.sh asks for: installed at the same
#     version as the kernel, so bcc finds /lib/modules/$(uname -r)/build);
#     extlinux in the disk's boot sector; net.ifnames=0 and a serial console on the
#     kernel command line;
#   - user vagrant (password vagrant, sudo without password) with Vagrant's
#     insecure public key (Vagrant swaps it for a per-machine key at first boot);
#     ssh host keys are made at first boot, not shared by every VM of the box;
#   - the host's local CA certificates (/usr/local/share/ca-certificates) and
#     /etc/pip.conf, so the guest reaches the package archives the way the host does.
# make is not in the box: scripts/bootstrap.sh installs it, as on a fresh machine.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${1:-${TLSCAP_VM_CACHE:-/var/cache/tlscap-vm}}"
OUT="$CACHE/box"
BOX_NAME="tlscap-bookworm64-libvirt.box"
CATALOG="tlscap-bookworm64.json"   # Vagrant box metadata: name, version, box file
VAGRANT_BOX="tlscap/bookworm64"
DISK_GB="${TLSCAP_BOX_DISK_GB:-20}"
say() { printf 'build-box: %s\n' "$*" >&2; }
die() { printf 'build-box: error: %s\n' "$*" >&2; exit 1; }
[[ $EUID -eq 0 ]] || die "run as root (losetup, mount, chroot)"

# The rootfs comes from build-image.sh (cached there; a no-op when up to date).
"$here/build-image.sh" "$CACHE"
ROOTFS="$CACHE/rootfs"
[[ -x $ROOTFS/usr/bin/apt-get ]] || die "no rootfs in $ROOTFS"

pubkey="${VAGRANT_INSECURE_PUBKEY:-}"
if [[ -z $pubkey ]]; then
    pubkey="$(ls /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub \
        /opt/vagrant/embedded/gems/gems/vagrant-*/keys/vagrant.pub 2>/dev/null | head -n1)" || true
fi
[[ -n $pubkey && -f $pubkey ]] || die "Vagrant's insecure public key (keys/vagrant.pub) not found: install vagrant"

stamp="$(cat "$here/build-box.sh" "$CACHE/image/STAMP" "$pubkey" | sha256sum | cut -c1-16)"
if [[ -z ${FORCE:-} && -f $OUT/STAMP && "$(cat "$OUT/STAMP")" == "$stamp" && -f $OUT/$BOX_NAME ]]; then
    say "box up to date ($OUT/$BOX_NAME, inputs $stamp)"
    exit 0
fi
for tool in losetup mkfs.ext4 qemu-img rsync; do
    command -v "$tool" >/dev/null || die "$tool missing (mount, e2fsprogs, qemu-utils, rsync)"
done
say "building the box (inputs $stamp)"

WORK="$CACHE/box-build"
MNT="$WORK/mnt"
loop=""
cleanup() {
    for m in dev/pts dev sys proc; do umount "$MNT/$m" 2>/dev/null || true; done
    umount "$MNT" 2>/dev/null || true
    [[ -n $loop ]] && losetup -d "$loop" 2>/dev/null || true
}
# A run killed half-way may have left the disk mounted (with /dev, /sys bound into
# it) and its loop device attached: undo that before anything is deleted.
cleanup
for dev in $(losetup -j "$WORK/disk.raw" 2>/dev/null | cut -d: -f1); do losetup -d "$dev" || true; done
if grep -qF " $WORK/" /proc/mounts; then
    die "something is still mounted under $WORK: unmount it first"
fi
trap cleanup EXIT
rm -rf --one-file-system "$WORK"
mkdir -p "$WORK" "$MNT"

# --- disk: the whole disk is one ext4 file system, extlinux in its boot sector ----------
# (no partition table: this machine's loop driver makes no partition devices, and
# SeaBIOS boots any sector 0 that ends in 55AA; ext4 leaves its first 1 KiB free.)
disk="$WORK/disk.raw"
truncate -s "${DISK_GB}G" "$disk"
# ^64bit: what syslinux reads reliably; the disk is far below 16 TiB.
mkfs.ext4 -q -F -O ^64bit -L tlscap-root "$disk"
loop="$(losetup --find --show "$disk")"
mount "$loop" "$MNT"

# --- root filesystem: the image's rootfs, without the matrix's kernels ---------------
# (merged /usr: /lib and /sbin are links into /usr, so the paths to leave out are there.)
say "copying $ROOTFS"
rsync -aHAX --exclude=/usr/lib/modules/ --exclude=/usr/src/ --exclude=/boot/ \
    --exclude=/usr/sbin/tlscap-guest-boot --exclude=/proc/ --exclude=/sys/ --exclude=/dev/ \
    "$ROOTFS/" "$MNT/"
mkdir -p "$MNT"/{proc,sys,dev,boot,lib/modules,usr/src}
mount -t proc proc "$MNT/proc"
mount --bind /sys "$MNT/sys"
mount --bind /dev "$MNT/dev"
mount --bind /dev/pts "$MNT/dev/pts"

cp /etc/resolv.conf "$MNT/etc/resolv.conf"
printf '#!/bin/sh\nexit 101\n' >"$MNT/usr/sbin/policy-rc.d"  # no daemons start in the chroot
chmod 0755 "$MNT/usr/sbin/policy-rc.d"
# The host's local trust anchors and pip settings: the guest reaches Debian's archive
# and PyPI through the same egress as the host.
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$MNT/usr/local/share/ca-certificates/"
fi
[[ -f /etc/pip.conf ]] && cp /etc/pip.conf "$MNT/etc/pip.conf"

box_packages=(systemd-sysv dbus openssh-server sudo rsync ifupdown isc-dhcp-client
    netbase ca-certificates linux-image-amd64 linux-headers-amd64 extlinux)
say "installing ${box_packages[*]}"
chroot "$MNT" /usr/bin/env DEBIAN_FRONTEND=noninteractive bash -c \
    "apt-get -q update && apt-get install -y -q --no-install-recommends ${box_packages[*]} \
     && update-ca-certificates" >"$WORK/apt.log" 2>&1 \
    || { tail -20 "$WORK/apt.log" >&2; die "package install failed (log: $WORK/apt.log)"; }
kver="$(ls "$MNT/lib/modules" | sort -V | tail -n1)"
chroot "$MNT" test -e "/lib/modules/$kver/build/include" || die "headers of $kver missing in the box"
say "kernel $kver"

# --- system configuration ---------------------------------------------------------------
uuid="$(blkid -s UUID -o value "$loop")"
echo "UUID=$uuid / ext4 errors=remount-ro 0 1" >"$MNT/etc/fstab"
echo tlscap-lab >"$MNT/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 tlscap-lab\n::1 localhost ip6-localhost ip6-loopback\n' >"$MNT/etc/hosts"
cat >"$MNT/etc/network/interfaces" <<'EOF'
# The box's own network: eth0 (the provider's NAT) by DHCP. Vagrant appends the
# private network's interfaces below.
source /etc/network/interfaces.d/*

auto lo
iface lo inet loopback

allow-hotplug eth0
iface eth0 inet dhcp
EOF
rm -f "$MNT/etc/resolv.conf"  # dhclient writes it

# user vagrant, sudo without password, the insecure key
chroot "$MNT" useradd -m -s /bin/bash -U vagrant
echo 'vagrant:vagrant' | chroot "$MNT" chpasswd
echo 'vagrant ALL=(ALL) NOPASSWD: ALL' >"$MNT/etc/sudoers.d/vagrant"
chmod 0440 "$MNT/etc/sudoers.d/vagrant"
install -d -m 0700 -o 1000 -g 1000 "$MNT/home/vagrant/.ssh"
install -m 0600 -o 1000 -g 1000 "$pubkey" "$MNT/home/vagrant/.ssh/authorized_keys"
chroot "$MNT" chown -R vagrant:vagrant /home/vagrant
printf 'UseDNS no\n' >"$MNT/etc/ssh/sshd_config.d/vagrant.conf"
# Host keys per VM: made at first boot (ssh-keygen -A makes only the missing ones).
rm -f "$MNT"/etc/ssh/ssh_host_*
mkdir -p "$MNT/etc/systemd/system/ssh.service.d"
printf '[Service]\nExecStartPre=\nExecStartPre=/usr/bin/ssh-keygen -A\nExecStartPre=/usr/sbin/sshd -t\n' \
    >"$MNT/etc/systemd/system/ssh.service.d/host-keys.conf"
# No password prompt for root's serial console; a getty on it for debugging.
chroot "$MNT" systemctl enable serial-getty@ttyS0.service >/dev/null 2>&1 || true

# --- boot loader ------------------------------------------------------------------------
# extlinux from the box's own package, run in the chroot on the mounted disk.
mkdir -p "$MNT/boot/extlinux"
cat >"$MNT/boot/extlinux/extlinux.conf" <<EOF
SERIAL 0 115200
DEFAULT debian
TIMEOUT 10
LABEL debian
    LINUX /boot/vmlinuz-$kver
    INITRD /boot/initrd.img-$kver
    APPEND root=UUID=$uuid ro console=tty0 console=ttyS0,115200n8 net.ifnames=0 biosdevname=0
EOF
[[ -f $MNT/boot/vmlinuz-$kver && -f $MNT/boot/initrd.img-$kver ]] || die "kernel or initrd of $kver missing in /boot"
chroot "$MNT" extlinux --install /boot/extlinux >"$WORK/extlinux.log" 2>&1 \
    || { cat "$WORK/extlinux.log" >&2; die "extlinux --install failed"; }

chroot "$MNT" apt-get clean
rm -f "$MNT/usr/sbin/policy-rc.d" "$MNT/etc/machine-id"
: >"$MNT/etc/machine-id"  # empty: systemd makes a new one at first boot
rm -rf "$MNT"/var/lib/apt/lists/* "$MNT"/tmp/* "$MNT"/root/.bash_history
mkdir -p "$MNT/var/lib/apt/lists/partial"
cleanup
loop=""
trap - EXIT

# --- the box: metadata.json + box.img (qcow2) ----------------------------------------
say "box.img (qcow2)"
qemu-img convert -O qcow2 "$disk" "$WORK/box.img"
rm -f "$disk"
printf '{"provider": "libvirt", "format": "qcow2", "virtual_size": %d}\n' "$DISK_GB" >"$WORK/metadata.json"
cat >"$WORK/Vagrantfile" <<'EOF'
# tlscap's locally built Debian 12 box (scripts/vm/build-box.sh).
Vagrant.configure("2") do |config|
  config.vm.provider "libvirt" do |lv|
    lv.disk_bus = "virtio"
  end
end
EOF
mkdir -p "$OUT.new"
tar -C "$WORK" -cf "$OUT.new/$BOX_NAME" metadata.json Vagrantfile box.img
# A catalog with a version per build: Vagrant (and vagrant-libvirt, which names the
# box's volume in the storage pool by version) then tell a rebuilt box from the old
# one, and machines made from the old one keep it until they are destroyed.
version="0.$(date -u +%Y%m%d.%H%M%S | sed 's/\.0*\([0-9]\)/.\1/g')"
cat >"$OUT.new/$CATALOG" <<EOF
{
  "name": "$VAGRANT_BOX",
  "description": "tlscap lab: Debian 12, kernel $kver, built by scripts/vm/build-box.sh (inputs $stamp)",
  "versions": [{
    "version": "$version",
    "providers": [{"name": "libvirt", "url": "file://$OUT/$BOX_NAME"}]
  }]
}
EOF
echo "$kver" >"$OUT.new/KERNEL"
echo "$version" >"$OUT.new/VERSION"
echo "$stamp" >"$OUT.new/STAMP"
rm -rf "$OUT"
mv "$OUT.new" "$OUT"
rm -rf --one-file-system "$WORK"
say "done: $OUT/$BOX_NAME ($(du -h "$OUT/$BOX_NAME" | cut -f1), kernel $kver, version $version)"
