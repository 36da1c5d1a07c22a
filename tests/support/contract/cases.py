"""One contract case: an operation with a fault at one call, then the checks.

Scenarios (each an operation on the world's one source):

* ``job``: clone the running source;
* ``frozen-job``: clone the source while it is frozen (a template);
* ``freeze``: freeze the running source;
* ``unfreeze``: unfreeze the frozen source (which has had a clone).

Modes: ``live`` (the fault raises; the engine rolls back while it runs) and
``kill`` (a child process running the engine SIGKILLs itself at the fault;
a new engine on the same journal recovers). Either way the case then
checks the job's record and the world (see :func:`verdict`).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instaclone.errors import InstacloneError

from . import harness
from .faults import Fault, HypervisorProxy, Injector, instrument
from .world import Snap, World, compare, snapshot

#: What each scenario needs the source to be before it runs, and what it must be after a failure.
NEEDS_FROZEN = {"job": False, "frozen-job": True, "freeze": False, "unfreeze": True}
SOURCE_AFTER = {"job": "running", "frozen-job": "paused", "freeze": "running", "unfreeze": "running"}
LABEL = {"freeze": "Freezing", "unfreeze": "Unfreezing"}


@dataclass(frozen=True)
class Scenario:
    name: str  # job | frozen-job | freeze | unfreeze
    count: int = 1
    customize: bool = False

    @property
    def is_job(self) -> bool:
        return self.name in ("job", "frozen-job")


@dataclass
class Report:
    """How one case went: the violations (empty: it passed) and what happened."""

    violations: list[str] = field(default_factory=list)
    outcome: str = ""
    note: str = ""  # e.g. "tolerated": the operation succeeded despite the fault
    # Why the case tested nothing (the operation never made the call this
    # time: some calls depend on timing, e.g. the source's clock is set only
    # after a stun over 1 s); the test is skipped unless there are violations.
    not_reached: str = ""


def build_engine(world: World, injector: Injector | None) -> Any:
    """An engine on the world; with ``injector``, every hypervisor and backend call goes through it."""
    virt = world.virt if injector is None else HypervisorProxy(world.virt, injector)
    storage, memory = harness.make_backends(world.config, virt, world.storage, world.memory)
    grants = getattr(world, "grants_dir", None)
    if grants is not None and hasattr(memory, "grants_dir"):
        memory.grants_dir = grants
    if injector is not None:
        instrument(storage, "storage", injector)
        instrument(memory, "memory", injector)
    return harness.make_engine(world.config, world.store, virt, storage, memory)


async def with_engine(world: World, fn: Callable[[Any], Awaitable[Any]], injector: Injector | None = None) -> Any:
    engine = build_engine(world, injector)
    try:
        return await fn(engine)
    finally:
        await harness.shutdown(engine)


async def set_frozen(world: World, frozen: bool) -> None:
    """Bring the source to the state a scenario starts from (no faults)."""
    entry = await harness.frozen_entry(world.store, world.source)
    if frozen and entry is None:
        await with_engine(world, lambda e: harness.freeze(e, world.source))
    elif not frozen and entry is not None:
        await with_engine(world, lambda e: harness.unfreeze(e, world.source))


async def clean_clone(world: World, name: str) -> None:
    """One clone of the source, made and destroyed without faults."""
    async def go(engine: Any) -> None:
        job_id = await harness.submit(engine, source=world.source, name=name, count=1, customize=False)
        await harness.wait(engine, job_id)
        out = await harness.job_outcome(world.store, job_id)
        assert out.state == "Unstunned", out
        for c in out.clones:
            await harness.destroy_clone(engine, c)
    await with_engine(world, go)


async def prepare(world: World, scenario: Scenario, name: str) -> Snap:
    """Set the world up for ``scenario``; returns the snapshot the world must look like afterwards.

    Raises AssertionError naming the cause when that fails: the world was
    damaged (by an earlier case: look for the first failure).
    """
    try:
        return await _prepare(world, scenario, name)
    except Exception as exc:
        raise AssertionError(f"cannot set up {scenario.name} on {world.source}, without faults: "
                             f"{type(exc).__name__}: {exc} (an earlier case may have damaged the world: "
                             "see the first failure)") from exc


async def _prepare(world: World, scenario: Scenario, name: str) -> Snap:
    if scenario.name != "unfreeze":
        await set_frozen(world, NEEDS_FROZEN[scenario.name])
        return await snapshot(world)
    # Unfrozen is the end state: compare with the world before the freeze.
    await set_frozen(world, False)
    baseline = await snapshot(world)
    await set_frozen(world, True)
    frozen = await harness.frozen_entry(world.store, world.source)
    if frozen is not None and not frozen.get("clones"):
        await clean_clone(world, f"{name}p")  # so unfreeze must give the source a new delta
    return baseline


async def run_op(world: World, scenario: Scenario, engine: Any, injector: Injector, name: str,
                 started: Callable[[str], None] | None = None, *, probe: bool = False,
                 ) -> tuple[str | None, harness.Outcome]:
    """Run the scenario's operation with ``injector`` armed; (job id or None, outcome).

    ``probe``: fingerprint the world around every call (for a clean run).
    """
    if scenario.is_job:
        job_id = await harness.submit(engine, source=world.source, name=name, count=scenario.count,
                                      customize=scenario.customize)
        if started is not None:
            started(job_id)
        injector.arm(lambda: harness.job_state(world.store, job_id),
                     (lambda: world.fingerprint(job_id)) if probe else None)
        try:
            await harness.wait(engine, job_id)
        finally:
            injector.disarm()
        return job_id, await harness.job_outcome(world.store, job_id)
    op = harness.freeze if scenario.name == "freeze" else harness.unfreeze

    async def label() -> str:
        return LABEL[scenario.name]

    injector.arm(label, (lambda: world.fingerprint(None)) if probe else None)
    try:
        await op(engine, world.source)
    except InstacloneError as exc:
        return None, harness.Outcome("Failed", exc.to_dict())
    except Exception as exc:  # noqa: BLE001 - reported as a violation: not an error of ours
        return None, harness.Outcome("Failed", {"code": f"unexpected {type(exc).__name__}", "message": str(exc)})
    finally:
        injector.disarm()
    return None, harness.Outcome("done", None)


async def record_plan(world: World, scenario: Scenario, name: str) -> Injector:
    """The scenario's operation without faults (the world is left as before); its injector has the calls."""
    before = await prepare(world, scenario, name)
    injector = Injector(clone=name)
    job_id, out = await with_engine(world, lambda e: run_op(world, scenario, e, injector, name, probe=True),
                                    injector)
    assert out.state in ("Unstunned", "done"), f"the clean run of {scenario} failed: {out}"
    report = Report(outcome=out.state)
    await settle(world, scenario, job_id, out, report, mode="clean")
    bad = compare(before, await snapshot(world), expect_state=SOURCE_AFTER[scenario.name],
                  expect_frozen="same" if scenario.name != "unfreeze" else None)
    assert not bad and not report.violations, f"the clean run of {scenario} left: {bad + report.violations}"
    return injector


