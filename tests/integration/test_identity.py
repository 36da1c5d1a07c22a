"""Integration: clones get their own identity inside the guest (guest agent customization)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from tests.support.guests import devguest
from tests.support.host import libvirt_ready
from tests.support.vmlib import Api, boot_source, cmd_sock

pytestmark = [pytest.mark.integration, pytest.mark.skipif(libvirt_ready() is not None,
                                                          reason=str(libvirt_ready()))]

SHOW = "hostname; cat /etc/machine-id; cat /sys/class/net/eth0/address; cat /run/instaclone/config.json"


async def test_two_clones_have_distinct_identity_and_get_their_data(world):
    scratch, virt, _daemon, config = world
    src = await boot_source(virt, scratch, "id-src", file_backed_ram=True)
    s = await devguest.GuestChannel.connect(src.cmd_sock)
    try:
        # The source has its DHCP lease (clones wait for IPv4 where the source had it).
        for _ in range(100):
            if "10.0.2." in (await s.run("ip -4 addr show eth0"))[1]:
                break
            await asyncio.sleep(0.2)
        before = (await s.run("hostname; cat /etc/machine-id; cat /sys/class/net/eth0/address"))[1].split()
        async with Api(config.daemon.socket) as api:
            status, body = await api.call("POST", "/v1/jobs?wait=180", {
                "source": "id-src", "name": "id-c", "count": 2, "config": {"role": "web", "tier": "blue"}})
            assert status == 201, body
            job = body["job"]
            assert job["state"] == "Unstunned", job
        seen = []
        for c in job["result"]["clones"]:
            ident = c["identity"]
            print(c["name"], "phases ms:", ident["phases_ms"], "guest ms:", ident["guest_ms"])
            # Every phase is timed (filecow: the QEMU start and the state load apart), the guest's too.
            assert {"qemu_start", "state_load", "nic_replug", "identity_script", "nics_seen", "link_up",
                    "network_renew", "ipv4_wait", "define"} <= set(ident["phases_ms"]), ident["phases_ms"]
            assert {"kernel_rng", "hostname", "restart_wait"} <= set(ident["guest_ms"]), ident["guest_ms"]
            assert ident["hostname"] == c["name"]
            assert [i["mac"] for i in ident["interfaces"]] == c["macs"]
            assert any(a.startswith("10.0.2.") for i in ident["interfaces"] for a in i["addresses"]), ident
            ch = await devguest.GuestChannel.connect(cmd_sock(config, c["name"]))
            try:
                host, mid, mac, data = (await ch.run(SHOW))[1].split(None, 3)
            finally:
                await ch.close()
            assert host == c["name"] and mac == c["macs"][0]
            assert json.loads(data) == {"role": "web", "tier": "blue"}
            # The clock was set from the host's.
            ch = await devguest.GuestChannel.connect(cmd_sock(config, c["name"]))
            try:
                guest_now = int((await ch.run("date +%s"))[1].strip())
            finally:
                await ch.close()
            assert abs(guest_now - time.time()) < 10
            seen.append((host, mid, mac))
        # Distinct from each other and from the source, whose identity is unchanged.
        assert len({x[1] for x in seen} | {before[1]}) == 3
        assert len({x[2] for x in seen} | {before[2]}) == 3
        assert (await s.run("hostname; cat /etc/machine-id; cat /sys/class/net/eth0/address"))[1].split() == before
    finally:
        await s.close()


async def test_customization_can_be_skipped_and_bad_config_is_refused(world):
    scratch, virt, _daemon, config = world
    await boot_source(virt, scratch, "id-src2")
    async with Api(config.daemon.socket) as api:
        status, body = await api.call("POST", "/v1/jobs", {"source": "id-src2", "name": "id-x",
                                                           "config": {"k": 1}})
        assert status == 400 and body["error"]["code"] == "invalid_request"
        status, body = await api.call("POST", "/v1/jobs?wait=180",
                                      {"source": "id-src2", "name": "id-plain", "customize": False})
        job = body["job"]
        assert job["state"] == "Unstunned", job
        ident = job["result"]["clones"][0]["identity"]
        assert {k: ident[k] for k in ("customized", "reason")} == {"customized": False, "reason": "not requested"}
        assert set(ident["phases_ms"]) == {"slot_wait", "memory_start", "link_down", "resume", "nic_replug", "define"}
