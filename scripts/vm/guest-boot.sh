#!/bin/sh
# PID 1 of a `make test-kernels` guest (installed in the image as
# /sbin/tlscap-guest-boot; the kernel command line says init=...).  It mounts what a
# minimal system needs and the checkout the host shares (tag "tlscap": virtio-9p,
# or virtiofs where the kernel has no 9p - Debian's cloud kernels have none), then runs
# the checkout's scripts/vm/guest-smoke.sh with its output on the console, and
# powers off.  Kept small on purpose: the smoke suite lives in the checkout, so
# changing it does not rebuild the image.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mount -t tmpfs -o size=1g tmpfs /tmp
mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null
mount -t debugfs nodev /sys/kernel/debug 2>/dev/null
mount -t cgroup2 nodev /sys/fs/cgroup 2>/dev/null
mount -t bpf bpf /sys/fs/bpf 2>/dev/null
mount -o remount,rw / 2>/dev/null
hostname tlscap-guest
ip link set lo up

src=/work/main
for arg in $(cat /proc/cmdline); do
    case "$arg" in tlscap.src=*) src="${arg#tlscap.src=}" ;; esac
done
echo "TLSCAP-GUEST: kernel $(uname -r), up $(cut -d' ' -f1 /proc/uptime)s"
# mount_share TAG DIR [ro]: 9p if this kernel has it, else virtiofs.
mount_share() {
    modprobe 9pnet_virtio 2>/dev/null; modprobe 9p 2>/dev/null; modprobe virtiofs 2>/dev/null
    mkdir -p "$2"
    if grep -qw 9p /proc/filesystems; then
        mount -t 9p -o "trans=virtio,version=9p2000.L,msize=262144${3:+,$3}" "$1" "$2"
    else
        mount -t virtiofs ${3:+-o $3} "$1" "$2"
    fi
}
if mount_share tlscap "$src" ro; then
    echo "TLSCAP-GUEST: checkout at $src ($(awk -v d="$src" '$2==d{print $3}' /proc/mounts))"
    mount_share gobuild /tmp/tlscap-go-builds || echo "TLSCAP-GUEST: no shared Go build cache"
    sh "$src/scripts/vm/guest-smoke.sh" "$src" 2>&1
else
    echo "TLSCAP-GUEST: cannot mount the checkout (tag tlscap, 9p or virtiofs) at $src"
    echo "TLSCAP-RESULT: fail 0/0 (no checkout)"
fi
echo "TLSCAP-GUEST: powering off"
sync
echo o >/proc/sysrq-trigger
sleep 5
echo b >/proc/sysrq-trigger
