"""Kill the daemon with SIGKILL at each of the seven states of a real clone, restart it, check the invariants.

After every restart (READY=1 means recovery is done):
 - the source is running (invariant 1);
 - no orphan domain, no job directory, no delta outside a live chain, no RAM
   copy of the job (invariant 2);
 - the job has an outcome in the journal (invariant 3): rolled back
   (Failed, ``interrupted``), or rolled forward when nothing had started;
 - every event of the job reached the webhook receiver, signed (invariant 3).

``INSTACLONE_SOAK_ROUNDS=N`` repeats the seven kills N times and adds N
kills at random moments (not at a pause point; ``INSTACLONE_SOAK_RANDOM=M``
sets how many); the figures go to stdout.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal
import time
from pathlib import Path

import pytest

from instaclone import events
from instaclone.hv import LibvirtHypervisor as Hypervisor
from tests.support.guests.devguest import nvram_path, read_counter, wait_counter
from tests.support.host import libvirt_ready
from tests.support.invariants import check_world, wait_file
from tests.support.proclib import DaemonProcess, NotifySocket, write_config
from tests.support.receiver import Receiver
from tests.support.vmlib import Api, Scratch, boot_source

pytestmark = [pytest.mark.integration, pytest.mark.skipif(libvirt_ready() is not None, reason=str(libvirt_ready()))]

STATES = ["Requested", "Stunned", "SourceDeltaCreated", "CloneDeltaCreated", "MemoryLinked", "Configured",
          "Unstunned"]
SECRET = events.new_secret()


async def test_sigkill_at_each_state_then_recovery_keeps_invariants(tmp_path: Path):
    rounds = int(os.environ.get("INSTACLONE_SOAK_ROUNDS", "1"))
    scratch = Scratch()
    virt = Hypervisor()
    await virt.connect()
    receiver = await Receiver([SECRET]).start()
    notify = NotifySocket(tmp_path / "notify")
    conf = write_config(tmp_path / "d.toml", scratch.path, daemon={"shutdown_grace_s": 5.0})
    conf.write_text(conf.read_text() + f'\n[[webhooks.endpoints]]\nname = "rx"\nurl = "{receiver.url}"\n'
                    f'secret = "{SECRET}"\n')
    src = "kc-src"
    procs: list[DaemonProcess] = []
    runs: list[dict[str, object]] = []
    n = 0
    try:
        # A UEFI source: every clone gets its own copy of the NVRAM, which a
        # kill at any state must not leave behind or take from the source.
        await boot_source(virt, scratch, src, firmware="uefi")
        src_nvram = nvram_path(src, scratch.path)
        nvram = (src_nvram, hashlib.sha256(src_nvram.read_bytes()).hexdigest())
        plan: list[tuple[str | None, float | None]] = [(s, None) for _ in range(rounds) for s in STATES]
        randoms = int(os.environ.get("INSTACLONE_SOAK_RANDOM", rounds if rounds > 1 else 0))
        plan += [(None, random.uniform(0.0, 2.5)) for _ in range(randoms)]
        for state, delay in plan:
            n += 1
            marker = tmp_path / f"marker-{n}"
            env = {"NOTIFY_SOCKET": str(notify.path)}
            if state is not None:
                env["INSTACLONE_FAULT_PAUSE"] = f"{state}:600:{marker}"
            d = DaemonProcess(conf, env=env).start()
            procs.append(d)
            await notify.wait("READY", "1")
            async with Api(scratch.path / "ctl.sock") as api:
                status, body = await api.call("POST", "/v1/jobs", {"source": src, "name": f"kc-{n}",
                                                                   "customize": False})
                assert status == 202, body
                job_id = body["job"]["id"]
            if state is not None:
                assert await wait_file(marker) == job_id
            else:
                await asyncio.sleep(delay or 0)
            t_kill = time.monotonic()
            d.signal(signal.SIGKILL)
            await d.wait()
            # Restart; READY=1 comes only after recovery.
            d2 = DaemonProcess(conf, env={"NOTIFY_SOCKET": str(notify.path)}).start()
            procs.append(d2)
            await notify.wait("READY", "1")
            recovered_s = time.monotonic() - t_kill
            async with Api(scratch.path / "ctl.sock") as api:
                status, body = await api.call("GET", f"/v1/jobs/{job_id}?wait=120")
                job = body["job"]
                outcome = job["state"]
                bad = await check_world(virt, scratch, src, job_id, nvram)
                if outcome not in ("Failed", "Unstunned"):
                    bad.append(f"job {job_id} ended {outcome}: {job.get('error')}")
                if outcome == "Failed" and job["error"]["code"] != "interrupted":
                    bad.append(f"job {job_id} failed with {job['error']}")
                # Killed as its stun began, a job has nothing of its own yet (the
                # stun's ledger holds what jobs share): it rolls forward.
                if state in STATES[2:] and outcome != "Failed":
                    bad.append(f"killed at {state}: expected a rollback, got {outcome}")
                # Every event of the job reaches the receiver (at least once, same ids).
                want = set()
                end = time.monotonic() + 30
                while time.monotonic() < end:
                    status, page = await api.call("GET", f"/v1/webhooks/deliveries?job={job_id}&limit=1000")
                    want = {x["event_id"] for x in page["deliveries"]}
                    if want and want <= receiver.ids():
                        break
                    await asyncio.sleep(0.1)
                missing = want - receiver.ids()
                if missing or not want:
                    bad.append(f"webhooks not delivered for {job_id}: {sorted(missing)}")
                final = "clone.ready" if outcome == "Unstunned" else "clone.failed"
                if not any(r.payload["type"] == final and r.payload["data"]["job_id"] == job_id
                           for r in receiver.received):
                    bad.append(f"no {final} event received for {job_id}")
                if outcome == "Unstunned":  # rolled forward: a real clone, removed again
                    own = job["result"]["clones"][0]["nvram"]
                    if not own or Path(own) == src_nvram or not Path(own).exists():
                        bad.append(f"clone kc-{n} has no NVRAM copy of its own: {own}")
                    await api.call("DELETE", f"/v1/clones/kc-{n}")
            runs.append({"killed_at": state or f"random {delay:.2f}s", "outcome": outcome,
                         "recovered_s": round(recovered_s, 2), "violations": bad})
            d2.signal(signal.SIGTERM)
            assert await d2.wait() == 0
        # The source survived every kill and still runs its program.
        _, count = read_counter(scratch.path / f"{src}.serial.log")
        await wait_counter(scratch.path / f"{src}.serial.log", above=count + 1, timeout=30)
    finally:
        for p in procs:
            p.kill()
        for name in await virt.list_names():
            if name.startswith("kc-"):
                await virt.undefine(name)
        await virt.close()
        await receiver.stop()
        notify.close()
        scratch.cleanup()
    failures = [r for r in runs if r["violations"]]
    print(f"\nkill test: {len(runs)} runs, {len(failures)} with violations")
    for r in runs:
        print(f"  killed at {r['killed_at']:<22} -> {r['outcome']:<10} recovered+ready in {r['recovered_s']} s "
              f"{r['violations'] or ''}")
    assert not failures, failures
    assert all(rec.verified_by == [0] for rec in receiver.received), "every webhook verifies"
