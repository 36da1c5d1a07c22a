"""NIC replacement on the busybox test guest: how long a clone's NIC replacement takes.

    .venv/bin/python bench/nic_bench.py [--clones 5] [--direct 5] [--customize] [--json out.json]

Boots one source (file-backed shared RAM), then:

* ``--clones`` clone jobs one after another (no guest customization unless
  ``--customize``): each clone's ``nic_replug`` phase from the job result
  (the NIC replaced right after the clone resumed, while its guest is busy);
* ``--direct`` replacements of the running source's own NIC
  (``LibvirtHypervisor.replace_nic``, the guest idle);
* one replacement while the guest is paused past libvirt's own wait inside
  the detach call (5 s): the time from the guest's resume until the
  replacement is done, i.e. how soon the device-removed event ends the wait.

Prints JSON lines, then p50/min/max per figure. Everything it creates is
removed. About a minute on a 2-core TCG machine. Run it under the lock the
integration tests take (``flock /tmp/instaclone-integration.lock ...``) on a shared libvirtd.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# The test guest's driver and helpers live with the tests.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from instaclone.hv import LibvirtHypervisor as Hypervisor, domxml
from instaclone.log import setup as log_setup
from tests.support.vmlib import Api, boot_source, daemon_world

SOURCE = "nicb-src"
#: Longer than libvirt's own wait for an unplug inside the detach call.
HELD_S = 6.0


def emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


async def clone_phases(socket: Path, n: int, customize: bool) -> list[float]:
    out = []
    async with Api(socket) as api:
        for i in range(n):
            name = f"nicb-c{i}"
            status, body = await api.call("POST", "/v1/jobs?wait=180",
                                          {"source": SOURCE, "name": name, "customize": customize})
            job = body["job"]
            assert status == 201 and job["state"] == "Unstunned", body
            phases = job["result"]["clones"][0]["identity"]["phases_ms"]
            emit({"clone": name, **phases})
            out.append(float(phases["nic_replug"]))
            status, body = await api.call("DELETE", f"/v1/clones/{name}")
            assert status == 200, body
    return out


async def direct(virt: Hypervisor, mac: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.monotonic()
        await virt.replace_nic(SOURCE, mac, link_up=True, timeout_s=30)
        out.append((time.monotonic() - t0) * 1000.0)
        emit({"direct_ms": round(out[-1], 1)})
        await asyncio.sleep(1)  # let the guest settle its new NIC
    return out


async def after_resume(virt: Hypervisor, mac: str) -> float:
    await virt.suspend(SOURCE)
    task = asyncio.create_task(virt.replace_nic(SOURCE, mac, link_up=True, timeout_s=60))
    await asyncio.sleep(HELD_S)
    t0 = time.monotonic()
    await virt.resume(SOURCE)
    await task
    ms = (time.monotonic() - t0) * 1000.0
    emit({"after_resume_ms": round(ms, 1)})
    return ms


async def main(args: argparse.Namespace) -> dict[str, Any]:
    figures: dict[str, list[float]] = {}
    async with daemon_world("nicb-") as (scratch, virt, config):
        await boot_source(virt, scratch, SOURCE, file_backed_ram=True)
        figures["clone nic_replug ms"] = await clone_phases(config.daemon.socket, args.clones, args.customize)
        mac = domxml.macs((await virt.lookup(SOURCE)).xml)[0]
        figures["direct replace_nic ms"] = await direct(virt, mac, args.direct)
        figures["resume to replaced ms"] = [await after_resume(virt, mac)]
    summary = {k: {"n": len(v), "p50": round(statistics.median(v), 1), "min": round(min(v), 1),
                   "max": round(max(v), 1)} for k, v in figures.items() if v}
    for k, v in summary.items():
        print(f"{k}: n={v['n']} p50={v['p50']:.0f} min={v['min']:.0f} max={v['max']:.0f}")
    return summary


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clones", type=int, default=5)
    p.add_argument("--direct", type=int, default=5)
    p.add_argument("--customize", action="store_true", help="customize the clones (the busybox guest has an agent)")
    p.add_argument("--json", type=Path, help="write the summary here")
    a = p.parse_args()
    log_setup("console", "warning")
    result = asyncio.run(main(a))
    if a.json:
        a.json.write_text(json.dumps(result, indent=2) + "\n")
