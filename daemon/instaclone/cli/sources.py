"""Commands on a source VM: ``freeze``, ``unfreeze``, ``check``, ``prepare``, ``frozen``."""

from __future__ import annotations

import argparse

from . import render
from .command import Arg, Commands
from .context import Ctx

COMMANDS = Commands()


@COMMANDS.command("freeze", help="pause a source once as a template: clones from it need no stun",
                  args=[Arg("source")])
async def _freeze(ctx: Ctx, args: argparse.Namespace) -> int:
    entry = await ctx.client.freeze(args.source)
    ctx.out.show(entry, lambda: print(
        f"froze {args.source} in {entry['freeze_ms']:.0f} ms (memory backend {entry['backend']}); "
        "clones from it need no stun"), [args.source])
    return 0


@COMMANDS.command("unfreeze", help="let a frozen source run again (its clones are not affected)",
                  args=[Arg("source")])
async def _unfreeze(ctx: Ctx, args: argparse.Namespace) -> int:
    entry = await ctx.client.unfreeze(args.source)
    ctx.out.show(entry, lambda: print(f"unfroze {args.source} ({entry['clones']} clones made while frozen)"),
                 [args.source])
    return 0


@COMMANDS.command("check", help="can SRC be instant-cloned? per capability, and what to change "
                                "(exit status 1 if not cloneable)", args=[Arg("source")])
async def _check(ctx: Ctx, args: argparse.Namespace) -> int:
    report = await ctx.client.check(args.source)
    ctx.out.show(report, lambda: render.print_check(report), ["cloneable" if report["cloneable"] else "not-cloneable"])
    return 0 if report["cloneable"] else 1


@COMMANDS.command("prepare", help="write what instant clones need into SRC's persistent definition "
                                  "(applies at its next boot)", args=[
    Arg("source"),
    Arg("--dry-run", action="store_true", help="show the diff, change nothing"),
])
async def _prepare(ctx: Ctx, args: argparse.Namespace) -> int:
    data = await ctx.client.prepare(args.source, dry_run=args.dry_run)
    ctx.out.show(data, lambda: render.print_prepare(data), data["changed"])
    return 0


@COMMANDS.command("frozen", help="list frozen sources")
async def _frozen(ctx: Ctx, args: argparse.Namespace) -> int:
    ctx.out.listing(await ctx.client.frozen(), render.FROZEN)
    return 0
