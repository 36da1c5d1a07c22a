"""Webhook endpoints and their deliveries: ``webhooks ls|enable``, ``webhooks deliveries ls|replay``."""

from __future__ import annotations

import argparse

from . import render
from .command import Arg, Commands
from .context import CliError, Ctx
from .exitcodes import EXIT_USAGE

COMMANDS = Commands()

#: The filters ``deliveries ls`` and ``deliveries replay`` share.
_FILTERS = (
    Arg("--status", choices=("pending", "delivered", "failed", "disabled")),
    Arg("--webhook", help="endpoint name"),
    Arg("--event", help="event id"),
)

COMMANDS.group("webhooks", help="webhook endpoints and their deliveries")


@COMMANDS.command("webhooks ls", help="endpoints from the config, with delivery counts")
async def _ls(ctx: Ctx, args: argparse.Namespace) -> int:
    ctx.out.listing(await ctx.client.webhooks(), render.WEBHOOKS)
    return 0


@COMMANDS.command("webhooks enable", help="re-enable an endpoint that answered 410 Gone", args=[Arg("name")])
async def _enable(ctx: Ctx, args: argparse.Namespace) -> int:
    data = await ctx.client.enable_webhook(args.name)
    ctx.out.show(data, lambda: print(f"enabled {args.name}" + (
        "" if data["was_disabled"] else " (it was not disabled)") +
        "; replay what it missed with: instaclone webhooks deliveries replay --status disabled"), [args.name])
    return 0


COMMANDS.group("webhooks deliveries", help="list or replay deliveries")


@COMMANDS.command("webhooks deliveries ls", help="deliveries, newest first", args=[
    *_FILTERS,
    Arg("--job", help="job id"),
    Arg("--limit", type=int, default=50),
])
async def _deliveries(ctx: Ctx, args: argparse.Namespace) -> int:
    rows = await ctx.client.deliveries(status=args.status, webhook=args.webhook, job=args.job, event=args.event,
                                       limit=args.limit)
    ctx.out.listing(rows, render.DELIVERIES)
    return 0


@COMMANDS.command("webhooks deliveries replay", help="send deliveries again (same event id)", args=[
    Arg("ids", nargs="*", type=int, help="delivery ids"),
    *_FILTERS,
])
async def _replay(ctx: Ctx, args: argparse.Namespace) -> int:
    if not (args.ids or args.status or args.webhook or args.event):
        raise CliError("say what to replay: delivery ids, or --status/--webhook/--event", EXIT_USAGE)
    ids = await ctx.client.replay(args.ids or None, status=args.status, webhook=args.webhook, event_id=args.event)
    ctx.out.show({"replayed": ids}, lambda: print(f"queued {len(ids)} deliveries again"), [str(i) for i in ids])
    return 0
