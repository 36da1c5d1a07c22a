"""The daemon itself: ``status`` (health, disk used per source) and ``gc``."""

from __future__ import annotations

import argparse

from . import render
from .command import Arg, Commands
from .context import Ctx, raw

COMMANDS = Commands()


@COMMANDS.command("status", help="daemon status, disk used per source")
async def _status(ctx: Ctx, args: argparse.Namespace) -> int:
    data = raw(await ctx.client.health())

    def human() -> None:
        for k, v in data.items():
            if k != "disk":
                print(f"{k}: {v}")
        if "disk" in data:
            print("disk used per source:")
            render.print_disk(data["disk"])
    ctx.out.show(data, human, [str(data.get("version", ""))])
    return 0


@COMMANDS.command("gc", help="delete the delta and memory images no domain's backing chain uses", args=[
    Arg("--dry-run", action="store_true", help="list what would be deleted, delete nothing"),
])
async def _gc(ctx: Ctx, args: argparse.Namespace) -> int:
    report = await ctx.client.gc(dry_run=args.dry_run)
    ctx.out.show(report, lambda: render.print_gc(report), [d["path"] for d in report["deleted"]])
    return 1 if report["failed"] else 0
