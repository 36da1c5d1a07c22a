"""Shell completion for ``instaclone``: scripts generated from the parser, names from the daemon.

``instaclone completion bash`` prints a bash script: tables of every command's subcommands,
options and positional arguments (generated from ``commandline.parser()``, so they cannot drift)
and one function that walks the words typed so far through them. Where a clone, source, pool or
job name is wanted it runs ``instaclone __complete KIND`` (a hidden command) for the daemon's
names; that prints nothing when the daemon cannot be reached, so completion never prints an error
into the command line. ``instaclone completion zsh`` is the same function under zsh's
``bashcompinit``.
"""

from __future__ import annotations

import argparse
import os
import shlex
from typing import TYPE_CHECKING

from . import loop
from .tree import COMPLETE, DEFAULT_SOCKET, walk

if TYPE_CHECKING:
    from instaclone.client import Client

#: The hidden command the scripts call: ``instaclone [--socket S] __complete KIND``.
HIDDEN = "__complete"
KINDS = ("clone", "source", "pool", "job")


def _kind_of(action: argparse.Action, cmd: tuple[str, ...]) -> str:
    if cmd == ("cp",):
        return "remote"
    if action.dest in COMPLETE:
        return COMPLETE[action.dest]
    if action.dest == "pool" or (cmd[:1] == ("pool",) and action.dest == "name"):
        return "pool"
    return "-"


def _value_of(a: argparse.Action) -> str:
    """What an option's value completes to: its choices, ``@KIND`` (the daemon's names), ``@file``, ``@none``."""
    if a.choices:
        return " ".join(str(c) for c in a.choices)
    if a.dest in COMPLETE:
        return "@" + COMPLETE[a.dest]
    return "@file" if a.metavar == "FILE" or a.dest == "socket" else "@none"


def _tables(p: argparse.ArgumentParser) -> list[str]:
    """``key=value`` assignments of the script's associative arrays."""
    subs: list[str] = []
    opts: list[str] = []
    pos: list[str] = []
    takes: list[str] = []
    for path, cmd in walk(p):
        key = shlex.quote(" ".join(("instaclone", *path)))
        names = [n for n in _subcommand_names(cmd) if n != HIDDEN]
        if names:
            subs.append(f"[{key}]={shlex.quote(' '.join(names))}")
        flags: list[str] = []
        kinds_here: list[str] = []
        for a in cmd._actions:
            if isinstance(a, argparse._SubParsersAction):
                continue
            if a.option_strings:
                flags.extend(a.option_strings)
                if a.nargs != 0:
                    for flag in a.option_strings:
                        k = " ".join(("instaclone", *path, flag))
                        takes.append(f"[{shlex.quote(k)}]={shlex.quote(_value_of(a))}")
            elif a.nargs != argparse.REMAINDER:
                kinds_here.append(_kind_of(a, path))
        opts.append(f"[{key}]={shlex.quote(' '.join(flags))}")
        if kinds_here:
            pos.append(f"[{key}]={shlex.quote(' '.join(kinds_here))}")
    return [f"_instaclone_subs=({' '.join(subs)})", f"_instaclone_opts=({' '.join(opts)})",
            f"_instaclone_pos=({' '.join(pos)})", f"_instaclone_takes=({' '.join(takes)})"]


def _subcommand_names(p: argparse.ArgumentParser) -> list[str]:
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            return list(a.choices)
    return []


