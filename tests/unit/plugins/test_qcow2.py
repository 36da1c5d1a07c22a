"""qcow2: the source's new overlay is made before the stun and only attached in it (real qemu-img, fake libvirt)."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from pathlib import Path

from instaclone import backends
from instaclone.plugin_api import Config, Recorder, ResourceKind, StunContext
from instaclone_plugins.qcow2 import Qcow2Storage
from tests.support.fakes import FakeHypervisor


def world(tmp_path: Path) -> tuple[Path, Config, FakeHypervisor]:
    """A 64 MiB qcow2 source disk, the default config over ``tmp_path``, a fake libvirt running the source."""
    base = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"], check=True)
    config = backends.config_from_dict({})
    config = replace(config, daemon=replace(config.daemon, state_dir=tmp_path / "state"))
    config.delta_dir.mkdir(parents=True)
    virt = FakeHypervisor()
    virt.add_source("src", base)
    return base, config, virt


async def test_source_overlay_made_before_the_stun_then_attached(tmp_path: Path) -> None:
    base, config, virt = world(tmp_path)
    storage = Qcow2Storage(config=config, virt=virt)
    recorded: list[tuple[ResourceKind, str]] = []

    async def record(kind: ResourceKind, ref: str, **_: object) -> None:
        recorded.append((kind, ref))

    rec: Recorder = record
    ctx = StunContext(job_id="j1", source=await virt.lookup("src"), job_dir=tmp_path / "job")

    await storage.prepare_source_delta(ctx=ctx, record=rec)
    assert [c for c in virt.calls if c[0] == "snapshot_disks"] == []  # nothing attached yet
    [(kind, ref)] = recorded
    overlay = Path(ref)
    assert kind is ResourceKind.SOURCE_DELTA and overlay.parent == config.delta_dir / "src"
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", "-f", "qcow2", str(overlay)],
                                     check=True, capture_output=True, text=True).stdout)
    # Backed by the source's top, its format named, the same size: libvirt attaches it as it is.
    assert (info["backing-filename"], info["backing-filename-format"]) == (str(base), "qcow2")
    assert info["virtual-size"] == 64 << 20

    tops = await storage.create_source_delta(ctx=ctx, record=rec)
    assert tops == {"vda": base}
    assert len(recorded) == 1  # recorded once, before it existed
    assert [c for c in virt.calls if c[0] == "snapshot_disks"] == [("snapshot_disks", "src")]
    assert (await virt.lookup("src")).disks[0].path == overlay


async def test_without_preparation_the_snapshot_makes_the_overlay(tmp_path: Path) -> None:
    _, config, virt = world(tmp_path)
    recorded: list[str] = []

    async def record(kind: ResourceKind, ref: str, **_: object) -> None:
        recorded.append(ref)

    ctx = StunContext(job_id="j2", source=await virt.lookup("src"), job_dir=tmp_path / "job")
    await Qcow2Storage(config=config, virt=virt).create_source_delta(ctx=ctx, record=record)
    assert len(recorded) == 1 and Path(recorded[0]).exists()
