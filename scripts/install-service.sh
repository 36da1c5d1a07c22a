#!/usr/bin/env bash
# Install instacloned as a systemd service on a Debian host (run as root):
#   - the Debian packages it needs (libvirt, QEMU, qemu-img, a compiler for libvirt-python);
#   - a virtualenv in $PREFIX (default /opt/instaclone) with instaclone installed;
#   - /etc/instaclone/instaclone.toml (the documented example) unless one exists;
#   - the system group "instaclone" (members may drive the daemon);
#   - the libvirt hook the filecow memory backend needs;
#   - systemd/instacloned.{service,socket}, enabled and started.
#
#   scripts/install-service.sh [--no-packages] [--no-start]
#
# Environment (for packaging and tests): PREFIX, CONFIG_DIR, UNIT_DIR, HOOK_DIR, BIN_DIR.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=${PREFIX:-/opt/instaclone}
CONFIG_DIR=${CONFIG_DIR:-/etc/instaclone}
UNIT_DIR=${UNIT_DIR:-/etc/systemd/system}
HOOK_DIR=${HOOK_DIR:-/etc/libvirt/hooks/qemu.d}
BIN_DIR=${BIN_DIR:-/usr/local/bin}
packages=1 start=1
for arg in "$@"; do
    case $arg in
        --no-packages) packages=0 ;;
        --no-start) start=0 ;;
        *) echo "usage: $0 [--no-packages] [--no-start]" >&2; exit 2 ;;
    esac
done
say() { echo "install-service: $*"; }

if [ "$packages" = 1 ]; then
    say "installing Debian packages"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q libvirt-daemon-system qemu-system-x86 qemu-utils \
        python3 python3-venv python3-dev libvirt-dev pkg-config gcc openssh-client >/dev/null
fi

getent group instaclone >/dev/null || { say "creating group instaclone"; groupadd --system instaclone; }

say "virtualenv $PREFIX/.venv"
[ -x "$PREFIX/.venv/bin/python" ] || python3 -m venv "$PREFIX/.venv"
"$PREFIX/.venv/bin/pip" install -q --upgrade "$repo[daemon]"
mkdir -p "$BIN_DIR"
ln -sf "$PREFIX/.venv/bin/instaclone" "$BIN_DIR/instaclone"
ln -sf "$PREFIX/.venv/bin/instacloned" "$BIN_DIR/instacloned"

if [ ! -e "$CONFIG_DIR/instaclone.toml" ]; then
    say "config $CONFIG_DIR/instaclone.toml (every key at its default)"
    install -D -m 0644 "$repo/config/instaclone.toml" "$CONFIG_DIR/instaclone.toml"
fi
"$PREFIX/.venv/bin/instacloned" --check-config --config "$CONFIG_DIR/instaclone.toml"

say "libvirt hook $HOOK_DIR/instaclone"
install -D -m 0755 "$repo/plugins/instaclone_plugins/libvirt_hook.py" "$HOOK_DIR/instaclone"

say "units in $UNIT_DIR"
mkdir -p "$UNIT_DIR"
sed "s|/opt/instaclone|$PREFIX|g; s|/etc/instaclone/instaclone.toml|$CONFIG_DIR/instaclone.toml|g" \
    "$repo/systemd/instacloned.service" > "$UNIT_DIR/instacloned.service"
install -m 0644 "$repo/systemd/instacloned.socket" "$UNIT_DIR/instacloned.socket"

if [ "$start" = 0 ]; then
    say "installed; not started (--no-start)"
    exit 0
fi
if [ ! -d /run/systemd/system ]; then
    say "systemd is not running on this machine: start the daemon by hand with"
    say "  $PREFIX/.venv/bin/instacloned --config $CONFIG_DIR/instaclone.toml"
    exit 0
fi
# libvirtd reads hooks when it starts; running domains are not affected.
systemctl try-restart libvirtd.service virtqemud.service 2>/dev/null || true
systemctl daemon-reload
systemctl enable --now instacloned.socket instacloned.service
say "running: systemctl status instacloned; instaclone status"
