"""Reading the built command line: its commands as a tree, and the names help and completion share.

``manual`` (help, the man page) and ``complete`` (the completion scripts) walk the parser that
``commandline.parser()`` builds; they get it from the command's context, so that neither imports the
group modules (whose ``meta`` commands import them).
"""

from __future__ import annotations

import argparse

#: The daemon's control socket when neither --socket nor $INSTACLONE_SOCKET says another.
DEFAULT_SOCKET = "/run/instaclone/control.sock"

#: Positional arguments naming things the daemon knows: ``dest`` -> completion kind.
#: ``complete`` offers the daemon's names for them (``instaclone __complete KIND``).
COMPLETE: dict[str, str] = {"source": "source", "job_id": "job", "job": "job", "clone": "clone", "pool": "pool"}


def subcommands(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The direct subcommands of ``p`` by name (empty if it has none)."""
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


Walked = tuple[tuple[str, ...], argparse.ArgumentParser]


def walk(p: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[Walked]:
    """Every command under ``p``, depth first: ``[((), p), (("jobs",), jobs), (("jobs", "ls"), ls), ...]``."""
    out = [(path, p)]
    for name, child in subcommands(p).items():
        out.extend(walk(child, (*path, name)))
    return out


def help_of(p: argparse.ArgumentParser, name: str) -> str:
    """The one-line help of subcommand ``name`` of ``p``."""
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                if choice.dest == name:
                    return choice.help or ""
    return ""
