"""Destroy benchmark (issue 21, "fast teardown"): destroy latency and the time to destroy many clones.

    flock /tmp/instaclone-integration.lock .venv/bin/python bench/destroy_bench.py \
        [--batch 10] [--rounds 2] [--count 50] [--json out.json]

One run, on the busybox test guest (256 MiB, file-backed RAM), with one
in-process daemon (production config), side by side in the same run:

* **fast**: ``Engine.destroy_clone`` as it is now: the clone's own files and
  the recorded images of its chain no other chain uses (a scoped
  collection; chains read from image files are kept while unchanged).
* **baseline** (the destroy of ce8c54d): the same destroy followed by a full
  collection with the chain cache emptied first, so that every domain's
  chains are read again with ``qemu-img`` as each destroy did then.

1. **Latency.** ``--rounds`` times per mode: one job makes ``--batch`` clones
   of the running source (no guest customization), then they are destroyed
   one after the other, each timed (p50/p95/max over all of them). Each
   destroy is split into libvirt's part (``undefine``: QEMU killed, libvirt
   waits until the process is gone) and instaclone's own (the rest: journal,
   chains, deletion).
2. **Many clones.** One job makes ``--count`` clones; then all are destroyed
   at once (as a pool torn down, or one DELETE each from many callers): the
   time until the last destroy returned, per mode.

libvirt's part is signalling QEMU and polling (every 200 ms) until the
process is gone and reaped: where no systemd runs, start libvirtd with
scripts/start-libvirtd.sh (a reaping subreaper above it), or a PID 1 that
reaps late adds its delay to every destroy (1.6 s in this sandbox). The
other domains on the host are in the JSON (a full collection reads every
domain's chains). Everything it creates is removed, on Ctrl-C too.
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


from instaclone import config as cfg
from instaclone.daemon import Daemon
from instaclone.hv import LibvirtHypervisor as Hypervisor, Outcome
from instaclone.jobs import gc
from instaclone.log import setup as log_setup
from instaclone.requests import CloneRequest
from tests.support.guests import devguest

ROOT = Path("/var/lib/instaclone/bench")
MODES = ("baseline", "fast")


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
        self.n = 0
        self.undefine_ms: dict[str, float] = {}

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
                       clone=replace(c.clone, max_count=max(64, self.args.count)),
                       gc=replace(c.gc, interval_s=0))

    @property
    def d(self) -> Daemon:
        assert self.daemon is not None
        return self.daemon

    async def make(self, source: str, n: int) -> list[str]:
        self.n += 1
        job = await self.d.engine.submit(CloneRequest(source=source, name=f"d{self.n}x", count=n, customize=False))
        await self.d.engine.wait(job.id, self.args.job_timeout_s)
        rec = await self.d.store.get_job(job.id)
        assert rec is not None and rec.state.value == "Unstunned", rec
        return [c["name"] for c in rec.result["clones"]]

    def time_undefine(self) -> None:
        """Time libvirt's part of each destroy (the daemon's hypervisor's undefine)."""
        virt = self.d.engine.svc.virt
        undefine_id = virt.undefine_id

        async def timed(name: str, uuid: str) -> Outcome:
            t0 = time.monotonic()
            try:
                return await undefine_id(name, uuid)
            finally:
                self.undefine_ms[name] = (time.monotonic() - t0) * 1000.0

        virt.undefine_id = timed  # type: ignore[method-assign]

    async def destroy(self, mode: str, name: str) -> float:
        t0 = time.monotonic()
        await self.d.engine.destroy_clone(name)
        if mode == "baseline":
            self.d.engine.svc.chain_cache.clear()
            await gc.collect(self.d.engine.svc)
        return (time.monotonic() - t0) * 1000.0

    async def latency(self, source: str, mode: str) -> dict[str, Any]:
        lat: list[float] = []
        libvirt: list[float] = []
        own: list[float] = []
        domains = 0
        for _ in range(self.args.rounds):
            names = await self.make(source, self.args.batch)
            domains = max(domains, len(await self.virt.list_names()))
            for name in names:
                lat.append(await self.destroy(mode, name))
                libvirt.append(self.undefine_ms[name])
                own.append(lat[-1] - libvirt[-1])

        def q(v: list[float], p: float) -> float:
            return round(nearest_rank(v, p) or 0, 1)

        return {"destroys": len(lat), "domains_at_start": domains, "p50_ms": q(lat, 0.5), "p95_ms": q(lat, 0.95),
                "max_ms": round(max(lat), 1), "libvirt_p50_ms": q(libvirt, 0.5),
                "own_p50_ms": q(own, 0.5), "own_p95_ms": q(own, 0.95), "own_max_ms": round(max(own), 1)}

    async def many(self, source: str, mode: str) -> dict[str, Any]:
        names = await self.make(source, self.args.count)
        domains = len(await self.virt.list_names())
        t0 = time.monotonic()
        lat = await asyncio.gather(*(self.destroy(mode, name) for name in names))
        secs = time.monotonic() - t0
        left = [c.name for c in await self.d.store.list_clones()]
        assert not left, left
        return {"clones": len(names), "domains_at_start": domains, "all_destroyed_s": round(secs, 2),
                "max_ms": round(max(lat), 1)}

    async def cleanup(self) -> None:
        if self.daemon is not None:
            with contextlib.suppress(Exception):
                await self.d.engine.shutdown(15)
            with contextlib.suppress(Exception):
                for c in await self.d.store.list_clones():
                    await self.d.engine.destroy_clone(c.name)
            with contextlib.suppress(Exception):
                await self.d.stop(0)
        for name in self.domains:
            with contextlib.suppress(Exception):
                await self.virt.undefine(name)
        shutil.rmtree(self.work, ignore_errors=True)


