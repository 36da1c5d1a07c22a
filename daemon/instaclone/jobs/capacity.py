"""Admission by capacity: a job is accepted only if the host can take what its clones will not share.

Before a job is stored (``jobs/admission.py``), and before a pool asks for
more members (``jobs/pools.py``), :meth:`Capacity.check` compares what the
job needs with what the host has free *now*, less what jobs accepted and not
yet finished already hold (their figures are not in MemAvailable or the free
blocks until their clones run):

 - memory: each clone's private part, the whole guest RAM for a memory
   backend that copies it (``saverestore``), ``admission.filecow_private_fraction``
   of it for one whose clones share the source's RAM (``shares_memory``:
   ``filecow``), plus ``admission.clone_overhead_mib`` for QEMU itself; the
   stun's RAM image too when it goes to the RAM directory and that is a
   memory filesystem. MemAvailable must keep ``admission.memory_reserve_mib``.
 - disk: ``admission.disk_growth_mib`` per new delta (the source's on the
   delta filesystem, each clone's on the clone filesystem) and the guest RAM
   once per stun for the memory image (in libvirt's memory_backing_dir for a
   backend with ``image_in_memory_backing_dir``, filecow's RAM copy, else in
   the jobs directory, saverestore's state file; a frozen source has it
   already); each filesystem must keep ``admission.min_free_disk_mib``.
 - queue: at most ``admission.max_queued_jobs`` jobs accepted and unfinished.

A shortfall raises :class:`~instaclone.errors.InsufficientCapacity` (507)
or :class:`~instaclone.errors.HostBusy` (503) naming the resource, the need
and what is free; the caller has made nothing yet. How many clones start at
once is bounded elsewhere (``clone.max_starting``: ``JobContext.start_slots``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..config import Config
from ..errors import HostBusy, InsufficientCapacity
from ..hv import hostfs

MIB = 1 << 20


class MemoryTraits(Protocol):
    """What admission needs of a memory backend (its class flags, ``instaclone.plugin_api.MemoryBackend``)."""

    @property
    def name(self) -> str: ...

    @property
    def shares_memory(self) -> bool: ...

    @property
    def image_in_memory_backing_dir(self) -> bool: ...


@dataclass(frozen=True)
class Demand:
    """What one job needs: memory, and disk per filesystem (device -> (a directory on it, MiB))."""

    memory_mib: float
    disk_mib: dict[int, tuple[str, float]] = field(default_factory=dict)
    what: str = ""  # the job in words, for the refusal's message


@dataclass(frozen=True)
class Snapshot:
    """The host's free figures at one moment (before the held reservations are taken off)."""

    mem_available_mib: float
    disk_free_mib: dict[int, float]


class HostProbe:
    """Reads the host: MemAvailable, free blocks per filesystem, libvirt's RAM directory. Tests replace it."""

    def mem_available_mib(self) -> float:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) / 1024
        raise OSError("/proc/meminfo has no MemAvailable line")

    def filesystem(self, path: Path) -> tuple[int, float]:
        """(device, MiB free to an unprivileged writer) of the filesystem ``path`` is, or will be made, on."""
        while not path.exists() and path != path.parent:
            path = path.parent
        st = os.statvfs(path)
        return os.stat(path).st_dev, st.f_bavail * st.f_frsize / MIB

    #: qemu.conf and the filesystem type are read again after this long (statfs via
    #: ctypes finds libc with ldconfig: milliseconds, too slow for every request).
    RAM_DIR_TTL_S = 60.0

    def __init__(self) -> None:
        self._ram_dir: tuple[float, Path, bool] | None = None

    def ram_dir(self) -> tuple[Path, bool]:
        """libvirt's memory_backing_dir (where filecow's RAM images live) and whether it is a memory fs."""
        now = time.monotonic()
        if self._ram_dir is None or now - self._ram_dir[0] > self.RAM_DIR_TTL_S:
            ram = hostfs.ram_dir()
            self._ram_dir = (now, Path(ram.path), ram.on_memory_fs)
        return self._ram_dir[1], self._ram_dir[2]


