#!/usr/bin/env bash
# Start libvirtd by hand, on a host where systemd does not run (setup.sh and
# the tests that restart it use this), and wait until it answers.
#
# libvirt daemonizes each QEMU it starts, so a QEMU that exits is reaped by
# the nearest "child subreaper" above it, or by PID 1. systemd reaps at once.
# A container's or sandbox's PID 1 may not: on these machines it reaped an
# exited QEMU about 1.6 s late, and libvirt's destroy waits until the process
# is reaped (virsh destroy of a running guest: 1.5-1.9 s, 0.28 s under a
# reaper). So libvirtd runs in the foreground under `tini -s` (a subreaper
# that reaps as soon as a child exits), detached from this shell; its log
# goes to /var/log/libvirt/libvirtd-stderr.log. Without tini it falls back
# to `libvirtd -d`.
#
#   scripts/start-libvirtd.sh
set -euo pipefail
if pgrep -x libvirtd >/dev/null; then
    echo "start-libvirtd: libvirtd is running already" >&2
elif command -v tini >/dev/null; then
    mkdir -p /var/log/libvirt
    setsid tini -s -- libvirtd </dev/null >>/var/log/libvirt/libvirtd-stderr.log 2>&1 &
else
    libvirtd -d
fi
for _ in $(seq 1 100); do
    virsh -c qemu:///system version >/dev/null 2>&1 && exit 0
    sleep 0.2
done
echo "start-libvirtd: libvirtd does not answer on qemu:///system" >&2
exit 1
