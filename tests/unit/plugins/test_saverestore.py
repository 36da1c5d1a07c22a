"""saverestore on the fakes: the image's format follows the source's QEMU, and the clones load it the same way."""

from __future__ import annotations

from pathlib import Path

import pytest

from instaclone.hv import QemuFacts
from instaclone.states import State
from tests.support.enginelib import run_job
from tests.support.fakes import fake_engine, fake_world


async def clone_memory(tmp_path: Path, qemu: tuple[int, int, int], **settings: object) -> dict[str, object]:
    c, store, virt = await fake_world(tmp_path, saverestore=settings)
    virt.qemu = QemuFacts(qemu, "tcg")
    engine = fake_engine(c, store, virt)
    try:
        job = await run_job(engine, store, name="c1")
        assert job.state is State.UNSTUNNED, job.error
        # The fake's load refuses a file saved with other mapped-ram channels.
        assert ("load_state", "c1") in virt.calls
        return dict(job.result["memory"])
    finally:
        await engine.shutdown(5)
        await store.close()


@pytest.mark.parametrize(("qemu", "settings", "fmt", "channels"), [
    ((10, 0, 2), {}, "mapped-ram", 4),
    ((9, 0, 0), {"channels": 2}, "mapped-ram", 2),
    ((8, 2, 0), {}, "stream", 0),  # file: migration, but no mapped-ram yet
    ((7, 2, 0), {}, "stream", 0),
    ((10, 0, 2), {"image_format": "stream"}, "stream", 0),
])
async def test_format_follows_qemu_and_settings(tmp_path, qemu, settings, fmt, channels):
    memory = await clone_memory(tmp_path, qemu, **settings)
    assert (memory["format"], memory["channels"]) == (fmt, channels)
    assert isinstance(memory["allocated_bytes"], int)