class Capacity:
    """The host budget of admission: checks demands, and holds what accepted jobs will use."""

    def __init__(self, probe: HostProbe | None = None) -> None:
        self.probe = probe or HostProbe()
        self._held: dict[str, Demand] = {}

    @property
    def held_jobs(self) -> int:
        """Jobs accepted and not finished that hold a reservation."""
        return len(self._held)

    def hold(self, job_id: str, demand: Demand) -> None:
        self._held[job_id] = demand

    def release(self, job_id: str) -> None:
        """The job ended: what it used is in the host's own figures now (or gone)."""
        self._held.pop(job_id, None)

    def demand(self, config: Config, *, source: str, ram_mib: int, backend: MemoryTraits, count: int,
               frozen: bool = False) -> Demand:
        """What a job of ``count`` clones of a ``ram_mib`` source through memory backend ``backend`` needs.

        A ``frozen`` source gets no new delta and no new memory image (both were made at freeze).
        """
        adm = config.admission
        share = adm.filecow_private_fraction if backend.shares_memory else 1.0
        per_clone = ram_mib * share + adm.clone_overhead_mib
        memory = per_clone * count
        disk: dict[int, tuple[str, float]] = {}

        def add(path: Path, mib: float) -> None:
            dev, _ = self.probe.filesystem(path)
            where, had = disk.get(dev, (str(path), 0.0))
            disk[dev] = (where, had + mib)

        add(config.clones_dir, adm.disk_growth_mib * count)
        if not frozen:
            add(config.delta_dir, adm.disk_growth_mib)
            if backend.image_in_memory_backing_dir:
                ram_dir, in_memory = self.probe.ram_dir()
                if in_memory:
                    memory += ram_mib
                else:
                    add(ram_dir, ram_mib)
            else:
                add(config.jobs_dir, ram_mib)
        what = (f"{count} clone{'s' if count != 1 else ''} of {source!r} ({backend.name}: {ram_mib} MiB guest RAM, "
                f"{ram_mib * share:g} MiB of it private, + {adm.clone_overhead_mib} MiB QEMU each)")
        return Demand(memory, disk, what)

    def snapshot(self) -> Snapshot:
        return Snapshot(self.probe.mem_available_mib(), {})

    def shortfall(self, config: Config, demand: Demand, snap: Snapshot) -> InsufficientCapacity | None:
        """The refusal ``demand`` earns against ``snap`` and the held reservations, or None if it fits."""
        adm = config.admission
        held = list(self._held.values())
        if len(held) >= adm.max_queued_jobs:
            return HostBusy(f"too many jobs: {len(held)} accepted and not finished, at most "
                            f"{adm.max_queued_jobs} (admission.max_queued_jobs); retry when some have finished",
                            resource="queue", need=1, free=max(0, adm.max_queued_jobs - len(held)), unit="jobs")
        held_mem = sum(d.memory_mib for d in held)
        free = snap.mem_available_mib - held_mem - adm.memory_reserve_mib
        if demand.memory_mib > free:
            return InsufficientCapacity(
                f"insufficient memory for {demand.what}: need {demand.memory_mib:.0f} MiB, free "
                f"{max(free, 0):.0f} MiB (MemAvailable {snap.mem_available_mib:.0f} MiB less "
                f"admission.memory_reserve_mib {adm.memory_reserve_mib} and {held_mem:.0f} MiB held by "
                f"{len(held)} accepted job{'s' if len(held) != 1 else ''})",
                resource="memory", need=round(demand.memory_mib), free=round(max(free, 0)), unit="MiB")
        for dev, (where, mib) in demand.disk_mib.items():
            if dev not in snap.disk_free_mib:
                snap.disk_free_mib[dev] = self.probe.filesystem(Path(where))[1]
            held_disk = sum(d.disk_mib.get(dev, ("", 0.0))[1] for d in held)
            free = snap.disk_free_mib[dev] - held_disk - adm.min_free_disk_mib
            need = mib
            if need > free:
                return InsufficientCapacity(
                    f"insufficient disk on the filesystem of {where} for {demand.what}: need {need:.0f} MiB, "
                    f"free {max(free, 0):.0f} MiB ({snap.disk_free_mib[dev]:.0f} MiB available less "
                    f"admission.min_free_disk_mib {adm.min_free_disk_mib} and {held_disk:.0f} MiB held by "
                    f"accepted jobs)",
                    resource="disk", need=round(need), free=round(max(free, 0)), unit="MiB", path=where)
        return None

    def check(self, config: Config, demand: Demand) -> None:
        """Raise InsufficientCapacity (507) or HostBusy (503) unless ``demand`` fits the host now."""
        refusal = self.shortfall(config, demand, self.snapshot())
        if refusal is not None:
            raise refusal

    def fit(self, config: Config, *, source: str, ram_mib: int, backend: MemoryTraits, limit: int,
            frozen: bool = False) -> tuple[int, InsufficientCapacity | None]:
        """The most clones (up to ``limit``) one job of ``source`` may make now, and why not more (or None)."""
        snap = self.snapshot()
        refusal = None
        for n in range(limit, 0, -1):
            refusal_n = self.shortfall(config, self.demand(config, source=source, ram_mib=ram_mib,
                                                           backend=backend, count=n, frozen=frozen), snap)
            if refusal_n is None:
                return n, refusal
            refusal = refusal or refusal_n
        return 0, refusal
