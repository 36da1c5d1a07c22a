#!/usr/bin/env bash
# Install everything instaclone needs on a Debian 12 host, as root. Idempotent:
# a second run checks, finds everything in place and returns in a few seconds.
#
#   scripts/setup.sh            # packages, virtualenv (.venv), libvirt running
#
# Environment: INSTACLONE_VENV (default: <repo>/.venv).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${INSTACLONE_VENV:-$repo/.venv}
say() { printf 'setup: %s\n' "$*"; }

[ "$(id -u)" = 0 ] || { echo "setup: must run as root (installs packages, starts libvirtd)" >&2; exit 1; }

pkgs=(qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-clients libvirt-dev
      pkg-config busybox-static cpio kmod python3-venv python3 gcc libc6-dev
      systemd   # systemd-analyze verifies the units in the tests; nothing is started
      mmdebstrap e2fsprogs dosfstools mtools fdisk ovmf  # the Debian test guest (build-debian-guest.sh)
      openssh-client)  # ssh-keygen: clones' SSH host keys are made on the host
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
    pgrep -x libvirtd >/dev/null || { say "starting libvirtd"; libvirtd -d; }
    for _ in $(seq 1 50); do
        virsh -c qemu:///system version >/dev/null 2>&1 && break
        sleep 0.2
    done
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
        libvirtd -d
    fi
    for _ in $(seq 1 50); do virsh -c qemu:///system version >/dev/null 2>&1 && break; sleep 0.2; done
    virsh -c qemu:///system version >/dev/null || { echo "setup: libvirtd did not come back after installing the hook" >&2; exit 1; }
fi
say "libvirtd answers on qemu:///system"

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
    "$venv/bin/pip" install -q -e "$repo[test]" 2>&1 | grep -vE "^WARNING: Location|^$" || true
    "$venv/bin/python" -c "import instaclone, libvirt, aiohttp, structlog"
    echo "$want" > "$stamp"
else
    say "virtualenv up to date"
fi
say "done"
