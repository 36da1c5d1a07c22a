"""The guest side of the identity reset: the shell scripts run through the guest agent, what they
are fed and what they report, and the SSH host keys made on the host for each clone.

The guest side is plain POSIX sh with fallbacks, so it works on a busybox guest and on systemd
distributions alike. It reports each item on a line ``IC-RESULT <item> <status> <detail>`` and
each public SSH host key on a line ``IC-PUB <key>``. :mod:`.customize` drives it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
import shutil
import tempfile
from pathlib import Path

from ..errors import CustomizationFailed

CONFIG_PATH = "/run/instaclone/config.json"
#: Bytes of host entropy credited to the guest kernel's input pool.
RNG_BYTES = 64
#: Size of systemd's random seed file (its default pool size).
SEED_BYTES = 512
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

# $1: new hostname, $2: 1 to keep SSH host keys, $3: seconds to move the
# clock by ("+1.234567890"; empty: not known). stdin, a line each: the
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
# When each step ended, on the guest's clock (a builtin read: no program run).
tick() { read -r up _ < /proc/uptime; echo "IC-T $1 $up"; }
tick begin
# The clock first, by the offset the host measured: relative, so this
# script's own start-up time does not count. (GNU date; busybox's has no
# relative -s: the host sets the clock itself when no result says so.)
if [ -n "${3:-}" ] && date -s "now $3 seconds" >/dev/null 2>&1; then
    r clock reset "moved by $3 s to the host's clock (its offset through guest-get-time); the RTC is not written"
fi
tick clock
read -r rng; read -r seed; read -r mid; read -r cfg
mkdir -p /run/instaclone
printf '%s\n' "$cfg" > /run/instaclone/config.json.tmp &&
    mv -f /run/instaclone/config.json.tmp /run/instaclone/config.json
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
                 case " $had " in
                     *" $t "*) [ "$keep_ssh" = 1 ] ||
                               { k=/etc/ssh/ssh_host_${t}_key; : > "$k"; how="$how $t(host)"; } ;;
                 esac ;;
        "PUB "*) [ -n "$k" ] && printf '%s\n' "${line#PUB }" > "$k.pub" ;;
        *) [ -n "$k" ] && printf '%s\n' "$line" >> "$k" ;;
    esac
done
tick ssh_keys_in

# machine-id: the host's random id, never derived from DMI (a clone's SMBIOS
# tables are its source's), also in dbus' copy when that is a file.
(umask 022; printf '%s\n' "$mid" > /etc/machine-id)
mid_detail="$mid"
if [ -f /var/lib/dbus/machine-id ] && [ ! -L /var/lib/dbus/machine-id ]; then
    printf '%s\n' "$mid" > /var/lib/dbus/machine-id && mid_detail="$mid_detail (also /var/lib/dbus/machine-id)"
fi
tick machine_id

# DHCP: leases dropped, clients restarted so that their client id and DUID
# follow the new machine-id (networkd derives them from it and keeps the old
# ones until restarted; NetworkManager keeps its DUID in lease files and
# secret_key; dhclient in its lease file's default-duid). journald writes
# under the new machine-id only once restarted. The restarts run meanwhile.
# The leases go before the clients are stopped: the guest may still be
# handling the new NIC's hot-plug, and a client that starts (ifupdown's
# dhclient) either starts before the stop and is stopped, or finds no old
# lease (and no old DUID) to read.
rm -f /run/udhcpc.* /var/lib/dhcp/*.lease* /var/lib/dhclient/*.lease* /run/systemd/netif/leases/* \
      /var/lib/NetworkManager/*.lease /var/lib/NetworkManager/secret_key 2>/dev/null
# By name (a busybox applet may run as "busybox"), and only when one may run
# (killall or pkill is a program: 100-400 ms under TCG): looked for now, after
# the leases went, so that one started since then has none to read.
clients=0
for c in /proc/[0-9]*/comm; do
    read -r n 2>/dev/null < "$c" && case $n in udhcpc|dhclient|busybox) clients=1; break ;; esac
done
if [ $clients = 1 ]; then
    if command -v killall >/dev/null 2>&1; then killall udhcpc dhclient >/dev/null 2>&1
    elif command -v pkill >/dev/null 2>&1; then pkill -x 'udhcpc|dhclient' >/dev/null 2>&1; fi
fi
for i in /sys/class/net/*; do
    i=${i#/sys/class/net/}
    [ "$i" = lo ] || ip -4 addr flush dev "$i" 2>/dev/null
done
dhcp="leases dropped" units=""
if [ $systemd = 1 ]; then
    if running systemd-network; then
        units="$units systemd-networkd.service"
        dhcp="$dhcp; systemd-networkd restarted (client id from the new machine-id)"
    fi
    if running NetworkManager; then
        units="$units NetworkManager.service"
        dhcp="$dhcp; NetworkManager restarted (new DUID and secret key)"
    fi
    if running systemd-journal; then
        units="$units systemd-journald.service"
        mid_detail="$mid_detail; journald restarted"
    fi
fi
rpid=""
if [ -n "$units" ]; then systemctl restart $units > /run/instaclone/restart.log 2>&1 & rpid=$!; fi
tick dhcp

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
tick kernel_rng

# Random seed files, so the next boot does not start from the source's.
seeds=""
for s in /var/lib/systemd/random-seed /var/lib/urandom/random-seed; do
    [ -f "$s" ] && printf "$seed" > "$s" && seeds="$seeds $s"
done
if [ -n "$seeds" ]; then r random_seed reset "replaced with host bytes:$seeds"
else r random_seed not_present "no random seed file"; fi
tick random_seed

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
tick hostname

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
tick ssh_host_keys

# VM generation ID: the host gave the clone a new one; only a guest kernel
# with a vmgenid driver reseeds from it.
gen=unsupported
for d in /sys/bus/acpi/drivers/vmgenid/*:*; do [ -e "$d" ] && gen=reset; done
if [ $gen = reset ]; then r vm_generation_id reset "new ID seen by the guest's vmgenid driver"
else r vm_generation_id unsupported "the guest kernel has no VMGENID driver"; fi
tick vm_generation_id

if [ -n "$rpid" ] && ! wait "$rpid"; then
    err=""; read -r err < /run/instaclone/restart.log
    r dhcp failed "systemctl restart$units: $err"
else
    r dhcp reset "$dhcp"
fi
tick restart_wait
r machine_id reset "$mid_detail"
echo "IC-DONE"
"""

