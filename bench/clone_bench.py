"""Clone benchmark: cold boot vs saverestore vs filecow, on real guests, in one run.

    .venv/bin/python bench/clone_bench.py [--sizes 256,1024,2048] [--pool 10] [--json out.json]

For each guest RAM size it boots a source (file-backed shared RAM, with
64 MiB written into its tmpfs so that there is memory to carry) and measures,
for each way of getting a warm VM:

* cold boot: define + start a fresh guest until its first counter line;
* saverestore: full RAM through the migration stream (mapped-ram with
  parallel channels where QEMU has it);
* filecow (running source, copy mode), filecow (running source, respawn mode),
  filecow (frozen source);
* what plain libvirt gives without instaclone: the source saved to a file and
  restored from it (``virDomainSaveParams``/``virDomainRestoreParams``), in
  libvirt's default format (what ``virsh save``/``virsh restore`` do) and,
  where libvirt and QEMU have it, in the ``sparse`` (mapped-ram) format with
  parallel channels.

Figures: the source's stun, clone-ready latency (request until the clone's
first counter line), and the clone QEMU's memory from /proc/PID/smaps_rollup
(RSS, PSS, private dirty). Then ``--pool`` clones from one stun. Results are
ratios against the baselines of the same run; absolute numbers depend on
the machine (here: TCG emulation, 2 cores).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

# Bench code: the plain libvirt calls a user has, used directly (the daemon
# goes through instaclone.hv).
import libvirt

# The test guest's driver lives with the tests (tests/support/guests/).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from instaclone import config as cfg
from instaclone.daemon import Daemon
from instaclone.hv import LibvirtHypervisor as Hypervisor
from instaclone.log import setup as log_setup
from instaclone.requests import CloneRequest, FreezeRequest
from instaclone_plugins.filecow import FileCowSettings
from tests.support.guests import devguest

ROOT = Path("/var/lib/instaclone/bench")
HOG_MIB = 64
#: Parallel channels of the plain sparse save/restore (instaclone's saverestore uses its own setting).
PLAIN_CHANNELS = 4


def smaps(name: str, ram_mib: int) -> dict[str, int]:
    """Memory (KiB) of the domain's QEMU process, from /proc/PID/smaps.

    Whole process: Rss, Pss, Private_Dirty. And the guest-RAM mapping alone
    (the VMA of exactly guest RAM size: the RAM file, or anonymous memory for
    saverestore): ``ram_private`` = its anonymous pages (copied-on-write or
    loaded: memory no other VM shares), ``ram_rss``. QEMU's own overhead (the TCG translation cache,
    heap, libraries) is the rest.
    """
    pid = Path(f"/run/libvirt/qemu/{name}.pid").read_text().strip()
    out = {"Rss": 0, "Pss": 0, "Private_Dirty": 0, "ram_private": 0, "ram_rss": 0}
    vma_is_ram = owns_resident = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if not head:
            continue
        if "-" in head[0] and not head[0].endswith(":"):
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            # Exactly guest RAM: the TCG translation cache is a large VMA too.
            vma_is_ram = abs((hi - lo) - (ram_mib << 20)) <= 2 << 20
            # A private file mapping (a filecow clone) owns only its anonymous
            # (copied-on-write) pages; an anonymous mapping (saverestore) or a
            # shared file of its own (a booted guest) owns every resident page.
            owns_resident = len(head) < 6 or "s" in head[1]
            continue
        key = head[0].rstrip(":")
        if key in ("Rss", "Pss", "Private_Dirty"):
            out[key] += int(head[1])
        # Anonymous pages inside the guest-RAM mapping: what this VM owns
        # alone (copy-on-write copies, or all of RAM loaded by saverestore).
        # Not smaps' Private_*: a page-cache page of the image mapped by just
        # one process counts as "private" there although it is shared cache.
        if vma_is_ram and key == ("Rss" if owns_resident else "Anonymous"):
            out["ram_private"] += int(head[1])
        if vma_is_ram and key == "Rss":
            out["ram_rss"] += int(head[1])
    return out


class Bench:
    def __init__(self, virt: Hypervisor, work: Path) -> None:
        self.virt = virt
        self.work = work
        self.created: list[str] = []

    async def boot(self, name: str, mib: int, *, shared: bool = True) -> tuple[float, Path]:
        disk = self.work / f"{name}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(devguest.GUEST_DIR / "base.qcow2"),
                        "-F", "qcow2", str(disk)], check=True)
        await self.virt.define(devguest.domain_xml(name, disk=disk, workdir=self.work, memory_mib=mib,
                                                   file_backed_ram=shared))
        self.created.append(name)
        t0 = time.monotonic()
        await self.virt.start(name)
        log = self.work / f"{name}.serial.log"
        await devguest.wait_counter(log, above=0, timeout=120)
        return time.monotonic() - t0, log

    async def fill(self, name: str) -> None:
        ch = await devguest.GuestChannel.connect(self.work / f"{name}.cmd.sock")
        try:
            # Random (not zero: zero pages are skipped by migration) but quick under TCG.
            rc, out = await ch.run("dd if=/dev/urandom of=/tmp/seed bs=1M count=4 2>/dev/null; "
                                   f"for i in $(seq {HOG_MIB // 4}); do cat /tmp/seed; done > /tmp/fill; echo ok",
                                   timeout=300)
            assert rc == 0, out
        finally:
            await ch.close()

    async def cleanup(self) -> None:
        for name in reversed(self.created):
            try:
                await self.virt.undefine(name)
            except Exception as exc:  # noqa: BLE001
                print(f"cleanup {name}: {exc}", file=sys.stderr)
        self.created.clear()


def plain_formats() -> list[tuple[str, dict[str, Any]]]:
    """The plain save/restore variants to measure: (label, extra save parameters).

    libvirt's default (raw stream, as ``virsh save``), and from libvirt 11.2
    with QEMU 9.0 the ``sparse`` image format (QEMU's mapped-ram) written and
    read by several channels.
    """
    out: list[tuple[str, dict[str, Any]]] = [("libvirt_save", {})]
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout.split()
    version = tuple(int(x) for x in qemu[3].split(".")[:2]) if len(qemu) > 3 else (0, 0)
    if libvirt.getVersion() >= 11_002_000 and version >= (9, 0):
        out.append((f"libvirt_sparse_p{PLAIN_CHANNELS}", {
            libvirt.VIR_DOMAIN_SAVE_PARAM_IMAGE_FORMAT: "sparse",
            libvirt.VIR_DOMAIN_SAVE_PARAM_PARALLEL_CHANNELS: PLAIN_CHANNELS}))
    return out


async def plain_save_restore(name: str, mib: int, image: Path, extra: dict[str, Any]) -> dict[str, Any]:
    """Save the running ``name`` to ``image`` and restore it, as a libvirt user would without instaclone.

    libvirt cannot restore an image under another UUID (its ABI check
    refuses), so the warm VM is the source itself, down from the start of
    the save until the restore returned (*stun*); *ready* is until it prints
    its next counter line. The image is removed.
    """
    def save_restore() -> tuple[float, float]:
        conn = libvirt.open("qemu:///system")
        try:
            dom = conn.lookupByName(name)
            t0 = time.monotonic()
            dom.saveParams({libvirt.VIR_DOMAIN_SAVE_PARAM_FILE: str(image), **extra}, 0)
            t1 = time.monotonic()
            restore = {libvirt.VIR_DOMAIN_SAVE_PARAM_FILE: str(image)}
            if libvirt.VIR_DOMAIN_SAVE_PARAM_PARALLEL_CHANNELS in extra:
                restore[libvirt.VIR_DOMAIN_SAVE_PARAM_PARALLEL_CHANNELS] = \
                    extra[libvirt.VIR_DOMAIN_SAVE_PARAM_PARALLEL_CHANNELS]
            conn.restoreParams(restore, 0)
            return t0, t1
        finally:
            conn.close()

    serial = devguest.serial_log_path(name, image.parent)
    _, before = devguest.read_counter(serial) or ("", 0)
    t0, t1 = await asyncio.to_thread(save_restore)
    restored = time.monotonic()
    st = image.stat()
    image.unlink()
    await devguest.wait_counter(serial, above=before, timeout=120)
    ready = time.monotonic()
    return {"stun_ms": (restored - t0) * 1000, "save_ms": (t1 - t0) * 1000, "restore_ms": (restored - t1) * 1000,
            "ready_s": ready - t0, "state_bytes": st.st_size, "state_allocated": st.st_blocks * 512}


async def daemon_for(work: Path, memory: str, mode: str = "copy") -> Daemon:
    c = cfg.Config()
    c = replace(c,
                daemon=replace(c.daemon, state_dir=work / f"state-{memory}-{mode}",
                               socket=work / f"{memory}-{mode}.sock", log_format="console", log_level="warning"),
                clone=replace(c.clone, memory_backends=(memory,), stun_deadline_ms=60000,
                              step_timeout_s=600)).with_section("memory.filecow", FileCowSettings(source_mode=mode))
    d = Daemon(c)
    await d.start()
    return d


async def clone_once(d: Daemon, source: str, name: str, count: int = 1) -> tuple[dict[str, Any], float, list[Path]]:
    assert d.engine is not None
    t0 = time.monotonic()
    job = await d.engine.submit(CloneRequest(source=source, name=name, count=count))
    await d.engine.wait(job.id, 900)
    rec = await d.store.get_job(job.id)
    assert rec is not None and rec.state.value == "Unstunned", (rec.state if rec else None, rec.error if rec else None)
    names = [c["name"] for c in rec.result["clones"]]
    logs = [d.config.clones_dir / n / f"{n}.serial.log" for n in names]
    for log in logs:
        await devguest.wait_counter(log, above=0, timeout=120)
    return rec.to_dict(), time.monotonic() - t0, logs


async def run(sizes: list[int], pool: int) -> dict[str, Any]:
    log_setup("console", "warning")
    work = ROOT / uuid.uuid4().hex[:8]
    work.mkdir(parents=True)
    os.chown(work, *devguest.qemu_owner())
    virt = Hypervisor()
    await virt.connect()
    b = Bench(virt, work)
    results: dict[str, Any] = {"sizes": {}, "accel": devguest.accel(), "fill_mib": HOG_MIB}
    daemons = {key: await daemon_for(work, *key) for key in
               [("saverestore", "copy"), ("filecow", "copy"), ("filecow", "respawn")]}
    try:
        for mib in sizes:
            row: dict[str, Any] = {}
            cold_s, _ = await b.boot(f"bc-cold-{mib}", mib)
            await asyncio.sleep(2)
            row["cold_boot"] = {"ready_s": cold_s, "mem": smaps(f"bc-cold-{mib}", mib)}
            await b.cleanup()
            for label, key, frozen in [("saverestore", ("saverestore", "copy"), False),
                                       ("filecow_running_copy", ("filecow", "copy"), False),
                                       ("filecow_running_respawn", ("filecow", "respawn"), False),
                                       ("filecow_frozen", ("filecow", "copy"), True)]:
                d = daemons[key]
                src = f"bs-{label[:6]}-{mib}"
                await b.boot(src, mib)
                await b.fill(src)
                if frozen:
                    assert d.engine is not None
                    await d.engine.freeze(FreezeRequest(src))
                job, ready_s, _ = await clone_once(d, src, f"bk-{label[:6]}-{mib}")
                await asyncio.sleep(2)
                cname = job["result"]["clones"][0]["name"]
                memory = job["result"].get("memory") or {}
                row[label] = {"stun_ms": job["result"]["stun_ms"], "ready_s": ready_s,
                              "durations_ms": job["durations_ms"], "mem": smaps(cname, mib),
                              "state_bytes": memory.get("state_bytes", memory.get("bytes")),
                              "state_allocated": memory.get("allocated_bytes"), "format": memory.get("format")}
                assert d.engine is not None
                await d.engine.destroy_clone(cname)
                if frozen:
                    await d.engine.unfreeze(FreezeRequest(src))
                await b.cleanup()
            for label, extra in plain_formats():
                src = f"bl-{label[8:14]}-{mib}"
                await b.boot(src, mib)
                await b.fill(src)
                r = await plain_save_restore(src, mib, work / f"{src}.img", extra)
                await asyncio.sleep(2)
                row[label] = {**r, "mem": smaps(src, mib)}
                await b.cleanup()
            results["sizes"][mib] = row
            print(json.dumps({mib: {k: {kk: vv for kk, vv in v.items() if kk != "durations_ms"}
                                    for k, v in row.items()}}), flush=True)
        # N clones from one stun, 256 MiB guest.
        if pool:
            for label, key in [("saverestore", ("saverestore", "copy")), ("filecow_running_copy", ("filecow", "copy"))]:
                d = daemons[key]
                src = f"bp-{label[:6]}"
                await b.boot(src, 256)
                await b.fill(src)
                job, ready_s, _ = await clone_once(d, src, f"bq-{label[:6]}", count=pool)
                await asyncio.sleep(3)
                names = [c["name"] for c in job["results"]["clones"]] if "results" in job else \
                    [c["name"] for c in job["result"]["clones"]]
                mems = [smaps(n, 256) for n in names]
                results.setdefault("pool", {})[label] = {
                    "count": pool, "stun_ms": job["result"]["stun_ms"], "all_ready_s": ready_s,
                    "pss_kib_mean": statistics.mean(m["Pss"] for m in mems),
                    "private_dirty_kib_mean": statistics.mean(m["Private_Dirty"] for m in mems),
                    "rss_kib_mean": statistics.mean(m["Rss"] for m in mems),
                    "ram_private_kib_mean": statistics.mean(m["ram_private"] for m in mems),
                }
                assert d.engine is not None
                for n in names:
                    await d.engine.destroy_clone(n)
                await b.cleanup()
                print(json.dumps({"pool": results["pool"][label]}), flush=True)
    finally:
        await b.cleanup()
        for d in daemons.values():
            assert d.engine is not None
            for c in await d.store.list_clones():
                await d.engine.destroy_clone(c.name)
            await d.stop()
        await virt.close()
        shutil.rmtree(work, ignore_errors=True)
    return results


def _row(*cells: str) -> str:
    """One Markdown table row."""
    return "|" + "|".join(f" {c} " if c != "---" else c for c in cells) + "|"


def table(res: dict[str, Any]) -> str:
    lines = [
        f"Guest: test guest under {res['accel'].upper()}, {res['fill_mib']} MiB written to its tmpfs before cloning.",
        "",
        _row("guest RAM", "method", "stun ms", "ready s", "ready vs cold boot", "ready vs best plain",
             "image MiB (allocated)", "process RSS MiB", "process PSS MiB", "process private dirty MiB",
             "guest-RAM private MiB", "% of guest RAM"),
        _row(*["---"] * 12),
    ]
    for mib, row in res["sizes"].items():
        cold = row["cold_boot"]["ready_s"]
        # The best plain alternative: the fastest libvirt save/restore of this size.
        plain = min((r["ready_s"] for label, r in row.items() if label.startswith("libvirt_")), default=None)
        for label, r in row.items():
            m = r["mem"]
            stun = "-" if r.get("stun_ms") is None else f"{r['stun_ms']:.0f}"
            ratio = "1.00" if label == "cold_boot" else f"{r['ready_s'] / cold:.2f}"
            vs_plain = "-" if plain is None else f"{r['ready_s'] / plain:.2f}"
            image = "-" if not r.get("state_bytes") else (
                f"{r['state_bytes'] / 2**20:.1f}" + (f" ({r['state_allocated'] / 2**20:.1f})"
                                                     if r.get("state_allocated") is not None else ""))
            lines.append(f"| {mib} MiB | {label} | {stun} | {r['ready_s']:.2f} | {ratio} | {vs_plain} | {image} | "
                         f"{m['Rss'] / 1024:.0f} | {m['Pss'] / 1024:.0f} | {m['Private_Dirty'] / 1024:.0f} | "
                         f"{m['ram_private'] / 1024:.1f} | {100 * m['ram_private'] / 1024 / int(mib):.1f} |")
    if res.get("pool"):
        lines += ["", _row("pool (256 MiB guest)", "clones", "stun ms", "all ready s", "mean RSS MiB", "mean PSS MiB",
                           "mean private dirty MiB", "mean guest-RAM private MiB"),
                  _row(*["---"] * 8)]
        for label, p in res["pool"].items():
            lines.append(f"| {label} | {p['count']} | {p['stun_ms']:.0f} | {p['all_ready_s']:.2f} | "
                         f"{p['rss_kib_mean'] / 1024:.0f} | {p['pss_kib_mean'] / 1024:.0f} | "
                         f"{p['private_dirty_kib_mean'] / 1024:.0f} | {p['ram_private_kib_mean'] / 1024:.1f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="256,1024,2048")
    p.add_argument("--pool", type=int, default=10)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    res = asyncio.run(run([int(s) for s in a.sizes.split(",") if s], a.pool))
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
