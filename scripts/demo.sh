#!/usr/bin/env bash
# The main job, from a fresh Debian 12 machine (as root):
#   set up, build the test guest, start instacloned on its built-in defaults,
#   boot a source guest, instant-clone it, and show the clone continuing the
#   source's counter without a reboot. Everything is removed at the end
#   (pass --keep to leave the daemon, source and clone running).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
keep=0; [ "${1:-}" = "--keep" ] && keep=1
venv=${INSTACLONE_VENV:-$repo/.venv}

"$repo/scripts/setup.sh"
"$repo/scripts/build-guest.sh"

bin=$venv/bin
sock=/run/instaclone/control.sock
work=/var/lib/instaclone/demo
src=demo-src
clone=demo-clone
logfile=$work/instacloned.log
daemon_pid=

cleanup() {
    [ $keep = 1 ] && return
    echo "== cleaning up"
    "$bin/instaclone" destroy $clone >/dev/null 2>&1 || true
    virsh -q -c qemu:///system destroy $src >/dev/null 2>&1 || true
    virsh -q -c qemu:///system undefine $src >/dev/null 2>&1 || true
    [ -n "$daemon_pid" ] && kill "$daemon_pid" 2>/dev/null && wait "$daemon_pid" 2>/dev/null || true
    rm -rf "$work" /var/lib/instaclone/deltas/$src
}
trap cleanup EXIT

# A previous --keep run may have left these.
"$bin/instaclone" destroy $clone >/dev/null 2>&1 || true
virsh -q -c qemu:///system destroy $src >/dev/null 2>&1 || true
virsh -q -c qemu:///system undefine $src >/dev/null 2>&1 || true
rm -rf "$work"; mkdir -p "$work"; chown libvirt-qemu:kvm "$work" 2>/dev/null || true; chmod 0755 "$work"

echo "== starting instacloned (built-in defaults; socket $sock, log $logfile)"
if "$bin/instaclone" status >/dev/null 2>&1; then
    echo "   (an instacloned is already running; using it)"
else
    "$bin/instacloned" --log-format console >"$logfile" 2>&1 &
    daemon_pid=$!
    for _ in $(seq 1 100); do "$bin/instaclone" status >/dev/null 2>&1 && break; sleep 0.1; done
    "$bin/instaclone" status >/dev/null
fi

echo "== booting source guest $src ($(cat /var/lib/instaclone/guest/accel))"
qemu-img create -q -f qcow2 -b /var/lib/instaclone/guest/base.qcow2 -F qcow2 "$work/$src.qcow2"
# Shared file-backed RAM lets the filecow backend clone it copy-on-write.
# The test guest's driver lives with the tests: run it from the repository.
PYTHONPATH="$repo" "$bin/python" -m tests.support.guests.devguest xml $src --disk "$work/$src.qcow2" --workdir "$work" --file-backed-ram > "$work/$src.xml"
virsh -q -c qemu:///system define "$work/$src.xml" >/dev/null
virsh -q -c qemu:///system start $src >/dev/null
for _ in $(seq 1 120); do grep -q 'count=3' "$work/$src.serial.log" 2>/dev/null && break; sleep 0.5; done
echo "   source serial: $(grep 'IC boot=' "$work/$src.serial.log" | tail -1)"

echo "== instaclone clone $src --name $clone --wait"
"$bin/instaclone" clone $src --name $clone --wait

clog=/var/lib/instaclone/clones/$clone/$clone.serial.log
sleep 3
echo "== source serial log, last lines (it kept running):"
grep 'IC boot=' "$work/$src.serial.log" | tail -3 | sed 's/^/   /'
echo "== clone serial log, first lines (same boot id, counter continues, no reboot):"
grep 'IC boot=' "$clog" | head -3 | sed 's/^/   /'
echo "== instaclone clones ls"
"$bin/instaclone" clones ls
echo "== instaclone events --tail 7 (each state change is an event; webhooks get the same)"
"$bin/instaclone" events --tail 7
virsh -c qemu:///system list
