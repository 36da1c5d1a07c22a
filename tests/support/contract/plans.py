"""From a clean run's calls to the list of contract cases, with ids that say where each fault is.

A case id reads ``<storage>-<memory>-<scenario>-<mode>-<NN>-<call>@<state>-<phase>``,
e.g. ``fake-filecow-job-live-10-save_state.src@CloneDeltaCreated-before``:
the NN-th call of the clean run, the method (``storage.``/``memory.`` for a
backend method, none for the hypervisor), the domain it is about, the state
the operation had recorded last when it was made, and whether the fault hits
before the call or after it took effect.
"""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import harness
from .cases import Scenario, record_plan
from .faults import LAYERS, Call, Fault, Injector, kill_faults, live_faults

MODES = ("live", "kill")


@dataclass(frozen=True)
class Case:
    storage: str
    memory: str
    scenario: Scenario
    mode: str  # live | kill
    call: Call
    phase: str

    @property
    def fault(self) -> Fault:
        return Fault(self.call.point, self.phase, "raise" if self.mode == "live" else "kill")

    @property
    def combo(self) -> str:
        return f"{self.storage}-{self.memory}-{self.scenario.name}-{self.mode}"

    @property
    def id(self) -> str:
        return f"{self.combo}-{self.call.n:02d}-{self.call.point.label()}@{self.call.state}-{self.phase}"


def cases_of(storage: str, memory: str, scenario: Scenario, plan: Injector, *,
             modes: tuple[str, ...] = MODES, layers: dict[str, tuple[str, ...]] | None = None) -> list[Case]:
    """The cases of one clean run; ``layers`` per mode (default: all layers in every mode)."""
    out = []
    for mode in modes:
        ls = (layers or {}).get(mode, LAYERS)
        points = live_faults(plan.calls, ls) if mode == "live" else kill_faults(plan.moments, ls)
        out += [Case(storage, memory, scenario, mode, c, phase) for c, phase in points]
    return out


FAKE_SCENARIOS = (Scenario("job", count=2, customize=True), Scenario("frozen-job"), Scenario("freeze"),
                  Scenario("unfreeze"))
#: Memory backends run once more in another mode of theirs (their section's source_mode).
EXTRA_MODES = ("filecow-copy",)
FAKE_CLONE = "ct"


def fake_combos() -> list[tuple[str, str]]:
    """(storage, memory) on the fakes: the fake storage with every memory backend found by entry point."""
    names = harness.memory_names()
    extra = [m for m in EXTRA_MODES if m.partition("-")[0] in names]
    return [(harness.FAKE_STORAGE, m) for m in sorted([*names, *extra])]


async def _fake_plan(storage: str, memory: str, scenario: Scenario) -> Injector:
    from .fakeworld import FakeWorld

    with tempfile.TemporaryDirectory(prefix="contract-plan-") as d:
        world = await FakeWorld.create(Path(d), storage=storage, memory=memory)
        try:
            return await record_plan(world, scenario, FAKE_CLONE)
        finally:
            await world.store.close()


def fake_cases() -> list[Case]:
    """Every case on the fakes: each scenario's clean run, then both modes at every call."""
    out = []
    for storage, memory in fake_combos():
        for scenario in FAKE_SCENARIOS:
            if memory.endswith("-precopy") and scenario.name != "job":
                continue  # a frozen source is served the same in every mode
            plan = asyncio.run(_fake_plan(storage, memory, scenario))
            out += cases_of(storage, memory, scenario, plan)
    return out
