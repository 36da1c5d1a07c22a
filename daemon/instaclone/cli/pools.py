"""Pools of ready clones: ``pool create|ls|show|delete|resize|update|claim`` and ``release``."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from .command import Arg, Commands, Exclusive
from .context import Ctx, kv
from .output import Column, Listing, raw

COMMANDS = Commands()


def _idle(p: dict[str, Any]) -> str:
    return str(len(p["idle"])) + (f"+{len(p['idle_old_source'])} old" if p["idle_old_source"] else "")


POOLS = Listing((
    Column("POOL", lambda p: p["name"]),
    Column("SOURCE", lambda p: p["source"]),
    Column("SIZE", lambda p: str(p["size"])),
    Column("IDLE", _idle),
    Column("CLAIMED", lambda p: str(len(p["claimed"]))),
    Column("PENDING", lambda p: str(p["pending"])),
    Column("NOTE", lambda p: p.get("held") or ((p.get("last_error") or {}).get("message") or "")[:60]),
    Column("GENERATION", lambda p: str(p.get("generation", "-")), wide=True),
    Column("IDLE MEMBERS", lambda p: ",".join(p["idle"]) or "-", wide=True),
    Column("CLAIMED MEMBERS", lambda p: ",".join(p["claimed"]) or "-", wide=True),
), key="name")


def _print_pool(p: dict[str, Any]) -> None:
    print(f"pool {p['name']}  source={p['source']} (generation {p['generation']})  size={p['size']}")
    print(f"  idle ({len(p['idle'])}): {', '.join(p['idle']) or '-'}")
    if p["idle_old_source"]:
        print(f"  idle of an older source, being replaced: {', '.join(p['idle_old_source'])}")
    print(f"  claimed ({len(p['claimed'])}): {', '.join(p['claimed']) or '-'}")
    print(f"  being made: {p['pending']}")
    if p.get("config"):
        print(f"  config: {json.dumps(p['config'], sort_keys=True)}")
    if p.get("held"):
        print(f"  held: {p['held']}")
    if p.get("last_error"):
        e = p["last_error"]
        print(f"  last replenish error ({p['failures']} in a row): {e.get('message')} [{e.get('code')}]")


def _print_claim(data: dict[str, Any]) -> None:
    c = data["clone"]
    ttl = f"  expires {time.strftime('%H:%M:%S', time.localtime(c['expires_at']))}" if c.get("expires_at") else ""
    print(f"{c['name']}{ttl}  (claimed in {data['waited_ms']:.0f} ms)")


COMMANDS.group("pool", help="pools of ready clones: create, ls, show, resize, update, delete, claim")


@COMMANDS.command("pool create", help="keep SIZE ready clones of SRC (running, customized, network up)", args=[
    Arg("pool"),
    Arg("--source", required=True),
    Arg("--size", type=int, required=True),
    Arg("--config", action="append", default=[], metavar="KEY=VALUE",
        help="data handed to each member (/run/instaclone/config.json); repeatable"),
    Arg("--no-customize", action="store_true", help="skip the members' identity reset"),
    Arg("--keep-network", action="store_true", help="isolated networks: no link-down until NIC replug"),
    Exclusive(
        Arg("--freeze", dest="freeze", action="store_true", default=None,
            help="freeze the source first: members need no stun (asked on a terminal if not given)"),
        Arg("--no-freeze", dest="freeze", action="store_false",
            help="keep the source running: each replenishment stuns it once for all members it makes")),
])
async def _create(ctx: Ctx, args: argparse.Namespace) -> int:
    name, out, c = args.pool, ctx.out, ctx.client
    freeze = args.freeze
    ask = freeze is None and sys.stdin.isatty() and not (out.machine or out.quiet)
    if ask and args.source not in {f["name"] for f in await c.frozen()}:
        answer = await asyncio.to_thread(
            input, f"{args.source} is not frozen: freeze it as the pool's template, so that "
                   "members need no stun? [y/N] ")
        freeze = answer.strip().lower() in ("y", "yes")
    made = raw(await c.create_pool(name, source=args.source, size=args.size, config=kv(args.config),
                                   customize=not args.no_customize, keep_network=args.keep_network,
                                   freeze=bool(freeze)))
    out.show(made, lambda: print(f"created pool {name}; it fills in the background "
                                 f"(instaclone pool show {name})"), [name])
    return 0


@COMMANDS.command("pool ls", help="pools with their idle, claimed and pending members")
async def _ls(ctx: Ctx, args: argparse.Namespace) -> int:
    ctx.out.listing([raw(p) for p in await ctx.client.pools()], POOLS)
    return 0


@COMMANDS.command("pool show", help="one pool", args=[Arg("pool")])
async def _show(ctx: Ctx, args: argparse.Namespace) -> int:
    p = raw(await ctx.client.pool(args.pool))
    ctx.out.show(p, lambda: _print_pool(p), p["idle"])
    return 0


@COMMANDS.command("pool delete", help="destroy the idle members; claimed ones stay", args=[Arg("pool")])
async def _delete(ctx: Ctx, args: argparse.Namespace) -> int:
    name = args.pool
    gone = await ctx.client.delete_pool(name)
    ctx.out.show(gone, lambda: print(
        f"deleted pool {name}; destroyed {len(gone['destroyed'])} idle members"
        + (f"; could not destroy: {gone['not_destroyed']}" if gone["not_destroyed"] else "")),
        gone["destroyed"])
    return 0


@COMMANDS.command("pool resize", help="change how many idle members the pool keeps",
                  args=[Arg("pool"), Arg("size", type=int)])
async def _resize(ctx: Ctx, args: argparse.Namespace) -> int:
    resized = raw(await ctx.client.resize_pool(args.pool, args.size))
    ctx.out.show(resized, lambda: print(f"pool {args.pool} resized to {args.size}"), [args.pool])
    return 0


@COMMANDS.command("pool update", help="image push: move the pool to a new (frozen) source",
                  args=[Arg("pool"), Arg("--source", required=True)])
async def _update(ctx: Ctx, args: argparse.Namespace) -> int:
    moved = raw(await ctx.client.update_pool(args.pool, source=args.source))
    ctx.out.show(moved, lambda: print(f"pool {args.pool} moves to {args.source}: idle members are "
                                      "replaced in the background, claimed ones stay"), [args.pool])
    return 0


@COMMANDS.command("pool claim", help="hand out a ready member now (waits, bounded, if none is idle)", args=[
    Arg("pool"),
    Arg("--ttl", type=float, metavar="S", help="destroy the member S seconds after the claim"),
    Arg("--config", action="append", default=[], metavar="KEY=VALUE",
        help="written over the pool's config to /run/instaclone/config.json; repeatable"),
    Arg("--wait", type=float, metavar="S", help="wait at most S seconds (default pools.claim_wait_s)"),
])
async def _claim(ctx: Ctx, args: argparse.Namespace) -> int:
    claim = raw(await ctx.client.claim(args.pool, ttl_s=args.ttl, config=kv(args.config) if args.config else None,
                                       wait_s=args.wait))
    ctx.out.show(claim, lambda: _print_claim(claim), [claim["clone"]["name"]])
    return 0


@COMMANDS.command("release", help="destroy a pool member (claimed or idle); its pool makes another",
                  args=[Arg("clone")])
async def _release(ctx: Ctx, args: argparse.Namespace) -> int:
    data = await ctx.client.release(args.clone)
    ctx.out.show(data, lambda: print(f"released {args.clone}; pool {data['pool']} makes another"), [args.clone])
    return 0
