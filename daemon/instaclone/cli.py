"""``instaclone``: command-line client of the control API.

Errors are one line on stderr and an exit status from ``cli_parser.EXIT_CODES`` (1 the daemon
reported an error, 2 usage, 3 unreachable, 4 permission denied, 130 Ctrl-C, 141 stdout closed
early; ``exec`` exits with the command's own status). No traceback, ever: ``main`` turns every
failure it knows into its line and status.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from . import cli_complete, cli_help, cli_inside, cli_pools, cli_progress, cli_render as render
from .cli_output import Output, to_yaml
from .cli_exit import EXIT_BROKEN_PIPE, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE
from .cli_parser import parser
from .cli_transport import CliError, Ctx, kv
from .states import TERMINAL

_TERMINAL = frozenset(s.value for s in TERMINAL)


def _clone_options(args: argparse.Namespace) -> dict[str, Any]:
    """The optional clone request fields given on the command line."""
    out: dict[str, Any] = {}
    if args.keep_ssh_host_keys:
        out["keep_ssh_host_keys"] = True
    if args.script:
        try:
            out["script"] = sys.stdin.read() if args.script == "-" else Path(args.script).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise CliError(f"--script {args.script}: {exc}", EXIT_USAGE) from None
    return out


async def _wait_with_progress(ctx: Ctx, job: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Show the job's states as they are reached until it ends or ``timeout_s`` passes; the job then."""

    async def states() -> AsyncIterator[dict[str, object]]:
        async for e in ctx.stream(f"/v1/events?job={job['id']}&follow=1&tail=1000"):
            data = e.get("data") or {}
            if e.get("type", "").startswith("clone.") and data.get("state"):
                yield data

    progress = cli_progress.Progress()
    try:
        async with asyncio.timeout(timeout_s):
            await cli_progress.show(states(), progress, _TERMINAL)
    except TimeoutError:
        print(f"  (still running after {timeout_s:g} s: instaclone jobs show {job['id']} --wait S)")
    return (await ctx.request("GET", f"/v1/jobs/{job['id']}"))["job"]


async def _clone(ctx: Ctx, args: argparse.Namespace) -> int:
    body = {"source": args.source, "name": args.name, "count": args.count, "keep_network": args.keep_network,
            "customize": not args.no_customize, "config": kv(args.config), **_clone_options(args),
            **({"ttl_s": args.ttl} if args.ttl is not None else {})}
    # Progress is for people: with -q or -o json|yaml the daemon waits and one answer comes back.
    progress = args.wait and not (ctx.out.quiet or ctx.out.machine)
    wait = f"?wait={args.timeout:g}" if args.wait and not progress else ""
    job = (await ctx.request("POST", f"/v1/jobs{wait}", body, timeout_s=args.timeout + 360))["job"]
    if progress:
        print(f"job {job['id']}: cloning {args.source} -> {', '.join(job['spec'].get('names', []))}", flush=True)
        job = await _wait_with_progress(ctx, job, args.timeout)
    names = [c["name"] for c in (job.get("result") or {}).get("clones", [])] if args.wait else [job["id"]]
    ctx.out.show(job, lambda: render.print_job(job, history=not progress), names)
    return 1 if args.wait and job["state"] != "Unstunned" else 0


async def _jobs(ctx: Ctx, args: argparse.Namespace) -> int:
    if args.jobs_cmd == "show":
        q = f"?wait={args.wait:g}" if args.wait else ""
        job = (await ctx.request("GET", f"/v1/jobs/{args.job_id}{q}", timeout_s=args.wait + 360))["job"]
        ctx.out.show(job, lambda: render.print_job(job), [job["state"]])
        return 0
    ctx.out.listing((await ctx.request("GET", "/v1/jobs"))["jobs"], render.JOBS)
    return 0


async def _clones(ctx: Ctx, args: argparse.Namespace) -> int:
    ctx.out.listing((await ctx.request("GET", "/v1/clones"))["clones"], render.CLONES)
    return 0


async def _destroy(ctx: Ctx, args: argparse.Namespace) -> int:
    data = await ctx.request("DELETE", f"/v1/clones/{args.clone}")
    ctx.out.show(data, lambda: print(f"destroyed {args.clone}"), [args.clone])
    return 0


async def _freeze(ctx: Ctx, args: argparse.Namespace) -> int:
    """``freeze`` and ``unfreeze``."""
    data = await ctx.request("POST", f"/v1/sources/{args.source}/{args.cmd}")
    entry = data["frozen" if args.cmd == "freeze" else "unfrozen"]

    def human() -> None:
        if args.cmd == "freeze":
            print(f"froze {args.source} in {entry['freeze_ms']:.0f} ms (memory backend {entry['backend']}); "
                  "clones from it need no stun")
        else:
            print(f"unfroze {args.source} ({entry['clones']} clones made while frozen)")
    ctx.out.show(entry, human, [args.source])
    return 0


async def _check(ctx: Ctx, args: argparse.Namespace) -> int:
    report = (await ctx.request("GET", f"/v1/sources/{args.source}/check"))["check"]
    ctx.out.show(report, lambda: render.print_check(report), ["cloneable" if report["cloneable"] else "not-cloneable"])
    return 0 if report["cloneable"] else 1


async def _prepare(ctx: Ctx, args: argparse.Namespace) -> int:
    data = (await ctx.request("POST", f"/v1/sources/{args.source}/prepare", {"dry_run": args.dry_run}))["prepare"]
    ctx.out.show(data, lambda: render.print_prepare(data), data["changed"])
    return 0


