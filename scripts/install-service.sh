#!/usr/bin/env bash
# Install instacloned as a systemd service on a Debian host (run as root):
#   - the Debian packages it needs (libvirt, QEMU, qemu-img, a compiler for libvirt-python):
#     on Debian 12 QEMU 10.0 and libvirt 11.3 from bookworm-backports, or with
#     INSTACLONE_PLATFORM=stock its own QEMU 7.2 and libvirt 9.0, as scripts/setup.sh
#     (docs/operations/platforms.md);
#   - a virtualenv in $PREFIX (default /opt/instaclone) with instaclone installed;
#   - /etc/instaclone/instaclone.toml (the documented example, 0640 root:instaclone) unless one
#     exists (an existing one loses any permission for others);
#   - the system group "instaclone" (members may drive the daemon);
#   - the libvirt hook the filecow memory backend needs;
#   - the man page instacloned(8), the README and the docs/ pages it links to (the units' Documentation=);
#   - systemd/instacloned.{service,socket}, enabled and started.
#
#   scripts/install-service.sh [--no-packages] [--no-start]
#
# Run again (after a git pull, say) it updates in place: the daemon is
# restarted only if its installed code or units changed (running jobs get
# daemon.shutdown_grace_s, then roll back), libvirtd only if the hook changed.
#
# Environment (for packaging and tests): PREFIX, CONFIG_DIR, UNIT_DIR, HOOK_DIR,
# BIN_DIR, MAN_DIR, DOC_DIR; SYSTEMD_RUN_DIR (default /run/systemd/system: the
# directory whose presence says systemd runs this machine).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=${PREFIX:-/opt/instaclone}
CONFIG_DIR=${CONFIG_DIR:-/etc/instaclone}
UNIT_DIR=${UNIT_DIR:-/etc/systemd/system}
HOOK_DIR=${HOOK_DIR:-/etc/libvirt/hooks/qemu.d}
BIN_DIR=${BIN_DIR:-/usr/local/bin}
MAN_DIR=${MAN_DIR:-/usr/local/share/man/man8}
DOC_DIR=${DOC_DIR:-/usr/share/doc/instaclone}
SYSTEMD_RUN_DIR=${SYSTEMD_RUN_DIR:-/run/systemd/system}
packages=1 start=1
for arg in "$@"; do
    case $arg in
        --no-packages) packages=0 ;;
        --no-start) start=0 ;;
        *) echo "usage: $0 [--no-packages] [--no-start]" >&2; exit 2 ;;
    esac
done
say() { echo "install-service: $*"; }
APT_SAY=install-service
# shellcheck source=lib/apt.sh
. "$repo/scripts/lib/apt.sh"
# shellcheck source=lib/platform.sh
. "$repo/scripts/lib/platform.sh"

if [ "$packages" = 1 ]; then
    platform_choose || exit 1
    say "platform: $PLATFORM_TEXT"
    refusal=$(platform_refusal)
    [ -z "$refusal" ] || { echo "$refusal" >&2; exit 1; }
    platform_install -q -- python3 python3-venv python3-dev pkg-config gcc openssh-client procps
fi

getent group instaclone >/dev/null || { say "creating group instaclone"; groupadd --system instaclone; }

# What the running daemon was started from: its installed Python files and
# entry points, and its units. A change to any of them means a restart.
installed_state() {
    {
        find "$PREFIX/.venv/lib" \( -path '*/site-packages/instaclone*' -name '*.py' \) \
            -o \( -path '*/site-packages/instaclone-*.dist-info/entry_points.txt' \) 2>/dev/null \
            | LC_ALL=C sort | xargs -r sha256sum
        sha256sum "$UNIT_DIR/instacloned.service" "$UNIT_DIR/instacloned.socket" 2>/dev/null || true
    } | sha256sum | cut -d' ' -f1
}
before=$(installed_state)

say "virtualenv $PREFIX/.venv"
[ -x "$PREFIX/.venv/bin/python" ] || python3 -m venv "$PREFIX/.venv"
"$PREFIX/.venv/bin/pip" install -q --upgrade "$repo[daemon]"
# libvirt-python is generated from the installed libvirt's API: built again,
# never from pip's cache, whenever that libvirt's version changes (as setup.sh).
want_libvirt=$(pkg-config --modversion libvirt)
if [ "$(cat "$PREFIX/.venv/.instaclone-libvirt" 2>/dev/null)" != "$want_libvirt" ]; then
    say "building libvirt-python against libvirt $want_libvirt"
    "$PREFIX/.venv/bin/pip" install -q --force-reinstall --no-deps --no-cache-dir --no-binary libvirt-python \
        libvirt-python
    echo "$want_libvirt" > "$PREFIX/.venv/.instaclone-libvirt"
