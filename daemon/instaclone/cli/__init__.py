"""``instaclone``: the command-line client of instacloned's control API.

The package: ``app`` (``main``: parse, run, exit statuses), ``command`` (the one way to declare
a command), ``commandline`` (the command line built from the group modules' tables), the group
modules (``clones``, ``sources``, ``status``, ``events``, ``webhooks``, ``pools``, ``guest``,
``meta``) and what they share (``context``, ``output``, ``render``, ``progress``, ``exitcodes``,
``complete``, ``manual``, ``tree``). It reaches the daemon only through ``instaclone.client``
(an import contract in pyproject.toml). docs/development/cli.md says how to add a command.

This module imports nothing of the package until ``main`` or ``parser`` is called: a Ctrl-C
while Python is still importing the CLI then finds ``main``'s handling in place sooner.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse

__all__ = ["main", "parser"]


def main(argv: list[str] | None = None) -> int:
    """The CLI (the console script ``instaclone``); its exit status. Never a traceback."""
    from .app import main as app_main

    return app_main(argv)


def parser() -> argparse.ArgumentParser:
    """The root argparse parser of the whole command line (every command, option and help text)."""
    from .commandline import parser as build

    return build()
