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
from .cli_exit import EXIT_BROKEN_PIPE, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE
from .cli_output import Output, to_yaml
from .cli_parser import parser
from .cli_transport import CliError, Ctx, kv, raw, translated


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
    if args.ttl is not None:
        out["ttl_s"] = args.ttl
    return out


async def _wait_with_progress(ctx: Ctx, job_id: str, timeout_s: float) -> dict[str, Any]:
    """Show the job's states as they are reached until it ends or ``timeout_s`` passes; the job then."""
    from .client.models import TERMINAL_STATES

    async def states() -> AsyncIterator[dict[str, object]]:
        async for ev in ctx.client.watch(job_id):
            yield dict(ev.data)

    try:
        async with asyncio.timeout(timeout_s):
            await cli_progress.show(states(), cli_progress.Progress(), TERMINAL_STATES)
    except TimeoutError:
        print(f"  (still running after {timeout_s:g} s: instaclone jobs show {job_id} --wait S)")
    return raw(await ctx.client.job(job_id))


async def _clone(ctx: Ctx, args: argparse.Namespace) -> int:
    # Progress is for people: with -q or -o json|yaml the daemon waits and one answer comes back.
    progress = args.wait and not (ctx.out.quiet or ctx.out.machine)
    submitted = await ctx.client.clone(
        args.source, name=args.name, count=args.count, wait=args.wait and not progress, timeout_s=args.timeout,
        config=kv(args.config), customize=not args.no_customize, keep_network=args.keep_network,
        **_clone_options(args))
    job = raw(submitted)
    if progress:
        print(f"job {job['id']}: cloning {args.source} -> {', '.join(submitted.clones)}", flush=True)
        job = await _wait_with_progress(ctx, submitted.id, args.timeout)
    names = [c["name"] for c in (job.get("result") or {}).get("clones", [])] if args.wait else [job["id"]]
    ctx.out.show(job, lambda: render.print_job(job, history=not progress), names)
    return 1 if args.wait and job["state"] != "Unstunned" else 0


async def _jobs(ctx: Ctx, args: argparse.Namespace) -> int:
    if args.jobs_cmd == "show":
        job = raw(await ctx.client.job(args.job_id, wait_s=args.wait))
        ctx.out.show(job, lambda: render.print_job(job), [job["state"]])
        return 0
    ctx.out.listing([raw(j) for j in await ctx.client.jobs()], render.JOBS)
    return 0


async def _clones(ctx: Ctx, args: argparse.Namespace) -> int:
    ctx.out.listing([raw(c) for c in await ctx.client.clones()], render.CLONES)
    return 0


async def _destroy(ctx: Ctx, args: argparse.Namespace) -> int:
    gone = raw(await ctx.client.destroy(args.clone))
    ctx.out.show(gone, lambda: print(f"destroyed {args.clone}"), [args.clone])
    return 0


async def _freeze(ctx: Ctx, args: argparse.Namespace) -> int:
    """``freeze`` and ``unfreeze``."""
    if args.cmd == "freeze":
        entry = await ctx.client.freeze(args.source)
    else:
        entry = await ctx.client.unfreeze(args.source)

    def human() -> None:
        if args.cmd == "freeze":
            print(f"froze {args.source} in {entry['freeze_ms']:.0f} ms (memory backend {entry['backend']}); "
                  "clones from it need no stun")
        else:
            print(f"unfroze {args.source} ({entry['clones']} clones made while frozen)")
    ctx.out.show(entry, human, [args.source])
    return 0


async def _check(ctx: Ctx, args: argparse.Namespace) -> int:
    report = await ctx.client.check(args.source)
    ctx.out.show(report, lambda: render.print_check(report), ["cloneable" if report["cloneable"] else "not-cloneable"])
    return 0 if report["cloneable"] else 1


async def _prepare(ctx: Ctx, args: argparse.Namespace) -> int:
    data = await ctx.client.prepare(args.source, dry_run=args.dry_run)
    ctx.out.show(data, lambda: render.print_prepare(data), data["changed"])
    return 0


async def _frozen(ctx: Ctx, args: argparse.Namespace) -> int:
    ctx.out.listing(await ctx.client.frozen(), render.FROZEN)
    return 0


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


async def _gc(ctx: Ctx, args: argparse.Namespace) -> int:
    report = await ctx.client.gc(dry_run=args.dry_run)
    ctx.out.show(report, lambda: render.print_gc(report), [d["path"] for d in report["deleted"]])
    return 1 if report["failed"] else 0


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


async def _webhooks(ctx: Ctx, args: argparse.Namespace) -> int:
    c = ctx.client
    if args.webhooks_cmd == "ls":
        ctx.out.listing(await c.webhooks(), render.WEBHOOKS)
        return 0
    if args.webhooks_cmd == "enable":
        data = await c.enable_webhook(args.name)
        ctx.out.show(data, lambda: print(f"enabled {args.name}" + (
            "" if data["was_disabled"] else " (it was not disabled)") +
            "; replay what it missed with: instaclone webhooks deliveries replay --status disabled"), [args.name])
        return 0
    if args.deliveries_cmd == "ls":
        rows = await c.deliveries(status=args.status, webhook=args.webhook, job=args.job, event=args.event,
                                  limit=args.limit)
        ctx.out.listing(rows, render.DELIVERIES)
        return 0
    if not (args.ids or args.status or args.webhook or args.event):
        raise CliError("say what to replay: delivery ids, or --status/--webhook/--event", EXIT_USAGE)
    ids = await c.replay(args.ids or None, status=args.status, webhook=args.webhook, event_id=args.event)
    ctx.out.show({"replayed": ids}, lambda: print(f"queued {len(ids)} deliveries again"), [str(i) for i in ids])
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
    # Imported here: --version, help and completion scripts need no aiohttp (a shell that evals
    # ``instaclone completion bash`` at start should not pay for it).
    from .client import Client

    async with Client(args.socket) as client:
        with translated():
            return await _COMMANDS[args.cmd](Ctx(client, Output(args.output, args.quiet)), args)


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
            return cli_complete.main(argv)
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