# Re-read the network once the links are up. Shell builtins where they do
# (under TCG a program costs 100-400 ms): the interfaces from a glob, "up"
# from their flags (IFF_UP, 0x1), networkd or NetworkManager from the
# processes' names; one program per interface is left, the client's own.
RENEW = r"""
procs=" "
for c in /proc/[0-9]*/comm; do read -r n 2>/dev/null < "$c" && procs="$procs$n "; done
for i in /sys/class/net/*; do
    i=${i#/sys/class/net/}
    [ "$i" = lo ] && continue
    fl=0; read -r fl 2>/dev/null < "/sys/class/net/$i/flags"
    [ $((fl & 1)) = 1 ] || ip link set "$i" up 2>/dev/null
    case $procs in
        *" systemd-network "*) networkctl reconfigure "$i" >/dev/null 2>&1 ;;
        *" NetworkManager "*) nmcli device reapply "$i" >/dev/null 2>&1 ;;
        *) if command -v dhclient >/dev/null 2>&1; then dhclient -1 "$i" >/dev/null 2>&1 &
           elif command -v udhcpc >/dev/null 2>&1; then udhcpc -i "$i" -n -q -t 5 -T 1 >/dev/null 2>&1 &
           fi ;;
    esac
done
wait
echo renewed
"""

# The user's script arrives on stdin; $1..$3 become its environment.
SCRIPT_WRAPPER = ('export IC_CLONE_NAME="$1" IC_SOURCE="$2" IC_JOB_ID="$3"; '
                   'cd /; exec /bin/sh -s')


def identity_script() -> str:
    """The identity reset script (``sh -c``; ``$1`` hostname, ``$2`` 1 to keep SSH host keys, ``$3`` the clock's
    offset in seconds, signed, or empty)."""
    return _IDENTITY.replace('"$PERL_RESEED"', "'" + _PERL_RESEED.strip() + "'")


def identity_stdin(machine_id: str, config: dict[str, str], host_keys: dict[str, tuple[bytes, bytes]]) -> bytes:
    """What the identity script reads on stdin: fresh host entropy, ``machine_id``, ``config``, the keys."""
    return b"\n".join([
        printf_octal(secrets.token_bytes(RNG_BYTES)),
        printf_octal(secrets.token_bytes(SEED_BYTES)),
        machine_id.encode(),
        json.dumps(config, sort_keys=True).encode(),
        *(b"KEY %s\n%s\nPUB %s" % (t.encode(), priv.strip(), pub.strip())
          for t, (priv, pub) in sorted(host_keys.items())),
        b"END-KEYS",
    ]) + b"\n"


def printf_octal(data: bytes) -> bytes:
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


def parse_marks(out: str) -> dict[str, float]:
    """Milliseconds each step of the identity script took in the guest, from its ``IC-T`` lines.

    The guest's uptime has a resolution of 10 ms; the first line only starts the clock.
    """
    out_ms: dict[str, float] = {}
    last: float | None = None
    for line in out.splitlines():
        parts = line.split()
        if len(parts) != 3 or parts[0] != "IC-T":
            continue
        try:
            at = float(parts[2])
        except ValueError:
            continue
        if last is not None:
            out_ms[parts[1]] = round(out_ms.get(parts[1], 0.0) + (at - last) * 1000.0, 1)
        last = at
    return out_ms


def parse_results(out: str) -> tuple[dict[str, dict[str, str]], list[str]]:
    """The identity script's report: item -> {status, detail}, and the new keys' fingerprints."""
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


#: SSH host key types made on the host for each clone (a guest keeps the types it had).
SSH_KEY_TYPES = ("rsa", "ecdsa", "ed25519")


async def make_host_keys(comment: str,
                         types: tuple[str, ...] = SSH_KEY_TYPES) -> dict[str, tuple[bytes, bytes]] | None:
    """Fresh SSH host key pairs of ``types``, made on the host: type -> (private key, public key).

    The host's generator is not the clone's (which is its source's until
    reseeded) and is fast: under TCG a guest takes 10-40 s for one RSA key.
    The keys exist on the host only in a private temporary directory, removed
    before this returns. None if the host has no ``ssh-keygen``.
    """
    tmp = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="instaclone-keys-"))
    procs: list[asyncio.subprocess.Process] = []
    try:
        try:
            for t in types:
                procs.append(await asyncio.create_subprocess_exec(
                    "ssh-keygen", "-q", "-t", t, "-N", "", "-C", comment, "-f", str(tmp / t),
                    stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.PIPE))
        except FileNotFoundError:
            return None
        out: dict[str, tuple[bytes, bytes]] = {}
        for t, proc in zip(types, procs, strict=True):
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
