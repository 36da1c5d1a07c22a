"""``instaclone``: command-line client of the control API.

Errors are one line on stderr and a non-zero exit status (1 for an error the
daemon reported, 2 for a usage error, 3 when the daemon cannot be reached).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from . import cli_pools, cli_render as render

DEFAULT_SOCKET = "/run/instaclone/control.sock"


class CliError(Exception):
    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


async def _request(sock: str, method: str, path: str, body: dict[str, Any] | None = None,
                   timeout_s: float = 660.0) -> dict[str, Any]:
    conn = aiohttp.UnixConnector(path=sock)
    try:
        async with (
            aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout_s)) as s,
            s.request(method, f"http://instaclone{path}", json=body) as resp,
        ):
            try:
                data = await resp.json(content_type=None)
            except ValueError:
                raise CliError(f"daemon sent a non-JSON answer (HTTP {resp.status})") from None
            if resp.status >= 400:
                err = (data or {}).get("error", {})
                raise CliError(f"{err.get('message', 'HTTP ' + str(resp.status))} [{err.get('code', '?')}]")
            return dict(data)
    except (aiohttp.ClientConnectorError, FileNotFoundError, ConnectionRefusedError) as exc:
        raise CliError(f"cannot reach instacloned at {sock}: {exc.strerror or exc}", 3) from None


def _clone_options(args: argparse.Namespace) -> dict[str, Any]:
    """The optional clone request fields given on the command line."""
    out: dict[str, Any] = {}
    if args.keep_ssh_host_keys:
        out["keep_ssh_host_keys"] = True
    if args.script:
        try:
            out["script"] = sys.stdin.read() if args.script == "-" else Path(args.script).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise CliError(f"--script {args.script}: {exc}", 2) from None
    return out


def _kv(pairs: list[str]) -> dict[str, str]:
    out = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key:
            raise CliError(f"--config wants KEY=VALUE, got {p!r}", 2)
        out[key] = value
    return out


def _emit(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


async def _clone(sock: str, args: argparse.Namespace, out_json: bool) -> int:
    wait = f"?wait={args.timeout:g}" if args.wait else ""
    data = await _request(sock, "POST", f"/v1/jobs{wait}",
                          {"source": args.source, "name": args.name, "count": args.count,
                           "keep_network": args.keep_network, "customize": not args.no_customize,
                           "config": _kv(args.config), **_clone_options(args),
                           **({"ttl_s": args.ttl} if args.ttl is not None else {})})
    job = data["job"]
    _emit(job) if out_json else render.print_job(job)
    return 1 if args.wait and job["state"] != "Unstunned" else 0


async def _jobs(sock: str, args: argparse.Namespace, out_json: bool) -> int:
    if args.jobs_cmd == "show":
        q = f"?wait={args.wait:g}" if args.wait else ""
        job = (await _request(sock, "GET", f"/v1/jobs/{args.job_id}{q}"))["job"]
        _emit(job) if out_json else render.print_job(job)
        return 0
    jobs = (await _request(sock, "GET", "/v1/jobs"))["jobs"]
    render.listing(out_json, jobs, *render.JOBS)
    return 0


async def _clones(sock: str, args: argparse.Namespace, out_json: bool) -> int:
    clones = (await _request(sock, "GET", "/v1/clones"))["clones"]
    render.listing(out_json, clones, *render.CLONES)
    return 0


async def _destroy(sock: str, args: argparse.Namespace, out_json: bool) -> int:
    data = await _request(sock, "DELETE", f"/v1/clones/{args.name}")
    _emit(data) if out_json else print(f"destroyed {args.name}")
    return 0


async def _freeze(sock: str, args: argparse.Namespace, out_json: bool) -> int:
    """``freeze`` and ``unfreeze``."""
    data = await _request(sock, "POST", f"/v1/sources/{args.source}/{args.cmd}")
    entry = data["frozen" if args.cmd == "freeze" else "unfrozen"]
    if out_json:
        _emit(entry)
    elif args.cmd == "freeze":
        print(f"froze {args.source} in {entry['freeze_ms']:.0f} ms (memory backend {entry['backend']}); "
              "clones from it need no stun")
    else:
        print(f"unfroze {args.source} ({entry['clones']} clones made while frozen)")
    return 0


async def _check(sock: str, args: argparse.Namespace, out_json: bool) -> int:
    report = (await _request(sock, "GET", f"/v1/sources/{args.source}/check"))["check"]
    _emit(report) if out_json else render.print_check(report)
    return 0 if report["cloneable"] else 1


async def _prepare(sock: str, args: argparse.Namespace, out_json: bool) -> int:
    data = (await _request(sock, "POST", f"/v1/sources/{args.source}/prepare", {"dry_run": args.dry_run}))
    _emit(data["prepare"]) if out_json else render.print_prepare(data["prepare"])
    return 0


async def _frozen(sock: str, args: argparse.Namespace, out_json: bool) -> int:
    rows = (await _request(sock, "GET", "/v1/frozen"))["frozen"]
    render.listing(out_json, rows, *render.FROZEN)
    return 0


async def _status(sock: str, args: argparse.Namespace, out_json: bool) -> int:
    data = await _request(sock, "GET", "/v1/health")
    if out_json:
        _emit(data)
    else:
        for k, v in data.items():
            if k != "disk":
                print(f"{k}: {v}")
        if "disk" in data:
            print("disk used per source:")
            render.print_disk(data["disk"])
    return 0


async def _gc(sock: str, args: argparse.Namespace, out_json: bool) -> int:
    report = (await _request(sock, "POST", "/v1/gc", {"dry_run": args.dry_run}))["gc"]
    _emit(report) if out_json else render.print_gc(report)
    return 1 if report["failed"] else 0


async def run(args: argparse.Namespace) -> int:
    """Run the parsed command against the daemon; the exit status. Raises CliError."""
    handler = _COMMANDS.get(args.cmd)
    if handler is None:
        raise CliError("no command given", 2)
    return await handler(args.socket, args, args.output == "json")


async def _events(sock: str, args: argparse.Namespace, out_json: bool) -> int:
    """Print events; with --follow keep printing them as they happen (until interrupted)."""
    q: list[str] = [f"tail={args.tail}"]
    if args.follow:
        q.append("follow=1")
    if args.job:
        q.append(f"job={args.job}")
    if args.type:
        q.append("type=" + ",".join(args.type))
    if args.since is not None:
        q.append(f"since={args.since}")
    conn = aiohttp.UnixConnector(path=sock)
    try:
        async with (
            aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=None)) as s,
            s.get(f"http://instaclone/v1/events?{'&'.join(q)}") as resp,
        ):
            if resp.status >= 400:
                err = (await resp.json(content_type=None)).get("error", {})
                raise CliError(f"{err.get('message')} [{err.get('code')}]")
            async for raw in resp.content:
                if not raw.strip():
                    continue
                if out_json:
                    print(raw.decode().strip(), flush=True)
                else:
                    print(render.event_line(json.loads(raw)), flush=True)
    except (aiohttp.ClientConnectorError, FileNotFoundError, ConnectionRefusedError) as exc:
        raise CliError(f"cannot reach instacloned at {sock}: {getattr(exc, 'strerror', None) or exc}", 3) from None
    except aiohttp.ClientPayloadError:
        raise CliError("the daemon closed the event stream (stopping?)") from None
    return 0


async def _webhooks(sock: str, args: argparse.Namespace, out_json: bool) -> int:
    if args.webhooks_cmd == "ls":
        rows = (await _request(sock, "GET", "/v1/webhooks"))["webhooks"]
        render.listing(out_json, rows, *render.WEBHOOKS)
        return 0
    if args.webhooks_cmd == "enable":
        data = await _request(sock, "POST", f"/v1/webhooks/{args.name}/enable")
        _emit(data) if out_json else print(f"enabled {args.name}" + (
            "" if data["was_disabled"] else " (it was not disabled)") +
            "; replay what it missed with: instaclone webhooks deliveries replay --status disabled")
        return 0
    if args.deliveries_cmd == "ls":
        q = [f"limit={args.limit}"] + [f"{k}={v}" for k, v in (("status", args.status), ("webhook", args.webhook),
                                                              ("job", args.job), ("event", args.event)) if v]
        rows = (await _request(sock, "GET", "/v1/webhooks/deliveries?" + "&".join(q)))["deliveries"]
        render.listing(out_json, rows, *render.DELIVERIES)
        return 0
    body: dict[str, Any] = {}
    if args.ids:
        body["ids"] = args.ids
    for key in ("status", "webhook"):
        if getattr(args, key):
            body[key] = getattr(args, key)
    if args.event:
        body["event_id"] = args.event
    if not body:
        raise CliError("say what to replay: delivery ids, or --status/--webhook/--event", 2)
    data = await _request(sock, "POST", "/v1/webhooks/deliveries/replay", body)
    _emit(data) if out_json else print(f"queued {len(data['replayed'])} deliveries again")
    return 0


_Handler = Callable[[str, argparse.Namespace, bool], Awaitable[int]]
#: Command name -> handler(socket, args, out_json) -> exit status.
_COMMANDS: dict[str, _Handler] = {
    "clone": _clone, "jobs": _jobs, "clones": _clones, "destroy": _destroy, "freeze": _freeze,
    "unfreeze": _freeze, "check": _check, "prepare": _prepare, "frozen": _frozen, "events": _events,
    "webhooks": _webhooks, "status": _status, "gc": _gc,
}
_COMMANDS.update(cli_pools.commands(_request, _kv))


def _clone_parser(sub: Any) -> None:
    c = sub.add_parser("clone", help="instant-clone a running or paused VM")
    c.add_argument("source")
    c.add_argument("--name", required=True, help="clone name; with --count > 1, the prefix of NAME-1..NAME-K")
    c.add_argument("--count", type=int, default=1)
    c.add_argument("--wait", action="store_true", help="wait until the job finishes")
    c.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                   help="data handed to the guest (/run/instaclone/config.json); repeatable")
    c.add_argument("--no-customize", action="store_true",
                   help="skip the guest-side identity reset (hostname, machine-id, DHCP)")
    c.add_argument("--keep-ssh-host-keys", action="store_true", default=None,
                   help="keep the source's SSH host keys (default: every clone gets new ones)")
    c.add_argument("--script", metavar="FILE",
                   help="shell script run in each clone after its identity reset ('-': stdin)")
    c.add_argument("--keep-network", action="store_true",
                   help="do not hold the clone's link down until its NIC is replaced (isolated networks)")
    c.add_argument("--timeout", type=float, default=300.0, help="seconds to wait with --wait")
    c.add_argument("--ttl", type=float, metavar="S", help="the daemon destroys each clone S seconds after it is ready")


def _source_parsers(sub: Any) -> None:
    """Commands on a source: freeze, unfreeze, check, prepare."""
    f = sub.add_parser("freeze", help="pause a source once as a template: clones from it need no stun")
    f.add_argument("source")
    u = sub.add_parser("unfreeze", help="let a frozen source run again (its clones are not affected)")
    u.add_argument("source")
    ck = sub.add_parser("check", help="can SRC be instant-cloned? per capability, and what to change "
                                      "(exit status 1 if not cloneable)")
    ck.add_argument("source")
    pr = sub.add_parser("prepare", help="write what instant clones need into SRC's persistent definition "
                                        "(applies at its next boot)")
    pr.add_argument("source")
    pr.add_argument("--dry-run", action="store_true", help="show the diff, change nothing")


def _events_parser(sub: Any) -> None:
    ev = sub.add_parser("events", help="show events (state changes); -f follows new ones")
    ev.add_argument("-f", "--follow", action="store_true", help="keep printing new events")
    ev.add_argument("--job", help="only this job's events")
    ev.add_argument("--type", action="append", default=[], metavar="TYPE",
                    help="event type or glob (clone.ready, clone.*); repeatable")
    ev.add_argument("--since", type=int, metavar="CURSOR", help="events after this cursor (see -o json)")
    ev.add_argument("--tail", type=int, default=20, help="how many past events to show first (default 20)")


def _webhooks_parser(sub: Any) -> None:
    wh = sub.add_parser("webhooks", help="webhook endpoints and their deliveries")
    whsub = wh.add_subparsers(dest="webhooks_cmd", required=True)
    whsub.add_parser("ls", help="endpoints from the config, with delivery counts")
    we = whsub.add_parser("enable", help="re-enable an endpoint that answered 410 Gone")
    we.add_argument("name")
    dl = whsub.add_parser("deliveries", help="list or replay deliveries")
    dlsub = dl.add_subparsers(dest="deliveries_cmd", required=True)
    dls = dlsub.add_parser("ls", help="deliveries, newest first")
    dlr = dlsub.add_parser("replay", help="send deliveries again (same event id)")
    dlr.add_argument("ids", nargs="*", type=int, help="delivery ids")
    for sp in (dls, dlr):
        sp.add_argument("--status", choices=("pending", "delivered", "failed", "disabled"))
        sp.add_argument("--webhook", help="endpoint name")
        sp.add_argument("--event", help="event id")
    dls.add_argument("--job", help="job id")
    dls.add_argument("--limit", type=int, default=50)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="instaclone", description="instant clones of running libvirt VMs")
    p.add_argument("--socket", default=os.environ.get("INSTACLONE_SOCKET", DEFAULT_SOCKET),
                   help="control socket of instacloned (env INSTACLONE_SOCKET)")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    sub = p.add_subparsers(dest="cmd", required=True)
    _clone_parser(sub)
    j = sub.add_parser("jobs", help="list or show clone jobs")
    jsub = j.add_subparsers(dest="jobs_cmd", required=True)
    jsub.add_parser("ls")
    js = jsub.add_parser("show")
    js.add_argument("job_id")
    js.add_argument("--wait", type=float, default=0.0, help="wait up to this many seconds for the job to end")
    cl = sub.add_parser("clones", help="list clones")
    clsub = cl.add_subparsers(dest="clones_cmd", required=True)
    clsub.add_parser("ls")
    d = sub.add_parser("destroy", help="power off and delete a clone and its files (those its own clones "
                                       "use stay until they are unused)")
    d.add_argument("name")
    _source_parsers(sub)
    sub.add_parser("frozen", help="list frozen sources")
    sub.add_parser("status", help="daemon status, disk used per source")
    g = sub.add_parser("gc", help="delete the delta and memory images no domain's backing chain uses")
    g.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")
    _events_parser(sub)
    _webhooks_parser(sub)
    cli_pools.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return asyncio.run(run(args))
    except CliError as exc:
        print(f"instaclone: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
