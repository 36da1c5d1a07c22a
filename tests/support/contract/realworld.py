"""The real world: libvirt, QEMU (TCG here) and the busybox test guest as the one source.

One source VM serves many cases: every case checks that it is as it was
(running or frozen, same chain, same NVRAM, same memory backing), so a case
that damaged it fails, and the next case starts from a verified state.
Its files live in a scratch directory that libvirt's QEMU user can reach;
file-backed RAM lives where libvirt puts it (``RAM_ROOT/<id>-<name>/pc.ram``,
filecow's images in ``RAM_ROOT/instaclone/``), UEFI variable stores libvirt
makes itself in ``NVRAM_ROOT``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from instaclone import config as cfg

from . import harness
from .world import World

RAM_ROOT = Path("/var/lib/libvirt/qemu/ram")
NVRAM_ROOT = Path("/var/lib/libvirt/qemu/nvram")
SCRATCH_ROOT = Path(os.environ.get("INSTACLONE_TEST_DIR", "/var/lib/instaclone/test-tmp"))
#: Every domain this suite defines starts with this.
PREFIX = "ct-"


def real_config(scratch: Path) -> cfg.Config:
    c = cfg.Config()
    return replace(
        c, daemon=replace(c.daemon, state_dir=scratch / "state", socket=scratch / "ctl.sock"),
        # TCG guests on a shared 2-core machine are slow; the deadline is not what is tested here.
        clone=replace(c.clone, stun_deadline_ms=60000, step_timeout_s=120),
    )


def new_scratch() -> Path:
    SCRATCH_ROOT.mkdir(parents=True, exist_ok=True)
    SCRATCH_ROOT.chmod(0o755)
    path = SCRATCH_ROOT / f"contract-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    os.chown(path, *harness.devguest.qemu_owner())
    path.chmod(0o755)
    return path


async def boot_source(virt: Any, scratch: Path, name: str, *, file_backed_ram: bool) -> None:
    """Define and start the busybox guest as ``name`` (UEFI, own NVRAM), wait until it counts."""
    dg = harness.devguest
    disk = scratch / f"{name}.qcow2"
    await asyncio.to_thread(subprocess.run, ["qemu-img", "create", "-q", "-f", "qcow2", "-b",
                                             str(dg.GUEST_DIR / "base.qcow2"), "-F", "qcow2", str(disk)],
                            check=True)
    xml = dg.domain_xml(name, disk=disk, workdir=scratch, memory_mib=256, file_backed_ram=file_backed_ram,
                        firmware="uefi")
    await virt.define(xml)
    await virt.start(name)
    await dg.wait_counter(dg.serial_log_path(name, scratch), above=1, timeout=180)


class LibvirtWorld(World):
    kind = "libvirt"

    def __init__(self, scratch: Path, *, source: str, storage: str, memory: str, virt: Any) -> None:
        super().__init__(config=real_config(scratch), virt=virt, source=source, storage=storage, memory=memory)
        self.scratch = scratch

    @classmethod
    async def attach(cls, scratch: Path, *, source: str, storage: str, memory: str) -> LibvirtWorld:
        """A world on a source booted earlier (by :func:`boot_source`): own connection, own journal."""
        virt = harness.Hypervisor()
        await virt.connect()
        w = cls(scratch, source=source, storage=storage, memory=memory, virt=virt)
        c = w.config
        # As the daemon makes them at start (freeze makes frozen/ once).
        for d in (c.daemon.state_dir, c.jobs_dir, c.clones_dir, c.delta_dir, c.daemon.state_dir / "frozen"):
            d.mkdir(parents=True, exist_ok=True)
            os.chown(d, *harness.devguest.qemu_owner())
        w.store = await harness.open_store(c.store_path)
        return w

    async def detach(self) -> None:
        await harness.close_store(self.store)
        await self.virt.close()

    @property
    def roots(self) -> list[Path]:
        return [self.scratch, RAM_ROOT, NVRAM_ROOT]

    async def domain_names(self) -> set[str]:
        return set(await self.virt.list_names())

    async def domain_facts(self) -> tuple[Any, ...]:
        out = []
        for name in sorted(await self.virt.list_names()):
            out.append((name, await self.virt.state(name)))
        info = await self.virt.lookup(self.source)
        return (tuple(out), tuple(str(d.path) for d in info.disks))

    async def source_xml(self) -> str:
        return str((await self.virt.lookup(self.source)).xml)

    async def chain(self, top: Path) -> list[str]:
        proc = await asyncio.create_subprocess_exec(
            "qemu-img", "info", "--force-share", "--backing-chain", "--output=json", str(top),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        if proc.returncode != 0:
            return [f"{top} (unreadable: {err.decode(errors='replace').strip()})"]
        return [str(i["filename"]) for i in json.loads(out)]

    async def leftover_processes(self, names: list[str]) -> list[str]:
        bad = []
        for n in names:
            r = await asyncio.to_thread(subprocess.run, ["pgrep", "-f", f"qemu-system.*guest={n},"],
                                        capture_output=True, text=True)
            if r.stdout.strip():
                bad.append(f"QEMU of {n} still runs (pid {r.stdout.split()})")
        return bad

    def child_spec(self) -> dict[str, Any]:
        return {"world": "libvirt", "scratch": str(self.scratch), "source": self.source,
                "storage": self.storage, "memory": self.memory}

    @classmethod
    async def in_child(cls, spec: dict[str, Any]) -> LibvirtWorld:
        return await cls.attach(Path(spec["scratch"]), source=spec["source"], storage=spec["storage"],
                                memory=spec["memory"])

    async def consolidate(self, max_depth: int = 6) -> None:
        """Keep the source's chain short (every case may add a delta): block pull, drop unused images.

        Test housekeeping between cases, through the storage backend's own
        API; only while the source is not frozen and has no clones (every
        case destroys its clones), so no other chain uses the images.
        """
        if await harness.frozen_entry(self.store, self.source) is not None:
            return
        if await harness.clones_of(self.store, self.source):
            return
        top = (await self.virt.lookup(self.source)).disks[0]
        if len(await self.chain(top.path)) <= max_depth:
            return
        storage, _ = harness.make_backends(self.config, self.virt, self.storage, self.memory)
        await storage.consolidate(domain=self.source, target=top.target)
        live = set(await self.chain(top.path))
        for f in self.config.delta_dir.rglob("*.qcow2"):
            if str(f) not in live:
                f.unlink()


def ram_images() -> set[str]:
    """The entries of filecow's image dir now."""
    images = RAM_ROOT / "instaclone"
    return {p.name for p in images.iterdir()} if images.is_dir() else set()


async def remove_all(virt: Any, scratches: list[Path], images_before: set[str]) -> None:
    """Undefine every domain of this suite, remove its scratch dirs and the filecow images made since.

    A case that fails may leave images (that is what it found): they must
    not stay for the next run (a frozen source's image has a fixed name).
    """
    for name in await virt.list_names():
        if name.startswith(PREFIX):
            await virt.undefine(name)
    for s in scratches:
        await asyncio.to_thread(shutil.rmtree, s, True)
    for entry in ram_images() - images_before:
        await asyncio.to_thread(shutil.rmtree, RAM_ROOT / "instaclone" / entry, True)
