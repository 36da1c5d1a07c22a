"""The one way to add a command to ``instaclone``: declare it in its group module's ``COMMANDS``.

A group module (``clones``, ``sources``, ``pools``...) holds one :class:`Commands` table named
``COMMANDS``. Each entry is a command's path, help text, arguments and handler, declared together::

    COMMANDS = Commands()

    @COMMANDS.command("freeze", help="pause a source once as a template: clones from it need no stun",
                      args=[Arg("source")])
    async def _freeze(ctx: Ctx, args: argparse.Namespace) -> int:
        ...

A command with subcommands is declared with :meth:`Commands.group` before them
(``COMMANDS.group("jobs", help=...)``, then ``@COMMANDS.command("jobs ls", ...)``). The parser
(``commandline.parser()``) is built from the tables of the modules listed in ``commandline.GROUPS``, in
their order; help, the man page and completion are printed from that parser, and ``app.main``
runs the handler the parsed command line names. Nothing else registers a command.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .context import Ctx

#: A command's handler: it gets the context (the daemon's client, output options, the root parser)
#: and the parsed arguments, and returns the exit status. It raises CliError for a failure.
Handler = Callable[[Ctx, argparse.Namespace], Awaitable[int]]


class Arg:
    """One ``add_argument`` call, kept until the parser is built: ``Arg("--wait", type=float)``."""

    def __init__(self, *flags: str, **kw: Any) -> None:
        self.flags, self.kw = flags, kw

    def add_to(self, p: argparse.ArgumentParser | argparse._MutuallyExclusiveGroup) -> None:
        p.add_argument(*self.flags, **self.kw)


class Exclusive:
    """Arguments of which at most one may be given (argparse's mutually exclusive group)."""

    def __init__(self, *args: Arg) -> None:
        self.args = args

    def add_to(self, p: argparse.ArgumentParser) -> None:
        group = p.add_mutually_exclusive_group()
        for a in self.args:
            a.add_to(group)


@dataclass(frozen=True)
class Command:
    """A command as declared: its words (``("pool", "claim")``), help, arguments and handler.

    ``run`` is None for a command that only has subcommands (``jobs``, ``pool``).
    """

    path: tuple[str, ...]
    help: str
    run: Handler | None = None
    args: tuple[Arg | Exclusive, ...] = ()
    usage: str | None = None


class Commands:
    """A group module's table of commands, in the order ``instaclone --help`` lists them."""

    def __init__(self) -> None:
        self.table: list[Command] = []

    def group(self, path: str, *, help: str) -> None:
        """Declare ``path`` (words separated by spaces) as a command that has subcommands."""
        self.table.append(Command(tuple(path.split()), help))

    def command(self, path: str, *, help: str, args: Iterable[Arg | Exclusive] = (),
                usage: str | None = None) -> Callable[[Handler], Handler]:
        """Declare the decorated handler as the command ``path`` (e.g. ``"pool claim"``) with its arguments."""

        def register(handler: Handler) -> Handler:
            self.table.append(Command(tuple(path.split()), help, handler, tuple(args), usage))
            return handler
        return register
