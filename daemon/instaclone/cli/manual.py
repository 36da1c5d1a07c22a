"""``instaclone help [TOPIC]`` and the man page ``instaclone.1``, both printed from the parser.

``docs/man/instaclone.1`` in the repository is ``instaclone help --man``'s output; a test fails
when it is out of date with the parser (regenerate: ``instaclone help --man > docs/man/instaclone.1``).
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from .exitcodes import EXIT_CODES, EXIT_USAGE
from .tree import DEFAULT_SOCKET, help_of, subcommands, walk

TOPICS: dict[str, str] = {
    "output": """\
Every command takes -o FORMAT and -q, before or after the command:
  -o table   the default: a table (lists) or a short report (one object)
  -o wide    lists with more columns (times, errors, members, paths)
  -o json    the API's objects as they are (lists: a JSON array)
  -o yaml    the same as YAML
  -q         only ids or names, one a line: jobs ls -> job ids; clones ls, pool ls, frozen,
             webhooks ls -> names; clone --wait -> the clones' names; clone -> the job id
Errors go to stderr, one line each, whatever the format.
--wait on a terminal shows each state of the job as it is reached, with its time since the
request; piped, the same lines come plain (no control characters), one at a time.
""",
    "completion": """\
bash:  eval "$(instaclone completion bash)"       (or save it as
       /etc/bash_completion.d/instaclone or ~/.local/share/bash-completion/completions/instaclone)
zsh:   eval "$(instaclone completion zsh)"        (in ~/.zshrc, after compinit)
Commands and options are completed from the parser; clone, source, pool and job names from the
daemon (nothing is offered when it cannot be reached). Sources are the ones the daemon knows of
(from its jobs, pools, clones and frozen sources).
""",
    "environment": f"""\
INSTACLONE_SOCKET   the control socket (default {DEFAULT_SOCKET}); --socket overrides it.
The socket is open to root, the daemon's user and the members of its group (usually
'instaclone'); changes (clone, destroy, exec, cp, ...) need root or a group in access.write_groups.
A user outside the group gets exit status 4 and the fix: usermod -aG instaclone USER, then log in again.
Each job, clone and claim is its maker's: other users' are not shown and answer not_found; only
admins (root, the daemon's user, access.admin_groups) reach all. access.sources may limit which
sources a user's groups may clone; a refusal names its rule and exits 4.
""",
}


def exit_codes() -> str:
    return "".join(f"  {code:<4} {text}\n" for code, text in EXIT_CODES)


def _topic(name: str) -> str | None:
    if name == "exit-codes":
        return exit_codes()
    return TOPICS.get(name)


def main(p: argparse.ArgumentParser, topic: list[str], man: bool) -> int:
    """Print the help asked for; 0, or 2 (usage) for an unknown topic."""
    if man:
        sys.stdout.write(man_page(p))
        return 0
    if not topic:
        sys.stdout.write(p.format_help())
        print("\ntopics: instaclone help exit-codes | output | completion | environment | COMMAND [SUBCOMMAND]")
        return 0
    text = _topic(topic[0]) if len(topic) == 1 else None
    if text is not None:
        sys.stdout.write(text)
        return 0
    cmd = p
    for word in topic:
        cmd = subcommands(cmd).get(word)  # type: ignore[assignment]
        if cmd is None:
            print(f"instaclone: no help on {' '.join(topic)!r}: try 'instaclone help'", file=sys.stderr)
            return EXIT_USAGE
    sys.stdout.write(cmd.format_help())
    return 0


# -- man page -------------------------------------------------------------------------------------


def _roff(text: str) -> str:
    """Text safe in a roff line: backslashes and hyphens escaped, no control character first."""
    out = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + out if out[:1] in (".", "'") else out


def _options(cmd: argparse.ArgumentParser, top: bool = False) -> list[str]:
    lines: list[str] = []
    for a in cmd._actions:
        if isinstance(a, argparse._SubParsersAction) or a.help == argparse.SUPPRESS:
            continue
        if not top and a.dest in ("help", "output", "quiet"):
            continue  # on every command: said once, under OPTIONS
        if a.option_strings:
            name = str(a.metavar) if a.metavar else (
                "{" + ",".join(map(str, a.choices)) + "}" if a.choices else a.dest.upper())
            metavar = "" if a.nargs == 0 else " " + name
            head = ", ".join(f"\\fB{_roff(o)}\\fR" for o in a.option_strings) + _roff(str(metavar))
        else:
            head = f"\\fI{_roff(str(a.metavar or a.dest).upper())}\\fR"
        lines += [".TP", head, _roff(a.help or "")]
    return lines


def man_page(p: argparse.ArgumentParser) -> str:
    """The manual as roff (man 7), generated from the parser; no date in it, so it is reproducible."""
    out = [f'.TH INSTACLONE 1 "" "instaclone {__version__}" "User Commands"',
           ".SH NAME", "instaclone \\- " + _roff(p.description or ""),
           ".SH SYNOPSIS", "\\fBinstaclone\\fR [\\fIOPTIONS\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]",
           ".SH DESCRIPTION",
           _roff("instaclone talks to instacloned over its control socket. Every command takes -o FORMAT "
                 "(table, wide, json, yaml) and -q (ids or names only), before or after the command."),
           ".SH OPTIONS", *_options(p, top=True), ".SH COMMANDS"]
    for path, cmd in walk(p):
        if not path or subcommands(cmd):
            continue
        parent = dict(walk(p))[path[:-1]]
        out += [f".SS {_roff('instaclone ' + ' '.join(path))}", _roff(help_of(parent, path[-1])), ".PP",
                _roff(" ".join(cmd.format_usage().split())[len("usage: "):])]
        out += _options(cmd)
    out += [".SH EXIT STATUS"]
    for code, text in EXIT_CODES:
        out += [".TP", f"\\fB{code}\\fR", _roff(text)]
    out += [".SH ENVIRONMENT", *(_roff(line) for line in TOPICS["environment"].splitlines()),
            ".SH COMPLETION", *(_roff(line) + "\n.br" for line in TOPICS["completion"].splitlines()),
            ".SH FILES", f"\\fI{_roff(DEFAULT_SOCKET)}\\fR", "the daemon's control socket",
            ".SH SEE ALSO", "\\fBinstacloned\\fR(8), \\fBvirsh\\fR(1)"]
    return "\n".join(out) + "\n"
