"""Where the tests run: the repository, the scratch root, and whether real integration tests can run."""

from __future__ import annotations

import os
import re
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


#: Debian 12's QEMU 7.2, unpacked by scripts/setup.sh beside the platform's QEMU (the backports
#: platform): a wrapper a domain names as its ``<emulator>``.
QEMU_7_2 = Path(os.environ.get("INSTACLONE_QEMU72", "/opt/instaclone/qemu-7.2/qemu-system-x86_64"))


def qemu_version(binary: str | Path) -> tuple[int, int] | None:
    """(major, minor) of the QEMU ``binary`` as its ``--version`` says, or None if it does not run."""
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"version (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def second_qemu() -> tuple[Path | None, str]:
    """(the second QEMU, what it is) or (None, why there is none).

    The second QEMU is Debian 12's QEMU 7.2 beside a newer system QEMU, so that one test run
    proves both. Where the system QEMU is 7.2 itself (the stock platform) there is none: every
    test proves the 7.2 paths there.
    """
    system = qemu_version("qemu-system-x86_64")
    if system is not None and system < (9, 0):
        return None, (f"the system QEMU is {system[0]}.{system[1]} itself (INSTACLONE_PLATFORM=stock?): "
                      "no second QEMU to boot")
    if not QEMU_7_2.exists():
        return None, (f"no QEMU 7.2 beside the system's: {QEMU_7_2} missing (scripts/setup.sh unpacks "
                      "Debian 12's there on the bookworm-backports platform)")
    got = qemu_version(QEMU_7_2)
    if got != (7, 2):
        return None, f"{QEMU_7_2} is not a working QEMU 7.2 (--version: {got})"
    return QEMU_7_2, f"QEMU 7.2 at {QEMU_7_2}"
