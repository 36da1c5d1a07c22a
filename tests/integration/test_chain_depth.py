"""Chain depth on real guests: one running guest cloned 40 times with ``max_chain_depth = 10``.

Live consolidation (block pull) keeps every chain at most 10 deep while clones made
before several consolidations keep running (and a clone of a clone a few times
more). The engine's decisions on fakes: tests/unit/jobs/test_chain_depth.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from instaclone import config as cfg
from instaclone.errors import LibvirtUnavailable
from instaclone.hv import LibvirtHypervisor as Hypervisor
from tests.support.guests import devguest
from tests.support.host import libvirt_ready
from tests.support.vmlib import Api, Scratch, boot_source, make_config, running_daemon

MAX_DEPTH = 10
JOBS = 40
KEEP = (5, 35)  # clones kept running: backed by images from before several consolidations
CLONES_OF_CLONE = 3


def qemu_chain(top: Path) -> list[Path]:
    out = subprocess.run(["qemu-img", "info", "--force-share", "--backing-chain", "--output=json", str(top)],
                         check=True, capture_output=True, text=True).stdout
    return [Path(img["filename"]) for img in json.loads(out)]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


async def chain_of(virt: Hypervisor, name: str) -> list[Path]:
    top = (await virt.lookup(name)).disks[0].path
    return await asyncio.to_thread(qemu_chain, top)


def clone_log(config: cfg.Config, name: str) -> Path:
    return config.clones_dir / name / f"{name}.serial.log"


async def advancing(log: Path, what: str) -> None:
    got = devguest.read_counter(log)
    assert got is not None, f"no counter from {what}"
    await devguest.wait_counter(log, above=got[1] + 2, timeout=30)


async def remove_domains(virt: Hypervisor, before: set[str], prefix: str) -> None:
    """Undefine the domains named ``prefix``* that appeared since ``before``.

    Other tests on this machine restart libvirtd now and then: keep trying
    on a lost connection for a while rather than leave guests behind.
    """
    loop = asyncio.get_running_loop()
    end = loop.time() + 60
    while True:
        try:
            for name in sorted(set(await virt.list_names()) - before):
                if name.startswith(prefix):
                    await virt.undefine(name)
            return
        except LibvirtUnavailable:
            if loop.time() > end:
                raise
            await asyncio.sleep(1)


@pytest.mark.integration
@pytest.mark.skipif(libvirt_ready() is not None, reason=str(libvirt_ready()))
async def test_depth_40_with_consolidation():
    t_start = time.monotonic()
    logs: list[dict[str, Any]] = []
    scratch = Scratch()
    virt = Hypervisor()
    await virt.connect()
    before = set(await virt.list_names())
    daemon = None
    destroys: list[asyncio.Task[None]] = []
    monitor: asyncio.Task[None] | None = None
    try:
        config = make_config(scratch, max_chain_depth=MAX_DEPTH)
        with capture_logs() as captured:
            logs = captured
            daemon = await running_daemon(config)
            src = await boot_source(virt, scratch, "cd-src")
            t_booted = time.monotonic()
            assert len(await chain_of(virt, "cd-src")) == 2  # cd-src.qcow2 -> base.qcow2

            # The source may be paused only while stunned: track the longest pause.
            longest_pause = [0.0]
            stuns: list[float] = []  # the daemon's own measure of each stun

            async def watch() -> None:
                paused_since = None
                while True:
                    st = await virt.state("cd-src")
                    now = time.monotonic()
                    if st == "running":
                        paused_since = None
                    else:
                        paused_since = paused_since or now
                        longest_pause[0] = max(longest_pause[0], now - paused_since)
                    await asyncio.sleep(0.05)

            monitor = asyncio.create_task(watch())

            async with Api(config.daemon.socket) as api:

                async def clone(source: str, name: str) -> dict[str, Any]:
                    for _ in range(30):
                        status, body = await api.call("POST", "/v1/jobs?wait=120", {
                            "source": source, "name": name, "customize": False, "keep_network": True})
                        # Refused before it started: libvirtd was being restarted (by other tests).
                        if status != 503 or body["error"]["code"] != "libvirt_unavailable":
                            break
                        await asyncio.sleep(1)
                    assert status == 201, body
                    assert body["job"]["state"] == "Unstunned", body["job"]
                    stuns.append(body["job"]["result"]["stun_ms"] or 0.0)
                    return body["job"]

                async def destroy(name: str) -> None:
                    status, body = await api.call("DELETE", f"/v1/clones/{name}")
                    assert status == 200, body

                jobs = 0
                depths: list[int] = []
                kept_backing: dict[str, dict[Path, str]] = {}
                job_ms: list[float] = []
                for i in range(1, JOBS + 1):
                    name = f"cd-c{i}"
                    t0 = time.monotonic()
                    await clone("cd-src", name)
                    job_ms.append((time.monotonic() - t0) * 1000)
                    jobs += 1
                    assert await virt.state("cd-src") == "running", f"source not running after job {i}"
                    chain = await chain_of(virt, "cd-src")
                    depths.append(len(chain))
                    assert len(chain) <= MAX_DEPTH, (i, chain)
                    clone_chain = await chain_of(virt, name)
                    assert len(clone_chain) <= MAX_DEPTH, (name, clone_chain)
                    if i in KEEP:
                        # Everything below the clone's own delta: read-only from now on.
                        kept_backing[name] = {p: await asyncio.to_thread(sha256, p) for p in clone_chain[1:]}
                    else:
                        destroys.append(asyncio.create_task(destroy(name)))

                # Clones of a clone: cd-c35's chain goes on from the source's chain at its stun.
                c35_depths = []
                for k in range(1, CLONES_OF_CLONE + 1):
                    name = f"cd-cc{k}"
                    await clone("cd-c35", name)
                    jobs += 1
                    assert await virt.state("cd-c35") == "running"
                    c35_depths.append(len(await chain_of(virt, "cd-c35")))
                    assert c35_depths[-1] <= MAX_DEPTH, c35_depths
                    assert len(await chain_of(virt, name)) <= MAX_DEPTH
                    await devguest.wait_counter(clone_log(config, name), above=0, timeout=30)
                    destroys.append(asyncio.create_task(destroy(name)))

                await asyncio.gather(*destroys)
            monitor.cancel()
            await asyncio.gather(monitor, return_exceptions=True)

            # libvirt's live XML (what virsh dumpxml shows) agrees with the images.
            for name in ("cd-src", "cd-c5", "cd-c35"):
                assert await virt.backing_chain(name, "vda") == await chain_of(virt, name), name
            assert len(await chain_of(virt, "cd-src")) <= MAX_DEPTH

            # Consolidating the source never touched what older clones are backed by.
            # An image a clone's own consolidation left out of every chain may be
            # gone (garbage collection after a destroy); one still used is intact.
            in_use = set()
            for dom in await virt.list_names():
                if dom.startswith("cd-"):
                    in_use |= set(await chain_of(virt, dom))
            for name, images in kept_backing.items():
                for path, digest in images.items():
                    if path in in_use:
                        assert await asyncio.to_thread(sha256, path) == digest, (name, path)
                    else:
                        assert not path.exists() or await asyncio.to_thread(sha256, path) == digest, (name, path)
            # ... and those clones (and the source) run on: their guest counters advance.
            await asyncio.gather(advancing(src.serial_log, "cd-src"),
                                 *(advancing(clone_log(config, n), n) for n in kept_backing))
            for name in ("cd-src", *kept_backing):
                assert await virt.state(name) == "running", name

            await daemon.stop()
            daemon = None

        failed = [e for e in logs if e["event"] == "chain.consolidation_failed"]
        assert not failed, failed
        done = [e for e in logs if e["event"] == "chain.consolidated"]
        by_domain: dict[str, int] = {}
        for e in done:
            by_domain[e["domain"]] = by_domain.get(e["domain"], 0) + 1
            assert e["depth_before"] == MAX_DEPTH + 1 and e["depth_after"] == 2, e
        # 2 images at boot, one more per job, consolidated at 11 -> every 9 jobs.
        assert by_domain.get("cd-src") == JOBS // (MAX_DEPTH - 1), by_domain
        assert by_domain.get("cd-c35", 0) >= 1, by_domain  # the clone-of-clone path consolidated too
        assert jobs >= 40
        assert longest_pause[0] < 20, longest_pause  # only stuns (stun deadline 20 s)

        ms = sorted(e["ms"] for e in done)
        src_ms = sorted(e["ms"] for e in done if e["domain"] == "cd-src")
        print(f"\nchain-depth figures: jobs={jobs} (clone of cd-src: {JOBS}, clone of cd-c35: {CLONES_OF_CLONE}), "
              f"max_chain_depth={MAX_DEPTH}, max source depth observed after a job={max(depths)}, "
              f"max cd-c35 depth={max(c35_depths)}, source depths={depths}")
        print(f"consolidations: {len(done)} ({by_domain}); ms min/median/max = "
              f"{ms[0]:.1f}/{statistics.median(ms):.1f}/{ms[-1]:.1f}; source only: "
              f"{src_ms[0]:.1f}/{statistics.median(src_ms):.1f}/{src_ms[-1]:.1f}")
        print(f"job wall ms min/median/max = {min(job_ms):.0f}/{statistics.median(job_ms):.0f}/{max(job_ms):.0f}; "
              f"stun ms median/max {statistics.median(stuns):.0f}/{max(stuns):.0f}; "
              f"longest source pause seen by polling {longest_pause[0] * 1000:.0f} ms; "
              f"boot {t_booted - t_start:.1f} s, "
              f"total {time.monotonic() - t_start:.1f} s")
    except BaseException:
        # What the daemon said (captured above) is the best clue.
        for e in logs[-40:]:
            print({k: v for k, v in e.items() if k != "timestamp"})
        raise
    finally:
        if monitor is not None:
            monitor.cancel()
            await asyncio.gather(monitor, return_exceptions=True)
        await asyncio.gather(*destroys, return_exceptions=True)
        try:
            if daemon is not None:
                await daemon.stop()
        finally:
            # Only what this test made (other users' domains may come and go meanwhile).
            await remove_domains(virt, before, "cd-")
            await virt.close()
            scratch.cleanup()
    left = subprocess.run(["pgrep", "-f", f"qemu-system.*{scratch.path.name}"], capture_output=True, text=True)
    assert not left.stdout.strip(), f"QEMU processes left behind: {left.stdout}"
