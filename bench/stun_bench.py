"""Stun benchmark (issue 13): consecutive clones of big, running guests while other guests are busy.

    .venv/bin/python bench/stun_bench.py [--modes copy,precopy] [--cases 1024:256,1024:750,4096:3072]
        [--clones 20] [--busy 3] [--mem-after 10] [--json out.json]

For each case ``RAM:USED`` (MiB) it boots the test guest with ``RAM`` MiB of
file-backed shared RAM, enlarges its tmpfs and fills ``USED`` MiB of it with
random bytes (zero pages would be skipped by migration), then, for each
``filecow`` source mode in turn (``memory.filecow.source_mode``, one
in-process daemon per mode), makes ``--clones`` consecutive clones of it,
each from a fresh stun, while ``--busy`` other 256 MiB guests burn CPU and
dirty memory. The production stun deadline (``clone.stun_deadline_ms``) is
kept, so deadline failures are counted, not hidden.

Per job: its outcome (Unstunned, or Failed with its error code), the
source's stun (the job result's ``stun_ms``), and the time from the request
until the clone's first counter line (*ready*). Per case and mode: stun
p50/p95/max (nearest rank, successful jobs), failures by code, ready p50/p95,
and host memory once ``--mem-after`` clones are alive: MemAvailable's drop
since before the first clone and the clones' QEMU PSS summed.

Every running-source clone carries its own image of the RAM in use (on the
memory backing directory), so at most as many clones are kept alive as fit
in MemAvailable with ``--margin-mib`` to spare: the oldest clone is destroyed
before the next one is made, and the memory figure is taken with the N that
fit (the output says N). Everything it creates is removed, on Ctrl-C too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
import uuid
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

# The test guest's driver lives with the tests (tests/support/guests/).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from instaclone import backends, config as cfg
from instaclone.daemon import Daemon
from instaclone.errors import ConfigError, InstacloneError
from instaclone.hv import LibvirtHypervisor as Hypervisor
from instaclone.log import setup as log_setup
from instaclone.requests import CloneRequest
from tests.support.guests import devguest

ROOT = Path("/var/lib/instaclone/bench")
BUSY_MIB = 256
#: Host memory a clone costs beyond its image of the source's RAM (its QEMU: TCG cache, heap; pages it writes).
CLONE_OVERHEAD_MIB = 300
SEED_MIB = 4


@dataclass(frozen=True)
class Case:
    ram_mib: int
    used_mib: int

    @property
    def label(self) -> str:
        return f"{self.ram_mib}:{self.used_mib}"


@dataclass
class Alive:
    """A clone of the current case and mode that is still running."""

    name: str
    daemon: Daemon


@dataclass
class Job:
    """One clone request and what came of it."""

    i: int
    name: str
    outcome: str = "Failed"
    error_code: str | None = None
    error: str | None = None
    stun_ms: float | None = None
    ready_s: float | None = None
    job_s: float | None = None
    memory: dict[str, Any] | None = None
    durations_ms: dict[str, Any] = field(default_factory=dict)
    alive: int = 0  # clones of this case and mode alive after this job

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# -- host figures -------------------------------------------------------------------------

def meminfo() -> dict[str, int]:
    """/proc/meminfo in KiB."""
    out: dict[str, int] = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            out[key] = int(parts[0])
    return out


def pss_kib(name: str) -> int | None:
    """PSS of the domain's QEMU process (KiB), from /proc/PID/smaps_rollup; None if it is gone."""
    try:
        pid = Path(f"/run/libvirt/qemu/{name}.pid").read_text().strip()
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def nearest_rank(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) by nearest rank: a value that occurred, never an interpolation."""
    if not values:
        return None
    s = sorted(values)
    return s[max(0, math.ceil(q * len(s)) - 1)]


def tmpfs_mib(out: str) -> int | None:
    """Size (MiB) of /tmp from the guest's ``df -m /tmp`` output."""
    for line in out.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit():
            return int(parts[1])
    return None


def busy_delta(before: int | None, after: int | None) -> int | None:
    """Loop iterations a busy guest made in between (None if either count could not be read)."""
    return None if before is None or after is None else after - before


def emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, default=str), flush=True)


