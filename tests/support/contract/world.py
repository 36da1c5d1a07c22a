"""What "nothing left anywhere" means, for any world (fakes or real libvirt).

A :class:`World` is the host a contract case runs on: a config, a journal, a
hypervisor, one source domain and the directories to watch. A
:class:`Snap` records what can be seen of it; :func:`compare` lists every
difference a failed, rolled-back operation must not leave: new or removed
files and directories (state dir, job and clone dirs, deltas, the memory
backing dir with its ``instaclone/`` images, NVRAM dirs), new or missing
domains, a source that is not in the state it was in, a source chain that
lost an image or changed a backing file, a changed NVRAM, a changed freeze
registry entry.
"""

from __future__ import annotations

import abc
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instaclone.config import Config

from . import harness

#: The journal's files: written by every operation, nobody's leftovers.
JOURNAL_FILES = "journal.sqlite"


@dataclass
class Snap:
    files: set[str]  # every file and directory below the watched roots
    domains: set[str]
    source_state: str
    chain: list[str]  # the source's disk chain, top first
    chain_stat: dict[str, tuple[int, int]]  # (size, mtime_ns) of the chain's images
    nvram_sha: str | None
    ram_backing: tuple[bool, str | None]
    frozen: dict[str, Any] | None
    extra: dict[str, Any] = field(default_factory=dict)


class World(abc.ABC):
    """A host to run contract cases on; subclasses say how to see its domains and disks."""

    kind: str  # "fake" | "libvirt"

    def __init__(self, *, config: Config, virt: Any, source: str, storage: str, memory: str) -> None:
        self.config = config
        self.virt = virt
        self.source = source
        self.storage = storage
        self.memory = memory
        self.store: Any = None

    @property
    @abc.abstractmethod
    def roots(self) -> list[Path]:
        """Directories whose every entry is watched."""

    @abc.abstractmethod
    async def domain_names(self) -> set[str]: ...

    @abc.abstractmethod
    async def source_xml(self) -> str:
        """The source's live definition."""

    @abc.abstractmethod
    async def chain(self, top: Path) -> list[str]:
        """The disk chain whose top is ``top``, top first."""

    @abc.abstractmethod
    def child_spec(self) -> dict[str, Any]:
        """What a child process needs to rebuild this world (see child.py)."""

    async def before_child(self) -> None:
        """Hand the world to a child process (close what it must open itself)."""
        await harness.close_store(self.store)

    async def after_child(self) -> None:
        self.store = await harness.open_store(self.config.store_path)

    async def leftover_processes(self, names: list[str]) -> list[str]:
        return []

    @abc.abstractmethod
    async def domain_facts(self) -> tuple[Any, ...]:
        """The domains and their states, for :meth:`fingerprint`."""

    async def fingerprint(self, job_id: str | None) -> str:
        """A digest of everything a SIGKILL now would leave: journal, files, domains.

        Two moments with the same fingerprint are the same crash to recovery.
        """
        files = []
        for p in sorted(list_files(self.roots)):
            # Logs grow on their own; their size says nothing about the job.
            size = -1 if p.endswith(".log") else _stat(p)[0]
            files.append((p, size))
        facts = (await harness.store_facts(self.store, job_id, self.source), tuple(files),
                 await self.domain_facts())
        return hashlib.sha256(repr(facts).encode()).hexdigest()[:16]

    async def source_state(self) -> str:
        return str(await self.virt.state(self.source))


def _sha(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _stat(path: str) -> tuple[int, int]:
    try:
        st = Path(path).stat()
    except OSError:
        return (-1, -1)
    return (st.st_size, st.st_mtime_ns)


def list_files(roots: list[Path]) -> set[str]:
    out: set[str] = set()
    for root in roots:
        if root.exists():
            out |= {str(p) for p in root.rglob("*") if not p.name.startswith(JOURNAL_FILES)}
    return out


async def snapshot(world: World) -> Snap:
    domxml, vmstate = harness.domxml, harness.vmstate
    xml = await world.source_xml()
    disks = _disks(xml)
    chain = await world.chain(Path(disks[0])) if disks else []
    nvram = vmstate.nvram_path(xml)
    return Snap(
        files=list_files(world.roots),
        domains=await world.domain_names(),
        source_state=await world.source_state(),
        chain=chain,
        chain_stat={p: _stat(p) for p in chain},
        nvram_sha=_sha(nvram) if nvram is not None else None,
        ram_backing=domxml.file_ram(xml),
        frozen=await harness.frozen_entry(world.store, world.source),
    )


def _disks(xml: str) -> list[str]:
    import xml.etree.ElementTree as ET

    root = ET.fromstring(xml)
    out = []
    for disk in root.iterfind("./devices/disk"):
        src = disk.find("source")
        if disk.get("device", "disk") == "disk" and src is not None and src.get("file"):
            out.append(str(src.get("file")))
    return out


def _frozen_core(entry: dict[str, Any] | None) -> Any:
    if entry is None:
        return None
    return {k: entry.get(k) for k in ("status", "backend", "image", "paused_by_us")}


def compare(before: Snap, after: Snap, *, expect_state: str, expect_frozen: Any = "same",
            allow_removed: set[str] | None = None) -> list[str]:
    """Everything ``after`` shows that a clean rollback must not leave (empty: nothing).

    ``expect_frozen``: "same" (the registry entry is unchanged) or None (no entry).
    New images on top of the source's chain are allowed: a source delta the
    source writes to is the source's disk now (docs/design/states.md, SourceDeltaCreated);
    an unfreeze tried twice gives it two.
    """
    bad: list[str] = []
    new_top = after.chain[: max(0, len(after.chain) - len(before.chain))]
    if after.chain[len(new_top):] != before.chain:
        bad.append(f"source chain changed: {before.chain} -> {after.chain}")
    broken = [p for p in after.chain if not Path(p).is_file()]
    if broken:
        bad.append(f"source chain broken: {', '.join(broken)} missing or unreadable")
    allowed = set(new_top) | {str(Path(p).parent) for p in new_top}
    new = sorted(after.files - before.files - allowed)
    if new:
        bad.append(f"left behind: {', '.join(new)}")
    gone = sorted(before.files - after.files - (allow_removed or set()))
    if gone:
        bad.append(f"removed: {', '.join(gone)}")
    if after.domains - before.domains:
        bad.append(f"domains left: {sorted(after.domains - before.domains)}")
    if before.domains - after.domains:
        bad.append(f"domains gone: {sorted(before.domains - after.domains)}")
    if after.source_state != expect_state:
        bad.append(f"source is {after.source_state}, not {expect_state}")
    for path in before.chain[1:]:  # backing images: read-only before and after
        if after.chain_stat.get(path) != before.chain_stat[path]:
            bad.append(f"backing image {path} changed: {before.chain_stat[path]} -> {after.chain_stat.get(path)}")
    if after.nvram_sha != before.nvram_sha:
        bad.append(f"source NVRAM changed or removed (sha {before.nvram_sha} -> {after.nvram_sha})")
    if after.ram_backing != before.ram_backing:
        bad.append(f"source memory backing changed: {before.ram_backing} -> {after.ram_backing}")
    want = _frozen_core(before.frozen) if expect_frozen == "same" else expect_frozen
    if _frozen_core(after.frozen) != want:
        bad.append(f"freeze registry entry is {_frozen_core(after.frozen)}, expected {want}")
    return bad
