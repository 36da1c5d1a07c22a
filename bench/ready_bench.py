"""Clone-ready time per phase (issue 23): customized clones of a running busybox and Debian 12 source.

    flock /tmp/instaclone-integration.lock .venv/bin/python bench/ready_bench.py \\
        [--clones 20] [--sources busybox,debian] [--label NAME] [--json out.json]

For each source (the busybox test guest, 256 MiB, and the Debian 12 test
guest, 512 MiB, cloud kernel, BIOS; both with file-backed shared RAM and a
guest agent, each waited for until it has IPv4: the busybox guest runs no
DHCP client of its own and is given a lease with udhcpc) it makes
``--clones`` customized clones one after another through the control API, as
a plain request makes them (identity reset, NIC replug, network up), each
clone destroyed before the next request.

*Ready* is the time from the request until its job is Unstunned: the clone
runs with its identity reset (reported per item) and IPv4 on each interface
where the source had it; what follows (the chain consolidation, the HTTP
answer) is *job done*. Per clone it prints a JSON line with both and every
phase the job result gives (``result.phases_ms``, ``durations_ms`` per state,
the clone's ``identity.phases_ms`` and the guest-side ``identity.guest_ms``),
then per source ready p50/p95 and each phase's p50 as a JSON line, and a
Markdown table of them, a column per source. Phases may overlap (the NIC
replug runs while the identity is reset), so they do not add up to *ready*.

Everything it creates (domains, daemon state, files) is removed, on an
error or Ctrl-C too. About 1 min per 5 clones of each source here (TCG).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

# The test guests' drivers and helpers live with the tests.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from instaclone.hv import LibvirtHypervisor as Hypervisor
from instaclone.jobs import customize
from instaclone.log import setup as log_setup
from tests.support.guests import debianguest, devguest
from tests.support.vmlib import Api, Scratch, boot_source, daemon_world

PREFIX = "rdy-"
SOURCES = ("busybox", "debian")


def emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


def nearest_rank(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[max(0, math.ceil(q * len(s)) - 1)]


async def wait_ipv4(virt: Hypervisor, name: str, timeout_s: float = 120) -> list[str]:
    """The source's interfaces with IPv4, once it has one (the clones then wait for theirs)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        got = await customize.ipv4_interfaces(virt, name)
        if got:
            return got
        await asyncio.sleep(0.5)
    raise TimeoutError(f"{name} has no IPv4 after {timeout_s:g} s")


async def boot(kind: str, virt: Hypervisor, scratch: Scratch) -> str:
    name = f"{PREFIX}{kind[:3]}-src"
    if kind == "busybox":
        vm = await boot_source(virt, scratch, name, file_backed_ram=True)
        # The busybox guest runs no DHCP client of its own: a lease, so that its clones wait for theirs.
        async with await devguest.GuestChannel.connect(vm.cmd_sock) as ch:
            rc, out = await ch.run("udhcpc -i eth0 -n -q -t 5 -T 1 >/dev/null 2>&1; ip -4 addr show eth0", timeout=60)
            if rc != 0 or "inet " not in out:
                raise RuntimeError(f"{name}: no DHCP lease: {out}")
    else:
        reason = debianguest.debian_ready()
        if reason is not None:
            raise RuntimeError(reason)
        await debianguest.boot(virt, scratch, name)
    await wait_ipv4(virt, name)
    await asyncio.sleep(2)  # let the guest settle after its boot
    return name


def phases_of(job: dict[str, Any]) -> dict[str, float]:
    """Every phase figure of a finished one-clone job, flat: ``group.phase`` -> ms."""
    out: dict[str, float] = {}
    res = job["result"]
    for k, v in (job.get("durations_ms") or {}).items():
        out[f"state.{k}"] = v
    for k, v in (res.get("phases_ms") or {}).items():
        out[f"job.{k}"] = v
    if res.get("stun_ms") is not None:
        out["job.stun"] = res["stun_ms"]
    ident = res["clones"][0]["identity"]
    for k, v in (ident.get("phases_ms") or {}).items():
        out[f"clone.{k}"] = v
    for k, v in (ident.get("guest_ms") or {}).items():
        out[f"guest.{k}"] = v
    if "ready_ms" in ident:
        out["clone.ready"] = ident["ready_ms"]
    if "agent_calls" in ident:
        out["clone.agent_calls"] = ident["agent_calls"]
    return out


