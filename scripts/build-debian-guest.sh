#!/usr/bin/env bash
# Build a real Debian 12 (bookworm) test guest from Debian packages, as root:
#
#   scripts/build-debian-guest.sh [OUTDIR]     (default /var/lib/instaclone/debian)
#
# The guest: systemd (PID 1), udev, dbus, Debian's qemu-guest-agent,
# openssh-server (host keys generated at build time, as a normal install does),
# systemd-networkd doing DHCP on every en*/eth* interface, iproute2, perl-base,
# two kernels: linux-image-cloud-amd64 (fast; no VMGENID driver) and
# linux-image-amd64 (CONFIG_VMGENID=y), each with Debian's initramfs (the
# virtio drivers are modules in both flavours). Root has no password; the
# serial console logs in as root by itself. /etc/machine-id is empty in the
# image: systemd writes a new, persistent id at a guest's first boot (the root
# file system is mounted rw from the start).
#
# Outputs in OUTDIR (dirs 0755, files 0644: libvirt runs QEMU as libvirt-qemu).
# Every build goes to its own directory OUTDIR/<hash12>, named by its inputs'
# hash, and is never changed or removed afterwards (qcow2 overlays of running
# guests point at its root.qcow2); OUTDIR/current is a symlink to the newest,
# switched by one rename, and these names in OUTDIR are symlinks through it:
#   root.qcow2          3 GiB GPT disk: partition 1 an EFI system partition
#                       (systemd-boot as \EFI\BOOT\BOOTX64.EFI, both kernels,
#                       loader entries "cloud" (default) and "generic"),
#                       partition 2 the ext4 root (label icroot), /dev/vda2
#   vmlinuz-cloud  initrd-cloud.img  vmlinuz-generic  initrd-generic.img
#                       for libvirt direct kernel boot
#   cmdline             kernel command line for direct kernel boot
#   kernel-version      e.g. 6.1.0-57
#   inputs.sha256       hash of this script (package list and guest
#                       configuration are in it)
# Idempotent: when OUTDIR/inputs.sha256 matches and the outputs exist it says
# "debian guest up to date" and returns at once. Old builds are kept: remove
# OUTDIR/<hash12> directories by hand once no guest uses them.
set -euo pipefail
umask 022

out=${1:-/var/lib/instaclone/debian}
self=$(readlink -f "$0")
suite=bookworm
root_label=icroot
disk_mib=3072                  # virtual size of root.qcow2
esp_start_mib=1 esp_mib=128    # partition 1
cmdline="root=/dev/vda2 rw console=ttyS0 quiet loglevel=3 net.ifnames=0 panic=-1 cryptomgr.notests=1"
# What the guest consists of (beyond Essential and apt, mmdebstrap's minbase).
packages=(systemd systemd-sysv udev dbus kmod qemu-guest-agent openssh-server iproute2 perl-base
          procps e2fsprogs initramfs-tools systemd-boot-efi
          linux-image-cloud-amd64 linux-image-amd64)
