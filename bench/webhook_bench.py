"""Do webhook receivers slow clones? Clone latency and stun with no endpoint (baseline), a healthy
receiver, one that hangs, and one that answers 500, in one run on real guests.

    .venv/bin/python bench/webhook_bench.py [--clones 5] [--json out.json]

Every mode makes ``--clones`` clones of one running 256 MiB source, one job
at a time (no guest customization, network kept: the clone path alone), and
reports the medians of the source's stun and of the job's latency (Requested
to Unstunned), as ratios to the baseline. The hanging receiver holds every
request until the sender's 10 s timeout; the failing one answers 500 and is
retried every 50-100 ms, so the sender is as busy as it gets.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from instaclone import config as cfg, events
from instaclone.daemon import Daemon
from instaclone.hv import LibvirtHypervisor as Hypervisor
from instaclone.log import setup as log_setup
from tests.support.apiclient import Api
from tests.support.vmlib import Scratch, boot_source

SECRET = events.new_secret()


#: A receiver in its own process (as in real life: it must not share the daemon's CPU time).
RECEIVER = """
import asyncio, sys
sys.path.insert(0, sys.argv[1])
from tests.support.receiver import Receiver
async def main():
    r = await Receiver([sys.argv[3]], mode=sys.argv[2]).start()
    print(r.url, flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


async def clone_once(daemon: Daemon, sock: Path, mode: str, url: str | None, name: str) -> tuple[float, float]:
    """Point the daemon at ``url`` (None: no endpoint), make one clone; (stun ms, latency ms)."""
    assert daemon.webhooks is not None
    base = daemon.config.webhooks
    endpoints = () if url is None else (cfg.WebhookEndpoint(f"bench-{mode}", url, (SECRET,)),)
    daemon.webhooks.configure(replace(base, endpoints=endpoints))
    async with Api(sock) as api:
        _status, body = await api.call("POST", "/v1/jobs?wait=120", {"source": "wb-src", "name": name,
                                                                     "customize": False, "keep_network": True})
        job = body["job"]
        assert job["state"] == "Unstunned", job
        await api.call("DELETE", f"/v1/clones/{name}")
    return job["result"]["stun_ms"], (job["history"][-1]["at"] - job["history"][0]["at"]) * 1000.0


async def main(args: argparse.Namespace) -> None:
    log_setup("console", "warning")
    scratch = Scratch()
    virt = Hypervisor()
    await virt.connect()
    root = Path(__file__).resolve().parent.parent
    procs = {}
    urls: dict[str, str | None] = {"none": None}
    for mode in ("ok", "hang", "500"):
        procs[mode] = await asyncio.create_subprocess_exec(
            sys.executable, "-c", RECEIVER, str(root), mode, SECRET, stdout=asyncio.subprocess.PIPE)
        assert procs[mode].stdout is not None
        urls[mode] = (await procs[mode].stdout.readline()).decode().strip()
    c = cfg.Config()
    config = replace(c, daemon=replace(c.daemon, state_dir=scratch.path / "state", socket=scratch.path / "ctl.sock",
                                       log_format="console", log_level="warning"),
                     webhooks=replace(c.webhooks, timeout_s=10.0, backoff_initial_s=0.1, backoff_max_s=0.1,
                                      max_attempts=1000))
    daemon = Daemon(config)
    await daemon.start()
    results = []
    samples: dict[str, list[tuple[float, float]]] = {m: [] for m in urls}
    try:
        await boot_source(virt, scratch, "wb-src")
        await clone_once(daemon, config.daemon.socket, "none", None, "wb-warmup")
        # Round robin, so that drift in the machine's speed hits every mode alike.
        for i in range(args.clones):
            for mode, url in urls.items():
                samples[mode].append(await clone_once(daemon, config.daemon.socket, mode, url, f"wb-{mode}-{i}"))
        for mode, got in samples.items():
            r = {"mode": mode, "clones": len(got), "stun_ms": statistics.median(s for s, _ in got),
                 "latency_ms": statistics.median(lat for _, lat in got),
                 "receiver_requests": sum(n for (w, o), n in daemon.webhooks.outcomes.items()  # type: ignore[union-attr]
                                          if w == f"bench-{mode}")}
            results.append(r)
            print(json.dumps(r), flush=True)
    finally:
        await daemon.stop(5)
        for name in await virt.list_names():
            if name.startswith("wb-"):
                await virt.undefine(name)
        await virt.close()
        for p in procs.values():
            p.kill()
            await p.wait()
        scratch.cleanup()
    base = results[0]
    print("\n| receiver | stun ms (median) | vs none | clone latency ms (median) | vs none | attempts |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {r['stun_ms']:.0f} | {r['stun_ms'] / base['stun_ms']:.2f}x | "
              f"{r['latency_ms']:.0f} | {r['latency_ms'] / base['latency_ms']:.2f}x | {r['receiver_requests']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clones", type=int, default=5)
    p.add_argument("--json")
    asyncio.run(main(p.parse_args()))
