#!/usr/bin/env bash
# Build (once) the guest image `make test-kernels` boots: a minimal Debian 12 rootfs
# with tlscap's system dependencies, plus one Debian cloud kernel per suite in
# scripts/vm/kernels (each with its modules, its headers for bcc, and an
# initramfs made by the guest's own initramfs-tools).
#
#   scripts/vm/build-image.sh [CACHE_DIR]      (root; default /var/cache/tlscap-vm)
#
# Output in CACHE_DIR/image/: rootfs.ext4, vmlinuz-<ver>, initrd.img-<ver>,
# kernels.txt ("<suite> <ver>" per line) and STAMP, the hash of this build's inputs
# (this script, the package and kernel lists, guest-boot.sh).  A run whose inputs
# hash to the STAMP already there does nothing: the image is rebuilt only when an
# input changes (or with FORCE=1).
#
# The Debian suites are read through a private apt state in CACHE_DIR/apt: the host's
# apt sources are not touched (adding trixie to them would upgrade `make setup`'s
# packages), and the mirror is the one the host's sources name.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${1:-${TLSCAP_VM_CACHE:-/var/cache/tlscap-vm}}"
OUT="$CACHE/image"
say() { printf 'build-image: %s\n' "$*" >&2; }
die() { printf 'build-image: error: %s\n' "$*" >&2; exit 1; }
[[ $EUID -eq 0 ]] || die "run as root (debootstrap, chroot)"

inputs=("$here/build-image.sh" "$here/packages" "$here/kernels" "$here/guest-boot.sh")
stamp="$(cat "${inputs[@]}" | sha256sum | cut -c1-16)"
if [[ -z ${FORCE:-} && -f $OUT/STAMP && "$(cat "$OUT/STAMP")" == "$stamp" && -f $OUT/rootfs.ext4 ]]; then
    say "image up to date ($OUT, inputs $stamp)"
    exit 0
fi

for tool in debootstrap mkfs.ext4 dpkg-deb apt-get; do
    command -v "$tool" >/dev/null || die "$tool missing: apt-get install debootstrap e2fsprogs qemu-system-x86"
done

# The mirror the machine's own apt sources name (deb822 or one-line format).
mirror="${TLSCAP_VM_MIRROR:-}"
if [[ -z $mirror ]]; then
    mirror="$(grep -rhoE 'https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
        | head -n1 | tr -d ' ')" || true
    mirror="${mirror:-http://deb.debian.org/debian}"
fi
mirror="${mirror%/}"
say "mirror $mirror, inputs $stamp"

# --- kernel packages, through a private apt state ----------------------------------
APT="$CACHE/apt"
mkdir -p "$APT/lists/partial" "$APT/archives/partial" "$APT/debs"
: >"$APT/sources.list"
mapfile -t suites < <(grep -vE '^\s*(#|$)' "$here/kernels" | awk '{print $1}')
for suite in "${suites[@]}"; do
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $suite main" >>"$APT/sources.list"
done
apt_opts=(-o APT::Sandbox::User=root -o "Dir::Etc::SourceList=$APT/sources.list" -o Dir::Etc::SourceParts=/dev/null
    -o "Dir::State::Lists=$APT/lists" -o "Dir::Cache::Archives=$APT/archives"
    -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache= -o Dir::State::status=/dev/null
    -o APT::Get::List-Cleanup=0)
apt-get "${apt_opts[@]}" -q update >/dev/null

# "<suite> <kernel-version>" for each suite: the version linux-image-cloud-amd64
# depends on in that suite's Packages file.
# (apt may keep its lists compressed: apt-helper reads any of its formats.)
packages_of() { /usr/lib/apt/apt-helper cat-file "$(ls "$APT"/lists/*_dists_"$1"_main_binary-amd64_Packages*)"; }
kernel_of_suite() {
    local suite="$1"
    packages_of "$suite" | awk '/^Package: linux-image-cloud-amd64$/{p=1} p&&/^Depends:/&&!done{print; done=1}' \
        | grep -oE 'linux-image-[^ ,]+-cloud-amd64' | sed -n '1s/^linux-image-//p'
}
: >"$APT/kernels.txt"
for suite in "${suites[@]}"; do
    ver="$(kernel_of_suite "$suite")"
    [[ -n $ver ]] || die "no linux-image-cloud-amd64 in $suite"
    echo "$suite $ver" >>"$APT/kernels.txt"
done
say "kernels: $(tr '\n' ';' <"$APT/kernels.txt")"

(
    cd "$APT/debs"
    while read -r suite ver; do
        common="$(packages_of "$suite" | awk -v pkg="linux-headers-$ver" '$0=="Package: "pkg{p=1} p&&/^Depends:/&&!done{print; done=1}' \
            | grep -oE 'linux-headers-[^ ,]+-common' | sed -n 1p)"
        [[ -n $common ]] || die "cannot find the -common headers of $ver"
        for pkg in "linux-image-$ver" "linux-headers-$ver" "$common"; do
            ls "${pkg}"_*.deb >/dev/null 2>&1 || apt-get "${apt_opts[@]}" -q download "$pkg/$suite" >/dev/null
        done
    done <"$APT/kernels.txt"
)

