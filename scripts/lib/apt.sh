# Sourced by the scripts that install or download Debian packages (bash).
#
# A host whose package lists are empty or stale fails in ways that do not say
# "run apt-get update": `apt-get download busybox-static` on a host that has
# it installed but no lists ends in "Can't find a source to download version
# ... of 'busybox-static:amd64'" (the version is known only from dpkg's status
# file), and a list older than the mirror asks for a .deb the mirror dropped.
#
#   apt_ensure_lists PKG...   apt-get update once if the lists cannot serve a PKG
#   apt_retry CMD...          CMD (an apt-get install/download); on failure, if the
#                             lists were not refreshed yet, apt-get update and CMD again
#
# APT_LISTS_DIR (default /var/lib/apt/lists) is where the lists are looked for;
# APT_SAY names the caller in messages.

APT_LISTS_DIR=${APT_LISTS_DIR:-/var/lib/apt/lists}
APT_UPDATED=${APT_UPDATED:-0}

# True (0) when some PKG has no candidate a download can come from: no
# Packages list at all, no candidate, or a candidate whose only source is
# /var/lib/dpkg/status. APT_WHY says which.
apt_lists_lack() {
    if ! compgen -G "$APT_LISTS_DIR/*_Packages*" >/dev/null; then
        APT_WHY="no package lists in $APT_LISTS_DIR"
        return 0
    fi
    local p
    for p in "$@"; do
        if ! apt-cache policy "$p" 2>/dev/null | apt_candidate_downloadable; then
            APT_WHY="the package lists have no downloadable candidate for $p"
            return 0
        fi
    done
    return 1
}

# Reads one package's `apt-cache policy` output: exit 0 if its candidate
# version comes from a list (a source line other than /var/lib/dpkg/status).
apt_candidate_downloadable() {
    awk '
        $1 == "Candidate:" { cand = $2; next }
        $1 == "Version" && $2 == "table:" { table = 1; next }
        !table { next }
        $1 == "***" { ver = $2; next }                        # " *** VERSION PRIO": the installed one
        NF == 2 && $2 ~ /^-?[0-9]+$/ { ver = $1; next }       # "     VERSION PRIO"
        $1 ~ /^-?[0-9]+$/ && ver == cand && $2 != "/var/lib/dpkg/status" { found = 1 }
        END { exit !(found && cand != "" && cand != "(none)") }
    '
}

apt_ensure_lists() {
    if apt_lists_lack "$@"; then
        echo "${APT_SAY:-apt}: apt-get update ($APT_WHY)"
        apt-get update -qq
        APT_UPDATED=1
    fi
}

apt_retry() {
    "$@" && return 0
    [ "$APT_UPDATED" = 1 ] && return 1
    echo "${APT_SAY:-apt}: '$*' failed; apt-get update (the lists may be stale) and once more" >&2
    apt-get update -qq
    APT_UPDATED=1
    "$@"
}
