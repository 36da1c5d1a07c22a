"""Guest identity reset after a clone runs, through the QEMU guest agent.

A clone made from memory is its source byte for byte: hostname, machine-id,
DHCP lease and address are the source's. While the clone's NICs are still
link-down, :func:`customize` sets the guest's clock, hostname and machine-id,
drops DHCP leases and hands over the caller's key/value data (readable in
the guest at ``/run/instaclone/config.json``); after the host brings the
links up, :func:`renew_network` re-reads the network and reports addresses.

The guest side is plain POSIX sh with fallbacks, so it works on a busybox
guest and on systemd distributions alike.
"""

from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET
from typing import Any

from .errors import InstacloneError
from .virt import Hypervisor

AGENT_CHANNEL = "org.qemu.guest_agent.0"
CONFIG_PATH = "/run/instaclone/config.json"

# $1: new hostname; stdin: the JSON config for CONFIG_PATH.
_IDENTITY = r"""
set -u
name=$1
hostname "$name" 2>/dev/null || echo "$name" > /proc/sys/kernel/hostname
echo "$name" > /etc/hostname 2>/dev/null
command -v hostnamectl >/dev/null 2>&1 && hostnamectl set-hostname "$name" >/dev/null 2>&1
rm -f /etc/machine-id
if command -v systemd-machine-id-setup >/dev/null 2>&1; then
    systemd-machine-id-setup >/dev/null 2>&1
else
    tr -d - < /proc/sys/kernel/random/uuid > /etc/machine-id
fi
mkdir -p /run/instaclone && cat > /run/instaclone/config.json.tmp && mv /run/instaclone/config.json.tmp /run/instaclone/config.json
for p in udhcpc dhclient; do killall "$p" >/dev/null 2>&1 || pkill -x "$p" >/dev/null 2>&1; done
rm -f /run/udhcpc.* /var/lib/dhcp/*.lease* /var/lib/dhclient/*.lease* /var/lib/NetworkManager/*.lease 2>/dev/null
for i in $(ls /sys/class/net); do
    [ "$i" = lo ] || ip -4 addr flush dev "$i" 2>/dev/null
done
echo "identity: $(hostname) $(cat /etc/machine-id)"
"""

# Re-read the network once the links are up.
_RENEW = r"""
for i in $(ls /sys/class/net); do
    [ "$i" = lo ] && continue
    ip link set "$i" up 2>/dev/null
    if command -v networkctl >/dev/null 2>&1 && networkctl status >/dev/null 2>&1; then
        networkctl reconfigure "$i" >/dev/null 2>&1
    elif command -v nmcli >/dev/null 2>&1; then
        nmcli device reapply "$i" >/dev/null 2>&1
    elif command -v dhclient >/dev/null 2>&1; then
        dhclient -1 "$i" >/dev/null 2>&1 &
    elif command -v udhcpc >/dev/null 2>&1; then
        udhcpc -i "$i" -n -q -t 5 -T 1 >/dev/null 2>&1 &
    fi
done
wait
echo renewed
"""


class CustomizationFailed(InstacloneError):
    code = "customization_failed"


def has_agent(xml: str) -> bool:
    root = ET.fromstring(xml)
    return any(t.get("name") == AGENT_CHANNEL for t in root.iterfind("./devices/channel/target"))


async def wait_agent(virt: Hypervisor, name: str, timeout_s: float) -> None:
    import asyncio

    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while True:
        try:
            await virt.agent(name, "guest-ping", timeout_s=2)
            return
        except InstacloneError as exc:
            if loop.time() > end:
                raise CustomizationFailed(f"guest agent of {name!r} did not answer within {timeout_s:g} s: "
                                          f"{exc.message}") from None
            await asyncio.sleep(0.2)


async def customize(virt: Hypervisor, name: str, *, hostname: str, config: dict[str, str],
                    timeout_s: float) -> dict[str, Any]:
    """Clock, hostname, machine-id, leases and config data; links must still be down."""
    await wait_agent(virt, name, timeout_s)
    await virt.agent(name, "guest-set-time", {"time": time.time_ns()})
    rc, out = await virt.agent_exec(name, ["/bin/sh", "-c", _IDENTITY, "sh", hostname],
                                    stdin=json.dumps(config, sort_keys=True).encode(), timeout_s=timeout_s)
    if rc != 0:
        raise CustomizationFailed(f"identity reset in {name!r} exited {rc}: {out.strip()[-400:]}")
    return {"hostname": hostname, "clock_set": True, "config_path": CONFIG_PATH if config else None}


async def renew_network(virt: Hypervisor, name: str, *, timeout_s: float) -> list[dict[str, Any]]:
    """Re-read the network after the links came up; returns the guest's interfaces."""
    rc, out = await virt.agent_exec(name, ["/bin/sh", "-c", _RENEW], timeout_s=timeout_s)
    if rc != 0:
        raise CustomizationFailed(f"network renewal in {name!r} exited {rc}: {out.strip()[-400:]}")
    ifaces = await virt.agent(name, "guest-network-get-interfaces") or []
    return [
        {"name": i.get("name"), "mac": i.get("hardware-address"),
         "addresses": [f"{a.get('ip-address')}/{a.get('prefix')}" for a in i.get("ip-addresses", [])]}
        for i in ifaces if i.get("name") != "lo"
    ]
