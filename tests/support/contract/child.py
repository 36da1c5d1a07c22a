"""The engine in a process of its own, killed by SIGKILL at one call.

Started by cases.kill_case from a multiprocessing fork server that has
imported the daemon's modules once (a fresh interpreter per case would cost
half a second of imports); ``python -m tests.support.contract.child SPEC`` does the
same by hand.

SPEC (JSON, written by cases.kill_case): the world to rebuild (see
``World.child_spec``), the scenario, the fault and the clone name, and where
to write the status the parent reads: ``{"job_id": ...}`` once the job is
queued, ``{"not_reached": true, ...}`` if the operation ended without
reaching the fault (the process then exits 0, which the parent reports).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from .cases import Scenario, build_engine, run_op
from .faults import Fault, Injector
from .world import World


async def rebuild(spec: dict[str, Any]) -> World:
    if spec["world"] == "fake":
        from .fakeworld import FakeWorld

        return await FakeWorld.in_child(spec)
    from .realworld import LibvirtWorld

    return await LibvirtWorld.in_child(spec)


async def main(spec: dict[str, Any]) -> int:
    world = await rebuild(spec)
    status = Path(spec["status"])
    fault = Fault.from_json(spec["fault"])
    dump = getattr(world.virt, "dump", None)
    state_file = getattr(world, "state_file", None)
    # A fake hypervisor lives in this process: its domains are saved just
    # before the kill, as a real libvirtd would keep them.
    on_kill = (lambda: dump(state_file)) if dump is not None and state_file is not None else None
    injector = Injector(fault, on_kill=on_kill, clone=spec["name"])
    engine = build_engine(world, injector)

    def started(job_id: str) -> None:
        status.write_text(json.dumps({"job_id": job_id}))

    job_id, out = await run_op(world, Scenario(**spec["scenario"]), engine, injector, spec["name"], started)
    status.write_text(json.dumps({"job_id": job_id, "not_reached": True, "outcome": out.state,
                                  "calls": [c.point.label() for c in injector.calls]}))
    return 0


def entry(spec_path: str, log_path: str) -> None:
    """A multiprocessing target: output to ``log_path``, exit code that of :func:`main`."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - the process's own stdout
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    code = asyncio.run(main(json.loads(Path(spec_path).read_text())))
    sys.stdout.flush()
    os._exit(code)  # nothing of the parent's (pytest's) exit handlers may run here


if __name__ == "__main__":
    sys.exit(asyncio.run(main(json.loads(Path(sys.argv[1]).read_text()))))
