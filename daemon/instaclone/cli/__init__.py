"""``instaclone``: the command-line client of instacloned's control API.

The package: ``app`` (parse, run, exit statuses), ``command`` (the one way to declare a
command), ``commandline`` (the command line built from the group modules' tables), the group
modules (``clones``, ``sources``, ``status``, ``events``, ``webhooks``, ``pools``, ``guest``,
``meta``) and what they share (``context``, ``output``, ``render``, ``progress``, ``exitcodes``,
``interrupt`` and ``loop`` (Ctrl-C), ``complete``, ``manual``, ``tree``). It reaches the daemon
only through ``instaclone.client`` (an import contract in pyproject.toml).
docs/development/cli.md says how to add a command.

``main`` takes over Ctrl-C before it imports the rest of the CLI (``interrupt``), so this
module imports only what that needs.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from . import interrupt

if TYPE_CHECKING:
    import argparse

__all__ = ["main", "parser"]


def main(argv: list[str] | None = None) -> int:
    """The CLI (the console script ``instaclone``; ``argv``: the command line's by default); its exit status.

    Never a traceback: every failure is one line on stderr. Ctrl-C ends any command within a
    second, with "instaclone: interrupted" and status 130.
    """
    try:
        with interrupt.handled(program=argv is None):
            from .app import main as run_cli

            return run_cli(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:
        return interrupt.end()


def parser() -> argparse.ArgumentParser:
    """The root argparse parser of the whole command line (every command, option and help text)."""
    from .commandline import parser as build

    return build()
