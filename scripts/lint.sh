#!/usr/bin/env bash
# Static checks, part of the test command (scripts/test.sh runs this before
# pytest): mypy --strict, ruff and the import contracts (layers), all configured
# in pyproject.toml. Runs every check, prints a check's output only when it
# fails, and exits non-zero if any failed. Needs the virtualenv (setup.sh).
#
#   scripts/lint.sh
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
bin=${INSTACLONE_VENV:-$repo/.venv}/bin
cd "$repo"

failed=()
check() {  # check NAME COMMAND...
    local name=$1 out
    shift
    if out=$("$@" 2>&1); then
        printf 'lint: %s ok\n' "$name"
    else
        printf 'lint: %s FAILED\n%s\n' "$name" "$out"
        failed+=("$name")
    fi
}
check mypy "$bin/mypy"
check ruff "$bin/ruff" check --quiet --output-format concise .
# The cache would be a directory in the repository; the graph takes a second.
check imports "$bin/lint-imports" --no-logo --no-cache
if [ ${#failed[@]} -gt 0 ]; then
    printf 'lint: failed: %s\n' "${failed[*]}" >&2
    exit 1
fi
