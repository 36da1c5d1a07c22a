"""Integration: clone real running guests through the daemon (libvirt + QEMU, no mocks)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from instaclone.hv.domxml import macs
from tests.support.guests import devguest
from tests.support.host import libvirt_ready
from tests.support.receiver import Receiver
from tests.support.vmlib import Api, boot_source, clone_log, first_counter

pytestmark = [pytest.mark.integration, pytest.mark.skipif(libvirt_ready() is not None,
                                                          reason=str(libvirt_ready()))]



async def test_clone_running_guest_end_to_end(world):
    scratch, virt, daemon, config = world
    src = await boot_source(virt, scratch, "ic-src")
    boot_src, _ = devguest.read_counter(src.serial_log)

    _, count_before = devguest.read_counter(src.serial_log)
    async with Api(config.daemon.socket) as api:
        status, body = await api.call("POST", "/v1/jobs?wait=120", {"source": "ic-src", "name": "ic-clone"})
        assert status == 201, body
        job = body["job"]
    assert job["state"] == "Unstunned", job
    assert [h["state"] for h in job["history"]] == [
        "Requested", "Stunned", "SourceDeltaCreated", "CloneDeltaCreated", "MemoryLinked", "Configured",
        "Unstunned"]
    print("per-state ms:", json.dumps(job["durations_ms"]), "stun_ms:", job["result"]["stun_ms"])

    # The source ran on past the stun, on a new delta.
    _, count_after = devguest.read_counter(src.serial_log)
    assert await virt.state("ic-src") == "running"
    await devguest.wait_counter(src.serial_log, above=count_after + 2, timeout=30)
    info = await virt.lookup("ic-src")
    assert info.disks[0].path != src.disk  # writes go to the new source delta

    # (a) no reboot: the clone continues the source's process, same boot id,
    # its counter picks up where the source was stunned.
    log = clone_log(config, "ic-clone")
    boot_clone, n = await devguest.wait_counter(log, above=0, timeout=30)
    assert boot_clone == boot_src
    first = first_counter(log)
    # The stun fell between the request and the job's end: so does the first
    # count the clone printed (it prints the one after the stun).
    assert first is not None and count_before <= first[1] <= count_after + 1 and first[1] > 2, \
        (first, count_before, count_after)
    await devguest.wait_counter(log, above=n + 2, timeout=30)

    # (c) its own identity.
    clone = await virt.lookup("ic-clone")
    assert clone.name != info.name and clone.uuid != info.uuid
    assert set(macs(clone.xml)).isdisjoint(macs(info.xml))
    genid = lambda xml: ET.fromstring(xml).findtext("genid")  # noqa: E731
    assert genid(clone.xml) and genid(info.xml) and genid(clone.xml) != genid(info.xml)
    assert clone.state == "running"

    # (b) disk isolation, both ways, below the guests' page caches.
    s = await devguest.GuestChannel.connect(src.cmd_sock)
    c = await devguest.GuestChannel.connect(config.clones_dir / "ic-clone" / "ic-clone.cmd.sock")
    try:
        write = "echo {p} | dd of=/dev/vda bs=512 seek={sec} conv=notrunc,fsync 2>/dev/null; echo ok"
        read = "echo 3 > /proc/sys/vm/drop_caches; dd if=/dev/vda bs=512 skip={sec} count=1 2>/dev/null"
        assert (await s.run(write.format(p="SRC-ONLY-PATTERN", sec=100)))[0] == 0
        assert (await c.run(write.format(p="CLONE-ONLY-PATTERN", sec=200)))[0] == 0
        _, s100 = await s.run(read.format(sec=100))
        _, s200 = await s.run(read.format(sec=200))
        _, c100 = await c.run(read.format(sec=100))
        _, c200 = await c.run(read.format(sec=200))
    finally:
        await s.close()
        await c.close()
    assert "SRC-ONLY-PATTERN" in s100 and "CLONE-ONLY-PATTERN" not in s200
    assert "CLONE-ONLY-PATTERN" in c200 and "SRC-ONLY-PATTERN" not in c100

    # The guest itself sees the clone's new MAC (NIC replugged); the source keeps its own.
    s = await devguest.GuestChannel.connect(src.cmd_sock)
    c = await devguest.GuestChannel.connect(config.clones_dir / "ic-clone" / "ic-clone.cmd.sock")
    try:
        assert (await c.run("cat /sys/class/net/eth0/address"))[1].strip() == macs(clone.xml)[0]
        assert (await s.run("cat /sys/class/net/eth0/address"))[1].strip() == macs(info.xml)[0]
    finally:
        await s.close()
        await c.close()

    # (d) the source is running; destroy removes the clone and only the clone.
    assert await virt.state("ic-src") == "running"
    async with Api(config.daemon.socket) as api:
        status, body = await api.call("DELETE", "/v1/clones/ic-clone")
        assert status == 200, body
        status, body = await api.call("DELETE", "/v1/clones/ic-src")
        assert status == 404 and body["error"]["code"] == "not_found"
    assert not await virt.exists("ic-clone")
    assert not (config.clones_dir / "ic-clone").exists()
    assert await virt.state("ic-src") == "running"
    assert src.disk.exists() and info.disks[0].path.exists()

    # (e) every state change reached the webhook receiver, signed.
    receiver: Receiver = daemon.receiver
    want = ["clone.requested", "clone.stunned", "clone.source_delta_created", "clone.clone_delta_created",
            "clone.memory_linked", "clone.configured", "clone.ready", "clone.destroyed"]
    for _ in range(100):
        if len({r.payload["type"] for r in receiver.received}) >= len(want):
            break
        await asyncio.sleep(0.1)
    got = [r.payload for r in receiver.received if r.payload["data"].get("job_id") == job["id"]]
    assert sorted(p["type"] for p in got) == sorted(want), got
    assert all(r.verified_by == [0] for r in receiver.received)
    stunned = next(p for p in got if p["type"] == "clone.stunned")
    assert stunned["data"]["duration_ms"] == job["durations_ms"]["Stunned"]


async def test_cli_clone_count_and_errors(world):
    scratch, virt, _daemon, config = world
    await boot_source(virt, scratch, "ic-src2")
    env = {**os.environ, "INSTACLONE_SOCKET": str(config.daemon.socket)}
    cli = [sys.executable, "-m", "instaclone.cli"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cli, *args], env=env, capture_output=True, text=True, timeout=300)

    r = await asyncio.to_thread(run, "-o", "json", "clone", "ic-src2", "--name", "ic-pool", "--count", "2", "--wait")
    assert r.returncode == 0, r.stderr
    job = json.loads(r.stdout)
    names = [c["name"] for c in job["result"]["clones"]]
    assert names == ["ic-pool-1", "ic-pool-2"]
    assert len({m for c in job["result"]["clones"] for m in c["macs"]}) == 2
    for n in names:
        assert await virt.state(n) == "running"
        await devguest.wait_counter(clone_log(config, n), above=0, timeout=30)
    assert await virt.state("ic-src2") == "running"

    r = await asyncio.to_thread(run, "clones", "ls")
    assert r.returncode == 0 and "ic-pool-1" in r.stdout and "ic-pool-2" in r.stdout

    # Inside a clone, as docs/guide/exec.md shows it: exec's output and exit status are the command's;
    # cp both ways, checked.
    r = await asyncio.to_thread(run, "exec", "--env", "WHO=cli", "ic-pool-1", "--", "sh", "-c",
                                'echo "out $WHO"; echo err >&2; exit 7')
    assert (r.returncode, r.stdout, r.stderr) == (7, "out cli\n", "err\n"), r
    local = scratch.path / "payload.bin"
    local.write_bytes(os.urandom(300_000))
    r = await asyncio.to_thread(run, "cp", str(local), "ic-pool-1:/tmp/payload.bin")
    assert r.returncode == 0, r.stderr
    back = scratch.path / "back"
    back.mkdir()
    r = await asyncio.to_thread(run, "cp", "ic-pool-1:/tmp/payload.bin", str(back))
    assert r.returncode == 0, r.stderr
    assert (back / "payload.bin").read_bytes() == local.read_bytes()
    r = await asyncio.to_thread(run, "cp", "ic-pool-1:/no/such/file", str(back))
    assert r.returncode == 1 and "guest_file_not_found" in r.stderr and "Traceback" not in r.stderr, r
    r = await asyncio.to_thread(run, "exec", "ic-src2", "--", "true")  # a source is never reachable
    assert r.returncode == 125 and "not_found" in r.stderr, r
    r = await asyncio.to_thread(run, "jobs", "show", job["id"])
    assert r.returncode == 0 and "Unstunned" in r.stdout

    # Errors: one line, non-zero exit, no traceback.
    for args, needle in [
        (("clone", "ic-src2", "--name", "ic-pool-1"), "name_in_use"),
        (("clone", "no-such-vm", "--name", "x1"), "source_not_found"),
        (("clone", "ic-src2", "--name", "../../etc/passwd"), "invalid_name"),
        (("clone", "ic-src2", "--name", "ok", "--count", "-1"), "invalid_request"),
        (("destroy", "ic-src2"), "not_found"),
    ]:
        r = await asyncio.to_thread(run, *args)
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        assert needle in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([*cli, "--socket", str(scratch.path / "nope.sock"), "status"], capture_output=True, text=True)
    assert r.returncode == 3 and "cannot reach instacloned" in r.stderr

    for n in names:
        r = await asyncio.to_thread(run, "destroy", n)
        assert r.returncode == 0, r.stderr
    assert await virt.state("ic-src2") == "running"


async def test_frozen_source_with_saverestore(world):
    """A source without shared file RAM can be frozen too: its saved state serves every job."""
    scratch, virt, _daemon, config = world
    src = await boot_source(virt, scratch, "ic-frz")
    async with Api(config.daemon.socket) as api:
        status, body = await api.call("POST", "/v1/sources/ic-frz/freeze")
        assert status == 200 and body["frozen"]["backend"] == "saverestore", body
        boot, _ = devguest.read_counter(src.serial_log)
        for name in ("ic-frz-a", "ic-frz-b"):
            status, body = await api.call("POST", "/v1/jobs?wait=180", {"source": "ic-frz", "name": name})
            assert body["job"]["state"] == "Unstunned", body
            b, _ = await devguest.wait_counter(clone_log(config, name), above=0, timeout=30)
            assert b == boot
        status, body = await api.call("POST", "/v1/sources/ic-frz/unfreeze")
        assert status == 200 and body["unfrozen"]["clones"] == 2
    assert await virt.state("ic-frz") == "running"
    assert not (config.daemon.state_dir / "frozen" / "ic-frz").exists()
