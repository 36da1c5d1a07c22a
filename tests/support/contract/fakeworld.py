"""The fake world: tests/support/fakes.py's hypervisor with file-backed RAM, a disk chain,
and a state that outlives a process.

:class:`ContractFake` adds to :class:`FakeHypervisor` what the real
backends need of libvirt here: a RAM file per running file-backed domain
under a RAM root (like ``/var/lib/libvirt/qemu/ram/<id>-<name>/pc.ram``,
removed when the domain stops; a clone mapping a frozen image gets a hard
link to it, as the libvirt hook does), so that ``filecow`` runs on it too; the
backing file of each overlay a disk snapshot made; and :meth:`dump` /
:meth:`load`, so that a child process killed mid-job leaves its domains
behind the way a real libvirtd would.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from instaclone import config as cfg

from ..fakes import SOURCE_XML, FakeDomain
from . import harness
from .world import World

RAM_ALIAS = "pc.ram"
RAM_BYTES = 1 << 20
AGENT = "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>"


class ContractFake(harness.FakeHypervisor):
    def __init__(self, ram_root: Path) -> None:
        super().__init__()
        self.ram_root = ram_root
        self.ramdirs: dict[str, str] = {}
        self.backing: dict[str, str] = {}  # overlay -> the image it was put on
        self.next_id = 1

    # -- RAM files, as libvirt keeps them -----------------------------------------
    def _map_ram(self, name: str) -> None:
        d = self._get(name)
        backed, _ = harness.domxml.file_ram(d.xml)
        if not backed or name in self.ramdirs:
            return
        ramdir = self.ram_root / f"{self.next_id}-{name}"
        self.next_id += 1
        ramdir.mkdir(parents=True)
        mark = ET.fromstring(d.xml).find(f"./metadata/{{{harness.domxml.IC_NS}}}clone")
        if mark is not None and mark.get("ram"):
            os.link(str(mark.get("ram")), ramdir / RAM_ALIAS)  # what the libvirt hook does
        else:
            with open(ramdir / RAM_ALIAS, "wb") as f:
                f.truncate(RAM_BYTES)
                f.write(os.urandom(4096))
        self.ramdirs[name] = str(ramdir)

    def _unmap_ram(self, name: str) -> None:
        ramdir = self.ramdirs.pop(name, None)
        if ramdir is not None:
            shutil.rmtree(ramdir, ignore_errors=True)

    async def ram_file(self, name: str, alias: str = RAM_ALIAS) -> tuple[Path, bool] | None:
        await self._hook("ram_file", name)
        d = self._get(name)
        if name not in self.ramdirs:
            return None
        return Path(self.ramdirs[name]) / alias, harness.domxml.file_ram(d.xml)[1] == "shared"

    async def start(self, name: str, *, paused: bool = False) -> None:
        await super().start(name, paused=paused)
        self._map_ram(name)

    async def destroy(self, name: str) -> None:
        await super().destroy(name)
        self._unmap_ram(name)

    async def undefine(self, name: str) -> None:
        await super().undefine(name)
        self._unmap_ram(name)

    async def snapshot_disks(self, name: str, overlays: dict[str, Path], *, reuse: bool = False) -> None:
        before = {d.target: str(d.path) for d in (await super().lookup(name)).disks}
        await super().snapshot_disks(name, overlays, reuse=reuse)
        for tgt, path in overlays.items():
            self.backing[str(path)] = before[tgt]

    async def backing_chain(self, name: str, target: str) -> list[Path]:
        """The disk's chain, top first, as libvirt's live XML shows it."""
        chain = await super().backing_chain(name, target)
        while str(chain[-1]) in self.backing:
            chain.append(Path(self.backing[str(chain[-1])]))
        return chain

    # -- surviving a process --------------------------------------------------------
    def dump(self, path: Path) -> None:
        state = {"domains": [asdict(d) for d in self.domains.values()], "ramdirs": self.ramdirs,
                 "backing": self.backing, "next_id": self.next_id}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, path)

    def load(self, path: Path) -> None:
        state = json.loads(path.read_text())
        self.domains = {d["name"]: FakeDomain(**d) for d in state["domains"]}
        self.ramdirs, self.backing, self.next_id = state["ramdirs"], state["backing"], state["next_id"]


def source_xml(name: str, disk: Path, nvram: Path) -> str:
    """The fake source: UEFI with its own variable store, shared file RAM, a guest agent."""
    xml = SOURCE_XML.format(name=name, uuid="6c0f9a62-3e1d-4b8e-9a57-000000000001", disk=disk)
    xml = xml.replace("<os><type arch='x86_64'>hvm</type></os>",
                      "<os><type arch='x86_64'>hvm</type>"
                      "<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>"
                      f"<nvram>{nvram}</nvram></os>"
                      "<memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>")
    return xml.replace("</devices>", AGENT + "</devices>")


def fake_config(root: Path) -> cfg.Config:
    c = cfg.Config()
    return replace(c, daemon=replace(c.daemon, state_dir=root / "state"),
                   clone=replace(c.clone, stun_deadline_ms=20000, step_timeout_s=20))


class FakeWorld(World):
    kind = "fake"

    def __init__(self, root: Path, *, storage: str, memory: str, source: str = "src") -> None:
        self.root = root
        virt = ContractFake(root / "ram")
        super().__init__(config=fake_config(root), virt=virt, source=source, storage=storage, memory=memory)
        self.state_file = root / "fake-hypervisor.json"
        # filecow's grants for the libvirt hook: here, not in the host's /run/instaclone/hook.
        self.grants_dir = root / "grants"

    @classmethod
    async def create(cls, root: Path, *, storage: str, memory: str) -> FakeWorld:
        w = cls(root, storage=storage, memory=memory)
        # As the daemon makes them at start (and freeze makes frozen/ once).
        for d in (w.config.jobs_dir, w.config.clones_dir, w.config.delta_dir, w.config.daemon.state_dir / "frozen",
                  w.virt.ram_root / "instaclone"):
            d.mkdir(parents=True, exist_ok=True)
        (root / "src").mkdir()
        disk, nvram = root / "src" / "src.qcow2", root / "src" / "src_VARS.fd"
        # A real (empty) qcow2 image, as the definition records: a shadow
        # reads its size with qemu-img -f qcow2 (a format is never probed).
        await asyncio.to_thread(subprocess.run, ["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "1M"],
                                check=True)
        nvram.write_bytes(os.urandom(8192))
        w.virt.add_source(w.source, disk)
        w.virt.domains[w.source].xml = source_xml(w.source, disk, nvram)
        w.virt._map_ram(w.source)
        w.store = await harness.open_store(w.config.store_path)
        return w

    @property
    def roots(self) -> list[Path]:
        # Not the root itself: the fake's dump and the child's files live there.
        return [self.root / "state", self.root / "ram", self.root / "src"]

    async def domain_names(self) -> set[str]:
        return set(self.virt.domains)

    async def domain_facts(self) -> tuple[Any, ...]:
        return tuple(sorted((d.name, d.state, hash(d.xml), hash(d.inactive)) for d in self.virt.domains.values()))

    async def source_xml(self) -> str:
        return str(self.virt.domains[self.source].xml)

    async def chain(self, top: Path) -> list[str]:
        out = [str(top)]
        while out[-1] in self.virt.backing:
            out.append(self.virt.backing[out[-1]])
        return out

    def child_spec(self) -> dict[str, Any]:
        return {"world": "fake", "root": str(self.root), "storage": self.storage, "memory": self.memory,
                "source": self.source}

    async def before_child(self) -> None:
        await super().before_child()
        self.virt.dump(self.state_file)

    async def after_child(self) -> None:
        await super().after_child()
        await asyncio.to_thread(self.virt.load, self.state_file)

    @classmethod
    async def in_child(cls, spec: dict[str, Any]) -> FakeWorld:
        """The same world in a child process: the fake's state from the parent's dump."""
        w = cls(Path(spec["root"]), storage=spec["storage"], memory=spec["memory"], source=spec["source"])
        w.virt.load(w.state_file)
        w.store = await harness.open_store(w.config.store_path)
        return w
