"""Invariants checked on real guests after a crash or a fault (tests/integration): nothing left, the source runs."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import time
from pathlib import Path

from instaclone.hv import LibvirtHypervisor as Hypervisor

from .vmlib import Scratch

#: Where libvirt keeps the guests' RAM files (memory_backing_dir).
RAM_ROOT = Path("/var/lib/libvirt/qemu/ram")


def chain(image: Path) -> set[str]:
    """Every file of ``image``'s backing chain (qemu-img), itself included."""
    out = subprocess.run(["qemu-img", "info", "--force-share", "--backing-chain", "--output=json", str(image)],
                         capture_output=True, text=True, check=True).stdout
    return {i["filename"] for i in json.loads(out)}


async def check_world(virt: Hypervisor, scratch: Scratch, src: str, job_id: str,
                      nvram: tuple[Path, str] | None = None) -> list[str]:
    """Violations of invariants 1, 2 and 7 after recovery (empty: none).

    ``nvram``: the source's UEFI variable store and its sha256, which no
    kill may change or remove.
    """
    bad: list[str] = []
    if nvram is not None:
        path, digest = nvram
        if not path.exists() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            bad.append(f"the source's NVRAM {path} was changed or removed")
    if await virt.state(src) != "running":
        bad.append(f"source {src} is {await virt.state(src)}")
    state = scratch.path / "state"
    clones = {p.name for p in (state / "clones").iterdir()} if (state / "clones").exists() else set()
    domains = {n for n in await virt.list_names() if n.startswith("kc-") and n != src}
    if domains != clones:
        bad.append(f"domains {sorted(domains)} != clone dirs {sorted(clones)}")
    jobs = list((state / "jobs").iterdir()) if (state / "jobs").exists() else []
    if jobs:
        bad.append(f"job directories left: {jobs}")
    live = set()
    for name in [src, *domains]:
        for d in (await virt.lookup(name)).disks:
            live |= chain(d.path)
    for f in (state / "deltas").rglob("*"):
        if f.is_file() and str(f) not in live:
            bad.append(f"orphan delta {f}")
    for f in RAM_ROOT.rglob(f"*{job_id}*"):
        bad.append(f"orphan RAM copy {f}")
    return bad


async def wait_file(path: Path, timeout: float = 120.0) -> str:
    end = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > end:
            raise AssertionError(f"{path} never appeared")
        await asyncio.sleep(0.05)
    return path.read_text()
