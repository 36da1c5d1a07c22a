from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest

# Scratch space that libvirt's QEMU user can read (pytest's tmp_path is 0700 under /tmp).
SCRATCH_ROOT = Path(os.environ.get("INSTACLONE_TEST_DIR", "/var/lib/instaclone/test-tmp"))


@pytest.fixture(autouse=True)
async def no_leaked_tasks():
    """Fail a test that leaves asyncio tasks running."""
    before = asyncio.all_tasks()
    yield
    await asyncio.sleep(0)
    leaked = [t for t in asyncio.all_tasks() - before if not t.done() and t is not asyncio.current_task()]
    for t in leaked:
        t.cancel()
    assert not leaked, f"test leaked tasks: {leaked}"


def libvirt_ready() -> str | None:
    """None if real integration tests can run here, else why not."""
    guest = Path(os.environ.get("INSTACLONE_GUEST_DIR", "/var/lib/instaclone/guest"))
    if not (guest / "initrd.img").exists():
        return f"test guest not built ({guest}/initrd.img missing): run scripts/build-guest.sh"
    try:
        subprocess.run(["virsh", "-c", "qemu:///system", "version"], check=True, capture_output=True, timeout=10)
    except Exception as exc:  # noqa: BLE001
        return f"libvirtd not reachable: {exc}"
    return None