async def settle(world: World, scenario: Scenario, job_id: str | None, out: harness.Outcome, report: Report,
                 *, mode: str) -> None:
    """Check the outcome's record; undo what a successful operation made (it is no leftover)."""
    bad = report.violations
    if job_id is not None:
        for owner_id in (job_id, f"stun-{job_id}"):  # the job's own records, and its stun's
            bad += [f"journal record not released: {r}" for r in await harness.unreleased(world.store, owner_id)]
    bad += [f"unfinished job in the journal: {j}" for j in await harness.unfinished_jobs(world.store)]
    if out.state == "Failed":
        err = out.error or {}
        if not err.get("code") or err.get("code") == "internal_error" or not err.get("message"):
            bad.append(f"no clear error: {err}")
        elif mode == "live" and "injected fault" not in json.dumps(err):
            bad.append(f"the error does not say what failed: {err}")
        elif mode == "kill" and scenario.is_job and err.get("code") != "interrupted":
            bad.append(f"after a crash the error is {err.get('code')}, not interrupted")
    elif out.state == "Unstunned":
        if mode != "clean":
            report.note = "tolerated" if mode == "live" else "rolled forward"
        if len(out.clones) != scenario.count:
            bad.append(f"job succeeded with clones {out.clones}, expected {scenario.count}")
        for c in out.clones:
            if (state := await world.virt.state(c)) != "running":
                bad.append(f"clone {c} is {state}")
        await with_engine(world, lambda e: _destroy_all(e, out.clones))
    elif out.state == "Partial":
        # Some clones failed and were removed alone; the others run and are registered.
        failed = (out.result or {}).get("failed_clones") or []
        if len(out.clones) + len(failed) != scenario.count or not out.clones or not failed:
            bad.append(f"partial job with clones {out.clones} and failed {failed}, expected {scenario.count}")
        if mode == "live" and not all("injected fault" in json.dumps(f.get("error")) for f in failed):
            bad.append(f"a failed clone's error does not say what failed: {failed}")
        if any(f.get("left_behind") for f in failed):
            bad.append(f"a failed clone left something behind: {failed}")
        for c in out.clones:
            if (state := await world.virt.state(c)) != "running":
                bad.append(f"clone {c} is {state}")
        await with_engine(world, lambda e: _destroy_all(e, out.clones))
    elif out.state == "done":
        if mode != "clean":
            report.note = "tolerated"
        if scenario.name == "freeze":
            await set_frozen(world, False)
    elif out.state not in ("killed",):
        bad.append(f"the operation ended {out.state}: {out.error}")
    if scenario.name == "unfreeze" and out.state != "done":
        try:  # the source may still be frozen: a second unfreeze must finish the job
            await set_frozen(world, False)
        except InstacloneError as exc:
            bad.append(f"unfreeze after the failure failed too: {exc}")
    if scenario.name in ("freeze", "unfreeze") and await harness.frozen_entry(world.store, world.source) is None:
        owner = harness.freeze_owner(world.source)
        bad += [f"journal record not released: {r}" for r in await harness.unreleased(world.store, owner)]


