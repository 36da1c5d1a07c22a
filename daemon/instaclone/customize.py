"""Guest identity reset after a clone runs, through the QEMU guest agent.

A clone made from memory is its source byte for byte: hostname, machine-id,
SSH host keys, the kernel's random state, DHCP client id and address are the
source's. While the clone's NICs are still link-down, :func:`customize`
makes each of them the clone's own and hands over the caller's key/value data
(``/run/instaclone/config.json``); after the host brings the links up,
:func:`renew_network` re-reads the network and waits for IPv4 where the
source had it; :func:`run_script` runs the user's own customization script.

Every secret is made *after* the guest's kernel random generator has been
given fresh host entropy and forced to reseed: until then a clone's RNG is
its source's (and its siblings'), and keys made from it could repeat. The
machine-id and the random seed file come from the host's generator.

The guest side is plain POSIX sh with fallbacks, so it works on a busybox
guest and on systemd distributions alike. It reports each item on a line
``IC-RESULT <item> <status> <detail>``; the job result carries them per clone.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
import xml.etree.ElementTree as ET
from typing import Any

from .errors import InstacloneError
from .virt import Hypervisor

AGENT_CHANNEL = "org.qemu.guest_agent.0"
CONFIG_PATH = "/run/instaclone/config.json"
#: Bytes of host entropy credited to the guest kernel's input pool.
RNG_BYTES = 64
#: Size of systemd's random seed file (its default pool size).
SEED_BYTES = 512
#: Largest user customization script accepted.
MAX_SCRIPT_BYTES = 64 * 1024
#: Output of a user script kept in the job result.
SCRIPT_TAIL_CHARS = 2000

# Credit the bytes in $1 to the kernel's input pool (RNDADDENTROPY, with full
# credit: they come from the host's CSPRNG) and force the crng to reseed
# (RNDRESEEDCRNG) now rather than on its own schedule (up to a minute later).
_PERL_RESEED = r"""
open(my $f, "<", $ARGV[0]) or die "open: $!"; binmode $f; local $/; my $d = <$f>;
open(my $u, ">", "/dev/urandom") or die "urandom: $!";
ioctl($u, 0x40085203, pack("i i", length($d) * 8, length($d)) . $d) or die "RNDADDENTROPY: $!\n";
ioctl($u, 0x5207, 0) or die "RNDRESEEDCRNG: $!\n";
"""

# $1: new hostname, $2: 1 to keep SSH host keys. stdin: base64 RNG bytes,
# base64 seed bytes, the new machine-id, then the JSON config (one line each
# but the last).
_IDENTITY = r"""
set -u
name=$1 keep_ssh=$2
umask 077
r() { echo "IC-RESULT $1 $2 $3"; }
systemd=0; [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1 && systemd=1
mkdir -p /run/instaclone
read -r rng_b64; read -r seed_b64; read -r mid
cat > /run/instaclone/config.json.tmp && mv /run/instaclone/config.json.tmp /run/instaclone/config.json

# 1. The kernel's random generator: first, so every secret below is new.
f=/run/instaclone/.rng
echo "$rng_b64" | base64 -d > "$f" 2>/dev/null
if command -v perl >/dev/null 2>&1 && err=$(perl -e "$PERL_RESEED" "$f" 2>&1); then
    r kernel_rng reset "$(wc -c < "$f" | tr -d ' ') host bytes credited, crng reseeded"
elif cat "$f" > /dev/urandom 2>/dev/null; then
    r kernel_rng partial "host bytes mixed into /dev/urandom; no forced reseed (${err:-no perl in the guest})"
else
    r kernel_rng failed "cannot write /dev/urandom"
fi
rm -f "$f"

# 2. Random seed files, so the next boot does not start from the source's.
seeds=""
for s in /var/lib/systemd/random-seed /var/lib/urandom/random-seed; do
    [ -f "$s" ] || continue
    echo "$seed_b64" | base64 -d > "$s.ic" && mv -f "$s.ic" "$s" && seeds="$seeds $s"
done
if [ -n "$seeds" ]; then r random_seed reset "replaced with host bytes:$seeds"
else r random_seed not_present "no random seed file"; fi

# 3. Hostname, also on /etc/hosts' 127.0.1.1 line (hostname -f reads it).
old=$(hostname 2>/dev/null || cat /proc/sys/kernel/hostname)
hostname "$name" 2>/dev/null || echo "$name" > /proc/sys/kernel/hostname
echo "$name" > /etc/hostname 2>/dev/null
[ $systemd = 1 ] && command -v hostnamectl >/dev/null 2>&1 && hostnamectl set-hostname "$name" >/dev/null 2>&1
r hostname reset "$name"
if [ -f /etc/hosts ]; then
    awk -v n="$name" -v o="$old" '
        /^127\.0\.1\.1[ \t]/ { if (!done) { d = ""; if (index($2, o ".") == 1) d = substr($2, length(o) + 1);
                                            if (d != "") print "127.0.1.1\t" n d "\t" n; else print "127.0.1.1\t" n;
                                            done = 1 }
                               next }
        { print }
        END { if (!done) print "127.0.1.1\t" n }' /etc/hosts > /etc/hosts.ic && cat /etc/hosts.ic > /etc/hosts
    rm -f /etc/hosts.ic
    r hosts reset "127.0.1.1 $name"
else
    printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n' "$name" > /etc/hosts && chmod 644 /etc/hosts
    r hosts reset "created with 127.0.1.1 $name"
fi

# 4. machine-id: the host's random id, never derived from DMI (a clone's
# SMBIOS tables are its source's). journald writes under the new id only
# once restarted.
printf '%s\n' "$mid" > /etc/machine-id && chmod 444 /etc/machine-id
detail="$mid"
if [ -f /var/lib/dbus/machine-id ] && [ ! -L /var/lib/dbus/machine-id ]; then
    printf '%s\n' "$mid" > /var/lib/dbus/machine-id && detail="$detail (also /var/lib/dbus/machine-id)"
fi
if [ $systemd = 1 ] && systemctl is-active -q systemd-journald 2>/dev/null; then
    systemctl restart systemd-journald >/dev/null 2>&1 && detail="$detail; journald restarted"
fi
r machine_id reset "$detail"

# 5. SSH host keys, made from the reseeded generator.
keys=$(ls /etc/ssh/ssh_host_*_key 2>/dev/null)
if [ -z "$keys" ]; then
    r ssh_host_keys not_present "no /etc/ssh/ssh_host_*_key"
elif [ "$keep_ssh" = 1 ]; then
    r ssh_host_keys kept "kept on request (the source's keys)"
elif ! command -v ssh-keygen >/dev/null 2>&1; then
    r ssh_host_keys failed "no ssh-keygen in the guest"
else
    types=""
    for k in $keys; do t=${k#/etc/ssh/ssh_host_}; types="$types ${t%_key}"; done
    rm -f /etc/ssh/ssh_host_*_key /etc/ssh/ssh_host_*_key.pub
    for t in $types; do ssh-keygen -q -t "$t" -N '' -C "root@$name" -f "/etc/ssh/ssh_host_${t}_key" </dev/null & done
    wait
    if [ $systemd = 1 ]; then
        for u in ssh sshd; do systemctl try-reload-or-restart "$u.service" >/dev/null 2>&1; done
    fi
    r ssh_host_keys reset "regenerated:$types"
fi
for p in /etc/ssh/ssh_host_*_key.pub; do
    [ -f "$p" ] && echo "IC-FP $(ssh-keygen -lf "$p" 2>/dev/null)"
done

# 6. DHCP: leases dropped, clients restarted so that their client id and
# DUID follow the new machine-id (networkd derives them from it and keeps
# the old ones until restarted; NetworkManager keeps its DUID in lease files
# and secret_key; dhclient in its lease file's default-duid).
for p in udhcpc dhclient; do killall "$p" >/dev/null 2>&1 || pkill -x "$p" >/dev/null 2>&1; done
rm -f /run/udhcpc.* /var/lib/dhcp/*.lease* /var/lib/dhclient/*.lease* 2>/dev/null
for i in $(ls /sys/class/net); do
    [ "$i" = lo ] || ip -4 addr flush dev "$i" 2>/dev/null
done
dhcp="leases dropped"
if [ $systemd = 1 ] && systemctl is-active -q systemd-networkd 2>/dev/null; then
    rm -f /run/systemd/netif/leases/* 2>/dev/null
    systemctl restart systemd-networkd >/dev/null 2>&1 && dhcp="$dhcp; systemd-networkd restarted (client id from the new machine-id)"
fi
if [ $systemd = 1 ] && systemctl is-active -q NetworkManager 2>/dev/null; then
    rm -f /var/lib/NetworkManager/*.lease /var/lib/NetworkManager/secret_key 2>/dev/null
    systemctl restart NetworkManager >/dev/null 2>&1 && dhcp="$dhcp; NetworkManager restarted (new DUID and secret key)"
fi
r dhcp reset "$dhcp"

# 7. VM generation ID: the host gave the clone a new one; only a guest
# kernel with a vmgenid driver reseeds from it.
if ls /sys/bus/acpi/drivers/vmgenid 2>/dev/null | grep -q :; then
    r vm_generation_id reset "new ID seen by the guest's vmgenid driver"
else
    r vm_generation_id unsupported "the guest kernel has no VMGENID driver"
fi
echo "IC-DONE"
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

# The user's script arrives on stdin; $1..$3 become its environment.
_SCRIPT_WRAPPER = ('export IC_CLONE_NAME="$1" IC_SOURCE="$2" IC_JOB_ID="$3"; '
                   'cd /; exec /bin/sh -s')


class CustomizationFailed(InstacloneError):
    code = "customization_failed"


def has_agent(xml: str) -> bool:
    root = ET.fromstring(xml)
    return any(t.get("name") == AGENT_CHANNEL for t in root.iterfind("./devices/channel/target"))


async def wait_agent(virt: Hypervisor, name: str, timeout_s: float) -> None:
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


def _parse(out: str) -> tuple[dict[str, dict[str, str]], list[str]]:
    items: dict[str, dict[str, str]] = {}
    fingerprints: list[str] = []
    for line in out.splitlines():
        if line.startswith("IC-RESULT "):
            parts = line.split(" ", 3)
            if len(parts) >= 3:
                items[parts[1]] = {"status": parts[2], "detail": parts[3] if len(parts) > 3 else ""}
        elif line.startswith("IC-FP ") and line[6:].strip():
            fingerprints.append(line[6:].strip())
    return items, fingerprints


async def customize(virt: Hypervisor, name: str, *, hostname: str, config: dict[str, str],
                    timeout_s: float, keep_ssh_host_keys: bool = False) -> dict[str, Any]:
    """Make the clone's identity its own; its links must still be down.

    Returns what was reset: ``reset`` maps each item (clock, kernel_rng,
    random_seed, hostname, hosts, machine_id, ssh_host_keys, dhcp,
    vm_generation_id) to ``{"status", "detail"}`` with status one of
    ``reset``, ``partial``, ``kept``, ``not_present``, ``unsupported`` or
    ``failed``; ``ssh_host_key_fingerprints`` the new keys' ``ssh-keygen -l``
    lines. Raises CustomizationFailed if the agent does not answer or the
    reset script fails.
    """
    await wait_agent(virt, name, timeout_s)
    await virt.agent(name, "guest-set-time", {"time": time.time_ns()})
    machine_id = secrets.token_hex(16)
    stdin = b"\n".join([
        base64.b64encode(secrets.token_bytes(RNG_BYTES)),
        base64.b64encode(secrets.token_bytes(SEED_BYTES)),
        machine_id.encode(),
        json.dumps(config, sort_keys=True).encode(),
    ])
    script = _IDENTITY.replace('"$PERL_RESEED"', "'" + _PERL_RESEED.strip() + "'")
    rc, out = await virt.agent_exec(
        name, ["/bin/sh", "-c", script, "sh", hostname, "1" if keep_ssh_host_keys else "0"],
        stdin=stdin, timeout_s=timeout_s)
    if rc != 0 or "IC-DONE" not in out:
        raise CustomizationFailed(f"identity reset in {name!r} exited {rc}: {out.strip()[-400:]}")
    items, fingerprints = _parse(out)
    items = {"clock": {"status": "reset", "detail": "set from the host (guest-set-time)"}, **items}
    return {
        "customized": True,
        "hostname": hostname,
        "machine_id": machine_id,
        "clock_set": True,
        "config_path": CONFIG_PATH if config else None,
        "reset": items,
        "ssh_host_key_fingerprints": fingerprints,
    }


def _ipv4(ifaces: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Interface name -> its IPv4 addresses (link-local and loopback left out)."""
    out: dict[str, list[str]] = {}
    for i in ifaces:
        if i.get("name") == "lo":
            continue
        addrs = [f"{a.get('ip-address')}/{a.get('prefix')}" for a in i.get("ip-addresses", [])
                 if a.get("ip-address-type") == "ipv4" and not str(a.get("ip-address", "")).startswith(("169.254.", "127."))]
        out[str(i.get("name"))] = addrs
    return out


async def ipv4_interfaces(virt: Hypervisor, name: str, *, timeout_s: int = 3) -> list[str] | None:
    """Names of the guest's interfaces that have IPv4 now; None if its agent does not answer."""
    try:
        ifaces = await virt.agent(name, "guest-network-get-interfaces", timeout_s=timeout_s) or []
    except InstacloneError:
        return None
    return sorted(n for n, addrs in _ipv4(ifaces).items() if addrs)


async def renew_network(virt: Hypervisor, name: str, *, timeout_s: float,
                        want_ipv4: list[str] | None = None) -> list[dict[str, Any]]:
    """Re-read the network after the links came up; returns the guest's interfaces.

    With ``want_ipv4`` (the interfaces that had IPv4 in the source), waits
    until each of them has IPv4 again, within ``timeout_s``; raises
    CustomizationFailed if one does not.
    """
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    rc, out = await virt.agent_exec(name, ["/bin/sh", "-c", _RENEW], timeout_s=timeout_s)
    if rc != 0:
        raise CustomizationFailed(f"network renewal in {name!r} exited {rc}: {out.strip()[-400:]}")
    delay = 0.1
    while True:
        ifaces = await virt.agent(name, "guest-network-get-interfaces") or []
        v4 = _ipv4(ifaces)
        missing = sorted(n for n in (want_ipv4 or []) if not v4.get(n))
        if not missing:
            break
        if loop.time() > end:
            raise CustomizationFailed(
                f"{name!r} has no IPv4 address on {', '.join(missing)} within {timeout_s:g} s "
                "(the source had one there)")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)
    return [
        {"name": i.get("name"), "mac": i.get("hardware-address"),
         "addresses": [f"{a.get('ip-address')}/{a.get('prefix')}" for a in i.get("ip-addresses", [])],
         "ipv4": v4.get(str(i.get("name")), [])}
        for i in ifaces if i.get("name") != "lo"
    ]


def validate_script(script: object) -> str | None:
    """A user customization script: a non-empty string of at most MAX_SCRIPT_BYTES."""
    from .errors import InvalidRequest

    if script is None:
        return None
    if not isinstance(script, str) or not script.strip():
        raise InvalidRequest("script must be a non-empty string (a shell script run in each clone)")
    if len(script.encode()) > MAX_SCRIPT_BYTES:
        raise InvalidRequest(f"script is larger than {MAX_SCRIPT_BYTES} bytes")
    if "\x00" in script:
        raise InvalidRequest("script must not contain NUL bytes")
    return script


async def run_script(virt: Hypervisor, name: str, script: str, *, source: str, job_id: str,
                     timeout_s: float) -> dict[str, Any]:
    """Run the user's customization script in the clone (``/bin/sh -s``, after the reset).

    The script sees ``IC_CLONE_NAME``, ``IC_SOURCE`` and ``IC_JOB_ID``.
    Returns its exit status and output tail; raises CustomizationFailed if it
    exits non-zero or does not finish within ``timeout_s``.
    """
    try:
        rc, out = await virt.agent_exec(name, ["/bin/sh", "-c", _SCRIPT_WRAPPER, "sh", name, source, job_id],
                                        stdin=script.encode(), timeout_s=timeout_s)
    except InstacloneError as exc:
        raise CustomizationFailed(f"customization script in {name!r}: {exc.message}") from None
    tail = out[-SCRIPT_TAIL_CHARS:]
    if rc != 0:
        raise CustomizationFailed(f"customization script in {name!r} exited {rc}: {tail.strip()[-400:]}")
    return {"exit_status": rc, "output_tail": tail}


async def set_clock(virt: Hypervisor, name: str, *, timeout_s: float = 10.0) -> dict[str, Any]:
    """Set ``name``'s clock from the host's through its agent; never raises.

    For a source that was paused (frozen, or stunned for long): its clock
    stood still meanwhile and stays behind unless set.
    """
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    last = ""
    while True:
        try:
            await virt.agent(name, "guest-set-time", {"time": time.time_ns()}, timeout_s=3)
            return {"set": True}
        except InstacloneError as exc:
            last = exc.message
        if loop.time() > end:
            return {"set": False, "reason": f"guest agent did not set the time within {timeout_s:g} s: {last}"}
        await asyncio.sleep(0.3)