async def _frozen(ctx: Ctx, args: argparse.Namespace) -> int:
    ctx.out.listing((await ctx.request("GET", "/v1/frozen"))["frozen"], render.FROZEN)
    return 0


async def _status(ctx: Ctx, args: argparse.Namespace) -> int:
    data = await ctx.request("GET", "/v1/health")

    def human() -> None:
        for k, v in data.items():
            if k != "disk":
                print(f"{k}: {v}")
        if "disk" in data:
            print("disk used per source:")
            render.print_disk(data["disk"])
    ctx.out.show(data, human, [str(data.get("version", ""))])
    return 0


async def _gc(ctx: Ctx, args: argparse.Namespace) -> int:
    report = (await ctx.request("POST", "/v1/gc", {"dry_run": args.dry_run}))["gc"]
    ctx.out.show(report, lambda: render.print_gc(report), [d["path"] for d in report["deleted"]])
    return 1 if report["failed"] else 0


async def _events(ctx: Ctx, args: argparse.Namespace) -> int:
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
    async for e in ctx.stream(f"/v1/events?{'&'.join(q)}"):
        if ctx.out.quiet:
            print(e.get("id", ""), flush=True)
        elif ctx.out.machine:
            # One event a line (NDJSON), also for yaml: a stream of documents.
            print(json.dumps(e, sort_keys=True) if ctx.out.format == "json" else "---\n" + to_yaml(e), end="\n"
                  if ctx.out.format == "json" else "", flush=True)
        else:
            print(render.event_line(e), flush=True)
    return 0


async def _webhooks(ctx: Ctx, args: argparse.Namespace) -> int:
    if args.webhooks_cmd == "ls":
        ctx.out.listing((await ctx.request("GET", "/v1/webhooks"))["webhooks"], render.WEBHOOKS)
        return 0
    if args.webhooks_cmd == "enable":
        data = await ctx.request("POST", f"/v1/webhooks/{args.name}/enable")
        ctx.out.show(data, lambda: print(f"enabled {args.name}" + (
            "" if data["was_disabled"] else " (it was not disabled)") +
            "; replay what it missed with: instaclone webhooks deliveries replay --status disabled"), [args.name])
        return 0
    if args.deliveries_cmd == "ls":
        q = [f"limit={args.limit}"] + [f"{k}={v}" for k, v in (("status", args.status), ("webhook", args.webhook),
                                                              ("job", args.job), ("event", args.event)) if v]
        rows = (await ctx.request("GET", "/v1/webhooks/deliveries?" + "&".join(q)))["deliveries"]
        ctx.out.listing(rows, render.DELIVERIES)
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
        raise CliError("say what to replay: delivery ids, or --status/--webhook/--event", EXIT_USAGE)
    data = await ctx.request("POST", "/v1/webhooks/deliveries/replay", body)
    ctx.out.show(data, lambda: print(f"queued {len(data['replayed'])} deliveries again"),
                 [str(i) for i in data["replayed"]])
    return 0


Handler = Callable[[Ctx, argparse.Namespace], Awaitable[int]]
#: Command name -> handler(ctx, args) -> exit status.
_COMMANDS: dict[str, Handler] = {
    "clone": _clone, "jobs": _jobs, "clones": _clones, "destroy": _destroy, "freeze": _freeze,
    "unfreeze": _freeze, "check": _check, "prepare": _prepare, "frozen": _frozen, "events": _events,
    "webhooks": _webhooks, "status": _status, "gc": _gc,
}
_COMMANDS.update(cli_pools.commands(kv))
_COMMANDS.update(cli_inside.commands())


async def run(args: argparse.Namespace) -> int:
    """Run the parsed command against the daemon; the exit status. Raises CliError."""
    ctx = Ctx(args.socket, Output(args.output, args.quiet))
    return await _COMMANDS[args.cmd](ctx, args)


def _local(args: argparse.Namespace) -> int | None:
    """The commands that need no daemon (help, completion); None for the others."""
    if args.cmd == "help":
        return cli_help.main(parser(), args.topic, args.man)
    if args.cmd == "completion":
        print(cli_complete.script(parser(), args.shell), end="")
        return 0
    return None


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush at exit cannot fail again."""
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), sys.stdout.fileno())


def main(argv: list[str] | None = None) -> int:
    """The CLI; its exit status. Every failure is one line on stderr (never a traceback)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        if cli_complete.HIDDEN in argv:
            return cli_complete.main(argv, lambda sock: Ctx(sock, Output()), CliError)
        args = parser().parse_args(argv)
        if args.cmd == "exec":
            cli_inside.split_exec(args)
        status = _local(args)
        if status is None:
            status = asyncio.run(run(args))
        sys.stdout.flush()
        return status
    except CliError as exc:
        print(f"instaclone: {exc}", file=sys.stderr)
        return exc.status
    except BrokenPipeError:
        # The reader of stdout went away (| head): like coreutils, stop quietly.
        _quiet_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        print("instaclone: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        # A bug of ours: still one line, and the traceback for whoever debugs it.
        if os.environ.get("INSTACLONE_DEBUG"):
            raise
        print(f"instaclone: internal error: {type(exc).__name__}: {exc} (INSTACLONE_DEBUG=1 shows the "
              "traceback)", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
