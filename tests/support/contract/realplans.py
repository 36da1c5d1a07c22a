"""The real-libvirt cases, made at collection: boot the sources once, record each scenario's clean run.

The sources are removed after the clean runs and booted again, from the
same definitions, while the contract module runs (fixture ``real_sources``:
its cases reuse them; each case verifies it finds and leaves them as they
were); :func:`cleanup` also runs at session end, as a safety net. Nothing boots
when integration tests are deselected (``-m "not integration"``), for
``--collect-only``, or when libvirt or the test guest is missing: the cases
then collect as one skipped placeholder.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from . import harness
from .cases import Scenario, record_plan
from .plans import Case, cases_of

#: world -> (source name, file-backed shared RAM)
WORLDS = {"fc": ("ct-fc-src", True), "sr": ("ct-sr-src", False)}
#: What runs on real libvirt per memory backend: one whose clones share the source's RAM gets the
#: source with shared file RAM and every scenario (its frozen image is its own); one that copies RAM
#: gets the other source and a clone job (freezing is the same core code for it).
SHARING_SCENARIOS = (Scenario("job"), Scenario("freeze"), Scenario("frozen-job"), Scenario("unfreeze"))
COPYING_SCENARIOS = (Scenario("job"),)


def world_of_memory(memory: str) -> str:
    """The world (source) a memory backend, found by entry point, runs its cases on."""
    return "fc" if harness.memory_class(memory).shares_memory else "sr"


def suites() -> list[tuple[str, str, str, Scenario]]:
    """(world, storage, memory, scenario), in the order they run: every backend found by entry point."""
    out = []
    for storage in harness.storage_names():
        for memory in harness.memory_names():
            w = world_of_memory(memory)
            out += [(w, storage, memory, s) for s in (SHARING_SCENARIOS if w == "fc" else COPYING_SCENARIOS)]
    return out

#: world -> scratch dir of its booted source.
BOOTED: dict[str, Path] = {}
#: filecow's image dir before the first boot (see realworld.remove_all).
IMAGES_BEFORE: set[str] = set()


def _unavailable(config: pytest.Config) -> str | None:
    from ..host import libvirt_ready

    expr = config.getoption("markexpr") or ""
    if "not integration" in expr.replace("  ", " "):
        return "integration tests deselected"
    if config.getoption("collectonly"):
        return "--collect-only: the cases come from clean runs on real guests"
    return libvirt_ready()


def libvirt_params(config: pytest.Config) -> list[Any]:
    why = _unavailable(config)
    if why is not None:
        return [pytest.param(None, id="unavailable", marks=pytest.mark.skip(reason=why))]
    try:
        cases = asyncio.run(_record_all())
    finally:
        # The sources do not run while other tests do (two cores, TCG): the
        # contract module boots them again (fixture real_sources).
        cleanup()
    return [pytest.param(c, id=c.id) for c in cases]


async def boot_all() -> None:
    """Boot every world's source in a new scratch dir (in parallel), into :data:`BOOTED`."""
    from . import harness
    from .realworld import boot_source, new_scratch, ram_images

    if not BOOTED:
        IMAGES_BEFORE.clear()
        IMAGES_BEFORE.update(ram_images())
    virt = harness.Hypervisor()
    await virt.connect()
    try:
        for w in WORLDS:
            BOOTED[w] = new_scratch()
        await asyncio.gather(*(boot_source(virt, BOOTED[w], src, file_backed_ram=fb)
                               for w, (src, fb) in WORLDS.items()))
    finally:
        await virt.close()


async def _record_all() -> list[Case]:
    from .realworld import LibvirtWorld

    await boot_all()
    out: list[Case] = []
    for i, (w, storage, memory, scenario) in enumerate(suites()):
        world = await LibvirtWorld.attach(BOOTED[w], source=WORLDS[w][0], storage=storage, memory=memory)
        try:
            plan = await record_plan(world, scenario, f"ct-{w}-plan{i}")
        finally:
            await world.detach()
        out += cases_of(storage, memory, scenario, plan)
    return out


def cleanup() -> None:
    if not BOOTED:
        return

    async def go() -> None:
        from . import harness
        from .realworld import remove_all

        virt = harness.Hypervisor()
        await virt.connect()
        try:
            await remove_all(virt, list(BOOTED.values()), IMAGES_BEFORE)
        finally:
            await virt.close()

    asyncio.run(go())
    BOOTED.clear()
