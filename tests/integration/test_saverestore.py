"""Integration: the saverestore memory backend's image on real QEMU (format per QEMU version, fdsets, logs)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.support.guests import devguest
from tests.support.host import libvirt_ready
from tests.support.vmlib import Api, boot_source, clone_log

pytestmark = [pytest.mark.integration, pytest.mark.skipif(libvirt_ready() is not None,
                                                          reason=str(libvirt_ready()))]


def our_fds(name: str) -> list[object]:
    """The descriptors instaclone added to the domain's fdsets (libvirt keeps its own there: the serial log)."""
    out = subprocess.run(["virsh", "-c", "qemu:///system", "qemu-monitor-command", name,
                          '{"execute": "query-fdsets"}'], capture_output=True, text=True, check=True).stdout
    return [fd for fdset in json.loads(out)["return"] for fd in fdset["fds"]
            if str(fd.get("opaque", "")).startswith("instaclone")]


def deprecations(name: str) -> list[str]:
    """The lines of the domain's QEMU log since its last start that warn of something deprecated.

    (QEMU 9.1+ warns there on every ``fd:`` migration into a file.)
    """
    lines = Path(f"/var/log/libvirt/qemu/{name}.log").read_text(errors="replace").splitlines()
    starts = [i for i, line in enumerate(lines) if "starting up" in line]
    return [line for line in lines[starts[-1] if starts else 0:] if "deprecat" in line.lower()]


async def test_image_is_sparse_on_qemu_9_and_its_clone_runs(world):
    """QEMU 9.0+: a mapped-ram image (holes where RAM is zero); the clone loads it with the same settings and runs."""
    scratch, virt, _daemon, config = world
    src = await boot_source(virt, scratch, "ic-sr", memory_mib=256)
    facts = await virt.qemu_facts("ic-sr")
    boot, _ = devguest.read_counter(src.serial_log)
    async with Api(config.daemon.socket) as api:
        status, body = await api.call("POST", "/v1/jobs?wait=180", {"source": "ic-sr", "name": "ic-sr-c"})
        assert status == 201 and body["job"]["state"] == "Unstunned", body
    memory = body["job"]["result"]["memory"]
    assert body["job"]["result"]["memory_backend"] == "saverestore", body["job"]["result"]
    print("image:", json.dumps(memory))
    if facts.mapped_ram:
        assert memory["format"] == "mapped-ram" and memory["channels"] == 4, memory
        # RAM pages sit at their own offsets: the file spans all of guest RAM,
        # and the zero pages of a busybox guest (most of 256 MiB) are holes.
        assert memory["bytes"] >= 256 << 20, memory
        assert memory["allocated_bytes"] < memory["bytes"] // 2, memory
    else:
        assert memory["format"] == "stream" and memory["channels"] == 0, memory
    b, n = await devguest.wait_counter(clone_log(config, "ic-sr-c"), above=0, timeout=60)
    assert b == boot  # the source's process runs on in the clone
    await devguest.wait_counter(clone_log(config, "ic-sr-c"), above=n + 1, timeout=60)
    assert await virt.state("ic-sr") == "running"
    if facts.file_migration:
        # add-fd + file:/dev/fdset/N: no fdset is left behind on either side
        # and QEMU has nothing to warn about (fd: into a file is deprecated).
        assert our_fds("ic-sr") == [] and our_fds("ic-sr-c") == []
        assert deprecations("ic-sr") == [] and deprecations("ic-sr-c") == []
