# Sourced by scripts/setup.sh (bash), after lib/apt.sh: which QEMU and libvirt
# this host runs (its "platform"), and how setup gets them.
#
#   Debian 12, INSTACLONE_PLATFORM unset or "backports" (the default): QEMU and
#     libvirt from bookworm-backports (today QEMU 10.0.2 and libvirt 11.3.0, the
#     versions of Debian 13). The packages are named one by one as
#     PKG/bookworm-backports: apt then takes those and the ones they need at
#     exactly their version from backports, and the rest from Debian 12.
#     "-t bookworm-backports" would make every dependency prefer backports
#     and upgrade systemd (252 -> 254) and mesa with them.
#   Debian 12, INSTACLONE_PLATFORM=stock: Debian 12's own QEMU 7.2 and libvirt 9.0.
#   Any other release (Debian 13 ...): the distribution's own packages, whatever
#     INSTACLONE_PLATFORM says (on Debian 13 they are QEMU 10.0 and libvirt 11.3).
#
#   platform_choose             PLATFORM=backports|stock|distribution, PLATFORM_RELEASE (12, 13, ...)
#                               and PLATFORM_TEXT; returns 1 (message on stderr) for an unknown
#                               INSTACLONE_PLATFORM
#   platform_refusal            why setup must stop (empty if it need not): the stock platform
#                               chosen where backports are installed, with the command back
#   platform_install [APT-OPTION...] -- PKG...
#                               installs the PKGs dpkg lacks and the platform's packages not
#                               installed as PLATFORM wants them (adding the backports source and
#                               fetching its list first where needed); says what it does
#   platform_to_install         the PLATFORM_PKGS not installed as PLATFORM wants them, one a line
#   platform_install_args PKG.. PKG/bookworm-backports (backports) or PKG, one a line
#   platform_backported         "PKG VERSION" of every installed QEMU, libvirt or seabios backport
#   platform_stock_version PKG  the newest version of PKG the lists have outside any -backports suite
#   platform_downgrade_command  the apt-get command that puts Debian 12's own packages back
#   platform_backports_source   adds $APT_ETC/sources.list.d/backports.sources unless a source
#                               names bookworm-backports; returns 0 if it added it
#   platform_backports_lists    0 if the package lists hold bookworm-backports
#   platform_stale_daemon NAME  why the running NAME (libvirtd, virtlogd) is not the installed
#                               one (empty if it is, or if none runs)
#   platform_qemu72 DIR         Debian 12's QEMU 7.2 unpacked into DIR beside the system's (the
#                               tests boot guests on it); PLATFORM_QEMU72 says what it did
#
# For tests: DEBIAN_VERSION_FILE (default /etc/debian_version), APT_ETC (default
# /etc/apt), PROC (default /proc); INSTACLONE_DEBIAN_MIRROR is the URI of the
# backports source setup writes (default http://deb.debian.org/debian).

DEBIAN_VERSION_FILE=${DEBIAN_VERSION_FILE:-/etc/debian_version}
APT_ETC=${APT_ETC:-/etc/apt}
PROC=${PROC:-/proc}

#: What makes the platform: setup installs each of these from the platform's
#: suite. The libvirt packages these need at their exact version
#: (libvirt-common, libvirt-daemon-driver-*, ...) follow on their own.
PLATFORM_PKGS=(qemu-system-x86 qemu-system-common qemu-system-data qemu-utils
               libvirt-daemon-system libvirt-daemon-system-systemd libvirt-clients libvirt-dev libvirt0
               libvirt-daemon libvirt-daemon-driver-qemu libvirt-daemon-config-network
               libvirt-daemon-config-nwfilter seabios)

