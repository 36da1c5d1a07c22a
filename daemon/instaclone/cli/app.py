"""``instaclone``'s entry point: parse the command line, run the command, turn failures into exit statuses.

Errors are one line on stderr and an exit status from ``exitcodes.EXIT_CODES`` (1 the daemon
reported an error, 2 usage, 3 unreachable, 4 permission denied, 130 Ctrl-C, 141 stdout closed
early; ``exec`` exits with the command's own status). No traceback, ever: ``main`` turns every
failure it knows into its line and status.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import complete, loop
from .command import Command
from .commandline import COMMAND_ATTR, parser
from .context import CliError, Ctx, translated
from .exitcodes import EXIT_BROKEN_PIPE, EXIT_FAILED
from .output import Output


async def run(args: argparse.Namespace, root: argparse.ArgumentParser) -> int:
    """Run the parsed command (the daemon's client is opened on first use); the exit status. Raises CliError."""
    cmd: Command = getattr(args, COMMAND_ATTR)
    assert cmd.run is not None  # the parser gives only commands with a handler
    ctx = Ctx(args.socket, Output(args.output, args.quiet), root)
    try:
        with translated():
            return await cmd.run(ctx, args)
    finally:
        await ctx.close()


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush at exit cannot fail again."""
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), sys.stdout.fileno())


def main(argv: list[str]) -> int:
    """The CLI on ``argv``; its exit status. Every failure is one line on stderr (never a traceback).

    Runs within ``instaclone.cli.main``'s Ctrl-C handling, which turns KeyboardInterrupt into its line.
    """
    try:
        if complete.HIDDEN in argv:
            return complete.main(argv)
        root = parser()
        args = root.parse_args(argv)
        status = loop.run(run(args, root))
        sys.stdout.flush()
        return status
    except CliError as exc:
        print(f"instaclone: {exc}", file=sys.stderr)
        return exc.status
    except BrokenPipeError:
        # The reader of stdout went away (| head): like coreutils, stop quietly.
        _quiet_stdout()
        return EXIT_BROKEN_PIPE
    except Exception as exc:
        # A bug of ours: still one line, and the traceback for whoever debugs it.
        if os.environ.get("INSTACLONE_DEBUG"):
            raise
        print(f"instaclone: internal error: {type(exc).__name__}: {exc} (INSTACLONE_DEBUG=1 shows the "
              "traceback)", file=sys.stderr)
        return EXIT_FAILED
