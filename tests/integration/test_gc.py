"""Integration: garbage collection on real guests (libvirt + QEMU, no mocks).

A running busybox source is cloned, the clone is cloned, the middle clone is
destroyed (its child keeps running and reads its whole disk), then the child:
every image no chain uses is gone, and the source's own files are untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.support.guests import devguest
from tests.support.host import libvirt_ready
from tests.support.vmlib import Api, boot_source, daemon_world

pytestmark = [pytest.mark.integration, pytest.mark.skipif(libvirt_ready() is not None,
                                                          reason=str(libvirt_ready()))]

PREFIX = "gc-"


@pytest.fixture
async def world():
    async with daemon_world(PREFIX) as w:
        yield w


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def chain(top: Path) -> list[str]:
    out = subprocess.run(["qemu-img", "info", "--force-share", "--backing-chain", "--output=json", str(top)],
                         check=True, capture_output=True, text=True).stdout
    return [os.path.realpath(img["filename"]) for img in json.loads(out)]


def our_files(config) -> set[str]:
    roots = [config.delta_dir, config.clones_dir, config.jobs_dir, config.daemon.state_dir / "frozen"]
    return {os.path.realpath(os.path.join(d, f)) for r in roots for d, _, fs in os.walk(r) for f in fs}


async def clone(api: Api, source: str, name: str) -> dict:
    status, body = await api.call("POST", "/v1/jobs?wait=180", {"source": source, "name": name})
    assert status == 201 and body["job"]["state"] == "Unstunned", body
    return body["job"]


async def disk(api: Api) -> dict:
    _, body = await api.call("GET", "/v1/health")
    return body["disk"]


async def test_destroy_middle_clone_then_child_then_gc(world):
    scratch, virt, config = world
    src = await boot_source(virt, scratch, "gc-src", file_backed_ram=True)
    base = devguest.GUEST_DIR / "base.qcow2"
    base_sha = sha(base)
    async with Api(config.daemon.socket) as api:
        await clone(api, "gc-src", "gc-mid")
        # From here on the source's own disk is a read-only backing image.
        src_disk_sha = sha(src.disk)
        await clone(api, "gc-mid", "gc-kid")
        kid_top = (await virt.lookup("gc-kid")).disks[0].path
        mid_disk = config.clones_dir / "gc-mid" / "vda.qcow2"
        assert os.path.realpath(mid_disk) in chain(kid_top)
        usage_before = await disk(api)
        print("disk before:", json.dumps(usage_before))

        # The middle clone goes; its child keeps running on its image.
        status, body = await api.call("DELETE", "/v1/clones/gc-mid")
        assert status == 200, body
        assert not await virt.exists("gc-mid")
        assert await virt.state("gc-kid") == "running"
        assert mid_disk.exists() and all(Path(p).exists() for p in chain(kid_top))  # whole, readable
        assert not list(config.delta_dir.glob("gc-mid/*"))  # mid's own top: nobody's now
        _, n = await devguest.wait_counter(config.clones_dir / "gc-kid" / "gc-kid.serial.log", above=0, timeout=30)
        async with await devguest.GuestChannel.connect(config.clones_dir / "gc-kid" / "gc-kid.cmd.sock") as ch:
            # The whole disk, below the page cache: every image of its chain is read.
            code, out = await ch.run("echo 3 > /proc/sys/vm/drop_caches; dd if=/dev/vda of=/dev/null bs=1M "
                                     "2>&1; echo rc=$?", timeout=120)
        assert code == 0 and "rc=0" in out, out
        await devguest.wait_counter(config.clones_dir / "gc-kid" / "gc-kid.serial.log", above=n + 1, timeout=30)
        status, body = await api.call("POST", "/v1/gc", {"dry_run": True})
        assert status == 200 and body["gc"]["deleted"] == [], body
        assert [r["clone"] for r in body["gc"]["retained"]] == ["gc-mid"]
        status, body = await api.call("POST", "/v1/jobs", {"source": "gc-src", "name": "gc-mid"})
        assert status == 409 and body["error"]["code"] == "name_in_use"
        usage_mid = await disk(api)
        print("disk after destroying gc-mid:", json.dumps(usage_mid))

        # The child goes: nothing uses gc-mid's image any more.
        status, body = await api.call("DELETE", "/v1/clones/gc-kid")
        assert status == 200, body
        assert not (config.clones_dir / "gc-mid").exists() and not (config.clones_dir / "gc-kid").exists()
        status, body = await api.call("POST", "/v1/gc", {"dry_run": False})
        assert status == 200 and body["gc"]["deleted"] == [] and body["gc"]["retained"] == [], body
        usage_after = await disk(api)
        print("disk after destroying gc-kid:", json.dumps(usage_after))

        # Every file left under our directories is in the running source's chain.
        src_top = (await virt.lookup("gc-src")).disks[0].path
        left = our_files(config)
        assert left <= set(chain(src_top)), left - set(chain(src_top))
        assert await virt.state("gc-src") == "running"
        by_source = {s["source"]: s for s in usage_before["sources"]}
        assert set(by_source) == {"gc-src", "gc-mid"} and by_source["gc-mid"]["clones"] == 1
        assert [s["source"] for s in usage_after["sources"]] == ["gc-src"]
        print(f"freed {usage_before['total_bytes'] - usage_after['total_bytes']} bytes; left {len(left)} files, "
              f"{usage_after['total_bytes']} bytes")
    assert sha(src.disk) == src_disk_sha and sha(base) == base_sha
    _, n = devguest.read_counter(src.serial_log) or ("", 0)
    await devguest.wait_counter(src.serial_log, above=n + 1, timeout=30)
