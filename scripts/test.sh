#!/usr/bin/env bash
# Run instaclone's test suite from a fresh machine: set up (packages, libvirtd,
# virtualenv), static checks (scripts/lint.sh: mypy --strict, ruff, import
# contracts), build the test guests, then pytest (unit + real-VM integration).
#
#   scripts/test.sh [pytest args...]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
"$repo/scripts/setup.sh"
# Before the guest builds and pytest: a failed check fails the run in seconds.
"$repo/scripts/lint.sh"
if [ -x "$repo/scripts/build-guest.sh" ]; then
    "$repo/scripts/build-guest.sh"
fi
if [ -x "$repo/scripts/build-debian-guest.sh" ]; then
    "$repo/scripts/build-debian-guest.sh"
fi
cd "$repo"
exec "${INSTACLONE_VENV:-$repo/.venv}/bin/pytest" -ra "$@"
