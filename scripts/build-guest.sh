#!/usr/bin/env bash
# Build instaclone's test guest from Debian packages (as root):
#   Debian's cloud kernel + a busybox-static initramfs whose /init keeps a
#   counter running (serial console + data disk) and serves a command channel
#   on the second serial port; plus an empty qcow2 data disk. Detects whether
#   KVM works here and records "kvm" or "tcg" in OUTDIR/accel.
#
#   scripts/build-guest.sh [OUTDIR]        (default /var/lib/instaclone/guest)
#
# Idempotent: when everything is built and newer than this script, it returns
# at once. INSTACLONE_ACCEL=kvm|tcg skips the detection.
set -euo pipefail
out=${1:-/var/lib/instaclone/guest}
self=$(readlink -f "$0")
say() { printf 'build-guest: %s\n' "$*"; }

[ "$(id -u)" = 0 ] || { echo "build-guest: must run as root" >&2; exit 1; }

if [ -s "$out/vmlinuz" ] && [ -s "$out/initrd.img" ] && [ -s "$out/base.qcow2" ] && [ -s "$out/accel" ] \
   && [ "$out/initrd.img" -nt "$self" ] && { [ -z "${INSTACLONE_ACCEL:-}" ] || grep -qx "$INSTACLONE_ACCEL" "$out/accel"; }; then
    say "guest up to date in $out ($(cat "$out/accel"))"
    exit 0
fi

tmp=$(mktemp -d /tmp/instaclone-guest.XXXXXX)
probe_pid=
trap '[ -n "$probe_pid" ] && kill "$probe_pid" 2>/dev/null; rm -rf "$tmp"' EXIT
chmod 0755 "$tmp"

kpkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
if [ -z "$kpkg" ]; then
    apt-get update -qq
    kpkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
fi
say "downloading $kpkg and busybox-static"
(cd "$tmp" && apt-get download -q "$kpkg" busybox-static >/dev/null 2>&1) \
    || (cd "$tmp" && apt-get update -qq && apt-get download -q "$kpkg" busybox-static >/dev/null)
mkdir "$tmp/k" "$tmp/b"
dpkg-deb -x "$tmp"/linux-image-*.deb "$tmp/k"
dpkg-deb -x "$tmp"/busybox-static_*.deb "$tmp/b"
kver=$(ls "$tmp/k/lib/modules")
moddir=$tmp/k/lib/modules/$kver
command -v depmod >/dev/null || { echo "build-guest: depmod missing: run scripts/setup.sh (package kmod)" >&2; exit 1; }
# The package ships no modules.dep (depmod runs at install time): make one.
depmod -b "$tmp/k" "$kver"

# --- initramfs ---------------------------------------------------------------
root=$tmp/root
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,etc,lib/modules,run}
cp "$tmp/b/bin/busybox" "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list); do
    [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done

# The virtio modules we need and everything they depend on, in load order.
declare -A seen=()
order=()
add_mod() {  # $1: path relative to $moddir, e.g. kernel/drivers/block/virtio_blk.ko
    local rel=$1 dep
    [ -n "${seen[$rel]:-}" ] && return
    seen[$rel]=1
    for dep in $(awk -F': ' -v m="$rel" '$1 == m {print $2}' "$moddir/modules.dep"); do
        add_mod "$dep"
    done
    order+=("$rel")
}
for m in virtio_pci virtio_blk virtio_net virtio_console; do
    rel=$(awk -F: -v m="/$m.ko" 'index($1, m) && substr($1, length($1) - length(m) + 1) == m {print $1; exit}' "$moddir/modules.dep")
    [ -n "$rel" ] || { echo "build-guest: module $m not found in $kver" >&2; exit 1; }
    add_mod "$rel"
done
: > "$root/etc/modules"
for rel in "${order[@]}"; do
    cp "$moddir/$rel" "$root/lib/modules/"
    basename "$rel" >> "$root/etc/modules"
done

cat > "$root/init" <<'INIT'
#!/bin/sh
# instaclone test guest. PID 1 must never exit.
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs -o size=80% tmp /tmp
for m in $(cat /etc/modules); do insmod /lib/modules/$m 2>/dev/null; done
ip link set lo up
boot=$(cat /proc/sys/kernel/random/boot_id)
for _ in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/vda ] && break; sleep 0.2; done

# Command channel on ttyS1: "<id> <command>" in, framed output back.
(
    stty -F /dev/ttyS1 raw -echo 2>/dev/null
    while true; do
        while IFS= read -r line; do
            id=${line%% *}
            cmd=${line#* }
            [ -n "$id" ] || continue
            printf '@@IC-BEGIN %s\n' "$id"
            sh -c "$cmd" 2>&1 </dev/null
            printf '\n@@IC-END %s %d\n' "$id" $?
        done </dev/ttyS1 >/dev/ttyS1
        sleep 0.2
    done
) &

echo "IC ready boot=$boot" > /dev/ttyS0
n=0
while true; do
    n=$((n + 1))
    line="IC boot=$boot count=$n"
    echo "$line" > /dev/ttyS0
    [ -b /dev/vda ] && printf '%-511s\n' "$line" | dd of=/dev/vda bs=512 count=1 conv=notrunc,fsync 2>/dev/null
    sleep 1
done
INIT
chmod 0755 "$root/init"

mkdir -p "$out"
chmod 0755 "$out"
(cd "$root" && find . -print0 | cpio --null -o -H newc --quiet | gzip -6) > "$tmp/initrd.img"
cp "$tmp/k/boot/vmlinuz-$kver" "$tmp/vmlinuz"
install -m 0644 "$tmp/vmlinuz" "$out/vmlinuz"
[ -s "$out/base.qcow2" ] || qemu-img create -q -f qcow2 "$out/base.qcow2" 64M
chmod 0644 "$out/base.qcow2"
echo "console=ttyS0 loglevel=1 panic=-1" > "$out/cmdline"
chmod 0644 "$out/cmdline"

# --- does KVM work here? ----------------------------------------------------
# /dev/kvm may exist while nested virtualization hangs guests: boot the real
# guest under KVM and wait for its init to speak.
accel=${INSTACLONE_ACCEL:-}
if [ -z "$accel" ]; then
    accel=tcg
    if [ -w /dev/kvm ]; then
        say "probing KVM (up to 20 s)"
        serial=$tmp/kvm-probe.log
        qemu-system-x86_64 -accel kvm -m 256 -nodefaults -display none -no-reboot \
            -serial file:"$serial" -kernel "$tmp/vmlinuz" -initrd "$tmp/initrd.img" \
            -append "console=ttyS0 loglevel=1 panic=-1" >/dev/null 2>&1 &
        probe_pid=$!
        for _ in $(seq 1 40); do
            grep -q 'IC ready' "$serial" 2>/dev/null && { accel=kvm; break; }
            kill -0 "$probe_pid" 2>/dev/null || break
            sleep 0.5
        done
        kill "$probe_pid" 2>/dev/null || true
        wait "$probe_pid" 2>/dev/null || true
        probe_pid=
    fi
fi
echo "$accel" > "$out/accel"
chmod 0644 "$out/accel"
# Written last: its timestamp marks a complete build.
install -m 0644 "$tmp/initrd.img" "$out/initrd.img"
say "built guest in $out: kernel $kver, $(du -h "$out/initrd.img" | cut -f1) initramfs, accel $accel"
