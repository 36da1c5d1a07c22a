"""Commands about the CLI itself, which need no daemon: ``help`` and ``completion``."""

from __future__ import annotations

import argparse

from . import complete, manual
from .command import Arg, Commands
from .context import Ctx

COMMANDS = Commands()


@COMMANDS.command("help", help="help on a command or topic; --man prints the man page", args=[
    Arg("topic", nargs="*", help="a command (e.g. 'pool claim') or a topic: exit-codes, output, completion, "
                                 "environment"),
    Arg("--man", action="store_true", help="the whole manual as a roff man page (instaclone.1)"),
])
async def _help(ctx: Ctx, args: argparse.Namespace) -> int:
    return manual.main(ctx.parser, args.topic, args.man)


@COMMANDS.command("completion", help="print the shell completion script: eval \"$(instaclone completion bash)\"",
                  args=[Arg("shell", choices=("bash", "zsh"))])
async def _completion(ctx: Ctx, args: argparse.Namespace) -> int:
    print(complete.script(ctx.parser, args.shell), end="")
    return 0
