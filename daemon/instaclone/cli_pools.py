"""The CLI's pool commands: ``pool create|ls|show|resize|update|delete|claim`` and ``release``."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from . import cli_render as render

Request = Callable[..., Awaitable[dict[str, Any]]]
#: ``KEY=VALUE`` options to a dict (the CLI's own, with its usage error).
KeyValues = Callable[[list[str]], dict[str, str]]
Handler = Callable[[str, argparse.Namespace, bool], Awaitable[int]]

POOLS: tuple[list[str], render.Row] = (
    ["POOL", "SOURCE", "SIZE", "IDLE", "CLAIMED", "PENDING", "NOTE"],
    lambda p: [p["name"], p["source"], str(p["size"]), str(len(p["idle"])) + (
        f"+{len(p['idle_old_source'])} old" if p["idle_old_source"] else ""), str(len(p["claimed"])),
        str(p["pending"]), p.get("held") or ((p.get("last_error") or {}).get("message") or "")[:60]])


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


def commands(request: Request, kv: KeyValues) -> dict[str, Handler]:
    """The handlers, bound to the CLI's request function and its ``KEY=VALUE`` parser."""

    async def pool(sock: str, args: argparse.Namespace, out_json: bool) -> int:
        cmd = args.pool_cmd
        if cmd == "create":
            freeze = args.freeze
            if freeze is None and sys.stdin.isatty() and not out_json:
                frozen = {f["name"] for f in (await request(sock, "GET", "/v1/frozen"))["frozen"]}
                if args.source not in frozen:
                    answer = await asyncio.to_thread(
                        input, f"{args.source} is not frozen: freeze it as the pool's template, so that "
                               "members need no stun? [y/N] ")
                    freeze = answer.strip().lower() in ("y", "yes")
            data = await request(sock, "POST", "/v1/pools", {
                "name": args.name, "source": args.source, "size": args.size, "config": kv(args.config),
                "customize": not args.no_customize, "keep_network": args.keep_network, "freeze": bool(freeze)})
            _print_or_emit(data["pool"], out_json, f"created pool {args.name}; it fills in the background "
                                                   f"(instaclone pool show {args.name})")
        elif cmd == "ls":
            render.listing(out_json, (await request(sock, "GET", "/v1/pools"))["pools"], *POOLS)
        elif cmd == "show":
            p = (await request(sock, "GET", f"/v1/pools/{args.name}"))["pool"]
            render.print_json(p) if out_json else _print_pool(p)
        elif cmd == "resize":
            data = await request(sock, "PATCH", f"/v1/pools/{args.name}", {"size": args.size})
            _print_or_emit(data["pool"], out_json, f"pool {args.name} resized to {args.size}")
        elif cmd == "update":
            data = await request(sock, "PATCH", f"/v1/pools/{args.name}", {"source": args.source})
            _print_or_emit(data["pool"], out_json, f"pool {args.name} moves to {args.source}: idle members are "
                                                   "replaced in the background, claimed ones stay")
        elif cmd == "delete":
            data = (await request(sock, "DELETE", f"/v1/pools/{args.name}"))["deleted"]
            if out_json:
                render.print_json(data)
            else:
                print(f"deleted pool {args.name}; destroyed {len(data['destroyed'])} idle members"
                      + (f"; could not destroy: {data['not_destroyed']}" if data["not_destroyed"] else ""))
        elif cmd == "claim":
            body: dict[str, Any] = {"config": kv(args.config)} if args.config else {}
            if args.ttl is not None:
                body["ttl_s"] = args.ttl
            if args.wait is not None:
                body["wait_s"] = args.wait
            data = (await request(sock, "POST", f"/v1/pools/{args.name}/claim", body))["claim"]
            if out_json:
                render.print_json(data)
            else:
                c = data["clone"]
                ttl = f"  expires {time.strftime('%H:%M:%S', time.localtime(c['expires_at']))}" \
                    if c.get("expires_at") else ""
                print(f"{c['name']}{ttl}  (claimed in {data['waited_ms']:.0f} ms)")
        return 0

    async def release(sock: str, args: argparse.Namespace, out_json: bool) -> int:
        data = (await request(sock, "POST", f"/v1/clones/{args.name}/release"))["released"]
        if out_json:
            render.print_json(data)
        else:
            print(f"released {args.name}; pool {data['pool']} makes another")
        return 0

    return {"pool": pool, "release": release}


def _print_or_emit(pool: dict[str, Any], out_json: bool, line: str) -> None:
    if out_json:
        render.print_json(pool)
    else:
        print(line)


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("pool", help="pools of ready clones: create, ls, show, resize, update, delete, claim")
    ps = p.add_subparsers(dest="pool_cmd", required=True)
    c = ps.add_parser("create", help="keep SIZE ready clones of SRC (running, customized, network up)")
    c.add_argument("name")
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
        sp.add_argument("name")
    r = ps.add_parser("resize", help="change how many idle members the pool keeps")
    r.add_argument("name")
    r.add_argument("size", type=int)
    u = ps.add_parser("update", help="image push: move the pool to a new (frozen) source")
    u.add_argument("name")
    u.add_argument("--source", required=True)
    cl = ps.add_parser("claim", help="hand out a ready member now (waits, bounded, if none is idle)")
    cl.add_argument("name")
    cl.add_argument("--ttl", type=float, metavar="S", help="destroy the member S seconds after the claim")
    cl.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                    help="written over the pool's config to /run/instaclone/config.json; repeatable")
    cl.add_argument("--wait", type=float, metavar="S", help="wait at most S seconds (default pools.claim_wait_s)")
    rl = sub.add_parser("release", help="destroy a pool member (claimed or idle); its pool makes another")
    rl.add_argument("name")
