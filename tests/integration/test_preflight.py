"""Integration: check and prepare a real running guest (the busybox test guest) through the daemon."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from instaclone_plugins._filecow_xml import FIX_MEMORY, has_shared_file_ram
from tests.support.guests import devguest
from tests.support.host import libvirt_ready
from tests.support.vmlib import Api, boot_source

pytestmark = [pytest.mark.integration, pytest.mark.skipif(libvirt_ready() is not None,
                                                          reason=str(libvirt_ready()))]


def by_cap(report: dict, cap: str) -> dict:
    found = [c for c in report["checks"] if c["capability"] == cap]
    assert len(found) == 1, report
    return found[0]


async def test_check_and_prepare_a_running_guest(world):
    scratch, virt, _daemon, config = world
    name = "ic-prep"
    src = await boot_source(virt, scratch, name, file_backed_ram=False)
    try:
        async with Api(config.daemon.socket) as api:
            status, body = await api.call("GET", f"/v1/sources/{name}/check")
            assert status == 200, body
            report = body["check"]
            mem = by_cap(report, "cow_memory")
            assert (mem["ok"], mem["level"], mem["fix"]) == (False, "warn", FIX_MEMORY), mem
            # Everything else the test guest has: ACPI, an agent that answers, genid, one qcow2 delta on base.
            assert report["cloneable"] is True, report
            assert by_cap(report, "guest_customization")["ok"] is True
            assert by_cap(report, "chain_depth")["detail"].startswith("vda: 2 image(s)")
            live_before = (await virt.lookup(name)).xml
            boot, count = devguest.read_counter(src.serial_log)

            status, body = await api.call("POST", f"/v1/sources/{name}/prepare", {"dry_run": True})
            assert status == 200 and body["prepare"]["applied"] is False, body
            assert not has_shared_file_ram(ET.fromstring(await virt.inactive_xml(name)))

            status, body = await api.call("POST", f"/v1/sources/{name}/prepare", {})
            assert status == 200, body
            p = body["prepare"]
            print("prepare diff:\n" + p["diff"])
            assert p["applied"] is True and [c.split(":")[0] for c in p["changed"]] == ["cow_memory"]
            assert "memoryBacking" in p["diff"] and "next boot" in p["note"]
            # The definition has it; the running domain is unchanged and runs on, same boot.
            assert has_shared_file_ram(ET.fromstring(await virt.inactive_xml(name)))
            info = await virt.lookup(name)
            assert info.state == "running" and not has_shared_file_ram(ET.fromstring(info.xml))
            assert info.xml == live_before
            assert await virt.ram_file(name) is None  # QEMU's RAM is still anonymous
            got_boot, _ = await devguest.wait_counter(src.serial_log, above=count, timeout=30)
            assert got_boot == boot

            status, body = await api.call("GET", f"/v1/sources/{name}/check")
            report = body["check"]
            mem = by_cap(report, "cow_memory")
            assert mem.get("pending") is True and "pending: " in mem["detail"] and "next boot" in mem["detail"]
            assert report["pending"] == ["cow_memory"]

            status, body = await api.call("POST", f"/v1/sources/{name}/prepare", {})
            assert body["prepare"]["changed"] == [] and body["prepare"]["diff"] == ""
            assert body["prepare"]["note"] == "nothing to change; pending until the next boot: cow_memory"

            # At the next boot the guest runs on shared file-backed RAM: filecow can serve it.
            await virt.destroy(name)
            await virt.start(name)
            await devguest.wait_counter(src.serial_log, above=0, timeout=60)
            found = await virt.ram_file(name)
            assert found is not None and found[1] is True
            status, body = await api.call("GET", f"/v1/sources/{name}/check")
            report = body["check"]
            assert by_cap(report, "cow_memory")["ok"] is True and report["pending"] == []
    finally:
        await virt.undefine(name)
