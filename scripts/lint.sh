#!/usr/bin/env bash
# Static checks, part of the test command (scripts/test.sh runs this before
# pytest): mypy --strict, ruff and the import contracts (layers), all configured
# in pyproject.toml, and the documentation site (mkdocs.yml) built with
# --strict, so a broken link or anchor fails. Runs every check, prints a check's output only when it
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
docs_site() {  # the site goes to a temporary directory, never site/ in the repository
    # check() runs this in a subshell ($(...)), so the trap (and docs_tmp, not local:
    # the trap runs after the function returned) remove the directory on any exit.
    docs_tmp=$(mktemp -d) || return 1
    trap 'rm -rf "$docs_tmp"' EXIT
    # Not --quiet: it also silences the warnings that --strict counts (mkdocs 1.6), so nothing would fail.
    "$bin/mkdocs" build --strict --config-file mkdocs.yml --site-dir "$docs_tmp/site"
}
check docs docs_site
if [ ${#failed[@]} -gt 0 ]; then
    printf 'lint: failed: %s\n' "${failed[*]}" >&2
    exit 1
fi
