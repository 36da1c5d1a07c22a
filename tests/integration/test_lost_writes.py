"""Integration: no guest write is lost by a pre-copy, on the QEMU that runs it (issue 23).

A busybox source rewrites its tmpfs as fast as its vCPU can while it is
cloned by pre-copy, again and again. At each stun, with the source still
stopped (the moment just before the daemon resumes it), the test copies
the source's RAM file: that is the memory every clone of the job must
start from. The clone maps the job's frozen image privately, so the file
libvirt holds for it stays that image whatever the clone does after; it
is compared with the copy page by page. One page may differ by design:
the shadow QEMU's VM generation ID, written at the top of RAM when its
incoming migration ends (each clone writes its own over it when it loads
the state); any other page is a write the pre-copy lost.

* QEMU of the platform (10 here), verification off as ``auto`` decides
  there: no page lost.
* QEMU 7.2 side by side (TCG): with ``precopy_verify = "never"`` the same
  check finds lost pages (the bug fixed in QEMU 9.0: the test proves the
  check can see it); with ``auto`` the copy is verified and nothing is lost.
"""

from __future__ import annotations

import asyncio
import os
import re
import uuid
from pathlib import Path
from typing import Any

import pytest

from instaclone_plugins.filecow import FileCowSettings
from tests.support.guests import devguest
from tests.support.host import libvirt_ready, second_qemu
from tests.support.vmlib import TEST_PREFIXES, Api, Scratch, boot_source, make_config, running_daemon

pytestmark = [pytest.mark.integration, pytest.mark.skipif(libvirt_ready() is not None,
                                                          reason=str(libvirt_ready()))]

SECOND_QEMU, SECOND_WHY = second_qemu()
PAGE = 4096
SEED = "dd if=/dev/urandom of=/tmp/seed bs=1M count=4 2>/dev/null"
# As fast as the vCPU can: a 16 MiB file of random bytes copied over and over
# into two files of the tmpfs (page-cache pages: guest RAM), never resting.
WRITER = (SEED + "; for i in 1 2 3 4; do cat /tmp/seed; done > /tmp/src16; "
          "(while :; do cp /tmp/src16 /tmp/w1; cp /tmp/src16 /tmp/w2; done) >/dev/null 2>&1 </dev/null & "
          "echo started")


def genid_bytes(xml: str) -> bytes | None:
    """The VM generation ID of a definition as the guest sees it in memory (little-endian GUID)."""
    m = re.search(r"<genid>([0-9a-fA-F-]{36})</genid>", xml)
    return uuid.UUID(m.group(1)).bytes_le if m else None


def lost_pages(truth: Path, image: Path, genids: set[bytes]) -> tuple[list[int], int]:
    """Offsets of the pages of ``image`` that differ from ``truth``, and how many differed only by a genid.

    A genid page holds the source's VM generation ID in ``truth`` and differs
    from ``image`` in at most 16 bytes (the shadow's own ID).
    """
    lost: list[int] = []
    by_genid = 0
    chunk = 1 << 20
    with open(truth, "rb") as a, open(image, "rb") as b:
        size = os.fstat(a.fileno()).st_size
        assert os.fstat(b.fileno()).st_size == size
        for off in range(0, size, chunk):
            x, y = a.read(chunk), b.read(chunk)
            if x == y:
                continue
            for p in range(0, len(x), PAGE):
                px, py = x[p:p + PAGE], y[p:p + PAGE]
                if px == py:
                    continue
                if any(g in px for g in genids) and _differ_only_in_16(px, py):
                    by_genid += 1
                else:
                    lost.append(off + p)
    return lost, by_genid


def _differ_only_in_16(x: bytes, y: bytes) -> bool:
    diff = [i for i in range(len(x)) if x[i] != y[i]]
    return bool(diff) and diff[-1] - diff[0] < 16


class StunTap:
    """At each stun, just before the daemon resumes the stopped source: its RAM against the job's shadow's.

    The shadow's RAM file is the frozen image every clone of the job maps
    (privately: the clones never change it), and the source has not run
    since the switchover: the two must be equal.
    """

    def __init__(self, virt: Any, source: str) -> None:
        self.virt, self.source = virt, source
        self.found: list[tuple[list[int], int]] = []  # per stun: lost page offsets, genid pages
        self._resume = virt.resume
        virt.resume = self.resume

    async def resume(self, name: str) -> None:
        if name == self.source and (await self.virt.state(name)) == "paused":
            shadows = [n for n in await self.virt.list_names() if n.startswith("instaclone-shadow-")]
            if shadows:  # a pre-copy (a job that fell back to copy has none)
                src, shadow = await self.virt.ram_file(name), await self.virt.ram_file(shadows[0])
                assert src is not None and shadow is not None, (src, shadow)
                g = genid_bytes((await self.virt.lookup(name)).xml)
                self.found.append(await asyncio.to_thread(lost_pages, src[0], shadow[0], {g} if g else set()))
        await self._resume(name)

    def close(self) -> None:
        self.virt.resume = self._resume


