#!/usr/bin/env bash
# Install everything instaclone needs on a Debian 12 host, as root. Idempotent:
# a second run checks, finds everything in place and returns in a few seconds.
#
#   scripts/setup.sh            # packages, virtualenv (.venv), libvirt running
#
# Environment: INSTACLONE_VENV (default: <repo>/.venv);
#   INSTACLONE_RAM_FS=tmpfs (default) | hugetlbfs | disk: what to mount on
#   libvirt's memory_backing_dir (see "Where guest RAM lives" below);
#   INSTACLONE_HUGEPAGES=N: with hugetlbfs, reserve N 2 MiB pages first.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${INSTACLONE_VENV:-$repo/.venv}
say() { printf 'setup: %s\n' "$*"; }

[ "$(id -u)" = 0 ] || { echo "setup: must run as root (installs packages, starts libvirtd)" >&2; exit 1; }

pkgs=(qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-clients libvirt-dev
      pkg-config busybox-static cpio kmod python3-venv python3 gcc libc6-dev
      systemd   # systemd-analyze verifies the units in the tests; nothing is started
      mmdebstrap e2fsprogs dosfstools mtools fdisk ovmf  # the Debian test guest (build-debian-guest.sh)
      openssh-client  # ssh-keygen: clones' SSH host keys are made on the host
      tini  # reaps libvirt's QEMU processes at once where no systemd runs (start-libvirtd.sh)
      zsh)  # the CLI's zsh completion is tried in a real zsh (tests/ops/test_cli_pty.py)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    say "packages present"
fi
# promtool checks config/prometheus/instaclone-alerts.yml in the tests (only
# the binary, out of Debian's prometheus package: no Prometheus server).
if ! command -v promtool >/dev/null; then
    say "installing promtool"
    "$repo/scripts/install-promtool.sh" || say "WARNING: promtool could not be installed:" \
        "tests/ops/test_ops_kit.py tries again, and skips the promtool checks if it still cannot" >&2
fi

# libvirt runs QEMU as libvirt-qemu; the Debian package creates the user, but a
# half-installed host may lack it.
if ! id libvirt-qemu >/dev/null 2>&1; then
    say "creating user libvirt-qemu"
    getent group kvm >/dev/null || groupadd --system kvm
    useradd --system --no-create-home --gid kvm --shell /usr/sbin/nologin libvirt-qemu
fi

# udev normally makes /dev/kvm 0660 root:kvm. Where no udev ran, it can be
# root-only; libvirt then finds "KVM was enabled when probing, but it is not
# available now" on every call and re-probes QEMU each time (a domain define
# took 52 s here instead of 30 ms).
if [ -c /dev/kvm ] && [ "$(stat -c %G /dev/kvm)" != kvm ]; then
    say "giving /dev/kvm to group kvm, mode 0660 (as udev would)"
    chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
fi

# Start virtlogd and libvirtd: through systemd when it runs, by hand otherwise.
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    systemctl start virtlogd.socket libvirtd.socket libvirtd.service >/dev/null 2>&1 || true
fi
if ! virsh -c qemu:///system version >/dev/null 2>&1; then
    pgrep -x virtlogd >/dev/null || { say "starting virtlogd"; virtlogd -d; }
    pgrep -x libvirtd >/dev/null || { say "starting libvirtd"; "$repo/scripts/start-libvirtd.sh"; }
fi
virsh -c qemu:///system version >/dev/null || { echo "setup: libvirtd does not answer on qemu:///system" >&2; exit 1; }

# The filecow memory backend's libvirt hook (see the script's docstring).
# libvirtd finds hook scripts when it starts, so a new or changed hook means
# a restart (running domains are not affected: libvirtd reconnects to them).
hook=/etc/libvirt/hooks/qemu.d/instaclone
if ! cmp -s "$repo/plugins/instaclone_plugins/libvirt_hook.py" "$hook"; then
    say "installing libvirt hook $hook"
    install -D -m 0755 "$repo/plugins/instaclone_plugins/libvirt_hook.py" "$hook"
    if [ -d /run/systemd/system ] && systemctl is-active -q libvirtd.service 2>/dev/null; then
        systemctl restart libvirtd.service
    else
        pkill -x libvirtd || true
        for _ in $(seq 1 50); do pgrep -x libvirtd >/dev/null || break; sleep 0.1; done
        "$repo/scripts/start-libvirtd.sh"
    fi
    for _ in $(seq 1 50); do virsh -c qemu:///system version >/dev/null 2>&1 && break; sleep 0.2; done
    virsh -c qemu:///system version >/dev/null || { echo "setup: libvirtd did not come back after installing the hook" >&2; exit 1; }
fi
say "libvirtd answers on qemu:///system"

