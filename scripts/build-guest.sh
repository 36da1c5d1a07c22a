#!/usr/bin/env bash
# Build instaclone's test guest from Debian packages, as root:
#
#   scripts/build-guest.sh [OUTDIR]        (default /var/lib/instaclone/guest)
#
# Outputs in OUTDIR (dirs 0755, files 0644: libvirt runs QEMU as libvirt-qemu):
#   vmlinuz     Debian's cloud kernel (from linux-image-cloud-amd64; not installed
#               on the host, only unpacked)
#   initrd.img  gzip'd newc cpio: static busybox, the virtio modules, and an /init
#               that prints "IC boot=<boot id> count=<n>" on ttyS0 every second,
#               writes the same line to sector 0 of /dev/vda, and runs commands
#               received on ttyS1 (see tests/support/guests/devguest.py)
#   cmdline     the kernel command line to boot it with
#   base.qcow2  empty 64 MiB data disk (created once, never replaced: overlays
#               of running guests may point at it)
#   accel       "kvm" if a KVM guest really boots here, else "tcg". /dev/kvm can
#               exist while KVM guests hang (broken nested virtualization), so
#               this boots the guest under KVM and waits for it to speak.
#
# Environment: INSTACLONE_ACCEL=kvm|tcg skips the KVM probe.
# Idempotent: when the outputs exist and are newer than this script it says
# "guest up to date" and returns at once.
set -euo pipefail
umask 022

out=${1:-/var/lib/instaclone/guest}
self=$(readlink -f "$0")
cmdline="console=ttyS0 loglevel=1 panic=-1 cryptomgr.notests=1"
kvm_wait=20      # s for a KVM guest to print "IC ready" (it needs < 1 s when KVM works)
tcg_wait=60      # s for the TCG smoke boot to print its first counter line
say() { printf 'build-guest: %s\n' "$*"; }
die() { printf 'build-guest: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root"
case ${INSTACLONE_ACCEL:-} in ""|kvm|tcg) ;; *) die "INSTACLONE_ACCEL must be kvm or tcg, not '$INSTACLONE_ACCEL'" ;; esac
for tool in apt-cache apt-get dpkg-deb depmod cpio gzip gcc qemu-img qemu-system-x86_64 timeout; do
    command -v "$tool" >/dev/null || die "$tool missing: run scripts/setup.sh"
done

mkdir -p "$out"
chmod 0755 "$out"
# One build at a time per OUTDIR; a second caller waits, then finds it done.
exec 9>"$out/.build.lock"
flock 9

up_to_date() {
    local f
    for f in vmlinuz initrd.img cmdline accel; do
        [ -s "$out/$f" ] && [ "$out/$f" -nt "$self" ] && [ "$out/$f" -nt "$(dirname "$self")/guest/ic-agent.c" ] || return 1
    done
    [ -s "$out/base.qcow2" ]
}
if up_to_date; then
    if [ -n "${INSTACLONE_ACCEL:-}" ] && [ "$(cat "$out/accel")" != "$INSTACLONE_ACCEL" ]; then
        echo "$INSTACLONE_ACCEL" > "$out/accel.tmp" && mv -f "$out/accel.tmp" "$out/accel"
    fi
    say "guest up to date in $out (accel $(cat "$out/accel"))"
    exit 0
fi

tmp=$(mktemp -d /tmp/instaclone-guest.XXXXXX)
chmod 0755 "$tmp"   # apt's _apt user must reach $tmp/deb
probe_pids=()
cleanup() {
    local p
    for p in "${probe_pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${probe_pids[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$tmp"
}
trap cleanup EXIT

# --- packages ----------------------------------------------------------------
kernel_pkg() {
    apt-cache depends linux-image-cloud-amd64 2>/dev/null \
        | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ {print $2; exit}'
}
APT_SAY=build-guest
# shellcheck source=lib/apt.sh
. "$(dirname "$self")/lib/apt.sh"
# "apt-cache show" is not enough: an installed busybox-static is known from
# dpkg's status file even with empty lists, and its download then fails.
kpkg=$(kernel_pkg)
if [ -z "$kpkg" ]; then
    apt_ensure_lists linux-image-cloud-amd64
    kpkg=$(kernel_pkg)