async def clone_and_compare(emulator: Path | None, verify: str, tmp_path: Path, *, clones: int,
                            memory_mib: int = 512) -> list[dict[str, Any]]:
    """``clones`` pre-copy jobs of a source writing as fast as it can; per job: mode, verified, lost pages."""
    from instaclone.hv import LibvirtHypervisor

    scratch = Scratch()
    virt = LibvirtHypervisor()
    await virt.connect()
    before = set(await virt.list_names())
    # A clone whose memory misses writes can hang: its NIC replug gives up sooner than in production.
    config = make_config(scratch, stun_deadline_ms=30_000, nic_release_timeout_s=20).with_section(
        "memory.filecow", FileCowSettings(source_mode="precopy", precopy_verify=verify))
    daemon = await running_daemon(config)
    name = "ic-lw-src"
    tap = StunTap(daemon.virt, name)
    out: list[dict[str, Any]] = []
    try:
        vm = await boot_source(virt, scratch, name, memory_mib=memory_mib, file_backed_ram=True, emulator=emulator)
        ch = await devguest.GuestChannel.connect(vm.cmd_sock)
        try:
            rc, text = await ch.run(WRITER, timeout=120)
            assert rc == 0 and text.strip().endswith("started"), text
        finally:
            await ch.close()
        await asyncio.sleep(3)  # the writer is at full speed
        async with Api(config.daemon.socket) as api:
            for i in range(1, clones + 1):
                clone = f"ic-lw-c{i}"
                status, body = await api.call("POST", "/v1/jobs?wait=600",
                                              {"source": name, "name": clone, "customize": False})
                assert status in (201, 202), body
                job = body["job"]
                mem = (job.get("result") or {}).get("memory") or {}
                row: dict[str, Any] = {"state": job["state"], "mode": mem.get("mode"),
                                       "verified": mem.get("verified"), "repaired": mem.get("repaired_pages"),
                                       "qemu": mem.get("qemu")}
                if job["state"] != "Unstunned":
                    # A clone whose memory misses writes may crash (QEMU 7.2 unverified): said, not hidden.
                    row["error"] = (job.get("error") or {}).get("message")
                if len(tap.found) > len([r for r in out if "lost" in r]):
                    lost, by_genid = tap.found[-1]
                    row.update(mode="precopy", lost=len(lost), lost_at=[hex(o) for o in lost[:8]],
                               genid_pages=by_genid)
                out.append(row)
                print(f"{clone}: {row}")
                if job["state"] == "Unstunned":
                    status, body = await api.call("DELETE", f"/v1/clones/{clone}")
                    assert status in (200, 202, 204), body
        assert await virt.state(name) == "running"
    finally:
        tap.close()
        await daemon.stop()
        for n in set(await virt.list_names()) - before:
            if n.startswith(TEST_PREFIXES):
                await virt.undefine(n)
        await virt.close()
        scratch.cleanup()
    return out


async def test_qemu_of_the_platform_loses_no_write(tmp_path: Path) -> None:
    rows = await clone_and_compare(None, "auto", tmp_path, clones=6)
    precopied = [r for r in rows if r["mode"] == "precopy"]
    assert len(precopied) >= 4, rows  # a fallback to copy is allowed, not the rule
    if int(str(precopied[0]["qemu"]).split(".")[0]) < 9:  # the stock platform: 7.2 is the system's QEMU
        assert all(r["state"] == "Unstunned" and r["verified"] is True and r["lost"] == 0 for r in precopied), rows
        await qemu_7_2_loses_writes_unverified(None, tmp_path)
        return
    assert all(r["state"] == "Unstunned" for r in rows), rows
    assert all(r["verified"] is False for r in precopied), rows  # auto: nothing to verify on QEMU 9+
    assert all(r["lost"] == 0 for r in precopied), rows
    assert all(r["genid_pages"] <= 1 for r in precopied), rows


@pytest.mark.skipif(SECOND_QEMU is None, reason=SECOND_WHY)
async def test_qemu_7_2_beside_loses_writes_unless_verified(tmp_path: Path) -> None:
    await qemu_7_2_loses_writes_unverified(SECOND_QEMU, tmp_path)
    verified = await clone_and_compare(SECOND_QEMU, "auto", tmp_path, clones=3)
    assert all(r["state"] == "Unstunned" for r in verified), verified
    precopied = [r for r in verified if r["mode"] == "precopy"]
    assert precopied and all(r["verified"] is True and r["lost"] == 0 for r in precopied), verified


async def qemu_7_2_loses_writes_unverified(emulator: Path | None, tmp_path: Path) -> None:
    """With the verification off, the check finds the writes QEMU 7.2 lost (the check can see them)."""
    unverified = await clone_and_compare(emulator, "never", tmp_path, clones=6)
    assert all(r["qemu"].startswith("7.2") for r in unverified if r.get("qemu")), unverified
    assert any(r.get("lost") for r in unverified), f"QEMU 7.2 lost no write in {unverified}"
