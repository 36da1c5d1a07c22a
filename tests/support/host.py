"""Where the tests run: the repository, the scratch root, and whether real integration tests can run."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

#: The repository's root (the directory holding ``tests/``).
REPO = Path(__file__).resolve().parents[2]

# Scratch space that libvirt's QEMU user can read (pytest's tmp_path is 0700 under /tmp).
SCRATCH_ROOT = Path(os.environ.get("INSTACLONE_TEST_DIR", "/var/lib/instaclone/test-tmp"))


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
