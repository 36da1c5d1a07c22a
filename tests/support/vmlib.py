"""Real-VM helpers for integration tests: scratch dirs, source guests, an in-process daemon."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from instaclone import config as cfg
from instaclone.daemon import Daemon
from instaclone.hv import LibvirtHypervisor as Hypervisor

from .apiclient import Api  # noqa: F401  (re-exported for tests)
from .guests import devguest
from .host import SCRATCH_ROOT


class Scratch:
    """A directory libvirt's QEMU user can use; removed with everything in it."""

    def __init__(self) -> None:
        SCRATCH_ROOT.mkdir(parents=True, exist_ok=True)
        SCRATCH_ROOT.chmod(0o755)
        self.path = SCRATCH_ROOT / uuid.uuid4().hex[:10]
        self.path.mkdir()
        os.chown(self.path, *devguest.qemu_owner())
        self.path.chmod(0o755)

    def cleanup(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


@dataclass
class SourceVM:
    name: str
    disk: Path
    workdir: Path

    @property
    def serial_log(self) -> Path:
        return self.workdir / f"{self.name}.serial.log"

    @property
    def cmd_sock(self) -> Path:
        return self.workdir / f"{self.name}.cmd.sock"


async def boot_source(virt: Hypervisor, scratch: Scratch, name: str, *, memory_mib: int = 256,
                      file_backed_ram: bool = False, firmware: str = "bios",
                      emulator: Path | None = None) -> SourceVM:
    """Define and start the busybox test guest ``name`` on an overlay in ``scratch``; wait until it counts.

    ``emulator`` names the QEMU binary it runs on (libvirt's default if None), e.g. the
    QEMU 7.2 of :func:`tests.support.host.second_qemu`.
    """
    disk = scratch.path / f"{name}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(devguest.GUEST_DIR / "base.qcow2"),
                    "-F", "qcow2", str(disk)], check=True)
    vm = SourceVM(name, disk, scratch.path)
    xml = devguest.domain_xml(name, disk=disk, workdir=scratch.path, memory_mib=memory_mib,
                              file_backed_ram=file_backed_ram, firmware=firmware, emulator=emulator)
    await virt.define(xml)
    await virt.start(name)
    await devguest.wait_counter(vm.serial_log, above=1, timeout=60 if firmware == "bios" else 120)
    return vm


async def remove_domain(virt: Hypervisor, name: str) -> None:
    await virt.undefine(name)


def make_config(scratch: Scratch, **clone_overrides: Any) -> cfg.Config:
    c = cfg.Config()
    return replace(
        c,
        daemon=replace(c.daemon, state_dir=scratch.path / "state", socket=scratch.path / "ctl.sock",
                       log_format="console"),
        # TCG guests on a shared 2-core CI machine are slow; the deadline is
        # tested with fakes, not here.
        clone=replace(c.clone, **{"stun_deadline_ms": 20000, **clone_overrides}),
    )


async def running_daemon(config: cfg.Config) -> Daemon:
    d = Daemon(config)
    await d.start()
    return d


async def wait_state(virt: Hypervisor, name: str, want: str, timeout: float = 20) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        if await virt.state(name) == want:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{name} not {want} after {timeout} s")


async def undefine_new(virt: Hypervisor, before: set[str], prefixes: str | tuple[str, ...]) -> None:
    """Undefine the domains named with ``prefixes`` that were not there ``before`` (a test's own)."""
    for name in set(await virt.list_names()) - before:
        if name.startswith(prefixes):
            await virt.undefine(name)


def assert_no_qemu_left(scratch: Scratch) -> None:
    """No QEMU process of ``scratch``'s guests (or their clones) may outlive the test."""
    left = subprocess.run(["pgrep", "-f", f"qemu-system.*{scratch.path.name}"], capture_output=True, text=True)
    assert not left.stdout.strip(), f"QEMU processes left behind: {left.stdout}"


@asynccontextmanager
async def daemon_world(prefix: str | tuple[str, ...],
                       configure: Callable[[cfg.Config], cfg.Config] = lambda c: c,
                       ) -> AsyncIterator[tuple[Scratch, Hypervisor, cfg.Config]]:
    """A scratch dir, a real daemon on it, a libvirt handle: (scratch, virt, config). ``configure``
    changes the test config before the daemon starts. Afterwards the daemon stops, the domains named
    ``prefix``... that the test made are undefined, and no QEMU process of the scratch dir may be left."""
    scratch = Scratch()
    virt = Hypervisor()
    await virt.connect()
    before = set(await virt.list_names())
    config = configure(make_config(scratch))
    daemon = await running_daemon(config)
    try:
        yield scratch, virt, config
    finally:
        await daemon.stop()
        await undefine_new(virt, before, prefix)
        await virt.close()
        scratch.cleanup()
    assert_no_qemu_left(scratch)


#: Every domain the integration tests create starts with one of these.
TEST_PREFIXES = ("ic-", "fc-", "fz-", "id-", "db-")


def clone_log(config: Any, name: str) -> Path:
    """A clone's serial console log (the busybox guest prints its boot id and counter there)."""
    return config.clones_dir / name / f"{name}.serial.log"


def cmd_sock(config: Any, name: str) -> Path:
    """A clone's command channel socket (``devguest.GuestChannel``)."""
    return config.clones_dir / name / f"{name}.cmd.sock"


def first_counter(log: Path) -> tuple[str, int] | None:
    """The first (boot id, counter) the guest printed in ``log``, or None."""
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("IC boot="):
            boot, count = line.split()[1:3]
            return boot.split("=", 1)[1], int(count.split("=", 1)[1])
    return None