say() { printf 'build-debian-guest: %s\n' "$*"; }
die() { printf 'build-debian-guest: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root"

mkdir -p "$out"
chmod 0755 "$out"
inputs=$( { cat "$self"; printf '%s\n' "${packages[@]}"; } | sha256sum | cut -d' ' -f1)
outputs=(root.qcow2 vmlinuz-cloud initrd-cloud.img vmlinuz-generic initrd-generic.img cmdline kernel-version)
up_to_date() {
    local f
    [ "$(cat "$out/inputs.sha256" 2>/dev/null)" = "$inputs" ] || return 1
    for f in "${outputs[@]}"; do [ -s "$out/$f" ] || return 1; done
}
# One build at a time per OUTDIR; a second caller waits, then finds it done.
exec 9>"$out/.build.lock"
flock 9
if up_to_date; then
    say "debian guest up to date in $(readlink -f "$out/current")"
    exit 0
fi

for tool in mmdebstrap mkfs.ext4 mkfs.vfat mcopy mmd sfdisk qemu-img; do
    command -v "$tool" >/dev/null || die "$tool missing: run scripts/setup.sh"
done
APT_SAY=build-debian-guest
# shellcheck source=lib/apt.sh
. "$(dirname "$self")/lib/apt.sh"
apt_ensure_lists linux-image-cloud-amd64

id=${inputs:0:12}
final=$out/$id
build=$(mktemp -d "$out/.build-$id.XXXXXX")
cleanup() {
    # mmdebstrap unmounts what it mounted, even on failure; never rm -rf through a mount.
    if [ -n "${build:-}" ] && [ -d "$build" ]; then
        if grep -q " $build/" /proc/mounts; then
            say "warning: leaving $build: something is still mounted in it" >&2
        else
            rm -rf "$build"
        fi
    fi
}
trap cleanup EXIT
chmod 0755 "$build"
rootfs=$build/rootfs
start=$(date +%s)

# --- the root file system ---------------------------------------------------------
# The host's apt sources (whatever mirror this machine uses) become the guest's.
sources=()
[ -s /etc/apt/sources.list ] && grep -q '^[[:space:]]*deb' /etc/apt/sources.list && sources+=(/etc/apt/sources.list)
for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -s "$f" ] && sources+=("$f")
done
[ ${#sources[@]} -gt 0 ] || die "no apt sources in /etc/apt"

# Before the kernels are installed (their postinst builds the initramfs):
# MODULES=list plus exactly the drivers needed to mount the root file system.
setup_hook='mkdir -p "$1/etc/initramfs-tools/conf.d" "$1/etc/initramfs-tools/hooks"
printf "MODULES=list\nCOMPRESS=gzip\n" > "$1/etc/initramfs-tools/conf.d/instaclone.conf"
cat > "$1/etc/initramfs-tools/hooks/instaclone-virtio" <<"EOF"
#!/bin/sh
[ "$1" = prereqs ] && exit 0
. /usr/share/initramfs-tools/hook-functions
manual_add_modules virtio_pci virtio_blk virtio_scsi sd_mod ext4 crc32c_generic
EOF
chmod 0755 "$1/etc/initramfs-tools/hooks/instaclone-virtio"'

customize_hook='set -e
r=$1
echo debian-guest > "$r/etc/hostname"
printf "127.0.0.1\tlocalhost\n127.0.1.1\tdebian-guest\n::1\t\tlocalhost ip6-localhost ip6-loopback\n" > "$r/etc/hosts"
printf "/dev/vda2\t/\text4\trw,errors=remount-ro\t0\t0\n" > "$r/etc/fstab"
# An empty machine-id: systemd writes a new one at first boot (root is rw).
rm -f "$r/etc/machine-id"; : > "$r/etc/machine-id"
mkdir -p "$r/etc/systemd/network"
printf "[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n" > "$r/etc/systemd/network/80-dhcp.network"
chroot "$r" systemctl enable systemd-networkd.service
# No password for root; the serial console logs in as root.
chroot "$r" passwd -d root >/dev/null
mkdir -p "$r/etc/systemd/system/serial-getty@ttyS0.service.d"
printf "[Service]\nExecStart=\nExecStart=-/sbin/agetty --autologin root --keep-baud 115200,57600,38400,9600 - \$TERM\n" \
    > "$r/etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf"
# Boot fast under TCG: nothing periodic, nothing that waits.
for u in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer \
         man-db.timer dpkg-db-backup.timer systemd-networkd-wait-online.service getty@tty1.service; do
    chroot "$r" systemctl mask "$u" >/dev/null 2>&1 || true
done
# ssh host keys as a normal install has them (openssh-server made them).
ls "$r"/etc/ssh/ssh_host_*_key >/dev/null
rm -f "$r"/etc/ssh/sshd_not_to_be_run'

say "mmdebstrap $suite (${#packages[@]} packages beyond minbase)"
# Keep package lists' Valid-Until checks off: the host's mirror may be a snapshot.
mmdebstrap --variant=minbase --mode=root --format=directory \
    --aptopt='Acquire::Check-Valid-Until "false"' \
    --include="$(IFS=,; echo "${packages[*]}")" \
    --setup-hook="$setup_hook" --customize-hook="$customize_hook" \
    "$suite" "$rootfs" "${sources[@]}" >"$build/mmdebstrap.log" 2>&1 || {
    tail -n 40 "$build/mmdebstrap.log" >&2
    die "mmdebstrap failed"
}
say "root file system after $(( $(date +%s) - start )) s: $(du -sh "$rootfs" | cut -f1)"

# --- kernels ------------------------------------------------------------------------
kver() {  # $1 cloud|generic: the one kernel version of that flavour in /boot
    local v
    v=$(cd "$rootfs/boot" && ls vmlinuz-* | sed 's/^vmlinuz-//' | grep -E -- "-amd64$" \
        | if [ "$1" = cloud ]; then grep -- -cloud-amd64; else grep -v -- -cloud-amd64; fi || true)
    [ "$(printf '%s\n' "$v" | grep -c .)" = 1 ] || die "expected one $1 kernel in /boot, found: $v"
    [ -s "$rootfs/boot/initrd.img-$v" ] || die "no initrd.img-$v in /boot"
    echo "$v"
}
kcloud=$(kver cloud)
kgeneric=$(kver generic)
grep -q '^CONFIG_VMGENID=y' "$rootfs/boot/config-$kgeneric" || say "warning: $kgeneric lacks CONFIG_VMGENID"
for f in cloud:"$kcloud" generic:"$kgeneric"; do
    install -m 0644 "$rootfs/boot/vmlinuz-${f#*:}" "$build/vmlinuz-${f%%:*}"
    install -m 0644 "$rootfs/boot/initrd.img-${f#*:}" "$build/initrd-${f%%:*}.img"
done
echo "$cmdline" > "$build/cmdline"
echo "${kcloud%-cloud-amd64}" > "$build/kernel-version"
[ -d "$rootfs/lib/modules/$kcloud" ] && [ -d "$rootfs/lib/modules/$kgeneric" ] || die "modules missing"

# --- the disk: GPT, ESP + ext4 root, built without loop devices -----------------------
raw=$build/disk.raw
truncate -s "${disk_mib}M" "$raw"
root_start_mib=$((esp_start_mib + esp_mib))
root_mib=$((disk_mib - root_start_mib - 1))   # the backup GPT lives in the last MiB
sfdisk -q --label gpt "$raw" <<EOF
start=${esp_start_mib}MiB, size=${esp_mib}MiB, type=uefi, name=ESP
start=${root_start_mib}MiB, size=${root_mib}MiB, type=linux, name=root
EOF
# ESP: FAT32 at partition 1's offset, filled with mtools.
# (512-byte clusters: enough of them for FAT32 on 128 MiB; its "block count
# mismatch" warning is about the rest of the disk after the partition.)
mkfs.vfat -F 32 -s 1 -n ESP --offset $((esp_start_mib * 2048)) "$raw" $((esp_mib * 1024)) >/dev/null 2>&1 \
    || die "mkfs.vfat failed"
esp=$build/esp
sdboot=$rootfs/usr/lib/systemd/boot/efi/systemd-bootx64.efi
[ -s "$sdboot" ] || die "no $sdboot"
mkdir -p "$esp/EFI/BOOT" "$esp/loader/entries"
cp "$sdboot" "$esp/EFI/BOOT/BOOTX64.EFI"
cp "$build/vmlinuz-cloud" "$build/initrd-cloud.img" "$build/vmlinuz-generic" "$build/initrd-generic.img" "$esp/"
printf 'default cloud.conf\ntimeout 0\nconsole-mode keep\neditor no\n' > "$esp/loader/loader.conf"
for fl in cloud generic; do
    printf 'title Debian 12 (%s kernel)\nlinux /vmlinuz-%s\ninitrd /initrd-%s.img\noptions %s\n' \
        "$fl" "$fl" "$fl" "$cmdline" > "$esp/loader/entries/$fl.conf"
done
export MTOOLS_SKIP_CHECK=1
mcopy -s -Q -i "$raw@@${esp_start_mib}M" "$esp/EFI" "$esp/loader" "$esp"/vmlinuz-* "$esp"/initrd-* ::/
# Root: ext4 written straight from the directory tree at partition 2's offset.
mkfs.ext4 -q -F -L "$root_label" -d "$rootfs" \
    -E offset=$((root_start_mib * 1024 * 1024)),nodiscard "$raw" "${root_mib}M"
qemu-img convert -O qcow2 "$raw" "$build/root.qcow2"
rm -f "$raw"
rm -rf "$esp"

# --- install ------------------------------------------------------------------------
# The new build's directory appears by one rename, then OUTDIR/current switches to
# it by another; builds in use are never touched.
rm -rf "$rootfs"
echo "$inputs" > "$build/inputs.sha256"
chmod 0644 "$build"/*
chmod 0755 "$build"
if [ -d "$final" ]; then
    # The same inputs were built before (OUTDIR/current had moved on): keep that one.
    say "reusing $final"
else
    mv -T "$build" "$final"
fi
for f in "${outputs[@]}" inputs.sha256; do
    [ -L "$out/$f" ] || { rm -f "$out/$f"; ln -s "current/$f" "$out/$f"; }
done
ln -sfn "$id" "$out/.current.tmp"
mv -T "$out/.current.tmp" "$out/current"
say "built debian guest in $final in $(( $(date +%s) - start )) s: kernels $kcloud, $kgeneric;" \
    "root.qcow2 $(du -h "$final/root.qcow2" | cut -f1) (virtual ${disk_mib} MiB)"