# --- rootfs ------------------------------------------------------------------------
# The rootfs directory stays in the cache: a change to anything but the package
# list (a kernel, guest-boot.sh) reuses it instead of running debootstrap again.
WORK="$CACHE/build"
ROOT="$CACHE/rootfs"
cleanup() {
    for m in proc sys dev/pts dev; do umount "$ROOT/$m" 2>/dev/null || true; done
}
trap cleanup EXIT
cleanup
# debootstrap runs once (or with FORCE=1); a changed package list is installed
# into the rootfs already there (a package dropped from the list stays until FORCE=1).
mkdir -p "$WORK"
if [[ -n ${FORCE:-} || ! -x $ROOT/usr/bin/apt-get ]]; then
    rm -rf "$ROOT" "$CACHE/rootfs.stamp"
    say "debootstrap bookworm (minbase)"
    debootstrap --variant=minbase bookworm "$ROOT" "$mirror" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log" >&2; die "debootstrap failed (log: $WORK/debootstrap.log)"; }
fi
mount -t proc proc "$ROOT/proc"
mount --bind /sys "$ROOT/sys"
mount --bind /dev "$ROOT/dev"
mount --bind /dev/pts "$ROOT/dev/pts"
base_stamp="$(cat "$here/packages" | sha256sum | cut -c1-16)"
if [[ "$(cat "$CACHE/rootfs.stamp" 2>/dev/null)" != "$base_stamp" ]]; then
    cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
    printf 'deb %s bookworm main\ndeb %s bookworm-updates main\n' "$mirror" "$mirror" >"$ROOT/etc/apt/sources.list"
    mapfile -t pkgs < <(grep -vE '^\s*(#|$)' "$here/packages" | awk '{print $1}')
    say "installing ${#pkgs[@]} packages"
    chroot "$ROOT" /usr/bin/env DEBIAN_FRONTEND=noninteractive bash -c \
        "apt-get -q update && apt-get install -y -q --no-install-recommends ${pkgs[*]}" >"$WORK/apt.log" 2>&1 \
        || { tail -20 "$WORK/apt.log" >&2; die "package install failed (log: $WORK/apt.log)"; }
    echo "$base_stamp" >"$CACHE/rootfs.stamp"
else
    say "reusing the Debian rootfs in $ROOT (same package list)"
fi
# virtio-9p for the shared checkout; loaded from the disk after boot, but in the
# initramfs too so a 9p root would work.
grep -qx 9pnet_virtio "$ROOT/etc/initramfs-tools/modules" \
    || printf '9p\n9pnet_virtio\nvirtio_blk\nvirtio_pci\next4\n' >>"$ROOT/etc/initramfs-tools/modules"

mkdir -p "$OUT.new"
rm -rf "$ROOT"/lib/modules/* "$ROOT"/usr/src/linux-headers-*  # only this build's kernels
while read -r suite ver; do
    say "kernel $ver ($suite)"
    for deb in "$APT"/debs/linux-image-"${ver}"_*.deb "$APT"/debs/linux-headers-"${ver}"_*.deb \
        "$APT"/debs/linux-headers-*-common_*.deb; do
        case "$deb" in *-common_*) [[ $(basename "$deb") == linux-headers-"${ver%-cloud-amd64}"-common_* ]] || continue ;; esac
        dpkg-deb --fsys-tarfile "$deb" | tar -x --keep-directory-symlink -C "$ROOT"
    done
    chroot "$ROOT" test -e "/lib/modules/$ver/build/include" || die "headers of $ver not where bcc looks (/lib/modules/$ver/build)"
    chroot "$ROOT" depmod "$ver"
    chroot "$ROOT" mkinitramfs -o "/boot/initrd.img-$ver" "$ver" >>"$WORK/initramfs.log" 2>&1 \
        || { tail -20 "$WORK/initramfs.log" >&2; die "mkinitramfs $ver failed"; }
    cp "$ROOT/boot/vmlinuz-$ver" "$ROOT/boot/initrd.img-$ver" "$OUT.new/"
done <"$APT/kernels.txt"
cp "$APT/kernels.txt" "$OUT.new/kernels.txt"

install -m 0755 "$here/guest-boot.sh" "$ROOT/sbin/tlscap-guest-boot"
echo tlscap-guest >"$ROOT/etc/hostname"
printf '127.0.0.1 localhost\n::1 localhost ip6-localhost\n' >"$ROOT/etc/hosts"
chroot "$ROOT" apt-get clean
rm -f "$ROOT"/boot/*
cleanup
trap - EXIT

size_mb=$(( $(du -sm "$ROOT" | cut -f1) + 1536 ))
say "rootfs.ext4 (${size_mb} MiB)"
mkfs.ext4 -q -F -L tlscap-root -d "$ROOT" "$OUT.new/rootfs.ext4" "${size_mb}M"
echo "$stamp" >"$OUT.new/STAMP"
rm -rf "$OUT"
mv "$OUT.new" "$OUT"
rm -rf "$WORK"
say "done: $OUT"
