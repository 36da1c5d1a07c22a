"""The contract on real libvirt: every storage x memory backend found by entry point, busybox guests under QEMU.

Cases come from clean runs on the booted sources (see realplans.py); one
source per memory backend serves all its cases. Each case fails one call
(live rollback) or kills the engine's process there (recovery by a new
engine), then checks that nothing is left (see cases.verdict).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.contract.cases import kill_case, live_case
from tests.support.contract.plans import Case
from tests.support.contract.realplans import BOOTED, WORLDS, boot_all, cleanup, world_of_memory
from tests.support.contract.results import failure_message, record

pytestmark = pytest.mark.integration

_names = itertools.count(1)


@pytest.fixture(scope="module")
def real_sources() -> Iterator[None]:
    """The sources of the cases, booted for this module only."""
    from tests.support.host import libvirt_ready

    if (why := libvirt_ready()) is not None:
        pytest.skip(why)
    asyncio.run(boot_all())
    try:
        yield
    finally:
        cleanup()


@pytest.mark.usefixtures("real_sources")
async def test_contract(libvirt_case: Case, tmp_path: Path) -> None:
    from tests.support.contract.realworld import LibvirtWorld

    case = libvirt_case
    w = world_of_memory(case.memory)
    world = await LibvirtWorld.attach(BOOTED[w], source=WORLDS[w][0], storage=case.storage, memory=case.memory)
    name = f"ct-{w}-{next(_names)}"
    try:
        await world.consolidate()
        if case.mode == "live":
            report = await live_case(world, case.scenario, case.fault, name)
        else:
            report = await kill_case(world, case.scenario, case.fault, name, tmp_path)
    finally:
        await world.detach()
    record(case, report)
    assert not report.violations, failure_message(case, report)
    if report.not_reached:
        pytest.skip(report.not_reached)


@pytest.mark.usefixtures("real_sources")
async def test_sources_still_run() -> None:
    """After every case, each source's guest still counts on (same boot): no case broke it."""
    from tests.support.contract.harness import devguest
    from tests.support.contract.realworld import LibvirtWorld

    for w, scratch in BOOTED.items():
        world = await LibvirtWorld.attach(scratch, source=WORLDS[w][0], storage="qcow2", memory="saverestore")
        try:
            state = await world.source_state()
        finally:
            await world.detach()
        if state != "running":
            continue  # frozen by the last case that ran (a -k selection)
        log = devguest.serial_log_path(WORLDS[w][0], scratch)
        boot, n = devguest.read_counter(log) or ("", 0)
        again, _ = await devguest.wait_counter(log, above=n + 1, timeout=60)
        assert again == boot, f"{WORLDS[w][0]} rebooted"
