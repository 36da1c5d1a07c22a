"""``instaclone events``: the daemon's events (state changes), and with ``-f`` the new ones as they come."""

from __future__ import annotations

import argparse
import json

from . import render
from .command import Arg, Commands
from .context import Ctx, raw
from .output import to_yaml

COMMANDS = Commands()


@COMMANDS.command("events", help="show events (state changes); -f follows new ones", args=[
    Arg("-f", "--follow", action="store_true", help="keep printing new events"),
    Arg("--job", help="only this job's events"),
    Arg("--type", action="append", default=[], metavar="TYPE",
        help="event type or glob (clone.ready, clone.*); repeatable"),
    Arg("--since", type=int, metavar="CURSOR", help="events after this cursor (see -o json)"),
    Arg("--tail", type=int, default=20, help="how many past events to show first (default 20)"),
])
async def _events(ctx: Ctx, args: argparse.Namespace) -> int:
    """Print events; with --follow keep printing them as they happen (until interrupted)."""
    async for ev in ctx.client.events(since=args.since, follow=args.follow, job=args.job, types=args.type or None,
                                      tail=args.tail):
        e = raw(ev)
        if ctx.out.quiet:
            print(e.get("id", ""), flush=True)
        elif ctx.out.format == "json":
            print(json.dumps(e, sort_keys=True), flush=True)  # one event a line (NDJSON)
        elif ctx.out.format == "yaml":
            print("---\n" + to_yaml(e), end="", flush=True)  # a stream of YAML documents
        else:
            print(render.event_line(e), flush=True)
    return 0