fi
[ -n "$kpkg" ] || die "apt-cache depends linux-image-cloud-amd64 names no linux-image-<version> package"
apt_ensure_lists "$kpkg" busybox-static
if [ "$APT_UPDATED" = 1 ]; then kpkg=$(kernel_pkg); fi
say "downloading $kpkg and busybox-static"
mkdir "$tmp/deb"
# apt drops root to _apt for downloads; let it write here (else it warns).
id _apt >/dev/null 2>&1 && chown _apt "$tmp/deb"
download() { (cd "$tmp/deb" && apt-get download -qq "$kpkg" busybox-static); }
if ! download; then
    # Stale lists: the mirror dropped that version (a kernel ABI bump renames
    # the package too, so the name is looked up again after the update).
    [ "$APT_UPDATED" = 0 ] || die "apt-get download failed"
    say "apt-get download failed: apt-get update (the lists may be stale) and once more"
    apt-get update -qq
    APT_UPDATED=1
    kpkg=$(kernel_pkg)
    download || die "apt-get download failed"
fi
mkdir "$tmp/k" "$tmp/b"
dpkg-deb -x "$tmp"/deb/linux-image-*.deb "$tmp/k"
dpkg-deb -x "$tmp"/deb/busybox-static_*.deb "$tmp/b"
kver=$(ls "$tmp/k/lib/modules")
[ "$(printf '%s\n' "$kver" | wc -l)" = 1 ] || die "expected one kernel in $kpkg, found: $kver"
moddir=$tmp/k/lib/modules/$kver
# The package ships no modules.dep (its postinst runs depmod): make one.
[ -s "$moddir/modules.dep" ] || depmod -b "$tmp/k" "$kver"