async def clones_of(api: Api, kind: str, source: str, n: int) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        name = f"{PREFIX}{kind[:3]}-c{i}"
        t0 = time.time()
        status, body = await api.call("POST", "/v1/jobs?wait=600", {"source": source, "name": name})
        done_s = time.time() - t0
        job = body.get("job") or {}
        if status != 201 or job.get("state") != "Unstunned":
            raise RuntimeError(f"clone {name} of {source}: HTTP {status}: {json.dumps(body)[:600]}")
        ready_at = next(h["at"] for h in job["history"] if h["state"] == "Unstunned")
        row = {"source": kind, "clone": name, "ready_s": round(ready_at - t0, 3), "job_done_s": round(done_s, 3),
               "phases_ms": phases_of(job)}
        emit(row)
        rows.append(row)
        status, body = await api.call("DELETE", f"/v1/clones/{name}")
        if status != 200:
            raise RuntimeError(f"destroy {name}: HTTP {status}: {body}")
    return rows


def summary(kind: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    ready = [r["ready_s"] for r in rows]
    keys = sorted({k for r in rows for k in r["phases_ms"]})
    return {"source": kind, "n": len(rows), "ready_p50_s": nearest_rank(ready, 0.5),
            "ready_p95_s": nearest_rank(ready, 0.95), "ready_max_s": max(ready),
            "job_done_p50_s": nearest_rank([r["job_done_s"] for r in rows], 0.5),
            "phases_p50_ms": {k: nearest_rank([r["phases_ms"][k] for r in rows if k in r["phases_ms"]], 0.5)
                              for k in keys}}


def table(label: str, sums: list[dict[str, Any]]) -> str:
    head = [f"{label}: phase (p50 ms)", *(f"{s['source']} (n={s['n']})" for s in sums)]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    lines.append("| **ready p50 / p95 s** | " + " | ".join(
        f"**{s['ready_p50_s']:.2f} / {s['ready_p95_s']:.2f}**" for s in sums) + " |")
    lines.append("| job done p50 s | " + " | ".join(f"{s['job_done_p50_s']:.2f}" for s in sums) + " |")
    keys = sorted({k for s in sums for k in s["phases_p50_ms"]},
                  key=lambda k: (("state", "job", "clone", "guest").index(k.split(".")[0]), k))
    for k in keys:
        cells = []
        for s in sums:
            v = s["phases_p50_ms"].get(k)
            cells.append("-" if v is None else f"{v:.0f}")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    sums = []
    async with daemon_world(PREFIX) as (scratch, virt, config), Api(config.daemon.socket) as api:
        for kind in args.sources:
            source = await boot(kind, virt, scratch)
            rows = await clones_of(api, kind, source, args.clones)
            sums.append(summary(kind, rows))
            emit({"summary": args.label, **sums[-1]})
            await virt.undefine(source)
    return sums


async def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    # SIGTERM ends the run as Ctrl-C does: through the clean-up.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await run(args)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clones", type=int, default=20)
    p.add_argument("--sources", default=",".join(SOURCES), type=lambda s: [x for x in s.split(",") if x])
    p.add_argument("--label", default="now", help="names the run in the JSON and the table (e.g. before, after)")
    p.add_argument("--json", type=Path, help="write the summaries here")
    a = p.parse_args()
    for s in a.sources:
        if s not in SOURCES:
            p.error(f"unknown source {s!r} (one of {', '.join(SOURCES)})")
    log_setup("console", "warning")
    result = asyncio.run(main(a))
    print(table(a.label, result))
    if a.json:
        a.json.write_text(json.dumps(result, indent=2) + "\n")
