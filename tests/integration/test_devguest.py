"""The test guest itself, booted for real through libvirt (``virsh``, no libvirt-python).

Needs ``scripts/build-guest.sh`` to have run and libvirtd on qemu:///system.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.support.guests import devguest

pytestmark = pytest.mark.integration

VIRSH = ["virsh", "-c", "qemu:///system"]
# Scratch space libvirt's QEMU user (libvirt-qemu) can reach; pytest's tmp_path
# (/tmp/pytest-of-root, 0700) is not.
SCRATCH_ROOT = Path(os.environ.get("INSTACLONE_TEST_DIR", "/var/lib/instaclone/test-tmp"))


def _not_ready() -> str | None:
    """Why this test cannot run here, or None."""
    if not (devguest.GUEST_DIR / "initrd.img").exists():
        return f"test guest not built ({devguest.GUEST_DIR}/initrd.img missing): run scripts/build-guest.sh"
    try:
        subprocess.run([*VIRSH, "version"], check=True, capture_output=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"libvirtd not reachable on qemu:///system: {exc}"
    return None


def _virsh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VIRSH, *args], check=check, capture_output=True, text=True, timeout=120)


async def test_guest_boots_counts_and_runs_commands() -> None:
    why = _not_ready()
    if why:
        pytest.skip(why)
    SCRATCH_ROOT.mkdir(parents=True, exist_ok=True)
    SCRATCH_ROOT.chmod(0o755)
    work = SCRATCH_ROOT / f"devguest-{uuid.uuid4().hex[:8]}"
    work.mkdir(mode=0o755)
    work.chmod(0o755)
    name = f"ic-test-devguest-{work.name[-8:]}"
    disk = work / f"{name}.qcow2"
    defined = False
    try:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(devguest.GUEST_DIR / "base.qcow2"),
                        "-F", "qcow2", str(disk)], check=True, timeout=60)
        xml = work / f"{name}.xml"
        xml.write_text(devguest.domain_xml(name, disk=disk, workdir=work))
        _virsh("define", str(xml))
        defined = True
        started = time.monotonic()
        _virsh("start", name)

        log = devguest.serial_log_path(name, work)
        await devguest.wait_counter(log, timeout=60)
        first_after = time.monotonic() - started
        boot_id, n = await devguest.wait_counter(log, above=2, timeout=30)
        assert n >= 3 and boot_id
        assert f"IC ready boot={boot_id}" in log.read_text(errors="replace")
        print(f"{devguest.accel()}: first counter line {first_after:.1f} s after virsh start")

        ch = await devguest.GuestChannel.connect(devguest.cmd_sock_path(name, work), timeout=30)
        try:
            assert await ch.run("echo hello") == (0, "hello\n")
            rc, sector0 = await ch.run("dd if=/dev/vda bs=512 count=1 2>/dev/null")
            assert rc == 0
            assert f"IC boot={boot_id} count=" in sector0
            rc, out = await ch.run("echo 3 > /proc/sys/vm/drop_caches && echo x > /tmp/f && cat /tmp/f; exit 3")
            assert (rc, out) == (3, "x\n")
            rc, out = await ch.run("cat /sys/class/net/eth0/address")
            assert rc == 0 and out.startswith("52:54:00:")
        finally:
            await ch.close()
        # Still counting, same boot.
        again, m = await devguest.wait_counter(log, above=n, timeout=30)
        assert again == boot_id and m > n
    finally:
        if defined:
            _virsh("destroy", name, check=False)
            _virsh("undefine", name, check=False)
        shutil.rmtree(work, ignore_errors=True)