# --- initramfs -----------------------------------------------------------------
root=$tmp/root
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,etc,lib/modules,run}
chmod 1777 "$root/tmp"
# PID 1 gets /dev/console as stdio before /init mounts devtmpfs.
mknod -m 0600 "$root/dev/console" c 5 1
cp "$tmp/b/bin/busybox" "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list); do
    [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done

# virtio_pci, virtio_blk, virtio_net, virtio_console, virtio_balloon (binds only
# when the domain has <memballoon model='virtio'/>; needed for free page
# reporting) and all they depend on, in load order (dependencies first), from
# modules.dep.
declare -A deps=() seen=()
while IFS= read -r line; do
    deps[${line%%:*}]=${line#*:}
done < "$moddir/modules.dep"
order=()
add_mod() {  # $1: path as in modules.dep, e.g. kernel/drivers/block/virtio_blk.ko
    local dep
    [ -z "${seen[$1]:-}" ] || return 0
    seen[$1]=1
    for dep in ${deps[$1]}; do add_mod "$dep"; done
    order+=("$1")
}
for m in virtio_pci virtio_blk virtio_net virtio_console virtio_balloon; do
    rel=
    for path in "${!deps[@]}"; do
        [ "${path##*/}" = "$m.ko" ] && { rel=$path; break; }
    done
    [ -n "$rel" ] || die "module $m.ko not in $kver's modules.dep (built in? compressed?)"
    add_mod "$rel"
done
: > "$root/etc/modules"
for rel in "${order[@]}"; do
    cp "$moddir/$rel" "$root/lib/modules/"
    echo "${rel##*/}" >> "$root/etc/modules"
done
say "modules: $(tr '\n' ' ' < "$root/etc/modules")"

# A minimal QEMU guest agent (the real one needs glib and friends), static.
gcc -O2 -static -Wall -o "$root/bin/ic-agent" "$(dirname "$self")/guest/ic-agent.c"
strip "$root/bin/ic-agent" 2>/dev/null || true
# udhcpc calls this to apply a lease.
mkdir -p "$root/usr/share/udhcpc"
cat > "$root/usr/share/udhcpc/default.script" <<'DHCP'
#!/bin/sh
case $1 in
    deconfig) ip -4 addr flush dev "$interface"; ip link set "$interface" up ;;
    bound|renew)
        ip -4 addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" dev "$interface"
        [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
        echo "$lease" > "/run/udhcpc.$interface.lease" 2>/dev/null || true ;;
esac
exit 0
DHCP
chmod 0755 "$root/usr/share/udhcpc/default.script"
# Debian's busybox looks for it in /etc/udhcpc.
mkdir -p "$root/etc/udhcpc"
ln -s /usr/share/udhcpc/default.script "$root/etc/udhcpc/default.script"
echo testguest > "$root/etc/hostname"

cat > "$root/init" <<'INIT'
#!/bin/sh
# instaclone test guest, PID 1. It must never exit: the kernel would panic.
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o mode=1777 tmpfs /tmp
exec </dev/null >/dev/ttyS0 2>&1
for m in $(cat /etc/modules); do
    insmod "/lib/modules/$m" || echo "IC warning: insmod $m failed"
done
boot=$(cat /proc/sys/kernel/random/boot_id)
ip link set lo up
hostname -F /etc/hostname
mkdir -p /run
cat /proc/sys/kernel/random/uuid | tr -d - > /etc/machine-id
# The guest agent on virtio-serial (org.qemu.guest_agent.0), when present.
(while :; do ic-agent; sleep 2; done) >/dev/null 2>&1 &
echo "IC ready boot=$boot"

# Command channel on ttyS1: "<id> <command>" lines in; for each, the output
# framed as "@@IC-BEGIN <id>" ... "@@IC-END <id> <exit status>" back.
serve() {
    cr=$(printf '\r')
    while :; do
        # (A failed redirection on a compound command is not fatal; on exec it is.)
        {
            if ! stty raw -echo clocal -hupcl <&3 2>/dev/null; then
                [ -n "${warned:-}" ] || echo "IC warning: no command channel: ttyS1 unusable"
                warned=1
                sleep 5
                continue
            fi
            while IFS= read -r line <&3; do
                line=${line%"$cr"}
                id=${line%% *}
                case $line in *" "*) cmd=${line#* } ;; *) cmd= ;; esac
                # Blank lines and line noise (e.g. a half-received line left
                # over when the VM was cloned) are skipped.
                case $id in ""|*[!A-Za-z0-9._:+=-]*) continue ;; esac
                printf '@@IC-BEGIN %s\n' "$id" >&3
                sh -c "$cmd" </dev/null >&3 2>&1
                rc=$?
                printf '\n@@IC-END %s %d\n' "$id" "$rc" >&3
            done
        } 3<>/dev/ttyS1
        sleep 1
    done
}
serve &

# The counter: console line and sector 0 of the data disk, every second.
n=0
while :; do
    n=$((n + 1))
    line="IC boot=$boot count=$n"
    echo "$line"
    if [ -b /dev/vda ]; then
        printf '%-511s\n' "$line" | dd of=/dev/vda bs=512 count=1 conv=notrunc,fsync 2>/dev/null
    fi
    sleep 1
done
INIT
chmod 0755 "$root/init"
(cd "$root" && find . -print0 | cpio --null -o -H newc --quiet --owner 0:0 | gzip -6) > "$tmp/initrd.img"
cp "$tmp/k/boot/vmlinuz-$kver" "$tmp/vmlinuz"

# --- boot it: does it work, and does KVM work? ----------------------------------------
boot_probe() {  # $1 kvm|tcg, $2 serial log, $3 timeout (s); $! is its `timeout` wrapper
    : > "$2"
    timeout -s KILL "$(($3 + 5))" qemu-system-x86_64 -accel "$1" -m 256 -nodefaults -display none \
        -no-reboot -serial "file:$2" -serial null -kernel "$tmp/vmlinuz" -initrd "$tmp/initrd.img" \
        -append "$cmdline" </dev/null >"$2.err" 2>&1 &
}
accel=${INSTACLONE_ACCEL:-}
kvm_pid= tcg_pid= tcg_secs= kvm_secs=
start=$(date +%s%N)
elapsed() { awk -v a="$start" -v b="$(date +%s%N)" 'BEGIN {printf "%.1f", (b - a) / 1e9}'; }
if [ -z "$accel" ]; then
    if [ -c /dev/kvm ] && [ -r /dev/kvm ] && [ -w /dev/kvm ]; then
        say "probing KVM: booting the guest under KVM (up to ${kvm_wait} s)"
        boot_probe kvm "$tmp/kvm.log" "$kvm_wait"; kvm_pid=$!; probe_pids+=("$kvm_pid")
    else
        say "no usable /dev/kvm: tcg"
        accel=tcg
    fi
