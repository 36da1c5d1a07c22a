"""The contract on the fakes: FakeStorage with every memory backend found by entry point, on a fake hypervisor.

Every call of every scenario fails once, before and after it takes effect;
once with a live rollback, once by SIGKILL of a child process running the
engine and recovery by a new one. Nothing may be left (see cases.verdict).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.contract.cases import kill_case, live_case
from tests.support.contract.fakeworld import FakeWorld
from tests.support.contract.plans import FAKE_CLONE, Case
from tests.support.contract.results import failure_message, record


async def test_contract(fake_case: Case, tmp_path: Path) -> None:
    case = fake_case
    world = await FakeWorld.create(tmp_path / "w", storage=case.storage, memory=case.memory)
    try:
        if case.mode == "live":
            report = await live_case(world, case.scenario, case.fault, FAKE_CLONE)
        else:
            report = await kill_case(world, case.scenario, case.fault, FAKE_CLONE, tmp_path)
    finally:
        await world.store.close()
    record(case, report)
    assert not report.violations, failure_message(case, report)
    if report.not_reached:
        pytest.skip(report.not_reached)