# -- the benchmark ------------------------------------------------------------------------

class Bench:
    def __init__(self, virt: Hypervisor, work: Path, tag: str, args: argparse.Namespace) -> None:
        self.virt = virt
        self.work = work
        self.tag = tag
        self.args = args
        self.domains: list[str] = []  # ours, not the daemons' clones
        self.daemons: dict[str, Daemon] = {}
        self.job_ids: list[str] = []
        self.ramdirs: set[Path] = set()

    # guests

    async def boot(self, name: str, mib: int, *, shared: bool) -> None:
        disk = self.work / f"{name}.qcow2"
        await asyncio.to_thread(
            subprocess.run, ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(devguest.GUEST_DIR / "base.qcow2"),
                             "-F", "qcow2", str(disk)], check=True)
        await self.virt.define(devguest.domain_xml(name, disk=disk, workdir=self.work, memory_mib=mib,
                                                   file_backed_ram=shared))
        self.domains.append(name)
        await self.virt.start(name)
        await devguest.wait_counter(devguest.serial_log_path(name, self.work), above=0, timeout=180)

    async def run_in(self, name: str, cmd: str, timeout: float = 60) -> str:
        async with await devguest.GuestChannel.connect(devguest.cmd_sock_path(name, self.work), timeout=30) as ch:
            rc, out = await ch.run(cmd, timeout=timeout)
        if rc != 0:
            raise RuntimeError(f"{name}: {cmd!r} exited {rc}: {out.strip()}")
        return out

    async def start_busy(self, name: str) -> None:
        """CPU and dirty memory, forever: 32 MiB of /dev/urandom rewritten into the tmpfs, iterations counted."""
        await self.run_in(name, "(n=0; while :; do dd if=/dev/urandom of=/tmp/busy bs=1M count=32 2>/dev/null; "
                                "n=$((n+1)); echo $n > /tmp/busy.n; done) </dev/null >/dev/null 2>&1 & echo ok")

    async def busy_iterations(self, name: str) -> int | None:
        try:
            return int((await self.run_in(name, "cat /tmp/busy.n 2>/dev/null || echo 0", timeout=30)).strip())
        except (RuntimeError, TimeoutError, ConnectionError, ValueError):
            return None

    async def fill(self, name: str, case: Case) -> dict[str, Any]:
        """/tmp remounted at 90% of RAM, then ``used_mib`` of random bytes written into it (timed)."""
        out = await self.run_in(name, "mount -o remount,size=90% /tmp && df -m /tmp")
        size = tmpfs_mib(out)
        if size is None or size < case.used_mib + 2 * SEED_MIB:
            raise RuntimeError(f"{name}: /tmp is {size} MiB after the remount, too small for {case.used_mib} MiB "
                               f"(df said: {out.strip()!r})")
        t0 = time.monotonic()
        # A 4 MiB random seed once (urandom is slow under TCG), then cat it over and over.
        await self.run_in(name, f"dd if=/dev/urandom of=/tmp/seed bs=1M count={SEED_MIB} 2>/dev/null && "
                                f"for i in $(seq {max(1, case.used_mib // SEED_MIB - 1)}); do cat /tmp/seed; done "
                                "> /tmp/fill && sync && echo ok",
                          timeout=max(600.0, case.used_mib * 1.0))
        fill_s = time.monotonic() - t0
        df = (await self.run_in(name, "df -m /tmp")).splitlines()[-1].split()
        found = await self.virt.ram_file(name)
        alloc_mib = None
        if found is not None:
            self.ramdirs.add(found[0].parent.parent)
            st = await asyncio.to_thread(found[0].stat)
            alloc_mib = round(st.st_blocks * 512 / 2**20)
        return {"tmpfs_mib": size, "fill_s": round(fill_s, 1),
                "tmpfs_used_mib": int(df[2]) if len(df) > 2 and df[2].isdigit() else None,
                "ram_file_allocated_mib": alloc_mib}

    # daemons

    def config_for(self, mode: str) -> cfg.Config:
        """The production configuration (stun deadline included) with our state dir; raises ConfigError.

        ``mode`` is a source_mode, or ``MODE@MS`` for a pre-copy with that downtime limit.
        """
        source_mode, _, downtime = mode.partition("@")
        own: dict[str, Any] = {"source_mode": source_mode}
        if downtime:
            own["precopy_downtime_ms"] = int(downtime)
        c = backends.config_from_dict({"memory": {"filecow": own}})
        a = self.args
        tag = source_mode[:3] + downtime
        return replace(c,
                       # Short: a clone's sockets live below it (108 bytes at most).
                       daemon=replace(c.daemon, state_dir=self.work / f"s-{tag}",
                                      socket=self.work / f"{tag}.sock", log_format="console",
                                      log_level="warning"),
                       clone=replace(c.clone, memory_backends=("filecow",),
                                     stun_deadline_ms=a.stun_deadline_ms if a.stun_deadline_ms else
                                     c.clone.stun_deadline_ms,
                                     step_timeout_s=a.step_timeout_s if a.step_timeout_s else c.clone.step_timeout_s))

    async def destroy(self, clone: Alive) -> None:
        assert clone.daemon.engine is not None
        await clone.daemon.engine.destroy_clone(clone.name)

    async def clone_once(self, d: Daemon, source: str, name: str, i: int) -> Job:
        assert d.engine is not None
        job = Job(i=i, name=name)
        log = d.config.clones_dir / name / f"{name}.serial.log"
        t0 = time.monotonic()
        timeout = self.args.ready_timeout_s

        async def first_counter() -> float:
            # The clone's console log is new: its first counter line is the clone running.
            await devguest.wait_counter(log, above=0, timeout=timeout)
            return time.monotonic()

        watch = asyncio.ensure_future(first_counter())
        try:
            try:
                rec = await d.engine.submit(CloneRequest(source=source, name=name, customize=self.args.customize))
            except InstacloneError as exc:
                job.error_code, job.error = exc.code, exc.message
                return job
            self.job_ids.append(rec.id)
            await d.engine.wait(rec.id, self.args.job_timeout_s)
            job.job_s = round(time.monotonic() - t0, 3)
            got = await d.store.get_job(rec.id)
            if got is None:
                job.error_code = "bench_job_missing"
                return job
            job.outcome = got.state.value
            job.durations_ms = got.history.durations_ms()
            res = got.result or {}
            job.stun_ms = res.get("stun_ms")
            job.memory = res.get("memory")
            if got.error:
                job.error_code, job.error = got.error.get("code"), got.error.get("message")
            if job.outcome != "Unstunned":
                if job.error_code is None:
                    job.error_code = f"bench_ended_{job.outcome}"
                return job
            try:
                job.ready_s = round(await watch - t0, 3)
            except TimeoutError:
                job.error_code, job.error = "bench_clone_not_ready", f"no counter line in {log}"
            return job
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await watch

    async def run_mode(self, case: Case, mode: str, d: Daemon, source: str, est_mib: int,
                       out: dict[str, Any]) -> None:
        """``--clones`` consecutive clones of ``source`` into ``out``; the oldest destroyed when no more fit."""
        a = self.args
        base = meminfo()
        avail_mib = base["MemAvailable"] // 1024
        fit = min(a.mem_after, max(0, (avail_mib - a.margin_mib) // est_mib))
        out.update({"case": case.label, "mode": mode, "clones": a.clones, "per_clone_estimate_mib": est_mib,
                    "mem_available_mib_before": avail_mib, "keep_alive": fit, "jobs": []})
        emit({k: v for k, v in out.items() if k != "jobs"})
        if fit == 0:
            out["skipped"] = (f"a clone needs about {est_mib} MiB; {avail_mib} MiB available, "
                              f"{a.margin_mib} MiB kept free")
            emit({"case": case.label, "mode": mode, "skipped": out["skipped"]})
            return
        alive: list[Alive] = []
        base_mode, _, downtime = mode.partition("@")
        short = {"copy": "c", "respawn": "r", "precopy": "p", "auto": "a"}.get(base_mode, base_mode[:3]) + downtime
        try:
            for i in range(1, a.clones + 1):
                while alive and (len(alive) >= fit or
                                 meminfo()["MemAvailable"] // 1024 - est_mib < a.margin_mib):
                    await self.destroy(alive.pop(0))
                if meminfo()["MemAvailable"] // 1024 - est_mib < a.margin_mib:
                    out["stopped"] = (f"host memory: fewer than {est_mib + a.margin_mib} MiB available "
                                      "with no clone left")
                    emit({"case": case.label, "mode": mode, "stopped": out["stopped"]})
                    break
                name = f"{self.tag}-{case.ram_mib // 1024}g{case.used_mib}{short}{i}"  # short: socket paths
                job = await self.clone_once(d, source, name, i)
                if job.outcome == "Unstunned":
                    alive.append(Alive(name, d))
                job.alive = len(alive)
                out["jobs"].append(job.to_dict())
                emit({"case": case.label, "mode": mode, **job.to_dict()})
                if "host_memory" not in out and len(alive) == fit:
                    out["host_memory"] = await self.host_memory(base, alive, fit)
                    emit({"case": case.label, "mode": mode, "host_memory": out["host_memory"]})
                state = await self.virt.state(source)
                if state != "running":
                    out["stopped"] = f"the source is {state} after job {i}"
                    emit({"case": case.label, "mode": mode, "stopped": out["stopped"]})
                    with contextlib.suppress(InstacloneError):
                        await self.virt.resume(source)
                    if await self.virt.state(source) != "running":
                        break
            if "host_memory" not in out and alive:
                out["host_memory"] = await self.host_memory(base, alive, fit)
        finally:
            for c in alive:
                try:
                    await self.destroy(c)
                except Exception as exc:  # noqa: BLE001 - reported; the final cleanup tries again
                    print(f"destroy {c.name}: {exc}", file=sys.stderr)

    async def host_memory(self, base: dict[str, int], alive: list[Alive], fit: int) -> dict[str, Any]:
        await asyncio.sleep(2)  # the last clone settles
        now = meminfo()
        pss = [pss_kib(c.name) for c in alive]
        return {
            "clones_alive": len(alive), "limited_by_memory": fit < self.args.mem_after,
            "mem_available_drop_mib": round((base["MemAvailable"] - now["MemAvailable"]) / 1024),
            "shmem_growth_mib": round((now.get("Shmem", 0) - base.get("Shmem", 0)) / 1024),
            "cached_growth_mib": round((now.get("Cached", 0) - base.get("Cached", 0)) / 1024),
            "clone_pss_sum_mib": round(sum(p for p in pss if p is not None) / 1024),
        }

    # cleanup

    async def cleanup(self) -> list[str]:
        """Everything the run made goes; returns what had to be removed by hand (leaks) or could not be."""
        notes: list[str] = []
        for mode, d in self.daemons.items():
            try:
                if d.engine is not None:
                    await d.engine.shutdown(15)  # a running job finishes or is rolled back
                    for c in await d.store.list_clones():
                        await d.engine.destroy_clone(c.name)
                await d.stop(0)
            except Exception as exc:  # noqa: BLE001 - reported, then the domains are removed by name below
                notes.append(f"daemon {mode}: {type(exc).__name__}: {exc}")
        self.daemons.clear()
        try:
            left = [n for n in await self.virt.list_names() if n.startswith(self.tag) and n not in self.domains]
        except Exception as exc:  # noqa: BLE001 - reported; our own domains are still removed
            notes.append(f"list domains: {exc}")
            left = []
        if left:
            notes.append(f"domains left by the daemons, removed: {', '.join(left)}")
        for name in [*left, *reversed(self.domains)]:
            try:
                await self.virt.undefine(name)
            except Exception as exc:  # noqa: BLE001 - reported; the rest is removed anyway
                notes.append(f"undefine {name}: {exc}")
        self.domains.clear()
        for ramdir in self.ramdirs:
            for jid in self.job_ids:
                p = ramdir / "instaclone" / jid
                if p.exists():
                    notes.append(f"memory image left behind, removed: {p}")
                    shutil.rmtree(p, ignore_errors=True)
        return notes


async def run(args: argparse.Namespace, results: dict[str, Any]) -> None:
    log_setup("console", "warning")
    tag = "sb" + uuid.uuid4().hex[:6]
    work = ROOT / tag
    work.mkdir(parents=True)
    os.chown(work, *devguest.qemu_owner())
    virt = Hypervisor()
    await virt.connect()
    b = Bench(virt, work, tag, args)
    results.update({"accel": devguest.accel(), "tag": tag, "modes": {}, "cases": {}, "busy": args.busy,
                    "clones": args.clones, "customize": args.customize, "mem_after": args.mem_after,
                    "margin_mib": args.margin_mib})
    try:
        for mode in args.modes:
            try:
                c = b.config_for(mode)
            except ConfigError as exc:
                results["modes"][mode] = {"rejected": str(exc)}
                emit({"mode": mode, "rejected": str(exc)})
                continue
            d = Daemon(c)
            try:
                await d.start()
            except Exception as exc:  # noqa: BLE001 - a mode the daemon cannot start with is reported and skipped
                results["modes"][mode] = {"rejected": f"daemon start: {type(exc).__name__}: {exc}"}
                emit({"mode": mode, **results["modes"][mode]})
                with contextlib.suppress(Exception):
                    await d.stop(0)
                continue
            b.daemons[mode] = d
            results["modes"][mode] = {"stun_deadline_ms": c.clone.stun_deadline_ms,
                                      "step_timeout_s": c.clone.step_timeout_s}
            emit({"mode": mode, **results["modes"][mode]})
        if not b.daemons:
            return
        # Booted once; a level runs the first N of them and keeps the others paused (no CPU, no writes).
        all_busy = [f"{tag}-busy{i}" for i in range(1, max(args.busy) + 1)]
        for name in all_busy:
            await b.boot(name, BUSY_MIB, shared=False)
            await b.start_busy(name)
            await virt.suspend(name)
        emit({"busy_guests": all_busy})
        for case in args.cases:
            src = f"{tag}-src-{case.ram_mib}-{case.used_mib}"
            row: dict[str, Any] = {"modes": {}}
            results["cases"][case.label] = row
            t0 = time.monotonic()
            await b.boot(src, case.ram_mib, shared=True)
            row["boot_s"] = round(time.monotonic() - t0, 1)
            row["fill"] = await b.fill(src, case)
            emit({"case": case.label, "boot_s": row["boot_s"], **row["fill"]})
            alloc = row["fill"]["ram_file_allocated_mib"] or case.used_mib
            est = max(alloc, case.used_mib) + CLONE_OVERHEAD_MIB
            for level in args.busy:
                busy = all_busy[:level]
                for name in all_busy:
                    if (name in busy) != (await virt.state(name) == "running"):
                        await (virt.resume(name) if name in busy else virt.suspend(name))
                for mode, d in b.daemons.items():
                    iters = {n: await b.busy_iterations(n) for n in busy}
                    r: dict[str, Any] = {"busy": level}
                    # Filled as it goes: an interrupted run still reports its jobs.
                    row["modes"][mode if len(args.busy) == 1 else f"{mode}, {level} busy"] = r
                    await b.run_mode(case, mode, d, src, est, r)
                    after = {n: await b.busy_iterations(n) for n in busy}
                    r["busy_iterations"] = {n: busy_delta(iters[n], after[n]) for n in busy}
                    emit({"case": case.label, "mode": mode, "busy": level, "summary": summarize(r)})
            await virt.undefine(src)
            b.domains.remove(src)
    finally:
        notes = await b.cleanup()
        await virt.close()
        shutil.rmtree(work, ignore_errors=True)
        if notes:
            results["cleanup"] = notes
            for n in notes:
                print(f"cleanup: {n}", file=sys.stderr)


# -- report -------------------------------------------------------------------------------

def summarize(r: dict[str, Any]) -> dict[str, Any]:
    jobs = r.get("jobs", [])
    ok = [j for j in jobs if j["outcome"] == "Unstunned" and j["error_code"] is None]
    stuns = [j["stun_ms"] for j in ok if j["stun_ms"] is not None]
    ready = [j["ready_s"] for j in ok if j["ready_s"] is not None]
    done = [j["job_s"] for j in ok if j["job_s"] is not None]
    images = [j["memory"]["ram_allocated_bytes"] / 2**20 for j in ok
              if j.get("memory") and isinstance(j["memory"].get("ram_allocated_bytes"), int)]
    modes = Counter(str(j["memory"].get("mode")) for j in ok if j.get("memory"))
    parts: dict[str, list[float]] = {}
    for j in ok:
        for k, v in ((j.get("memory") or {}).get("stun_parts_ms") or {}).items():
            parts.setdefault(k, []).append(v)
    return {
        "jobs": len(jobs), "ok": len(ok),
        "failures": dict(Counter(j["error_code"] for j in jobs if j not in ok)),
        "stun_ms": {"p50": nearest_rank(stuns, 0.5), "p95": nearest_rank(stuns, 0.95),
                    "max": max(stuns) if stuns else None},
        "ready_s": {"p50": nearest_rank(ready, 0.5), "p95": nearest_rank(ready, 0.95)},
        "job_s_p50": nearest_rank(done, 0.5),
        "image_mib_median": round(statistics.median(images)) if images else None,
        "memory_modes": dict(modes),
        "stun_parts_p50_ms": {k: nearest_rank(v, 0.5) for k, v in parts.items()},
        "host_memory": r.get("host_memory"),
        "keep_alive": r.get("keep_alive"),
        "note": r.get("skipped") or r.get("stopped"),
    }


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(res: dict[str, Any]) -> str:
    deadlines = sorted({m["stun_deadline_ms"] for m in res.get("modes", {}).values() if "stun_deadline_ms" in m})
    lines = [
        f"Stun deadline {', '.join(map(str, deadlines)) or '-'} ms. Test guest under "
        f"{str(res.get('accel', '?')).upper()}, busy 256 MiB guests beside the source: "
        f"{', '.join(map(str, res.get('busy') or [0]))} (per row), "
        f"{res.get('clones')} consecutive clones per case and mode, each from its own stun of the running source; "
        "stun and ready percentiles by nearest rank over successful jobs.",
        "",
        "| case (RAM:used MiB) | mode | ok | failures | stun p50 ms | stun p95 ms | stun max ms | "
        "pre-copy stun parts p50 ms | ready p50 s | "
        "ready p95 s | job done p50 s | image MiB | host memory after N clones | fill s | aim |",
        "|" + "---|" * 15,
    ]
    for mode, m in res.get("modes", {}).items():
        if "rejected" in m:
            lines.append(f"| all | {mode} | - | rejected: {m['rejected']} | | | | | | | | | | | |")
    for label, row in res.get("cases", {}).items():
        fill = row.get("fill", {}).get("fill_s")
        for mode, r in row.get("modes", {}).items():
            s = summarize(r)
            fails = ", ".join(f"{k} x{v}" for k, v in s["failures"].items()) or "0"
            hm = s["host_memory"]
            mem = "-"
            if hm:
                mem = (f"N={hm['clones_alive']}{' (all that fit)' if hm['limited_by_memory'] else ''}: "
                       f"MemAvailable drop {hm['mem_available_drop_mib']} MiB (Shmem +{hm['shmem_growth_mib']}, "
                       f"Cached +{hm['cached_growth_mib']}), clone PSS sum {hm['clone_pss_sum_mib']} MiB")
            p95 = s["stun_ms"]["p95"]
            target = 100 if not r.get("busy", res.get("busy")) else 250
            parts = " / ".join(f"{k} {v:.0f}" for k, v in s["stun_parts_p50_ms"].items() if v is not None) or "-"
            aim = "yes" if (p95 is not None and p95 < target and s["ok"] == s["jobs"] and s["jobs"]
                            and "stun_deadline_exceeded" not in s["failures"]) else "no"
            if s["note"]:
                fails += f" ({s['note']})"
            lines.append(f"| {label} | {mode} | {s['ok']}/{s['jobs']} | {fails} | {_fmt(s['stun_ms']['p50'], '.0f')} | "
                         f"{_fmt(p95, '.0f')} | {_fmt(s['stun_ms']['max'], '.0f')} | {parts} | "
                         f"{_fmt(s['ready_s']['p50'], '.2f')} | {_fmt(s['ready_s']['p95'], '.2f')} | "
                         f"{_fmt(s['job_s_p50'], '.2f')} | "
                         f"{_fmt(s['image_mib_median'], 'd')} | {mem} | {_fmt(fill, '.0f')} | {aim} |")
    lines += ["", "*aim*: stun p95 < 100 ms with no busy guest beside the source, < 250 ms with busy guests, and "
              "every job succeeded (no deadline failure). *pre-copy stun parts*: `stun_parts_ms` of the job "
              "results (from the last look that found the source running to the look that found it stopped, the "
              "steps' bookkeeping, the disk snapshot, the migration's end, the verification, the resume). "
              "*ready*: from the "
              "request to the clone's first counter line; *job done*: to the job's end (Unstunned: clones "
              "started, customized and registered). *image MiB*: the job's memory image "
              "(`ram_allocated_bytes`), i.e. the RAM copied. *host memory*: MemAvailable's "
              "drop since before the first clone of the row and the clones' QEMU PSS summed, once N clones are "
              "alive (N < --mem-after when no more fit; the oldest clone is then destroyed before each next one)."]
    if res.get("interrupted"):
        lines += ["", "Interrupted: partial results."]
    if res.get("cleanup"):
        lines += ["", "Cleanup: " + "; ".join(res["cleanup"])]
    return "\n".join(lines)


def parse_cases(text: str) -> list[Case]:
    cases = []
    for item in text.split(","):
        if not item.strip():
            continue
        ram, _, used = item.partition(":")
        c = Case(int(ram), int(used))
        if not 0 < c.used_mib < c.ram_mib:
            raise argparse.ArgumentTypeError(f"{item}: used MiB must be above 0 and below the RAM size")
        cases.append(c)
    return cases


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default="copy,precopy", type=lambda s: [m for m in s.split(",") if m],
                   help="memory.filecow.source_mode values side by side, MODE@MS for a pre-copy with that "
                   "downtime limit (default: copy,precopy)")
    p.add_argument("--cases", default="1024:256,1024:750,4096:3072", type=parse_cases,
                   help="RAM:used MiB per source guest (default: 1024:256,1024:750,4096:3072)")
    p.add_argument("--clones", type=int, default=20, help="consecutive clones per case and mode")
    p.add_argument("--busy", default=[3], type=lambda s: [int(n) for n in s.split(",") if n],
                   help="busy 256 MiB guests beside the source; a list (e.g. 0,3) runs every case at each level "
                   "in turn (default: 3)")
    p.add_argument("--mem-after", type=int, default=10, help="host memory is measured with this many clones alive "
                   "(fewer if they do not fit)")
    p.add_argument("--margin-mib", type=int, default=3072, help="MemAvailable never planned below this")
    p.add_argument("--stun-deadline-ms", type=int, default=0, help="default: the production clone.stun_deadline_ms")
    p.add_argument("--step-timeout-s", type=float, default=0, help="default: the production clone.step_timeout_s")
    p.add_argument("--no-customize", dest="customize", action="store_false",
                   help="clone without the guest-side identity reset (default: as a plain request, with it)")
    p.add_argument("--job-timeout-s", type=float, default=1800)
    p.add_argument("--ready-timeout-s", type=float, default=600, help="from the request")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    results: dict[str, Any] = {}
    rc = 0

    async def main_task() -> None:
        task = asyncio.current_task()
        assert task is not None

        def stop() -> None:
            # Once: a second signal must not cut the cleanup short.
            if not results.get("interrupted"):
                results["interrupted"] = True
                task.cancel()
            else:
                print("cleaning up, please wait", file=sys.stderr)

        # SIGINT too: a shell that starts us in the background ignores it, and asyncio would leave it so.
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop)
        await run(a, results)

    t0 = time.monotonic()
    try:
        asyncio.run(main_task())
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted: partial results", file=sys.stderr)
        rc = 130
    except Exception:  # noqa: BLE001 - the traceback is printed, and the partial results with it
        traceback.print_exc()
        rc = 1
    results["wall_s"] = round(time.monotonic() - t0)
    if a.json:
        a.json.write_text(json.dumps(results, indent=2, default=str))
    print(table(results))
    return rc


if __name__ == "__main__":
    sys.exit(main())
