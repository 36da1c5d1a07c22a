#!/usr/bin/env bash
# Install everything instaclone needs on a Debian 12 host, as root. Idempotent:
# a second run checks, finds everything in place and returns in a few seconds.
#
#   scripts/setup.sh            # packages, virtualenv (.venv), libvirt running
#
# The platform (docs/operations/platforms.md): on Debian 12, QEMU 10.0 and
# libvirt 11.3 from bookworm-backports (the bookworm-backports apt source is
# added if no source names it), and beside them Debian 12's own QEMU 7.2,
# unpacked into /opt/instaclone/qemu-7.2 for the tests; on Debian 13 the
# distribution's own QEMU and libvirt (the same versions).
#
# Environment: INSTACLONE_VENV (default: <repo>/.venv);
#   INSTACLONE_PLATFORM=stock: on Debian 12, its own QEMU 7.2 and libvirt 9.0
#   instead (refused, with the command that goes back, where the backports
#   are installed already); INSTACLONE_DEBIAN_MIRROR: the URI of the backports
#   source setup adds (default http://deb.debian.org/debian);
#   INSTACLONE_RAM_FS=tmpfs (default) | hugetlbfs | disk: what to mount on
#   libvirt's memory_backing_dir (see "Where guest RAM lives" below);
#   INSTACLONE_HUGEPAGES=N: with hugetlbfs, reserve N 2 MiB pages first.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${INSTACLONE_VENV:-$repo/.venv}
qemu72_dir=/opt/instaclone/qemu-7.2
say() { printf 'setup: %s\n' "$*"; }
APT_SAY=setup
# shellcheck source=lib/apt.sh
. "$repo/scripts/lib/apt.sh"
# shellcheck source=lib/platform.sh
. "$repo/scripts/lib/platform.sh"

platform_choose || exit 1
[ "$(id -u)" = 0 ] || { echo "setup: must run as root (installs packages, starts libvirtd)" >&2; exit 1; }
say "platform: $PLATFORM_TEXT"
refusal=$(platform_refusal)
[ -z "$refusal" ] || { echo "$refusal" >&2; exit 1; }

pkgs=(pkg-config busybox-static cpio kmod python3-venv python3 python3-dev gcc libc6-dev  # python3-dev: libvirt-python builds
      procps   # pgrep: which daemons run (a minimal Debian has none)
      systemd   # systemd-analyze verifies the units in the tests; nothing is started
      mmdebstrap e2fsprogs dosfstools mtools fdisk ovmf  # the Debian test guest (build-debian-guest.sh)
      openssh-client  # ssh-keygen: clones' SSH host keys are made on the host
      tini  # reaps libvirt's QEMU processes at once where no systemd runs (start-libvirtd.sh)
      zsh)  # the CLI's zsh completion is tried in a real zsh (tests/ops/test_cli_pty.py)
platform_install -qq --no-install-recommends -- "${pkgs[@]}"
say "QEMU $(dpkg-query -W -f='${Version}' qemu-system-x86), libvirt $(dpkg-query -W -f='${Version}' libvirt0)"
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

# Restart libvirtd (running domains are not affected: libvirtd reconnects to
# them), through systemd when it runs it, and wait until it answers.
restart_libvirtd() {
    say "restarting libvirtd: $1"
    if [ -d /run/systemd/system ] && systemctl is-active -q libvirtd.service 2>/dev/null; then
        systemctl restart libvirtd.service
    else
        local pid
        pid=$(pgrep -o -x libvirtd || true)
        if [ -n "$pid" ]; then
            kill "$pid"
            for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
        "$repo/scripts/start-libvirtd.sh"
    fi
    for _ in $(seq 1 50); do virsh -c qemu:///system version >/dev/null 2>&1 && break; sleep 0.2; done
    virsh -c qemu:///system version >/dev/null || { echo "setup: libvirtd did not come back ($1)" >&2; exit 1; }
}

# Start virtlogd and libvirtd: through systemd when it runs, by hand otherwise.
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    systemctl start virtlogd.socket libvirtd.socket libvirtd.service >/dev/null 2>&1 || true
fi
if ! virsh -c qemu:///system version >/dev/null 2>&1; then
    pgrep -x virtlogd >/dev/null || { say "starting virtlogd"; virtlogd -d; }
    pgrep -x libvirtd >/dev/null || { say "starting libvirtd"; "$repo/scripts/start-libvirtd.sh"; }