async def _destroy_all(engine: Any, names: list[str]) -> None:
    for n in names:
        await harness.destroy_clone(engine, n)


async def verdict(world: World, scenario: Scenario, before: Snap, job_id: str | None, out: harness.Outcome,
                  report: Report, *, mode: str, names: list[str]) -> Report:
    await settle(world, scenario, job_id, out, report, mode=mode)
    after = await snapshot(world)
    report.violations += compare(before, after, expect_state=SOURCE_AFTER[scenario.name],
                                 expect_frozen="same" if scenario.name != "unfreeze" else None)
    report.violations += await world.leftover_processes(names)
    report.outcome = out.state
    return report


def _not_reached(fault: Fault, calls: list[str]) -> str:
    return (f"the operation did not make the call {fault.point.label()} this time (a call that depends on "
            f"timing, or the calls changed); its calls: {', '.join(calls)}")


def clone_names(name: str, count: int) -> list[str]:
    return [name] if count == 1 else [f"{name}-{i}" for i in range(1, count + 1)]


async def live_case(world: World, scenario: Scenario, fault: Fault, name: str) -> Report:
    """The fault raises; the engine rolls back live."""
    before = await prepare(world, scenario, name)
    injector = Injector(fault, clone=name)
    job_id, out = await with_engine(world, lambda e: run_op(world, scenario, e, injector, name), injector)
    report = Report()
    if injector.fired is None:
        report.not_reached = _not_reached(fault, [c.point.label() for c in injector.calls])
    return await verdict(world, scenario, before, job_id, out, report, mode="live",
                         names=clone_names(name, scenario.count))


async def kill_case(world: World, scenario: Scenario, fault: Fault, name: str, aux: Path) -> Report:
    """A child process runs the operation and SIGKILLs itself at the fault; a new engine recovers."""
    before = await prepare(world, scenario, name)
    spec = {**world.child_spec(), "scenario": scenario.__dict__, "fault": fault.to_json(), "name": name,
            "status": str(aux / f"{name}.status.json")}
    spec_path = aux / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    log = aux / f"{name}.child.log"
    await world.before_child()
    try:
        rc = await _child(spec_path, log)
    finally:
        await world.after_child()
    status = json.loads(Path(spec["status"]).read_text()) if Path(spec["status"]).exists() else {}
    report = Report()
    if rc == 0 and status.get("not_reached"):
        report.not_reached = _not_reached(fault, status.get("calls", []))
    elif rc != -9:
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        report.violations.append(f"the child exited {rc} instead of being killed at {fault.point.label()} "
                                 f"({status}); log tail:\n{tail}")
    job_id = status.get("job_id")

    async def recover(engine: Any) -> harness.Outcome:
        handled = await harness.recover(engine)
        for jid in handled:
            await harness.wait(engine, jid)
        # A fault not reached (a timing-dependent call): the job finished in
        # the child, so recovery has nothing to do; the case is skipped.
        if job_id is not None and job_id not in handled and not report.not_reached:
            report.violations.append(f"recovery did not handle job {job_id} (handled {handled})")
        return await harness.job_outcome(world.store, job_id) if job_id else harness.Outcome("killed", None)

    out = await with_engine(world, recover)
    return await verdict(world, scenario, before, job_id, out, report, mode="kill",
                         names=clone_names(name, scenario.count))


_FORKS: Any = None


def _fork_context() -> Any:
    """A fork server that has imported the engine, the backends and the worlds once."""
    global _FORKS
    if _FORKS is None:
        _FORKS = multiprocessing.get_context("forkserver")
        _FORKS.set_forkserver_preload(["tests.support.contract.child", "tests.support.contract.fakeworld",
                                       "tests.support.contract.realworld"])
    return _FORKS


async def _child(spec: Path, log: Path, timeout_s: float = 300.0) -> int:
    """Run the child (see child.py) to its end; its exit code, -9 when it SIGKILLed itself."""
    proc = _fork_context().Process(target=_child_entry(), args=(str(spec), str(log)), daemon=True)
    proc.start()
    await asyncio.to_thread(proc.join, timeout_s)
    if proc.exitcode is None:
        proc.kill()
        await asyncio.to_thread(proc.join)
        return -1000
    return int(proc.exitcode)


def _child_entry() -> Any:
    from .child import entry  # child.py imports this module

    return entry
