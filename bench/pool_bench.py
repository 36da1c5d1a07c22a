"""Pool benchmark (issue 14): claim latency, replenish rate, and coalesced stuns.

    .venv/bin/python bench/pool_bench.py [--concurrent 16] [--pool-size 8] [--claims 20] [--json out.json]

One run, on the busybox test guest (256 MiB, file-backed RAM), with one
in-process daemon (production config; its control API on a Unix socket):

1. **Coalescing.** ``--concurrent`` clone requests sent at once to one running
   source, against the serialized path measured in the same run (the same
   requests one after the other, each waiting for the previous one, as a job
   holding its source's lock for its whole length did): stuns used, and the
   time until every clone is ready (job Unstunned).
2. **Replenish rate.** A pool of ``--pool-size`` from a frozen source and one
   from a running source: the time from ``pool create`` until every member
   is idle (running, customized, network up), as clones ready per minute.
3. **Claim latency.** ``--claims`` claims over the API (``POST
   /v1/pools/NAME/claim``, the socket round trip included) from a warm
   pool: p50/p95. After each claim the member is released and the pool
   refills before the next claim.

Everything it creates is removed, on Ctrl-C too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp

from instaclone import config as cfg
from instaclone.daemon import Daemon
from instaclone.hv import LibvirtHypervisor as Hypervisor
from instaclone.log import setup as log_setup
from instaclone.requests import CloneRequest, FreezeRequest
from tests.support.guests import devguest

ROOT = Path("/var/lib/instaclone/bench")


def nearest_rank(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[max(0, math.ceil(q * len(s)) - 1)]


def emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


class Bench:
    def __init__(self, virt: Hypervisor, work: Path, args: argparse.Namespace) -> None:
        self.virt, self.work, self.args = virt, work, args
        self.domains: list[str] = []
        self.daemon: Daemon | None = None
        self.phases: dict[str, Any] = {}

    async def boot(self, name: str) -> None:
        disk = self.work / f"{name}.qcow2"
        await asyncio.to_thread(
            subprocess.run, ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(devguest.GUEST_DIR / "base.qcow2"),
                             "-F", "qcow2", str(disk)], check=True)
        await self.virt.define(devguest.domain_xml(name, disk=disk, workdir=self.work, memory_mib=256,
                                                   file_backed_ram=True))
        self.domains.append(name)
        await self.virt.start(name)
        await devguest.wait_counter(devguest.serial_log_path(name, self.work), above=0, timeout=180)

    def config(self) -> cfg.Config:
        c = cfg.Config()
        return replace(c, daemon=replace(c.daemon, state_dir=self.work / "s", socket=self.work / "ctl.sock",
                                         log_format="console", log_level="warning"),
                       pools=replace(c.pools, max_clones=200, check_interval_s=1.0))

    @property
    def d(self) -> Daemon:
        assert self.daemon is not None
        return self.daemon

    async def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        conn = aiohttp.UnixConnector(path=str(self.work / "ctl.sock"))
        async with aiohttp.ClientSession(connector=conn) as s, \
                s.request(method, f"http://ic{path}", json=body) as r:
            return r.status, await r.json()

    async def destroy_all(self) -> None:
        for c in await self.d.store.list_clones():
            with contextlib.suppress(Exception):
                await self.d.engine.destroy_clone(c.name)

    async def jobs_ready(self, ids: list[str], t0_wall: float) -> tuple[float, set[str], list[str]]:
        """(seconds from t0 until the last job ended, stun ids, states); per-phase figures in self.phases."""
        for i in ids:
            await self.d.engine.wait(i, self.args.job_timeout_s)
        jobs = [j for j in [await self.d.store.get_job(i) for i in ids] if j]
        end = max(j.updated_at for j in jobs)
        stuns = {j.result.get("stun", {}).get("id") for j in jobs if j.result}
        phases: dict[str, list[float]] = {}
        for j in jobs:
            for c in j.result.get("clones", []):
                for k, v in ((c.get("identity") or {}).get("phases_ms") or {}).items():
                    phases.setdefault(k, []).append(v)
        self.phases = {k: {"p50_ms": nearest_rank(v, 0.5), "max_ms": max(v)} for k, v in phases.items()}
        self.phases["first_ready_s"] = {"s": round(min(j.updated_at for j in jobs) - t0_wall, 2)}
        self.phases["stun_ms"] = {"values": sorted({j.result.get("stun_ms") for j in jobs if j.result})}
        return end - t0_wall, {s for s in stuns if s}, [j.state.value for j in jobs if j]

    async def coalescing(self, source: str) -> dict[str, Any]:
        n = self.args.concurrent
        out: dict[str, Any] = {"requests": n}
        # The serialized path: one request after the other.
        t0 = time.time()
        ids = []
        for i in range(n):
            job = await self.d.engine.submit(CloneRequest(source=source, name=f"ser{i}"))
            await self.d.engine.wait(job.id, self.args.job_timeout_s)
            ids.append(job.id)
        secs, stuns, states = await self.jobs_ready(ids, t0)
        out["serialized"] = {"all_ready_s": round(secs, 2), "stuns": len(stuns),
                             "ok": states.count("Unstunned"), "phases": self.phases}
        emit({"phase": "serialized", **out["serialized"]})
        await self.destroy_all()
        # All at once.
        t0 = time.time()
        jobs = await asyncio.gather(*(self.d.engine.submit(CloneRequest(source=source, name=f"co{i}"))
                                      for i in range(n)))
        secs, stuns, states = await self.jobs_ready([j.id for j in jobs], t0)
        out["concurrent"] = {"all_ready_s": round(secs, 2), "stuns": len(stuns), "ok": states.count("Unstunned"),
                             "phases": self.phases}
        out["speedup"] = round(out["serialized"]["all_ready_s"] / secs, 2)
        emit({"phase": "concurrent", **out["concurrent"], "speedup": out["speedup"]})
        await self.destroy_all()
        return out

    async def fill(self, name: str, source: str) -> dict[str, Any]:
        size = self.args.pool_size
        t0 = time.monotonic()
        status, body = await self.api("POST", "/v1/pools", {"name": name, "source": source, "size": size})
        assert status == 201, body
        while True:
            p = (await self.api("GET", f"/v1/pools/{name}"))[1]["pool"]
            if len(p["idle"]) >= size:
                break
            if time.monotonic() - t0 > self.args.job_timeout_s:
                raise TimeoutError(f"pool {name} not full: {p}")
            await asyncio.sleep(0.1)
        secs = time.monotonic() - t0
        return {"size": size, "full_s": round(secs, 2), "clones_per_min": round(size / secs * 60.0, 1)}

    async def claims(self, pool: str) -> dict[str, Any]:
        lat: list[float] = []
        waited: list[float] = []
        for _ in range(self.args.claims):
            t0 = time.monotonic()
            status, body = await self.api("POST", f"/v1/pools/{pool}/claim", {})
            lat.append((time.monotonic() - t0) * 1000.0)
            assert status == 200, body
            waited.append(body["claim"]["waited_ms"])
            await self.api("POST", f"/v1/clones/{body['claim']['clone']['name']}/release")
            while True:  # warm again
                p = (await self.api("GET", f"/v1/pools/{pool}"))[1]["pool"]
                if len(p["idle"]) >= p["size"] and p["pending"] == 0:
                    break
                await asyncio.sleep(0.1)
        return {"claims": len(lat), "p50_ms": round(nearest_rank(lat, 0.5) or 0, 1),
                "p95_ms": round(nearest_rank(lat, 0.95) or 0, 1), "max_ms": round(max(lat), 1),
                "waited_p95_ms": round(nearest_rank(waited, 0.95) or 0, 1)}

    async def cleanup(self) -> None:
        if self.daemon is not None:
            with contextlib.suppress(Exception):
                for p in (await self.api("GET", "/v1/pools"))[1]["pools"]:
                    await self.api("DELETE", f"/v1/pools/{p['name']}")
            with contextlib.suppress(Exception):
                await self.d.engine.shutdown(15)
                await self.destroy_all()
            with contextlib.suppress(Exception):
                for f in list((await self.d.store.frozen()).keys()):
                    await self.d.engine.unfreeze(FreezeRequest(f))
            with contextlib.suppress(Exception):
                await self.d.stop(0)
        for name in self.domains:
            with contextlib.suppress(Exception):
                await self.virt.undefine(name)
        shutil.rmtree(self.work, ignore_errors=True)


async def run(args: argparse.Namespace, results: dict[str, Any]) -> None:
    log_setup("console", "warning")
    tag = "pb" + uuid.uuid4().hex[:6]
    work = ROOT / tag
    work.mkdir(parents=True)
    os.chown(work, *devguest.qemu_owner())
    virt = Hypervisor()
    await virt.connect()
    b = Bench(virt, work, args)
    results.update({"accel": devguest.accel(), "guest_mib": 256})
    try:
        run_src, frozen_src = f"{tag}-run", f"{tag}-frz"
        await asyncio.gather(b.boot(run_src), b.boot(frozen_src))
        b.daemon = Daemon(b.config())
        await b.d.start()
        results["coalescing"] = await b.coalescing(run_src)
        if args.only == "coalescing":
            return
        await b.d.engine.freeze(FreezeRequest(frozen_src))
        results["replenish_frozen"] = await b.fill("pf", frozen_src)
        emit({"phase": "replenish_frozen", **results["replenish_frozen"]})
        results["replenish_running"] = await b.fill("pr", run_src)
        emit({"phase": "replenish_running", **results["replenish_running"]})
        await b.api("DELETE", "/v1/pools/pr")
        await b.api("PATCH", "/v1/pools/pf", {"size": 4})
        results["claim"] = await b.claims("pf")
        emit({"phase": "claim", **results["claim"]})
    finally:
        await b.cleanup()


def table(r: dict[str, Any]) -> str:
    co, rf, rr, cl = r["coalescing"], r["replenish_frozen"], r["replenish_running"], r["claim"]
    return "\n".join([
        "| measure | value |", "|---|---|",
        f"| {co['requests']} concurrent requests, one running source: stuns | {co['concurrent']['stuns']} "
        f"(serialized: {co['serialized']['stuns']}) |",
        f"| ... all clones ready | {co['concurrent']['all_ready_s']} s (serialized: "
        f"{co['serialized']['all_ready_s']} s, {co['speedup']}x) |",
        f"| replenish from a frozen source ({rf['size']} members) | {rf['clones_per_min']} clones/min "
        f"({rf['full_s']} s) |",
        f"| replenish from a running source ({rr['size']} members) | {rr['clones_per_min']} clones/min "
        f"({rr['full_s']} s) |",
        f"| claim from a warm pool, over the API ({cl['claims']} claims) | p50 {cl['p50_ms']} ms, "
        f"p95 {cl['p95_ms']} ms, max {cl['max_ms']} ms |",
    ])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrent", type=int, default=16)
    p.add_argument("--pool-size", type=int, default=8)
    p.add_argument("--claims", type=int, default=20)
    p.add_argument("--only", choices=("all", "coalescing"), default="all", help="coalescing: phase 1 only")
    p.add_argument("--job-timeout-s", type=float, default=600)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    results: dict[str, Any] = {}
    asyncio.run(run(a, results))
    if "claim" in results:
        print(table(results))
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