fi
virsh -c qemu:///system version >/dev/null || { echo "setup: libvirtd does not answer on qemu:///system" >&2; exit 1; }

# A package upgrade replaces the programs under the running daemons, and
# restarts them only where policy-rc.d allows it (not in containers, nor on
# these machines). virtlogd holds the running guests' log pipes: SIGUSR1 makes
# it re-execute its (new) program keeping them, as "systemctl reload" does.
why=$(platform_stale_daemon virtlogd)
if [ -n "$why" ]; then
    say "re-executing virtlogd: $why"
    if [ -d /run/systemd/system ] && systemctl is-active -q virtlogd.service 2>/dev/null; then
        systemctl reload virtlogd.service
    else
        kill -USR1 "$(pgrep -o -x virtlogd)"
    fi
fi
why=$(platform_stale_daemon libvirtd)
[ -z "$why" ] || restart_libvirtd "$why"

# The filecow memory backend's libvirt hook (see the script's docstring).
# libvirtd finds hook scripts when it starts, so a new or changed hook means
# a restart.
hook=/etc/libvirt/hooks/qemu.d/instaclone
if ! cmp -s "$repo/plugins/instaclone_plugins/libvirt_hook.py" "$hook"; then
    say "installing libvirt hook $hook"
    install -D -m 0755 "$repo/plugins/instaclone_plugins/libvirt_hook.py" "$hook"
    restart_libvirtd "it finds hooks when it starts"
fi
say "libvirtd $(virsh -c qemu:///system version --daemon | sed -n 's/^Running against daemon: //p') answers on qemu:///system"

# QEMU 7.2 beside the platform's QEMU: Debian 12's own qemu-system-x86,
# -common and -data unpacked into $qemu72_dir, with a wrapper
# $qemu72_dir/qemu-system-x86_64 that a domain names as its <emulator>. The
# tests boot guests on it to prove what instaclone does on QEMU 7.2
# (tests/integration/test_platforms.py); nothing else uses it. On the stock
# platform the system's QEMU is 7.2 itself.
if [ "$PLATFORM" = backports ]; then
    if platform_qemu72 "$qemu72_dir"; then
        say "QEMU 7.2 beside it: $PLATFORM_QEMU72"
    else
        say "WARNING: QEMU 7.2 beside it: $PLATFORM_QEMU72 (the tests of QEMU 7.2 skip)" >&2
    fi
fi

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
# The stamp holds the hash of the pyproject.toml installed from (any change to
# it, a new test dependency say, reinstalls, whatever the files' times are)
# and the libvirt version libvirt-python was built against: the binding is
# generated from the installed libvirt's API description, and one built for
# another libvirt lacks its calls or does not load. pip would reuse a wheel it
# built before, for the old libvirt: the rebuild bypasses its cache.
stamp="$venv/.instaclone-installed"
want_project=$(sha256sum "$repo/pyproject.toml" | cut -d' ' -f1)
want_libvirt=$(pkg-config --modversion libvirt)
have_project=$(sed -n 's/^pyproject=//p' "$stamp" 2>/dev/null || true)
have_libvirt=$(sed -n 's/^libvirt=//p' "$stamp" 2>/dev/null || true)
if [ "$have_project" != "$want_project" ]; then
    say "installing instaclone (editable) and test dependencies into $venv"
    "$venv/bin/pip" install -q --upgrade pip >/dev/null
    "$venv/bin/pip" install -q -e "$repo[daemon,test]" 2>&1 | grep -vE "^WARNING: Location|^$" || true
fi
if [ "$have_libvirt" != "$want_libvirt" ]; then
    say "building libvirt-python against libvirt $want_libvirt${have_libvirt:+ (was built for $have_libvirt)}"
    "$venv/bin/pip" install -q --force-reinstall --no-deps --no-cache-dir --no-binary libvirt-python libvirt-python \
        2>&1 | { grep -vE "^WARNING: Location|^$" || true; }
fi
if [ "$have_project" != "$want_project" ] || [ "$have_libvirt" != "$want_libvirt" ]; then
    "$venv/bin/python" -c "import instaclone, libvirt, aiohttp, structlog"
    printf 'pyproject=%s\nlibvirt=%s\n' "$want_project" "$want_libvirt" > "$stamp"
else
    say "virtualenv up to date (libvirt-python built for libvirt $want_libvirt)"
fi
say "done"