# Where guest RAM lives. libvirt puts each file-backed guest's RAM in
# <memory_backing_dir>/<id>-<name>/pc.ram and the filecow backend its frozen
# images in <memory_backing_dir>/instaclone/ (the hook hard-links between the
# two, so both must be on one filesystem: the mount covers both). On a disk
# filesystem (Debian's default /var/lib/libvirt/qemu/ram is on /) every page a
# guest dirties is written back to the disk, and the sparse copy of the RAM
# made during a stun competes with that writeback: the stun grows with the
# guest's RAM in use and the host's disk load. A tmpfs keeps it all in memory
# (size=100% is a limit, not a reservation). Mounting over the directory hides
# the files of domains using it, so it is done only while no domain is active
# (running or paused: a frozen source is paused and its RAM is in there) and
# the directory holds no file. Not permanent: docs/operations/guest-ram.md has an fstab line
# or a systemd mount unit. `instaclone check SRC` reports it (ram_filesystem).
ram_fs=${INSTACLONE_RAM_FS:-tmpfs}
case $ram_fs in tmpfs|hugetlbfs|disk) ;; *)
    echo "setup: INSTACLONE_RAM_FS must be tmpfs, hugetlbfs or disk, not '$ram_fs'" >&2; exit 1 ;; esac
ramdir=$(sed -nE "s/^[[:space:]]*memory_backing_dir[[:space:]]*=[[:space:]]*[\"']([^\"']*)[\"'].*/\1/p" \
         /etc/libvirt/qemu.conf 2>/dev/null | tail -n 1)
ramdir=${ramdir:-/var/lib/libvirt/qemu/ram}
mkdir -p "$ramdir"
fsname() { case $1 in 1021994) echo tmpfs ;; 958458f6) echo hugetlbfs ;; ef53) echo ext4 ;;
           58465342) echo xfs ;; 9123683e) echo btrfs ;; 794c7630) echo overlay ;; *) echo "f_type 0x$1" ;; esac; }
magic=$(stat -f -c %t "$ramdir")
if [ "$ram_fs" = disk ]; then
    say "memory_backing_dir $ramdir left on $(fsname "$magic") (INSTACLONE_RAM_FS=disk)"
elif [ "$(fsname "$magic")" = "$ram_fs" ]; then
    say "memory_backing_dir $ramdir is on $ram_fs already"
elif [ "$magic" = 1021994 ] || [ "$magic" = 958458f6 ]; then
    say "WARNING: memory_backing_dir $ramdir is on $(fsname "$magic"), not $ram_fs: left as it is" >&2
elif mountpoint -q "$ramdir"; then
    say "WARNING: memory_backing_dir $ramdir is a $(fsname "$magic") mount of its own: left as it is" >&2
else
    active=$(virsh -c qemu:///system list --name | sed '/^$/d')
    files=$(find "$ramdir" -mindepth 1 -not -type d -print -quit)
    if [ -n "$active" ] || [ -n "$files" ]; then
        say "WARNING: memory_backing_dir $ramdir is on $(fsname "$magic") (a disk: RAM copies compete with" \
            "writeback), but a $ram_fs mounted now would hide" \
            "${active:+the RAM files of the active domains $(echo $active)}${files:+${active:+ and }files such as $files};" \
            "not mounted:" \
            "run setup.sh again when no domain is running" >&2
    else
        owner="uid=$(stat -c %u "$ramdir"),gid=$(stat -c %g "$ramdir")"
        if [ "$ram_fs" = hugetlbfs ]; then
            if [ -n "${INSTACLONE_HUGEPAGES:-}" ]; then
                echo "$INSTACLONE_HUGEPAGES" > /proc/sys/vm/nr_hugepages
                say "reserved $(cat /proc/sys/vm/nr_hugepages) huge pages of 2 MiB (asked: $INSTACLONE_HUGEPAGES)"
            fi
            [ "$(cat /proc/sys/vm/nr_hugepages)" -gt 0 ] || say "WARNING: no huge pages reserved" \
                "(/proc/sys/vm/nr_hugepages is 0): no guest with file-backed RAM can start" >&2
            mount -t hugetlbfs -o "pagesize=2M,mode=0755,$owner" hugetlbfs "$ramdir"
        else
            mount -t tmpfs -o "size=100%,mode=0755,$owner" tmpfs "$ramdir"
        fi
        say "mounted a $ram_fs on memory_backing_dir $ramdir (was on $(fsname "$magic"))"
    fi
fi

# The project's virtualenv. libvirt-python compiles against libvirt-dev.
if [ ! -x "$venv/bin/python" ]; then
    say "creating virtualenv $venv"
    python3 -m venv "$venv"
fi
# The stamp holds the hash of the pyproject.toml installed from: any change to
# it (a new test dependency, say) reinstalls, whatever the files' times are.
stamp="$venv/.instaclone-installed"
want=$(sha256sum "$repo/pyproject.toml" | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    say "installing instaclone (editable) and test dependencies into $venv"
    "$venv/bin/pip" install -q --upgrade pip >/dev/null
    "$venv/bin/pip" install -q -e "$repo[daemon,test]" 2>&1 | grep -vE "^WARNING: Location|^$" || true
    "$venv/bin/python" -c "import instaclone, libvirt, aiohttp, structlog"
    echo "$want" > "$stamp"
else
    say "virtualenv up to date"
fi
say "done"
