"""libvirt/QEMU faults on real guests: each gives a clean outcome, never a paused source or a leftover.

- the source is destroyed in the middle of a clone;
- the delta directory's filesystem is full (a 16 MiB loop-mounted ext4);
- qemu-img fails;
- libvirtd restarts in the middle of a job;
- and concurrent requests on real sources (invariant 6 with real guests).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from instaclone.config import Config
from instaclone.daemon import Daemon
from instaclone.hv import LibvirtHypervisor as Hypervisor
from instaclone_plugins.qcow2 import Qcow2Settings
from tests.support.guests import devguest
from tests.support.host import libvirt_ready
from tests.support.proclib import restart_libvirtd
from tests.support.vmlib import Api, Scratch, boot_source, make_config, running_daemon

pytestmark = [pytest.mark.integration, pytest.mark.skipif(libvirt_ready() is not None, reason=str(libvirt_ready()))]

PREFIX = "ft-"


@dataclass
class World:
    scratch: Scratch
    virt: Hypervisor
    config: Config
    daemon: Daemon | None = None

    async def start(self, config: Config | None = None) -> Daemon:
        self.config = config or self.config
        self.daemon = await running_daemon(self.config)
        return self.daemon

    async def clone(self, body: dict[str, Any]) -> dict[str, Any]:
        async with Api(self.config.daemon.socket) as api:
            status, out = await api.call("POST", "/v1/jobs?wait=180", {"customize": False, **body})
            assert status in (201, 202), out
            return dict(out["job"])

    async def leftovers(self, job_id: str, source: str) -> list[str]:
        """Domains, files and RAM copies a failed job must not leave."""
        bad = []
        names = [n for n in await self.virt.list_names() if n.startswith(PREFIX) and not n.endswith("src")
                 and not n.startswith(f"{PREFIX}src")]
        if names:
            bad.append(f"domains {names}")
        if any((self.config.jobs_dir).iterdir()):
            bad.append(f"job dirs {list(self.config.jobs_dir.iterdir())}")
        if self.config.clones_dir.exists() and any(self.config.clones_dir.iterdir()):
            bad.append(f"clone dirs {list(self.config.clones_dir.iterdir())}")
        bad += [str(p) for p in Path("/var/lib/libvirt/qemu/ram").rglob(f"*{job_id}*")]
        return bad


@pytest.fixture
async def world() -> AsyncIterator[World]:
    scratch = Scratch()
    virt = Hypervisor()
    await virt.connect()
    w = World(scratch, virt, make_config(scratch))
    try:
        yield w
    finally:
        if w.daemon is not None:
            await w.daemon.stop()
        for name in await virt.list_names():
            if name.startswith(PREFIX):
                await virt.undefine(name)
        await virt.close()
        subprocess.run(["umount", "-l", str(scratch.path / "small")], capture_output=True)
        scratch.cleanup()
    left = subprocess.run(["pgrep", "-f", f"qemu-system.*{scratch.path.name}"], capture_output=True, text=True)
    assert not left.stdout.strip(), f"QEMU processes left behind: {left.stdout}"


async def test_source_destroyed_mid_clone(world: World):
    d = await world.start()
    await boot_source(world.virt, world.scratch, f"{PREFIX}src1")

    async def destroy_source(job_id: str, step: str) -> None:
        if step == "CloneDeltaCreated":
            await world.virt.destroy(f"{PREFIX}src1")

    assert d.engine is not None
    d.engine.step_hook = destroy_source
    job = await world.clone({"source": f"{PREFIX}src1", "name": f"{PREFIX}c1"})
    assert job["state"] == "Failed", job
    assert job["error"]["step"] in ("CloneDeltaCreated", "MemoryLinked"), job["error"]
    assert "ft-src1" in job["error"]["message"] or "not running" in job["error"]["message"], job["error"]
    print("source destroyed mid-clone ->", job["error"])
    assert await world.virt.state(f"{PREFIX}src1") == "shutoff"  # never left paused: it is simply gone
    assert await world.leftovers(job["id"], f"{PREFIX}src1") == []


async def test_delta_filesystem_full(world: World):
    small = world.scratch.path / "small"
    small.mkdir()
    img = world.scratch.path / "small.img"
    subprocess.run(["truncate", "-s", "16M", str(img)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(img)], check=True, capture_output=True)
    r = subprocess.run(["mount", "-o", "loop", str(img), str(small)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot loop-mount here: {r.stderr.strip()}")
    os.chown(small, *devguest.qemu_owner())
    # Fill it to the last block.
    subprocess.run(["dd", "if=/dev/zero", f"of={small / 'fill'}", "bs=64k"], capture_output=True)
    assert shutil.disk_usage(small).free < 64 * 1024
    # Admission would refuse this job (507 insufficient_capacity, disk: tests/hostile/test_capacity.py);
    # with its disk margin off, the filesystem fills under the step itself, which must fail cleanly.
    config = replace(world.config.with_section("storage.qcow2", Qcow2Settings(delta_dir=small / "deltas")),
                     admission=replace(world.config.admission, min_free_disk_mib=0, disk_growth_mib=0))
    (small / "deltas").mkdir(exist_ok=True)
    await world.start(config)
    await boot_source(world.virt, world.scratch, f"{PREFIX}src2")
    job = await world.clone({"source": f"{PREFIX}src2", "name": f"{PREFIX}c2"})
    assert job["state"] == "Failed", job
    # The source's new delta is made before the stun (qcow2's prepare_source_delta): the full
    # filesystem fails the job before the source is ever stopped.
    assert job["error"]["step"] == "Stunned", job["error"]
    assert "No space left on device" in job["error"]["message"] or "space" in job["error"]["message"], job["error"]
    print("delta filesystem full ->", job["error"])
    assert await world.virt.state(f"{PREFIX}src2") == "running"
    info = await world.virt.lookup(f"{PREFIX}src2")
    assert info.disks[0].path.parent == world.scratch.path, "the source still writes to its own disk"
    assert not list((small / "deltas").rglob("*.qcow2")), "no half-made delta left on the full filesystem"
    assert await world.leftovers(job["id"], f"{PREFIX}src2") == []


async def test_qemu_img_failing(world: World):
    fake = world.scratch.path / "qemu-img"
    fake.write_text("#!/bin/sh\n"
                    "if [ \"$1\" = create ]; then echo \"qemu-img: $7: Could not create: Input/output error\" >&2; "
                    "exit 1; fi\nexec qemu-img \"$@\"\n")
    fake.chmod(0o755)
    config = world.config.with_section("storage.qcow2", Qcow2Settings(qemu_img=str(fake)))
    await world.start(config)
    await boot_source(world.virt, world.scratch, f"{PREFIX}src3")
    job = await world.clone({"source": f"{PREFIX}src3", "name": f"{PREFIX}c3"})
    assert job["state"] == "Failed", job
    # The job's first qemu-img create is the source's new delta, made before the stun.
    assert job["error"]["step"] == "Stunned" and "Input/output error" in job["error"]["message"], job
    print("qemu-img failing ->", job["error"])
    assert await world.virt.state(f"{PREFIX}src3") == "running"
    assert await world.leftovers(job["id"], f"{PREFIX}src3") == []


@pytest.mark.skipif(os.path.isdir("/run/systemd/system"), reason="restarts libvirtd by hand (no systemd here)")
async def test_libvirtd_restarted_mid_job(world: World):
    d = await world.start()
    await boot_source(world.virt, world.scratch, f"{PREFIX}src4")

    async def restart(job_id: str, step: str) -> None:
        if step == "MemoryLinked":  # the source is stunned here
            await asyncio.to_thread(restart_libvirtd)

    assert d.engine is not None
    d.engine.step_hook = restart
    job = await world.clone({"source": f"{PREFIX}src4", "name": f"{PREFIX}c4"})
    print("libvirtd restarted mid-job ->", job["state"], job.get("error"))
    # Either outcome is clean: libvirt reconnected and the job finished, or it rolled back.
    assert job["state"] in ("Unstunned", "Failed"), job
    assert await world.virt.state(f"{PREFIX}src4") == "running"
    if job["state"] == "Failed":
        assert await world.leftovers(job["id"], f"{PREFIX}src4") == []
    else:
        assert await world.virt.state(f"{PREFIX}c4") == "running"
    d.engine.step_hook = None
    job = await world.clone({"source": f"{PREFIX}src4", "name": f"{PREFIX}c4b"})
    assert job["state"] == "Unstunned", job


async def test_concurrent_requests_on_real_sources(world: World):
    await world.start()
    await asyncio.gather(boot_source(world.virt, world.scratch, f"{PREFIX}srcA"),
                         boot_source(world.virt, world.scratch, f"{PREFIX}srcB"))
    reqs = [(f"{PREFIX}srcA", f"{PREFIX}a{i}") for i in range(6)] + \
           [(f"{PREFIX}srcB", f"{PREFIX}b{i}") for i in range(3)]
    jobs = await asyncio.gather(*(world.clone({"source": s, "name": n, "keep_network": True}) for s, n in reqs))
    assert [j["state"] for j in jobs] == ["Unstunned"] * len(reqs), [j.get("error") for j in jobs]
    # One stun per source at a time: the stun windows on a source never overlap;
    # jobs that waited for a stun shared the next one.
    for src in (f"{PREFIX}srcA", f"{PREFIX}srcB"):
        by_stun: dict[str, list[tuple[float, float]]] = {}
        for j in jobs:
            if j["source"] == src:
                by_stun.setdefault(j["result"]["stun"]["id"], []).append(_stun_window(j))
        windows = sorted((min(w[0] for w in ws), max(w[1] for w in ws)) for ws in by_stun.values())
        assert all(a_end <= b_start + STUN_WINDOW_SLACK_S
                   for (_, a_end), (b_start, _) in itertools.pairwise(windows)), windows
        assert await world.virt.state(src) == "running"
    assert len({j["result"]["stun"]["id"] for j in jobs}) < len(jobs)
    for _, n in reqs:
        assert await world.virt.state(n) == "running"
    async with Api(world.config.daemon.socket) as api:
        await asyncio.gather(*(api.call("DELETE", f"/v1/clones/{n}") for _, n in reqs))
        _status, body = await api.call("GET", "/v1/clones")
        assert body["clones"] == []


#: Stunned is written a few ms after the source stopped, so a window computed
#: from it ends a little later than the stun did.
STUN_WINDOW_SLACK_S = 0.05


def _stun_window(job: dict[str, Any]) -> tuple[float, float]:
    """(when the source stopped, about, when it ran again): from Stunned and the stun's length."""
    h = {e["state"]: e for e in job["history"]}
    start = h["Stunned"]["at"]
    return start, start + job["result"]["stun_ms"] / 1000.0
