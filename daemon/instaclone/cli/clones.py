"""Clones and their jobs: ``clone``, ``jobs ls|show``, ``clones ls``, ``destroy``."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from . import progress, render
from .command import Arg, Commands
from .context import CliError, Ctx, kv, raw
from .exitcodes import EXIT_USAGE

COMMANDS = Commands()


async def _clone_options(args: argparse.Namespace) -> dict[str, Any]:
    """The optional clone request fields given on the command line."""
    out: dict[str, Any] = {}
    if args.keep_ssh_host_keys:
        out["keep_ssh_host_keys"] = True
    if args.script:
        try:
            # In a thread: the loop stays free to see a Ctrl-C while this waits on a terminal.
            out["script"] = await asyncio.to_thread(
                sys.stdin.read if args.script == "-" else Path(args.script).read_text)
        except (OSError, UnicodeDecodeError) as exc:
            raise CliError(f"--script {args.script}: {exc}", EXIT_USAGE) from None
    if args.ttl is not None:
        out["ttl_s"] = args.ttl
    return out


async def _wait_with_progress(ctx: Ctx, job_id: str, timeout_s: float) -> dict[str, Any]:
    """Show the job's states as they are reached until it ends or ``timeout_s`` passes; the job then."""
    from instaclone.client.models import TERMINAL_STATES

    async def states() -> AsyncIterator[dict[str, object]]:
        async for ev in ctx.client.watch(job_id):
            yield dict(ev.data)

    try:
        async with asyncio.timeout(timeout_s):
            await progress.show(states(), progress.Progress(), TERMINAL_STATES)
    except TimeoutError:
        print(f"  (still running after {timeout_s:g} s: instaclone jobs show {job_id} --wait S)")
    return raw(await ctx.client.job(job_id))


@COMMANDS.command("clone", help="instant-clone a running or paused VM", args=[
    Arg("source", help="the VM to clone (a libvirt domain)"),
    Arg("--name", required=True, help="clone name; with --count > 1, the prefix of NAME-1..NAME-K"),
    Arg("--count", type=int, default=1, help="how many clones (one stun for all)"),
    Arg("--wait", action="store_true",
        help="wait until the job ends, showing each state as it is reached (exit 1 unless every clone is ready)"),
    Arg("--config", action="append", default=[], metavar="KEY=VALUE",
        help="data handed to the guest (/run/instaclone/config.json); repeatable"),
    Arg("--no-customize", action="store_true", help="skip the guest-side identity reset (hostname, machine-id, DHCP)"),
    Arg("--keep-ssh-host-keys", action="store_true", default=None,
        help="keep the source's SSH host keys (default: every clone gets new ones)"),
    Arg("--script", metavar="FILE", help="shell script run in each clone after its identity reset ('-': stdin)"),
    Arg("--keep-network", action="store_true",
        help="do not hold the clone's link down until its NIC is replaced (isolated networks)"),
    Arg("--timeout", type=float, default=300.0, metavar="S", help="seconds to wait with --wait"),
    Arg("--ttl", type=float, metavar="S", help="the daemon destroys each clone S seconds after it is ready"),
])
async def _clone(ctx: Ctx, args: argparse.Namespace) -> int:
    # Progress is for people: with -q or -o json|yaml the daemon waits and one answer comes back.
    show_progress = args.wait and not (ctx.out.quiet or ctx.out.machine)
    submitted = await ctx.client.clone(
        args.source, name=args.name, count=args.count, wait=args.wait and not show_progress, timeout_s=args.timeout,
        config=kv(args.config), customize=not args.no_customize, keep_network=args.keep_network,
        **await _clone_options(args))
    job = raw(submitted)
    if show_progress:
        print(f"job {job['id']}: cloning {args.source} -> {', '.join(submitted.clones)}", flush=True)
        job = await _wait_with_progress(ctx, submitted.id, args.timeout)
    names = [c["name"] for c in (job.get("result") or {}).get("clones", [])] if args.wait else [job["id"]]
    ctx.out.show(job, lambda: render.print_job(job, history=not show_progress), names)
    return 1 if args.wait and job["state"] != "Unstunned" else 0


COMMANDS.group("jobs", help="list or show clone jobs")


@COMMANDS.command("jobs ls", help="all jobs")
async def _jobs_ls(ctx: Ctx, args: argparse.Namespace) -> int:
    ctx.out.listing([raw(j) for j in await ctx.client.jobs()], render.JOBS)
    return 0


@COMMANDS.command("jobs show", help="one job with its states and their times", args=[
    Arg("job_id"),
    Arg("--wait", type=float, default=0.0, metavar="S", help="wait up to S seconds for the job to end"),
])
async def _jobs_show(ctx: Ctx, args: argparse.Namespace) -> int:
    job = raw(await ctx.client.job(args.job_id, wait_s=args.wait))
    ctx.out.show(job, lambda: render.print_job(job), [job["state"]])
    return 0


COMMANDS.group("clones", help="list clones")


@COMMANDS.command("clones ls", help="clones made by instaclone, with their state")
async def _clones_ls(ctx: Ctx, args: argparse.Namespace) -> int:
    ctx.out.listing([raw(c) for c in await ctx.client.clones()], render.CLONES)
    return 0


@COMMANDS.command("destroy", help="power off and delete a clone and its files (those its own clones use stay "
                                  "until they are unused)", args=[Arg("clone")])
async def _destroy(ctx: Ctx, args: argparse.Namespace) -> int:
    gone = raw(await ctx.client.destroy(args.clone))
    ctx.out.show(gone, lambda: print(f"destroyed {args.clone}"), [args.clone])
    return 0