platform_choose() {
    local text want=${INSTACLONE_PLATFORM:-}
    text=$(head -n 1 "$DEBIAN_VERSION_FILE" 2>/dev/null || true)
    PLATFORM_RELEASE=${text%%.*}
    case $want in
        ""|backports|stock) ;;
        *) echo "${APT_SAY:-platform}: INSTACLONE_PLATFORM must be 'backports' (the default on Debian 12)" \
                "or 'stock', not '$want'" >&2
           return 1 ;;
    esac
    if [ "$PLATFORM_RELEASE" = 12 ] && [ "$want" = stock ]; then
        PLATFORM=stock
        PLATFORM_TEXT="Debian 12's own QEMU and libvirt (7.2 and 9.0; INSTACLONE_PLATFORM=stock)"
    elif [ "$PLATFORM_RELEASE" = 12 ]; then
        PLATFORM=backports
        PLATFORM_TEXT="QEMU and libvirt from bookworm-backports (10.0 and 11.3; INSTACLONE_PLATFORM=stock keeps Debian 12's own 7.2 and 9.0)"
    else
        PLATFORM=distribution
        PLATFORM_TEXT="the distribution's own QEMU and libvirt (/etc/debian_version: ${text:-missing})"
        [ -z "$want" ] || PLATFORM_TEXT="$PLATFORM_TEXT; INSTACLONE_PLATFORM=$want chooses only on Debian 12"
    fi
}

platform_refusal() {
    local backported
    [ "$PLATFORM" = stock ] || return 0
    backported=$(platform_backported)
    [ -n "$backported" ] || return 0
    # Going back is a downgrade of libvirt under its running domains: the
    # operator's decision, not a script's.
    echo "${APT_SAY:-platform}: INSTACLONE_PLATFORM=stock, but QEMU and libvirt from bookworm-backports are installed:"
    echo "$backported" | sed 's/^/    /'
    echo "They are not downgraded here. To go back to Debian 12's own QEMU 7.2 and libvirt 9.0,"
    echo "stop every domain, then run"
    echo "    $(platform_downgrade_command)"
    echo "and this script again with INSTACLONE_PLATFORM=stock (it restarts libvirtd and rebuilds"
    echo "libvirt-python against libvirt 9.0)."
}

