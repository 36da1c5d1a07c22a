"""Integration: both QEMUs of one run, the platform's and Debian 12's QEMU 7.2 beside it (issue 23).

On the bookworm-backports platform libvirt 11 runs QEMU 10 by default;
scripts/setup.sh unpacks Debian 12's QEMU 7.2 beside it, and a domain that
names it as its ``<emulator>`` runs on it. Each case boots the busybox guest
on one QEMU, checks what ``qemu_facts()`` reads from that QEMU, and makes a
clone (filecow) that must run on the same QEMU as its source: the migration
stream of one QEMU version is loaded by the same version. With filecow's
``source_mode`` "copy" the clone is made the same way on both; with "auto"
(the default) the job decides from the source's own QEMU: a pre-copy,
unverified, where that QEMU tracks dirty pages exactly (QEMU 9.0 and later,
or KVM), a copy where a pre-copy would need verifying inside the stun (TCG
before 9.0). Where there is no second QEMU (the stock platform, whose
system QEMU is 7.2 itself) the 7.2 cases skip, saying so.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from instaclone import config as cfg
from instaclone.hv import LibvirtHypervisor as Hypervisor
from instaclone.hv.records import QemuFacts
from instaclone_plugins.filecow import FileCowSettings
from tests.support.guests import devguest
from tests.support.host import libvirt_ready, qemu_version, second_qemu
from tests.support.vmlib import (
    TEST_PREFIXES,
    Api,
    Scratch,
    boot_source,
    clone_log,
    daemon_world,
)

pytestmark = [pytest.mark.integration, pytest.mark.skipif(libvirt_ready() is not None,
                                                          reason=str(libvirt_ready()))]

QEMU72, QEMU72_WHY = second_qemu()
World = tuple[Scratch, Hypervisor, cfg.Config]


@pytest.fixture(params=["copy", "auto"])
async def world(request: pytest.FixtureRequest) -> AsyncIterator[World]:
    """A daemon whose filecow backend runs with the ``source_mode`` of the parameter."""
    mode = FileCowSettings(source_mode=request.param)
    async with daemon_world(TEST_PREFIXES, lambda c: c.with_section("memory.filecow", mode)) as made:
        virt = made[1]
        before = set(await virt.list_names())
        yield made
        # Every job has ended: a pre-copy shadow still defined would be a leak.
        shadows = [n for n in set(await virt.list_names()) - before if n.startswith("instaclone-shadow-")]
    assert not shadows, f"pre-copy shadow domains left behind: {shadows}"


def emulator_of(xml: str) -> str:
    return ET.fromstring(xml).findtext("./devices/emulator") or ""


def program_of(name: str) -> str:
    """The program the running QEMU of domain ``name`` executes (its /proc exe link)."""
    pid = Path(f"/run/libvirt/qemu/{name}.pid").read_text().strip()
    return os.readlink(f"/proc/{pid}/exe")


async def boot_and_clone(world: World, name: str, emulator: Path | None) -> QemuFacts:
    """Boot ``name`` on ``emulator``, clone it; checks that hold on any QEMU. The source's QEMU facts."""
    scratch, virt, config = world
    src = await boot_source(virt, scratch, name, file_backed_ram=True, emulator=emulator)
    boot, _ = devguest.read_counter(src.serial_log) or ("", 0)
    facts = await virt.qemu_facts(name)
    assert facts.accel == devguest.accel(), facts
    source_xml = (await virt.lookup(name)).xml
    if emulator is not None:
        assert emulator_of(source_xml) == str(emulator)

    clone = f"{name}-c"
    async with Api(config.daemon.socket) as api:
        status, body = await api.call("POST", "/v1/jobs?wait=300", {"source": name, "name": clone})
        assert status == 201, body
    job = body["job"]
    assert job["state"] == "Unstunned", job.get("error")
    assert job["result"]["memory_backend"] == "filecow", job["result"]
    check_mode(config, facts, job["result"]["memory"])

    # The clone runs on its source's QEMU: same <emulator>, same program, same version.
    info = await virt.lookup(clone)
    assert emulator_of(info.xml) == emulator_of(source_xml), (emulator_of(info.xml), emulator_of(source_xml))
    assert program_of(clone) == program_of(name)
    assert await virt.qemu_facts(clone) == facts
    # It continues the source's boot and keeps counting.
    log = clone_log(config, clone)
    b, n = await devguest.wait_counter(log, above=0, timeout=120)
    assert b == boot
    await devguest.wait_counter(log, above=n + 1, timeout=60)
    assert await virt.state(name) == "running" and info.state == "running"
    return facts


def check_mode(config: cfg.Config, facts: QemuFacts, memory: dict[str, object]) -> None:
    """The way filecow kept the source's RAM, as its source_mode and the source's QEMU decide."""
    mode = config.section("memory.filecow", FileCowSettings).source_mode
    if mode == "copy":
        assert memory["mode"] == "copy", memory
    elif facts.loses_tcg_writes:
        assert memory["mode"] == "copy", memory
        assert f"QEMU {facts.text} with TCG can lose guest writes" in str(memory["mode_reason"]), memory
    elif "fallback" not in memory:  # a pre-copy that did not converge falls back to a copy, saying so
        assert memory["mode"] == "precopy" and memory["verified"] is False, memory
        assert "tracks the pages the guest writes exactly" in str(memory["verify_reason"]), memory
        assert memory["qemu"] == facts.text and memory["accel"] == facts.accel, memory


async def test_the_platform_qemu_boots_and_clones(world: World) -> None:
    """The system QEMU: qemu_facts() says its version, and a clone of a guest on it runs on it."""
    facts = await boot_and_clone(world, "ic-pl-sys", None)
    assert facts.version[:2] == qemu_version("qemu-system-x86_64"), facts


@pytest.mark.skipif(QEMU72 is None, reason=QEMU72_WHY)
async def test_qemu_7_2_beside_it_boots_and_clones(world: World) -> None:
    """Debian 12's QEMU 7.2 under the platform's libvirt: a 7.2 guest is cloned onto 7.2."""
    assert QEMU72 is not None
    facts = await boot_and_clone(world, "ic-pl-72", QEMU72)
    assert facts.version[:2] == (7, 2)
    # What the daemon decides by: TCG on 7.2 can lose guest writes while migrating.
    assert facts.loses_tcg_writes == (facts.accel == "tcg")
    assert not facts.file_migration and not facts.mapped_ram