async def run(args: argparse.Namespace, results: dict[str, Any]) -> None:
    log_setup("console", "warning")
    tag = "db" + uuid.uuid4().hex[:6]
    work = ROOT / tag
    work.mkdir(parents=True)
    os.chown(work, *devguest.qemu_owner())
    virt = Hypervisor()
    await virt.connect()
    b = Bench(virt, work, args)
    results.update({"accel": devguest.accel(), "guest_mib": 256, "other_domains": len(await virt.list_names())})
    try:
        source = f"{tag}-src"
        await b.boot(source)
        b.daemon = Daemon(b.config())
        await b.d.start()
        b.time_undefine()
        for mode in MODES:
            results[f"latency_{mode}"] = await b.latency(source, mode)
            emit({"phase": f"latency_{mode}", **results[f"latency_{mode}"]})
        for mode in reversed(MODES) if args.count else ():
            results[f"many_{mode}"] = await b.many(source, mode)
            emit({"phase": f"many_{mode}", **results[f"many_{mode}"]})
    finally:
        await b.cleanup()


def table(r: dict[str, Any]) -> str:
    rows = ["| measure | baseline (destroy + full GC, as at ce8c54d) | fast (now) |", "|---|---|---|"]
    lb, lf = r["latency_baseline"], r["latency_fast"]
    rows.append(f"| destroy, {lf['destroys']} one after the other: p50 / p95 / max | {lb['p50_ms']} / "
                f"{lb['p95_ms']} / {lb['max_ms']} ms | {lf['p50_ms']} / {lf['p95_ms']} / {lf['max_ms']} ms |")
    rows.append(f"| ... libvirt's undefine (QEMU killed and reaped): p50 | {lb['libvirt_p50_ms']} ms | "
                f"{lf['libvirt_p50_ms']} ms |")
    rows.append(f"| ... instaclone's own part: p50 / p95 / max | {lb['own_p50_ms']} / {lb['own_p95_ms']} / "
                f"{lb['own_max_ms']} ms | {lf['own_p50_ms']} / {lf['own_p95_ms']} / {lf['own_max_ms']} ms |")
    if "many_fast" in r and "many_baseline" in r:
        mb, mf = r["many_baseline"], r["many_fast"]
        rows.append(f"| {mf['clones']} clones destroyed at once ({mf['domains_at_start']} domains) | "
                    f"{mb['all_destroyed_s']} s | {mf['all_destroyed_s']} s |")
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=10, help="clones per round of the latency phase")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--count", type=int, default=50, help="clones of the many-clones phase (0: skip it)")
    p.add_argument("--job-timeout-s", type=float, default=900)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    results: dict[str, Any] = {}
    asyncio.run(run(a, results))
    if "latency_fast" in results:
        print(table(results))
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
