"""Helpers for engine tests on the fake hypervisor (the ``env`` fixture is in tests/unit/conftest.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from instaclone import config as cfg
from instaclone.jobs.engine import Engine
from instaclone.requests import CloneRequest
from instaclone.store import Store

#: A guest-agent channel, to add to a fake source's XML.
AGENT = "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>"


async def run_job(engine: Engine, store: Store, **kw: Any) -> Any:
    """Submit a clone job (source ``src``, name ``c1`` unless given); its record once finished."""
    job = await engine.submit(CloneRequest(source=kw.pop("source", "src"), name=kw.pop("name", "c1"), **kw))
    await engine.wait(job.id, 10)
    return await store.get_job(job.id)


def leftover_files(c: cfg.Config) -> list[Path]:
    """Files in the state directory other than the journal and source deltas in use."""
    out = []
    for p in c.daemon.state_dir.rglob("*"):
        if p.is_file() and not p.name.startswith("journal.sqlite") and p.parent != c.delta_dir:
            out.append(p)
    return out