_FUNCTION = r'''
_instaclone_names() {
    # The daemon's names of a kind; nothing (and no error) if it cannot be reached.
    command "${_instaclone_cmd:-instaclone}" "${_instaclone_sock[@]}" __complete "$1" 2>/dev/null
}

_instaclone() {
    # zsh (bashcompinit): bash's 0-based arrays and word splitting, for this function only.
    [[ -n "${ZSH_VERSION:-}" ]] && setopt localoptions ksharrays shwordsplit
    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}"
    # Not "path": zsh ties that name to $PATH.
    local cmdpath="instaclone" w i npos=0 kinds kind
    _instaclone_sock=()
    for ((i = 1; i < COMP_CWORD; i++)); do
        w="${COMP_WORDS[i]}"
        if [[ "$w" == "--socket" ]]; then
            _instaclone_sock=(--socket "${COMP_WORDS[i+1]}"); ((i++)); continue
        fi
        if [[ "$w" == --*=* ]]; then continue; fi
        if [[ "$w" == -* ]]; then
            if [[ -n "${_instaclone_takes[$cmdpath $w]}" ]]; then ((i++)); fi
            continue
        fi
        if [[ " ${_instaclone_subs[$cmdpath]} " == *" $w "* ]]; then
            cmdpath="$cmdpath $w"
        else
            ((npos++))
        fi
    done
    COMPREPLY=()
    local value="${_instaclone_takes[$cmdpath $prev]}"
    if [[ -n "$value" && "$prev" == -* ]]; then
        case "$value" in
            @file) COMPREPLY=($(compgen -f -- "$cur")) ;;
            @none) ;;
            @*) COMPREPLY=($(compgen -W "$(_instaclone_names "${value#@}")" -- "$cur")) ;;
            *) COMPREPLY=($(compgen -W "$value" -- "$cur")) ;;
        esac
        return 0
    fi
    if [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "${_instaclone_opts[$cmdpath]}" -- "$cur"))
        return 0
    fi
    if [[ -n "${_instaclone_subs[$cmdpath]}" ]]; then
        COMPREPLY=($(compgen -W "${_instaclone_subs[$cmdpath]}" -- "$cur"))
        return 0
    fi
    kinds=(${_instaclone_pos[$cmdpath]})
    kind="${kinds[npos]}"
    case "$kind" in
        clone|source|pool|job) COMPREPLY=($(compgen -W "$(_instaclone_names "$kind")" -- "$cur")) ;;
        remote)
            COMPREPLY=($(compgen -W "$(_instaclone_names clone | sed 's/$/:/')" -- "$cur") $(compgen -f -- "$cur"))
            type compopt >/dev/null 2>&1 && compopt -o nospace
            ;;
        -|'') ;;
    esac
    return 0
}
'''


def script(p: argparse.ArgumentParser, shell: str) -> str:
    """The completion script for ``shell`` ("bash" or "zsh"), to be sourced or eval'ed."""
    head = "# instaclone completion, generated from its parser by: instaclone completion " + shell + "\n"
    if shell == "zsh":
        head += "autoload -U +X bashcompinit && bashcompinit\n"
    tables = "\n".join(f"typeset -A {t.split('=', 1)[0]}\n{t}" for t in _tables(p))
    return head + tables + "\n" + _FUNCTION.lstrip("\n") + "complete -F _instaclone instaclone\n"


async def names(client: Client, kind: str) -> list[str]:
    """The daemon's names of ``kind``: clones, pools, job ids, or sources (those its jobs, frozen
    sources, pools and clones name: the daemon has no list of libvirt domains)."""
    if kind == "clone":
        return [c.name for c in await client.clones()]
    if kind == "pool":
        return [p.name for p in await client.pools()]
    if kind == "job":
        return [j.id for j in await client.jobs()]
    if kind == "source":
        found = {str(f["name"]) for f in await client.frozen()}
        found.update(j.source for j in await client.jobs())
        found.update(p.source for p in await client.pools())
        found.update(c.source for c in await client.clones())
        return sorted(n for n in found if n)
    return []


async def _names(sock: str, kind: str) -> list[str]:
    from instaclone.client import Client

    async with Client(sock, timeout_s=5) as client:
        return await names(client, kind)


def main(argv: list[str]) -> int:
    """``instaclone [--socket S] __complete KIND``: the names, one a line; always exit 0, quietly."""
    sock = os.environ.get("INSTACLONE_SOCKET", DEFAULT_SOCKET)
    before = argv[:argv.index(HIDDEN)]
    if "--socket" in before and before.index("--socket") + 1 < len(before):
        sock = before[before.index("--socket") + 1]
    from instaclone.client import ClientError

    rest = argv[argv.index(HIDDEN) + 1:]
    if not rest or rest[0] not in KINDS:
        return 0
    try:
        found = loop.run(_names(sock, rest[0]))
    except ClientError:
        return 0  # no daemon, no names: never an error in the middle of a command line
    for n in found:
        print(n)
    return 0
