"""The CLI's pool commands: ``pool create|ls|show|resize|update|delete|claim`` and ``release``."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from .cli_output import Column, Listing, raw

if TYPE_CHECKING:
    from .cli_transport import Ctx

#: ``KEY=VALUE`` options to a dict (the CLI's own, with its usage error).
KeyValues = Callable[[list[str]], dict[str, str]]
Handler = Callable[["Ctx", argparse.Namespace], Awaitable[int]]


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


def commands(kv: KeyValues) -> dict[str, Handler]:
    """The handlers, with the CLI's ``KEY=VALUE`` parser."""

    async def pool(ctx: Ctx, args: argparse.Namespace) -> int:
        cmd, name, out, c = args.pool_cmd, getattr(args, "pool", ""), ctx.out, ctx.client
        if cmd == "create":
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
        elif cmd == "ls":
            out.listing([raw(p) for p in await c.pools()], POOLS)
        elif cmd == "show":
            p = raw(await c.pool(name))
            out.show(p, lambda: _print_pool(p), p["idle"])
        elif cmd == "resize":
            resized = raw(await c.resize_pool(name, args.size))
            out.show(resized, lambda: print(f"pool {name} resized to {args.size}"), [name])
        elif cmd == "update":
            moved = raw(await c.update_pool(name, source=args.source))
            out.show(moved, lambda: print(f"pool {name} moves to {args.source}: idle members are "
                                          "replaced in the background, claimed ones stay"), [name])
        elif cmd == "delete":
            gone = await c.delete_pool(name)
            out.show(gone, lambda: print(
                f"deleted pool {name}; destroyed {len(gone['destroyed'])} idle members"
                + (f"; could not destroy: {gone['not_destroyed']}" if gone["not_destroyed"] else "")),
                gone["destroyed"])
        elif cmd == "claim":
            claim = raw(await c.claim(name, ttl_s=args.ttl, config=kv(args.config) if args.config else None,
                                      wait_s=args.wait))
            out.show(claim, lambda: _print_claim(claim), [claim["clone"]["name"]])
        return 0

    async def release(ctx: Ctx, args: argparse.Namespace) -> int:
        data = await ctx.client.release(args.clone)
        ctx.out.show(data, lambda: print(f"released {args.clone}; pool {data['pool']} makes another"), [args.clone])
        return 0

    return {"pool": pool, "release": release}


def add_parsers(sub: Any) -> None:
    """The pool commands, on the CLI's subcommand adder (``cli_parser._Sub``)."""
    p = sub.add_parser("pool", help="pools of ready clones: create, ls, show, resize, update, delete, claim")
    ps = sub.nested(p, "pool_cmd")
    c = ps.add_parser("create", help="keep SIZE ready clones of SRC (running, customized, network up)")
    c.add_argument("pool")
    c.add_argument("--source", required=True)
    c.add_argument("--size", type=int, required=True)
    c.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                   help="data handed to each member (/run/instaclone/config.json); repeatable")
    c.add_argument("--no-customize", action="store_true", help="skip the members' identity reset")
    c.add_argument("--keep-network", action="store_true", help="isolated networks: no link-down until NIC replug")
    fz = c.add_mutually_exclusive_group()
    fz.add_argument("--freeze", dest="freeze", action="store_true", default=None,
                    help="freeze the source first: members need no stun (asked on a terminal if not given)")
    fz.add_argument("--no-freeze", dest="freeze", action="store_false",
                    help="keep the source running: each replenishment stuns it once for all members it makes")
    ps.add_parser("ls", help="pools with their idle, claimed and pending members")
    for name, helptext in (("show", "one pool"), ("delete", "destroy the idle members; claimed ones stay")):
        sp = ps.add_parser(name, help=helptext)
        sp.add_argument("pool")
    r = ps.add_parser("resize", help="change how many idle members the pool keeps")
    r.add_argument("pool")
    r.add_argument("size", type=int)
    u = ps.add_parser("update", help="image push: move the pool to a new (frozen) source")
    u.add_argument("pool")
    u.add_argument("--source", required=True)
    cl = ps.add_parser("claim", help="hand out a ready member now (waits, bounded, if none is idle)")
    cl.add_argument("pool")
    cl.add_argument("--ttl", type=float, metavar="S", help="destroy the member S seconds after the claim")
    cl.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                    help="written over the pool's config to /run/instaclone/config.json; repeatable")
    cl.add_argument("--wait", type=float, metavar="S", help="wait at most S seconds (default pools.claim_wait_s)")
    rl = sub.add_parser("release", help="destroy a pool member (claimed or idle); its pool makes another")
    rl.add_argument("clone")