fi
mkdir -p "$BIN_DIR"
ln -sf "$PREFIX/.venv/bin/instaclone" "$BIN_DIR/instaclone"
ln -sf "$PREFIX/.venv/bin/instacloned" "$BIN_DIR/instacloned"

# The config may hold webhook secrets: root's, readable by the instaclone
# group (who drive the daemon), by nobody else.
if [ ! -e "$CONFIG_DIR/instaclone.toml" ]; then
    say "config $CONFIG_DIR/instaclone.toml (every key at its default), 0640 root:instaclone"
    install -D -m 0640 -o root -g instaclone "$repo/config/instaclone.toml" "$CONFIG_DIR/instaclone.toml"
elif [ -n "$(find "$CONFIG_DIR/instaclone.toml" -maxdepth 0 -perm /o=rwx)" ]; then
    say "config $CONFIG_DIR/instaclone.toml was open to every user: no longer (chmod o-rwx)"
    chmod o-rwx "$CONFIG_DIR/instaclone.toml"
fi
"$PREFIX/.venv/bin/instacloned" --check-config --config "$CONFIG_DIR/instaclone.toml"

hook_changed=0
if cmp -s "$repo/plugins/instaclone_plugins/libvirt_hook.py" "$HOOK_DIR/instaclone"; then
    say "libvirt hook $HOOK_DIR/instaclone unchanged"
else
    say "libvirt hook $HOOK_DIR/instaclone"
    install -D -m 0755 "$repo/plugins/instaclone_plugins/libvirt_hook.py" "$HOOK_DIR/instaclone"
    hook_changed=1
fi

say "man page $MAN_DIR/instacloned.8, README and docs/ in $DOC_DIR"
install -D -m 0644 "$repo/docs/man/instacloned.8" "$MAN_DIR/instacloned.8"
install -D -m 0644 "$repo/README.md" "$DOC_DIR/README.md"
# The README links into docs/: the pages go beside it, so the links resolve there too.
(cd "$repo" && find docs -name '*.md' -exec install -D -m 0644 {} "$DOC_DIR/{}" \;)

say "units in $UNIT_DIR"
mkdir -p "$UNIT_DIR"
sed "s|/opt/instaclone|$PREFIX|g; s|/etc/instaclone/instaclone.toml|$CONFIG_DIR/instaclone.toml|g" \
    "$repo/systemd/instacloned.service" > "$UNIT_DIR/instacloned.service.new"
mv -f "$UNIT_DIR/instacloned.service.new" "$UNIT_DIR/instacloned.service"
install -m 0644 "$repo/systemd/instacloned.socket" "$UNIT_DIR/instacloned.socket"
changed=0
[ "$(installed_state)" = "$before" ] || changed=1

if [ "$start" = 0 ]; then
    say "installed; not started (--no-start)"
    exit 0
fi
if [ ! -d "$SYSTEMD_RUN_DIR" ]; then
    say "systemd is not running on this machine: start the daemon by hand with"
    say "  $PREFIX/.venv/bin/instacloned --config $CONFIG_DIR/instaclone.toml"
    exit 0
fi
# libvirtd finds hooks when it starts (running domains are not affected by a
# restart): only a new or changed hook needs one, or a libvirt upgrade whose
# package could not restart it (policy-rc.d).
stale=$(platform_stale_daemon libvirtd)
if [ "$hook_changed" = 1 ] || [ -n "$stale" ]; then
    for unit in libvirtd.service virtqemud.service; do
        if systemctl is-active -q "$unit"; then
            say "restarting $unit (${stale:-the hook changed})"
            systemctl restart "$unit"
        fi
    done
else
    say "libvirtd not restarted (hook unchanged)"
fi
systemctl daemon-reload
systemctl enable -q instacloned.socket instacloned.service
if systemctl is-active -q instacloned.service; then
    if [ "$changed" = 1 ]; then
        say "restarting instacloned (its code or units changed)"
        systemctl restart instacloned.service
    else
        say "instacloned left running (code and units unchanged)"
    fi
else
    say "starting instacloned"
    systemctl start instacloned.socket instacloned.service
fi
say "running: systemctl status instacloned; instaclone status"
