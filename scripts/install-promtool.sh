#!/usr/bin/env bash
# Install promtool (tests check config/prometheus/*.yml with it), as root.
# Debian's "prometheus" package ships it; installing that package would also
# start a Prometheus server, so only the binary is taken out of the .deb.
#
#   scripts/install-promtool.sh [DEST]      (default /usr/local/bin/promtool)
#
# Does nothing when promtool is on PATH or DEST exists.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-/usr/local/bin/promtool}
APT_SAY=install-promtool
# shellcheck source=lib/apt.sh
. "$repo/scripts/lib/apt.sh"
if command -v promtool >/dev/null || [ -x "$dest" ]; then
    exit 0
fi
[ "$(id -u)" = 0 ] || { echo "install-promtool: must run as root (apt-get download)" >&2; exit 1; }
tmp=$(mktemp -d /tmp/instaclone-promtool.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
chmod 0755 "$tmp"
# apt drops root to _apt for downloads; let it write here (else it warns).
id _apt >/dev/null 2>&1 && chown _apt "$tmp"
apt_ensure_lists prometheus
(cd "$tmp" && apt_retry apt-get download -qq prometheus)
dpkg-deb --fsys-tarfile "$tmp"/prometheus_*.deb | tar -x -C "$tmp" ./usr/bin/promtool
install -D -m 0755 "$tmp/usr/bin/promtool" "$dest"
echo "install-promtool: $("$dest" --version 2>&1 | head -n 1) in $dest"
