"""The ``instaclone`` command line, built from the group modules' command tables.

``parser()`` is the single source of the CLI's shape: ``app.main`` dispatches on it, ``instaclone
help`` and the man page (``manual``) are printed from it, and the completion scripts
(``complete``) are generated from it. Its commands are those declared in the ``COMMANDS`` table
of each module in ``GROUPS`` (see ``command``), in that order. ``-o`` and ``-q`` are accepted
before the command and after it (``instaclone -q clones ls`` and ``instaclone clones ls -q``),
like docker's and podman's.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from .. import __version__
from . import clones, events, guest, meta, pools, sources, status, webhooks
from .command import Command
from .output import FORMATS
from .tree import DEFAULT_SOCKET

#: The group modules, in the order ``instaclone --help`` lists their commands.
GROUPS = (clones, sources, status, events, webhooks, pools, guest, meta)

#: The attribute of the parsed arguments that holds the Command to run.
COMMAND_ATTR = "command"


def _output_options(p: argparse.ArgumentParser, top: bool) -> None:
    # On the subcommands the defaults are SUPPRESS, so an option given before the command is not
    # overwritten by the subcommand's default.
    kw: dict[str, Any] = {} if top else {"default": argparse.SUPPRESS}
    p.add_argument("-o", "--output", choices=FORMATS, **({"default": "table"} if top else kw),
                   help="table (default), wide (more columns), json or yaml")
    p.add_argument("-q", "--quiet", action="store_true", **({"default": False} if top else kw),
                   help="print only ids or names (one a line), for scripts")


class _Sub:
    """``add_parser`` with the output options on every command."""

    def __init__(self, sub: Any) -> None:
        self.sub = sub

    def add_parser(self, name: str, **kw: Any) -> argparse.ArgumentParser:
        if "help" in kw and "description" not in kw:
            kw["description"] = kw["help"]
        p: argparse.ArgumentParser = self.sub.add_parser(name, **kw)
        _output_options(p, top=False)
        return p

    @staticmethod
    def nested(p: argparse.ArgumentParser, dest: str) -> _Sub:
        return _Sub(p.add_subparsers(dest=dest, required=True, metavar="COMMAND"))


def _add(subs: dict[tuple[str, ...], _Sub], cmd: Command) -> None:
    """Add one declared command under its parent (declared before it)."""
    parent = subs.get(cmd.path[:-1])
    if parent is None:
        raise LookupError(f"command {' '.join(cmd.path)!r} is declared before its group {' '.join(cmd.path[:-1])!r}")
    kw: dict[str, Any] = {"help": cmd.help} if cmd.usage is None else {"help": cmd.help, "usage": cmd.usage}
    p = parent.add_parser(cmd.path[-1], **kw)
    for arg in cmd.args:
        arg.add_to(p)
    if cmd.run is None:
        subs[cmd.path] = _Sub.nested(p, f"{cmd.path[-1]}_cmd")
    else:
        p.set_defaults(**{COMMAND_ATTR: cmd})


def parser() -> argparse.ArgumentParser:
    """The whole command line (argparse exits 2 on a usage error)."""
    p = argparse.ArgumentParser(prog="instaclone", description="instant clones of running libvirt VMs",
                                epilog="'instaclone help TOPIC' for more: exit-codes, output, completion")
    p.add_argument("--version", action="version", version=f"instaclone {__version__}")
    p.add_argument("--socket", default=os.environ.get("INSTACLONE_SOCKET", DEFAULT_SOCKET),
                   help="control socket of instacloned (env INSTACLONE_SOCKET)")
    _output_options(p, top=True)
    subs: dict[tuple[str, ...], _Sub] = {(): _Sub.nested(p, "cmd")}
    for group in GROUPS:
        for cmd in group.COMMANDS.table:
            _add(subs, cmd)
    return p