fi
# Boot under TCG at the same time: proves the initramfs works whatever the accel.
boot_probe tcg "$tmp/tcg.log" "$tcg_wait"; tcg_pid=$!; probe_pids+=("$tcg_pid")
deadline_kvm=$(( $(date +%s) + kvm_wait ))
deadline_tcg=$(( $(date +%s) + tcg_wait ))
while [ -n "$kvm_pid" ] || [ -n "$tcg_pid" ]; do
    sleep 0.2
    now=$(date +%s)
    if [ -n "$kvm_pid" ]; then
        if grep -q '^IC ready' "$tmp/kvm.log"; then
            kvm_secs=$(elapsed); accel=kvm
            kill "$kvm_pid" 2>/dev/null || true; kvm_pid=
            # A guest that boots under KVM needs no TCG proof.
            [ -z "$tcg_pid" ] || { kill "$tcg_pid" 2>/dev/null || true; tcg_pid=; }
        elif ! kill -0 "$kvm_pid" 2>/dev/null || [ "$now" -ge "$deadline_kvm" ]; then
            kill "$kvm_pid" 2>/dev/null || true; kvm_pid=
            accel=tcg
            say "KVM guest did not come up in $(elapsed) s (console: '$(tail -c 100 "$tmp/kvm.log" \
                | tr -s '\r\n' '  ')', QEMU: '$(tail -c 200 "$tmp/kvm.log.err" | tr -s '\r\n' '  ')'): using tcg"
        fi
    fi
    if [ -n "$tcg_pid" ]; then
        if grep -q '^IC boot=.* count=1' "$tmp/tcg.log"; then
            tcg_secs=$(elapsed)
            kill "$tcg_pid" 2>/dev/null || true; tcg_pid=
        elif ! kill -0 "$tcg_pid" 2>/dev/null || [ "$now" -ge "$deadline_tcg" ]; then
            kill "$tcg_pid" 2>/dev/null || true; tcg_pid=
            echo "--- serial console of the TCG boot:" >&2
            tail -n 30 "$tmp/tcg.log" "$tmp/tcg.log.err" >&2 || true
            die "the guest did not print its first counter line under TCG within ${tcg_wait} s"
        fi
    fi
done
for p in "${probe_pids[@]}"; do wait "$p" 2>/dev/null || true; done
probe_pids=()
[ -z "$kvm_secs" ] || say "KVM works: guest ready after $kvm_secs s"
[ -z "$tcg_secs" ] || say "TCG boot: first counter line after $tcg_secs s"

# --- install -----------------------------------------------------------------------
# Each file is replaced by a rename, so a guest starting meanwhile never reads a
# half-written one; initrd.img goes last, its timestamp marking a complete build.
put() {  # $1 source file, $2 name in $out
    install -m 0644 "$1" "$out/.$2.tmp"
    mv -f "$out/.$2.tmp" "$out/$2"
}
if [ ! -s "$out/base.qcow2" ]; then
    qemu-img create -q -f qcow2 "$out/.base.qcow2.tmp" 64M
    chmod 0644 "$out/.base.qcow2.tmp"
    mv -f "$out/.base.qcow2.tmp" "$out/base.qcow2"
fi
chmod 0644 "$out/base.qcow2"
echo "$cmdline" > "$tmp/cmdline"
echo "$accel" > "$tmp/accel"
put "$tmp/vmlinuz" vmlinuz
put "$tmp/cmdline" cmdline
put "$tmp/accel" accel
put "$tmp/initrd.img" initrd.img
say "built guest in $out: kernel $kver, initramfs $(du -h "$out/initrd.img" | cut -f1), accel $accel"