platform_install() {
    local opts=() p missing=() platform_missing=() platform_args=() install=()
    while [ $# -gt 0 ] && [ "$1" != -- ]; do opts+=("$1"); shift; done
    [ $# -eq 0 ] || shift
    for p in "$@"; do
        case $(_platform_status "$p") in "install ok installed"*) ;; *) missing+=("$p") ;; esac
    done
    mapfile -t platform_missing < <(platform_to_install)
    if [ ${#missing[@]} -eq 0 ] && [ ${#platform_missing[@]} -eq 0 ]; then
        echo "${APT_SAY:-platform}: packages present"
        return 0
    fi
    if [ "$PLATFORM" = backports ] && [ ${#platform_missing[@]} -gt 0 ]; then
        if platform_backports_source; then
            echo "${APT_SAY:-platform}: added the apt source $APT_ETC/sources.list.d/backports.sources (bookworm-backports)"
        fi
        if ! platform_backports_lists; then
            echo "${APT_SAY:-platform}: apt-get update (no bookworm-backports package list yet)"
            apt-get update -qq
            APT_UPDATED=1
        fi
    fi
    mapfile -t platform_args < <(platform_install_args "${platform_missing[@]}")
    install=("${missing[@]}" "${platform_args[@]}")
    echo "${APT_SAY:-platform}: installing ${install[*]}"
    apt_ensure_lists "${missing[@]}" "${platform_missing[@]}"
    # Keep a conffile the admin changed (libvirt's qemu.conf, say) without asking.
    DEBIAN_FRONTEND=noninteractive apt_retry apt-get install -y "${opts[@]}" \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${install[@]}" >/dev/null
}

# dpkg's "Status Version" of PKG, empty if dpkg does not know it.
_platform_status() { dpkg-query -W -f='${Status} ${Version}' "$1" 2>/dev/null || true; }

platform_to_install() {
    local p st
    for p in "${PLATFORM_PKGS[@]}"; do
        st=$(_platform_status "$p")
        case $st in
            "install ok installed"*~bpo*) ;;
            "install ok installed"*) [ "$PLATFORM" != backports ] || echo "$p" ;;
            *) echo "$p" ;;
        esac
    done
}

platform_install_args() {
    local p
    for p in "$@"; do
        if [ "$PLATFORM" = backports ]; then echo "$p/bookworm-backports"; else echo "$p"; fi
    done
}

platform_backported() {
    # ${db:Status-Abbrev} is "ii " for an installed package.
    { dpkg-query -W -f='${db:Status-Abbrev} ${Package} ${Version}\n' 'qemu-*' 'libvirt*' seabios 2>/dev/null || true; } \
        | awk '$1 ~ /^[a-z]i$/ && $3 ~ /~bpo/ { print $2, $3 }'
}

platform_stock_version() {
    local v best=""
    while read -r v; do
        if [ -z "$best" ] || dpkg --compare-versions "$v" gt "$best"; then best=$v; fi
    done < <(apt-cache madison "$1" 2>/dev/null \
             | awk -F'|' '$3 ~ /Packages/ && $3 !~ /-backports/ { gsub(/[[:space:]]/, "", $2); print $2 }')
    echo "$best"
}

platform_downgrade_command() {
    local p v stock args=()
    while read -r p v; do
        stock=$(platform_stock_version "$p")
        # A package Debian 12 does not have (libvirt 11 split libvirt0 into more) goes away.
        if [ -n "$stock" ]; then args+=("$p=$stock"); else args+=("$p-"); fi
    done < <(platform_backported)
    echo "apt-get install --allow-downgrades --no-install-recommends ${args[*]}"
}

platform_backports_source() {
    local f files=()
    for f in "$APT_ETC/sources.list" "$APT_ETC"/sources.list.d/*.list "$APT_ETC"/sources.list.d/*.sources; do
        [ -f "$f" ] && files+=("$f")
    done
    # A one-line "deb URI bookworm-backports main" or a deb822 "Suites: ... bookworm-backports".
    if [ ${#files[@]} -gt 0 ] && awk '!/^[[:space:]]*#/ && /(^|[[:space:]])bookworm-backports([[:space:]]|$)/ { f = 1 }
                                      END { exit !f }' "${files[@]}"; then
        return 1
    fi
    mkdir -p "$APT_ETC/sources.list.d"
    cat > "$APT_ETC/sources.list.d/backports.sources" <<EOF
Types: deb
URIs: ${INSTACLONE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    return 0
}

platform_backports_lists() {
    compgen -G "$APT_LISTS_DIR/*_dists_bookworm-backports_*Packages*" >/dev/null
}

platform_stale_daemon() {
    local name=$1 pid exe running installed
    pid=$(pgrep -o -x "$name" || true)
    [ -n "$pid" ] || return 0
    exe=$(readlink "$PROC/$pid/exe" 2>/dev/null || true)
    if [ "$name" = libvirtd ]; then
        running=$({ virsh -c qemu:///system version --daemon 2>/dev/null || true; } \
                  | sed -n 's/^Running against daemon: //p')
        installed=$({ libvirtd --version 2>/dev/null || true; } | awk '{ print $NF }')
        if [ -n "$running" ] && [ -n "$installed" ] && [ "$running" != "$installed" ]; then
            echo "libvirtd $running runs, $installed is installed"
            return 0
        fi
    fi
    # The package replaced the program under the running process.
    case $exe in *" (deleted)") echo "$name runs a program the packages replaced ($exe)" ;; esac
}

platform_qemu72() {
    local dir=$1 pkgs=(qemu-system-x86 qemu-system-common qemu-system-data) want=() p v f tmp new stamp d
    local deps=() firmware=()
    case $dir in /?*) ;; *) PLATFORM_QEMU72="not made: '$dir' is not an absolute path"; return 1 ;; esac
    for p in "${pkgs[@]}"; do
        v=$(platform_stock_version "$p")
        case $v in
            1:7.2*|7.2*) want+=("$p=$v") ;;
            *) PLATFORM_QEMU72="not made: the package lists have no Debian 12 QEMU 7.2 $p (${v:-none})"
               return 1 ;;
        esac
    done
    # What the copy was made from, and how (the wrapper's revision): a change to either makes it again.
    stamp="${want[*]} wrapper=2"
    if [ -x "$dir/qemu-system-x86_64" ] && [ "$(cat "$dir/.instaclone-packages" 2>/dev/null)" = "$stamp" ]; then
        PLATFORM_QEMU72="present in $dir (${want[*]})"
        return 0
    fi
    tmp=$(mktemp -d /tmp/instaclone-qemu72.XXXXXX)
    chmod 0755 "$tmp"
    # apt drops root to _apt for downloads; let it write here (else it warns).
    id _apt >/dev/null 2>&1 && chown _apt "$tmp"
    if ! (cd "$tmp" && apt_retry apt-get download -qq "${want[@]}"); then
        rm -rf "$tmp"
        PLATFORM_QEMU72="not made: apt-get download ${want[*]} failed"
        return 1
    fi
    # The libraries QEMU 7.2 links that QEMU 10 does not (its modules' too).
    for p in $(for f in "$tmp"/*.deb; do dpkg-deb -f "$f" Depends; done | tr ',' '\n' \
               | sed -E 's/\(.*\)//; s/\|.*//; s/[[:space:]]//g' | grep -vE '^(qemu-|seabios$|ipxe-qemu$|$)' \
               | sort -u); do
        case $(_platform_status "$p") in "install ok installed"*) ;; *) deps+=("$p") ;; esac
    done
    if [ ${#deps[@]} -gt 0 ]; then
        if ! DEBIAN_FRONTEND=noninteractive apt_retry apt-get install -y -qq --no-install-recommends "${deps[@]}" \
                >/dev/null; then
            rm -rf "$tmp"
            PLATFORM_QEMU72="not made: the libraries it needs (${deps[*]}) did not install"
            return 1
        fi
    fi
    new="$dir.new"
    rm -rf "$new"
    mkdir -p "$new"
    for f in "$tmp"/*.deb; do dpkg-deb -x "$f" "$new"; done
    rm -rf "$tmp"
    if ! v=$("$new/usr/bin/qemu-system-x86_64" --version 2>&1 | head -n 1) || [[ $v != *" 7.2."* ]]; then
        rm -rf "$new"
        PLATFORM_QEMU72="not made: the unpacked QEMU does not run: $v"
        return 1
    fi
    # QEMU finds its modules, ROMs and firmware relative to its own program
    # (../lib/x86_64-linux-gnu/qemu, ../share/qemu, ../share/seabios, ...):
    # here that is the unpacked tree, which has its modules and ROMs but not
    # the firmware of the seabios and ipxe-qemu packages. The wrapper names
    # its own directories first (QEMU_MODULE_DIR; -L directories are searched
    # first, in their order), then the system's for each one the tree lacks.
    while read -r d; do
        case $d in "$new/usr/bin/../"*) ;; *) continue ;; esac
        [ -d "$d" ] || [ ! -d "/usr/${d#"$new/usr/bin/../"}" ] || firmware+=("-L /usr/${d#"$new/usr/bin/../"}")
    done < <("$new/usr/bin/qemu-system-x86_64" -L help 2>/dev/null)
    cat > "$new/qemu-system-x86_64" <<EOF
#!/bin/sh
# Debian 12's QEMU 7.2 (${want[*]}), unpacked by scripts/setup.sh.
export QEMU_MODULE_DIR=$dir/usr/lib/x86_64-linux-gnu/qemu
exec $dir/usr/bin/qemu-system-x86_64 -L $dir/usr/share/qemu ${firmware[*]} "\$@"
EOF
    chmod 0755 "$new/qemu-system-x86_64"
    echo "$stamp" > "$new/.instaclone-packages"
    rm -rf "$dir"
    mv "$new" "$dir"
    PLATFORM_QEMU72="made in $dir: $v"
}
