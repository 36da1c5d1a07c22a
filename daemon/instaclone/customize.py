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
import hashlib
import json
import secrets
import shutil
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from .errors import InstacloneError, InvalidRequest
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

# $1: new hostname, $2: 1 to keep SSH host keys. stdin, a line each: the
# RNG bytes and the seed bytes as printf octal escapes, the new machine-id,
# the JSON config; then the host-made SSH host keys ("KEY <type>", the
# private key's lines, "PUB <public key line>") up to "END-KEYS".
#
# Under TCG every program started in the guest costs 100-400 ms, so this
# uses shell builtins wherever it can (printf, read, case, globs): about six
# programs in all on a Debian guest, and the service restarts run while the
# rest goes on.
_IDENTITY = r"""
set -u
name=$1 keep_ssh=$2
umask 077
r() { echo "IC-RESULT $1 $2 $3"; }
read -r rng; read -r seed; read -r mid; read -r cfg
mkdir -p /run/instaclone
printf '%s\n' "$cfg" > /run/instaclone/config.json.tmp && mv -f /run/instaclone/config.json.tmp /run/instaclone/config.json
systemd=0; [ -d /run/systemd/system ] && systemd=1
procs=" "
for c in /proc/[0-9]*/comm; do read -r n 2>/dev/null < "$c" && procs="$procs$n "; done
running() { case $procs in *" $1 "*) return 0 ;; esac; return 1; }

# SSH host keys made on the host go over the guest's own keys of the same
# type (in place: their modes stay); a type the host did not make is made
# here below, once the generator is reseeded.
had="" how="" k=""
for f in /etc/ssh/ssh_host_*_key; do [ -f "$f" ] && { t=${f#/etc/ssh/ssh_host_}; had="$had ${t%_key}"; }; done
while IFS= read -r line; do
    case $line in
        END-KEYS) break ;;
        "KEY "*) t=${line#KEY }; k=""
                 case " $had " in *" $t "*) [ "$keep_ssh" = 1 ] || { k=/etc/ssh/ssh_host_${t}_key; : > "$k"; how="$how $t(host)"; } ;; esac ;;
        "PUB "*) [ -n "$k" ] && printf '%s\n' "${line#PUB }" > "$k.pub" ;;
        *) [ -n "$k" ] && printf '%s\n' "$line" >> "$k" ;;
    esac
done

# machine-id: the host's random id, never derived from DMI (a clone's SMBIOS
# tables are its source's), also in dbus' copy when that is a file.
(umask 022; printf '%s\n' "$mid" > /etc/machine-id)
mid_detail="$mid"
if [ -f /var/lib/dbus/machine-id ] && [ ! -L /var/lib/dbus/machine-id ]; then
    printf '%s\n' "$mid" > /var/lib/dbus/machine-id && mid_detail="$mid_detail (also /var/lib/dbus/machine-id)"
fi

# DHCP: leases dropped, clients restarted so that their client id and DUID
# follow the new machine-id (networkd derives them from it and keeps the old
# ones until restarted; NetworkManager keeps its DUID in lease files and
# secret_key; dhclient in its lease file's default-duid). journald writes
# under the new machine-id only once restarted. The restarts run meanwhile.
# (by name, not by the comm scan: busybox applets can run as "busybox")
if command -v killall >/dev/null 2>&1; then killall udhcpc dhclient >/dev/null 2>&1
elif command -v pkill >/dev/null 2>&1; then pkill -x 'udhcpc|dhclient' >/dev/null 2>&1; fi
rm -f /run/udhcpc.* /var/lib/dhcp/*.lease* /var/lib/dhclient/*.lease* /run/systemd/netif/leases/* \
      /var/lib/NetworkManager/*.lease /var/lib/NetworkManager/secret_key 2>/dev/null
for i in /sys/class/net/*; do
    i=${i#/sys/class/net/}
    [ "$i" = lo ] || ip -4 addr flush dev "$i" 2>/dev/null
done
dhcp="leases dropped" units=""
if [ $systemd = 1 ]; then
    running systemd-network && { units="$units systemd-networkd.service"; dhcp="$dhcp; systemd-networkd restarted (client id from the new machine-id)"; }
    running NetworkManager && { units="$units NetworkManager.service"; dhcp="$dhcp; NetworkManager restarted (new DUID and secret key)"; }
    running systemd-journal && { units="$units systemd-journald.service"; mid_detail="$mid_detail; journald restarted"; }
fi
rpid=""
if [ -n "$units" ]; then systemctl restart $units > /run/instaclone/restart.log 2>&1 & rpid=$!; fi

# The kernel's random generator, before any secret is made in here.
f=/run/instaclone/.rng
printf "$rng" > "$f"
if command -v perl >/dev/null 2>&1 && err=$(perl -e "$PERL_RESEED" "$f" 2>&1); then
    r kernel_rng reset "64 host bytes credited, crng reseeded"
elif printf "$rng" > /dev/urandom; then
    r kernel_rng partial "host bytes mixed into /dev/urandom; no forced reseed (${err:-no perl in the guest})"
else
    r kernel_rng failed "cannot write /dev/urandom"
fi
: > "$f"

# Random seed files, so the next boot does not start from the source's.
seeds=""
for s in /var/lib/systemd/random-seed /var/lib/urandom/random-seed; do
    [ -f "$s" ] && printf "$seed" > "$s" && seeds="$seeds $s"
done
if [ -n "$seeds" ]; then r random_seed reset "replaced with host bytes:$seeds"
else r random_seed not_present "no random seed file"; fi

# Hostname, also on /etc/hosts' 127.0.1.1 line (hostname -f reads it), its
# domain kept. /etc/hostname is the name systemd sets at boot.
read -r old < /proc/sys/kernel/hostname
printf '%s\n' "$name" > /proc/sys/kernel/hostname
(umask 022; printf '%s\n' "$name" > /etc/hostname)
r hostname reset "$name"
line127="127.0.1.1	$name" hosts="" seen=0
if [ -f /etc/hosts ]; then
    while IFS= read -r line || [ -n "$line" ]; do
        case $line in
            127.0.1.1[[:space:]]*)
                [ $seen = 1 ] && continue
                set -f; set -- $line; set +f
                case ${2:-} in "$old".*) line127="127.0.1.1	$name${2#"$old"}	$name" ;; esac
                line=$line127 seen=1 ;;
        esac
        hosts="$hosts$line
"
    done < /etc/hosts
fi
[ $seen = 1 ] || hosts="$hosts$line127
"
(umask 022; printf '%s' "$hosts" > /etc/hosts)
r hosts reset "$line127"

# SSH host keys, continued: report, or make what the host did not.
if [ -z "$had" ]; then
    r ssh_host_keys not_present "no /etc/ssh/ssh_host_*_key"
elif [ "$keep_ssh" = 1 ]; then
    r ssh_host_keys kept "kept on request (the source's keys)"
else
    for t in $had; do
        case "$how " in *" $t(host) "*) continue ;; esac
        k=/etc/ssh/ssh_host_${t}_key
        rm -f "$k" "$k.pub"
        ssh-keygen -q -t "$t" -N '' -C "root@$name" -f "$k" </dev/null >/dev/null 2>&1 && how="$how $t(guest)"
    done
    case "$how" in
        *"("*) r ssh_host_keys reset "regenerated:$how" ;;
        *) r ssh_host_keys failed "no host-made keys and no ssh-keygen in the guest" ;;
    esac
fi
for p in /etc/ssh/ssh_host_*_key.pub; do
    [ -f "$p" ] && { IFS= read -r pub < "$p"; echo "IC-PUB $pub"; }
done

# VM generation ID: the host gave the clone a new one; only a guest kernel
# with a vmgenid driver reseeds from it.
gen=unsupported
for d in /sys/bus/acpi/drivers/vmgenid/*:*; do [ -e "$d" ] && gen=reset; done
if [ $gen = reset ]; then r vm_generation_id reset "new ID seen by the guest's vmgenid driver"
else r vm_generation_id unsupported "the guest kernel has no VMGENID driver"; fi

if [ -n "$rpid" ] && ! wait "$rpid"; then
    err=""; read -r err < /run/instaclone/restart.log
    r dhcp failed "systemctl restart$units: $err"
else
    r dhcp reset "$dhcp"
fi
r machine_id reset "$mid_detail"
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


def _printf_octal(data: bytes) -> bytes:
    """``data`` as a printf format of octal escapes only (no ``%``, no shell quoting issue)."""
    return "".join(f"\\{b:03o}" for b in data).encode()


def ssh_fingerprint(pub_line: str) -> str | None:
    """``ssh-keygen -l``'s line for an OpenSSH public key line: ``BITS SHA256:... COMMENT (TYPE)``.

    None if the line is not a public key.
    """
    parts = pub_line.split(None, 2)
    if len(parts) < 2:
        return None
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except ValueError:
        return None
    fields: list[bytes] = []
    pos = 0
    while pos + 4 <= len(blob):
        n = int.from_bytes(blob[pos:pos + 4], "big")
        fields.append(blob[pos + 4:pos + 4 + n])
        pos += 4 + n
    if not fields:
        return None
    kind = fields[0].decode(errors="replace")
    if kind == "ssh-rsa" and len(fields) >= 3:
        bits, name = int.from_bytes(fields[2], "big").bit_length(), "RSA"
    elif kind.startswith("ecdsa-sha2-nistp"):
        bits, name = int(kind.rsplit("nistp", 1)[1]), "ECDSA"
    elif kind == "ssh-ed25519":
        bits, name = 256, "ED25519"
    elif kind == "ssh-dss" and len(fields) >= 2:
        bits, name = int.from_bytes(fields[1], "big").bit_length(), "DSA"
    else:
        return None
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    comment = parts[2].strip() if len(parts) > 2 else "no comment"
    return f"{bits} SHA256:{digest} {comment} ({name})"


def _parse(out: str) -> tuple[dict[str, dict[str, str]], list[str]]:
    items: dict[str, dict[str, str]] = {}
    fingerprints: list[str] = []
    for line in out.splitlines():
        if line.startswith("IC-RESULT "):
            parts = line.split(" ", 3)
            if len(parts) >= 3:
                items[parts[1]] = {"status": parts[2], "detail": parts[3] if len(parts) > 3 else ""}
        elif line.startswith("IC-PUB "):
            fp = ssh_fingerprint(line[7:])
            if fp:
                fingerprints.append(fp)
    return items, fingerprints


async def customize(virt: Hypervisor, name: str, *, hostname: str, config: dict[str, str],
                    timeout_s: float, keep_ssh_host_keys: bool = False,
                    host_keys: dict[str, tuple[bytes, bytes]] | None = None,
                    macs: list[str] | None = None) -> dict[str, Any]:
    """Make the clone's identity its own; its links must still be down.

    Returns what was reset: ``reset`` maps each item (clock, kernel_rng,
    random_seed, hostname, hosts, machine_id, ssh_host_keys, dhcp,
    vm_generation_id) to ``{"status", "detail"}`` with status one of
    ``reset``, ``partial``, ``kept``, ``not_present``, ``unsupported`` or
    ``failed``; ``ssh_host_key_fingerprints`` the new keys' ``ssh-keygen -l``
    lines, computed from the public keys the guest holds afterwards.

    With ``macs`` (the replugged NICs) it first waits until the guest has
    them all: a hot-plugged NIC appears in the guest a while after the plug.
    ``host_keys`` (from :func:`make_host_keys`) replace the guest's SSH host
    keys of the same types; a type without one is made in the guest.
    Raises CustomizationFailed if the agent does not answer, a NIC does not
    appear or the reset script fails.
    """
    await wait_agent(virt, name, timeout_s)
    await virt.agent(name, "guest-set-time", {"time": time.time_ns()})
    if macs:
        await wait_nics(virt, name, macs, timeout_s=timeout_s)
    machine_id = secrets.token_hex(16)
    keys = host_keys or {}
    stdin = b"\n".join([
        _printf_octal(secrets.token_bytes(RNG_BYTES)),
        _printf_octal(secrets.token_bytes(SEED_BYTES)),
        machine_id.encode(),
        json.dumps(config, sort_keys=True).encode(),
        *(b"KEY %s\n%s\nPUB %s" % (t.encode(), priv.strip(), pub.strip()) for t, (priv, pub) in sorted(keys.items())),
        b"END-KEYS",
    ]) + b"\n"
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


#: SSH host key types made on the host for each clone (a guest keeps the types it had).
SSH_KEY_TYPES = ("rsa", "ecdsa", "ed25519")


async def make_host_keys(comment: str) -> dict[str, tuple[bytes, bytes]] | None:
    """Fresh SSH host key pairs, made on the host: type -> (private key, public key).

    The host's generator is not the clone's (which is its source's until
    reseeded) and is fast: under TCG a guest takes 10-40 s for one RSA key.
    The keys exist on the host only in a private temporary directory, removed
    before this returns. None if the host has no ``ssh-keygen``.
    """
    tmp = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="instaclone-keys-"))
    procs: list[asyncio.subprocess.Process] = []
    try:
        try:
            for t in SSH_KEY_TYPES:
                procs.append(await asyncio.create_subprocess_exec(
                    "ssh-keygen", "-q", "-t", t, "-N", "", "-C", comment, "-f", str(tmp / t),
                    stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.PIPE))
        except FileNotFoundError:
            return None
        out: dict[str, tuple[bytes, bytes]] = {}
        for t, proc in zip(SSH_KEY_TYPES, procs):
            _, err = await proc.communicate()
            if proc.returncode != 0:
                raise CustomizationFailed(f"ssh-keygen -t {t} on the host failed: {err.decode(errors='replace')}")
            out[t] = ((tmp / t).read_bytes(), (tmp / f"{t}.pub").read_bytes())
        return out
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        await asyncio.to_thread(shutil.rmtree, tmp, True)


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


async def ipv4_interfaces(virt: Hypervisor, name: str, *, timeout_s: int = 3,
                          attempts: int = 2) -> list[str] | None:
    """Names of the guest's interfaces that have IPv4 now; None if its agent does not answer."""
    for attempt in range(attempts):
        try:
            ifaces = await virt.agent(name, "guest-network-get-interfaces", timeout_s=timeout_s) or []
        except InstacloneError:
            if attempt + 1 < attempts:
                await asyncio.sleep(0.2)
            continue
        return sorted(n for n, addrs in _ipv4(ifaces).items() if addrs)
    return None


async def wait_nics(virt: Hypervisor, name: str, macs: list[str], *, timeout_s: float) -> None:
    """Wait until the guest lists a NIC with each of ``macs``; CustomizationFailed if not in time."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    want = {m.lower() for m in macs}
    delay = 0.05
    while True:
        ifaces = await virt.agent(name, "guest-network-get-interfaces") or []
        missing = want - {str(i.get("hardware-address", "")).lower() for i in ifaces}
        if not missing:
            return
        if loop.time() > end:
            raise CustomizationFailed(f"the guest of {name!r} does not show its new NIC(s) "
                                      f"{', '.join(sorted(missing))} within {timeout_s:g} s of the hot-plug")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.5)


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
