"""A guest that writes a qcow2 header into its raw disk (issue 21, item 1: never probe an image format).

Real images made with qemu-img. A raw "disk" whose first bytes are a qcow2
header naming a backing file: an NBD URL this test listens on (no connection
may arrive), a host canary file watched with inotify (it may never be
opened), or a json: name. The chain walk, the source check, GC's
reachability and clone-delta creation must read it as the raw disk libvirt
recorded, and every qemu-img call the code makes must name its formats.
The integration test at the end has the busybox guest write the header
itself, then clones it.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import json
import os
import socket
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, suppress
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from instaclone import config as cfg
from instaclone.errors import StorageError
from instaclone.jobs import gc
from instaclone.plugin_api import CloneTarget, StunContext
from instaclone_plugins import _shadow
from instaclone_plugins.qcow2 import Qcow2Settings, Qcow2Storage
from tests.support.fakes import FakeHypervisor

RAW_SIZE = 64 << 20
PIB = 1 << 50
IN_OPEN = 0x20


# -- witnesses: a listener nobody may reach, a file nobody may open -----------------------------------


class Listener:
    """A TCP listener on 127.0.0.1 that counts the connections it gets (in a thread, so a blocking
    qemu-img that connects cannot hang the test's event loop)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()  # an NBD client gives up on a closed connection

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


_libc = ctypes.CDLL(None, use_errno=True)


class Canary:
    """A host file watched with inotify IN_OPEN: :attr:`opened` counts the opens since it was made."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.write_bytes(b"host secret\n" * 100)
        self.fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        assert _libc.inotify_add_watch(self.fd, bytes(path), IN_OPEN) >= 0, os.strerror(ctypes.get_errno())
        self.opens = 0

    @property
    def opened(self) -> int:
        while True:
            try:
                buf = os.read(self.fd, 4096)
            except BlockingIOError:
                return self.opens
            off = 0
            while off < len(buf):  # struct inotify_event: wd, mask, cookie, len, name[len]
                mask = int.from_bytes(buf[off + 4:off + 8], "little")
                self.opens += bool(mask & IN_OPEN)
                off += 16 + int.from_bytes(buf[off + 12:off + 16], "little")

    def close(self) -> None:
        os.close(self.fd)


def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout


def qcow2_header(tmp: Path, backing: str, *, size: int = PIB, backing_fmt: str = "raw") -> bytes:
    """The first 4 KiB of a qcow2 image of ``size`` naming ``backing`` (never opened: -u)."""
    img = tmp / f"hdr-{abs(hash(backing))}.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", backing_fmt, str(img), str(size))
    head = img.read_bytes()[:4096]
    img.unlink()
    return head


def hostile_raw(path: Path, header: bytes, size: int = RAW_SIZE) -> Path:
    """A raw disk of ``size`` bytes whose guest wrote ``header`` at its start."""
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(header)
    return path


class Hostile:
    """The witnesses and three raw disks whose headers name the listener, the canary and a json: canary."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.listener = Listener()
        self.canary = Canary(tmp / "canary.raw")
        self.nbd = hostile_raw(tmp / "nbd.raw", qcow2_header(tmp, f"nbd://127.0.0.1:{self.listener.port}/x"))
        self.host = hostile_raw(tmp / "host.raw", qcow2_header(tmp, str(self.canary.path)))
        self.json = hostile_raw(tmp / "json.raw", qcow2_header(tmp, "json:" + json.dumps(
            {"driver": "raw", "file": {"driver": "file", "filename": str(self.canary.path)}})))
        assert self.canary.opened == 0

    @property
    def disks(self) -> dict[str, Path]:
        return {"vda": self.nbd, "vdb": self.host, "vdc": self.json}

    def assert_untouched(self) -> None:
        assert self.listener.connections == 0, "a qemu-img call connected to the NBD server a guest's header named"
        assert self.canary.opened == 0, "a qemu-img call opened the host file a guest's header named"

    def close(self) -> None:
        self.listener.close()
        self.canary.close()


@pytest.fixture
def hostile(tmp_path: Path) -> Iterator[Hostile]:
    h = Hostile(tmp_path)
    try:
        yield h
    finally:
        h.close()


def domain_xml(name: str, disks: dict[str, tuple[Path, str]]) -> str:
    """A fake domain whose disks are ``target -> (path, format libvirt recorded)``."""
    devs = "".join(f"<disk type='file' device='disk'><driver name='qemu' type='{fmt}'/><source file='{p}'/>"
                   f"<target dev='{t}' bus='virtio'/></disk>" for t, (p, fmt) in disks.items())
    return (f"<domain type='qemu'><name>{name}</name><uuid>6c1e1b26-5a54-4b8e-9a43-{abs(hash(name)) % 10**12:012d}"
            f"</uuid><memory unit='KiB'>262144</memory><os><type arch='x86_64'>hvm</type></os>"
            f"<devices>{devs}</devices></domain>")


def storage_for(tmp: Path, virt: FakeHypervisor, **qcow2: Any) -> Qcow2Storage:
    c = cfg.Config()
    c = replace(c, daemon=replace(c.daemon, state_dir=tmp / "state")).with_section(
        "storage.qcow2", Qcow2Settings(**qcow2))
    return Qcow2Storage(config=c, virt=virt)


def raw_source(virt: FakeHypervisor, h: Hostile, name: str = "src") -> None:
    virt.add_source(name, h.nbd)
    virt.domains[name].xml = domain_xml(name, {t: (p, "raw") for t, p in h.disks.items()})


# -- the chain walk ------------------------------------------------------------------------------------


async def walk(storage: Qcow2Storage, path: Path, fmt: str) -> set[str]:
    """The images of the chain of ``path`` (recorded as ``fmt``) as the backend reads it for a defined
    domain: through ``_images_in_use``, the walk a source delta's undo (and GC) makes."""
    assert isinstance(storage.virt, FakeHypervisor)
    storage.virt.add_source("walk", path)
    storage.virt.domains["walk"].xml = domain_xml("walk", {"vda": (path, fmt)})
    try:
        return await storage._images_in_use("walk")
    finally:
        del storage.virt.domains["walk"]


async def test_chain_walk_reads_each_layer_with_its_recorded_format(tmp_path, hostile):
    """A raw disk is the whole chain, whatever header its guest wrote; a real qcow2 chain over one
    is read layer by layer with the format each header names, down to the raw disk and no further."""
    storage = storage_for(tmp_path, FakeHypervisor())
    for disk in hostile.disks.values():
        assert await walk(storage, disk, "raw") == {str(disk)}
    mid, top = tmp_path / "mid.qcow2", tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", str(hostile.host), "-F", "raw", str(mid), str(RAW_SIZE))
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", str(mid), "-F", "qcow2", str(top), str(RAW_SIZE))
    assert await walk(storage, top, "qcow2") == {str(top), str(mid), str(hostile.host)}
    hostile.assert_untouched()
    # The backend's chain API says the same, in order.
    for disk in hostile.disks.values():
        assert await storage.chain(path=disk, fmt="raw") == [disk]
        assert await storage.chain_depth(path=disk, fmt="raw") == 1
    assert await storage.chain(path=top, fmt="qcow2") == [top, mid, hostile.host]
    # Settled headers are remembered (the walk's cache); a rewritten one is read again.
    await asyncio.sleep(1.1)
    assert await storage.chain(path=top, fmt="qcow2") == [top, mid, hostile.host]
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", str(hostile.nbd), "-F", "raw", str(top))
    assert await storage.chain(path=top, fmt="qcow2") == [top, hostile.nbd]
    hostile.assert_untouched()


def _rewrite(img: Path, old: bytes, new: bytes) -> None:
    data = bytearray(img.read_bytes())
    at = data.index(old)
    data[at:at + len(old)] = new
    img.write_bytes(bytes(data))


async def test_unsafe_backing_names_are_refused(tmp_path, hostile):
    """A qcow2 layer (its header is the container's) naming a json:, protocol or relative backing, no
    backing format, a loop, or a chain past the bound: each refused as unsafe_image, nothing opened."""
    storage = storage_for(tmp_path, FakeHypervisor())
    storage.max_chain_images = 3  # storage.qcow2.max_chain_images

    async def refused(path: Path, fmt: str, why: str) -> None:
        with pytest.raises(StorageError, match=why) as err:
            await walk(storage, path, fmt)
        assert (err.value.code, err.value.http_status) == ("unsafe_image", 409), err.value
        hostile.assert_untouched()

    port = hostile.listener.port
    cases = {
        "nbd": (f"nbd://127.0.0.1:{port}/x", "not an absolute local path"),
        "http": (f"http://127.0.0.1:{port}/x", "not an absolute local path"),
        "json": (f'json:{{"driver": "file", "filename": "{hostile.canary.path}"}}', "json: name"),
        "relative": ("canary.raw", "relative name"),
    }
    for label, (backing, why) in cases.items():
        img = tmp_path / f"{label}.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "raw", str(img), "1M")
        await refused(img, "qcow2", why)
    # A backing name without its format: the backing-format header extension (magic 0xe2792aca) gone.
    nofmt = tmp_path / "nofmt.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", str(hostile.canary.path), "-F", "raw", str(nofmt), "1M")
    _rewrite(nofmt, bytes.fromhex("e2792aca"), b"\0\0\0\0")
    await refused(nofmt, "qcow2", "without its format")
    # A loop: a -> b -> a.
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", str(b), "-F", "qcow2", str(a), "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", str(tmp_path / "A.qcow2"), "-F", "qcow2", str(b), "1M")
    _rewrite(b, str(tmp_path / "A.qcow2").encode(), str(a).encode())
    await refused(a, "qcow2", "loops")
    # Deeper than the bound (3): base <- l1 <- l2 <- l3.
    below = tmp_path / "base.raw"
    below.write_bytes(b"\0" * 4096)
    fmt = "raw"
    for i in range(1, 4):
        layer = tmp_path / f"l{i}.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", str(below), "-F", fmt, str(layer), "4096")
        below, fmt = layer, "qcow2"
    assert len(await walk(storage, tmp_path / "l2.qcow2", "qcow2")) == 3
    await refused(below, "qcow2", "more than 3 images")
    # A format libvirt may record but instaclone does not read, and a name that is not a local path.
    await refused(hostile.nbd, "vmdk", "format 'vmdk'")
    await refused(Path(f"nbd://127.0.0.1:{port}/x"), "raw", "not an absolute local path")


# -- GC, the source check, clone deltas ----------------------------------------------------------------


@asynccontextmanager
async def real_storage_engine(tmp_path: Path, h: Hostile) -> AsyncIterator[Any]:
    """An engine on the fake hypervisor with the real qcow2 storage; source "src" has the hostile raw disks."""
    from instaclone.jobs.engine import Engine
    from instaclone.store import Store
    from instaclone_plugins.saverestore import SaveRestoreMemory

    virt = FakeHypervisor()
    raw_source(virt, h)
    c = cfg.Config()
    c = replace(c, daemon=replace(c.daemon, state_dir=tmp_path / "state"))
    store = Store(c.store_path)
    await store.open()
    engine = Engine(config=c, store=store, virt=virt, storage=Qcow2Storage(config=c, virt=virt),
                    memory=SaveRestoreMemory(config=c, virt=virt))
    try:
        yield engine
    finally:
        await engine.shutdown(5)
        await store.close()


async def test_gc_reachability_opens_nothing_but_the_disks(tmp_path, hostile):
    async with real_storage_engine(tmp_path, hostile) as engine:
        used = await gc.reachable(engine.svc)
        assert {str(p) for p in hostile.disks.values()} <= used
        assert str(hostile.canary.path) not in used
        report = await gc.collect(engine.svc, dry_run=True)  # does not abort
        assert report.failed == []
    hostile.assert_untouched()


async def test_source_check_opens_nothing_but_the_disks(tmp_path, hostile):
    from aiohttp import web

    from instaclone.api import RUNNER_ARGS, make_app
    from instaclone.jobs.gc import GarbageCollector
    from tests.support.apiclient import Api

    async with real_storage_engine(tmp_path, hostile) as engine:
        runner = web.AppRunner(make_app(engine, engine.store, gc=GarbageCollector(engine.svc)), **RUNNER_ARGS)
        await runner.setup()
        sock = tmp_path / "ctl.sock"
        await web.UnixSite(runner, str(sock)).start()
        try:
            async with Api(sock) as client:
                status, body = await client.call("GET", "/v1/sources/src/check")
        finally:
            await runner.cleanup()
    assert status == 200, body
    depths = [c["detail"] for c in body["check"]["checks"] if c["capability"] == "chain_depth"]
    assert len(depths) == 3 and all(": 1 image(s)" in d for d in depths), depths
    hostile.assert_untouched()


async def test_clone_delta_of_a_raw_disk_is_backed_by_it_as_raw(tmp_path, hostile):
    virt = FakeHypervisor()
    raw_source(virt, hostile)
    storage = storage_for(tmp_path, virt)
    info = await virt.lookup("src")
    ctx = StunContext(job_id="j1", source=info, job_dir=tmp_path / "job", tops=dict(hostile.disks))
    clone = CloneTarget(name="c1", uuid="u", dir=tmp_path / "c1")
    clone.dir.mkdir()

    async def record(*_a: Any, **_k: Any) -> int:
        return 1

    made = await storage.create_clone_delta(ctx=ctx, clone=clone, record=record)
    for target, delta in made.items():
        got = json.loads(qemu_img("info", "--force-share", "-f", "qcow2", "--output=json", str(delta)))
        assert got["virtual-size"] == RAW_SIZE, f"{target}: the clone's disk took the size the guest's header claims"
        assert got["backing-filename"] == str(hostile.disks[target])
        assert got["backing-filename-format"] == "raw"
    hostile.assert_untouched()


# -- every qemu-img call names its formats ---------------------------------------------------------------


async def test_every_qemu_img_call_names_the_format(tmp_path, hostile, monkeypatch):
    """Records the argv of every subprocess the plugins start, driving each path that runs qemu-img."""
    calls: list[tuple[str, ...]] = []
    real_exec = asyncio.create_subprocess_exec

    async def recording(*argv: str, **kw: Any) -> Any:
        calls.append(tuple(str(a) for a in argv))
        return await real_exec(*argv, **kw)

    monkeypatch.setattr(asyncio, "create_subprocess_exec", recording)
    virt = FakeHypervisor()
    raw_source(virt, hostile)
    storage = storage_for(tmp_path, virt)
    await storage.check()
    info = await virt.lookup("src")
    ctx = StunContext(job_id="j1", source=info, job_dir=tmp_path / "job", tops=dict(hostile.disks))
    ctx.job_dir.mkdir()
    clone = CloneTarget(name="c1", uuid="u", dir=tmp_path / "c1")
    clone.dir.mkdir()

    async def record(*_a: Any, **_k: Any) -> int:
        return 1

    def check_calls(least: int) -> None:
        qemu = [c for c in calls if Path(c[0]).name == "qemu-img" and c[1:] != ("--version",)]
        assert len(qemu) >= least, calls
        for argv in qemu:
            assert "-f" in argv and argv[argv.index("-f") + 1] in ("raw", "qcow2"), f"no -f: {argv}"
            assert "--backing-chain" not in argv, f"lets qemu-img probe backing formats: {argv}"
            if "-b" in argv:
                assert "-F" in argv and "-u" in argv, f"-b without -F/-u: {argv}"

    made = await storage.create_clone_delta(ctx=ctx, clone=clone, record=record)  # info + create per disk
    # filecow's shadow reads each source disk's size.
    shadow = await _shadow.start(ctx=ctx, record=record, virt=virt, config=storage.config)
    assert shadow.name in virt.domains
    check_calls(9)
    await storage._images_in_use("src")  # a source delta's undo
    for path in made.values():
        await storage.chain(path=path, fmt="qcow2")  # GC
        await storage.chain_depth(path=path, fmt="qcow2")  # check, results, consolidation
    check_calls(15)
    hostile.assert_untouched()


# -- a real guest writes the header itself, then is cloned ---------------------------------------------


def _vdb_xml(xml: str, raw: Path) -> str:
    """The test guest's definition with a second, raw disk ``vdb``."""
    dom = ET.fromstring(xml)
    devices = dom.find("devices")
    assert devices is not None
    disk = ET.SubElement(devices, "disk", type="file", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type="raw")
    ET.SubElement(disk, "source", file=str(raw))
    ET.SubElement(disk, "target", dev="vdb", bus="virtio")
    return ET.tostring(dom, encoding="unicode")


@pytest.mark.integration
async def test_guest_written_header_clone_is_raw(tmp_path, hostile):
    from tests.support.host import libvirt_ready

    if (why := libvirt_ready()) is not None:
        pytest.skip(why)
    from tests.support.guests import devguest
    from tests.support.vmlib import Api, daemon_world

    header = qcow2_header(tmp_path, f"nbd://127.0.0.1:{hostile.listener.port}/x")
    async with daemon_world("ic-hi-") as (scratch, virt, config):
        src, clone = "ic-hi-src", "ic-hi-c1"
        top = scratch.path / f"{src}.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-b", str(devguest.GUEST_DIR / "base.qcow2"), "-F", "qcow2",
                 str(top))
        raw = scratch.path / f"{src}-data.raw"
        with open(raw, "wb") as f:
            f.truncate(RAW_SIZE)
        os.chown(raw, *devguest.qemu_owner())
        xml = _vdb_xml(devguest.domain_xml(src, disk=top, workdir=scratch.path), raw)
        await virt.define(xml)
        try:
            await virt.start(src)
            await devguest.wait_counter(devguest.serial_log_path(src, scratch.path), above=1, timeout=120)
            # The guest writes a qcow2 header (1 PiB, backed by our NBD listener) into its raw disk.
            deadline = time.monotonic() + 120
            while True:
                try:
                    status, out = await virt.agent_exec(src, ["dd", "of=/dev/vdb", "bs=4096", "count=1",
                                                              "conv=fsync"], stdin=header, timeout_s=60)
                    break
                except Exception:  # the agent may not answer yet
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(2)
            assert status == 0, out
            assert raw.read_bytes()[:4096] == header
            assert json.loads(qemu_img("info", "--output=json", "--force-share", str(raw)))["format"] == "qcow2"

            async with Api(config.daemon.socket) as api:
                status, body = await api.call("GET", f"/v1/sources/{src}/check")
                assert status == 200, body
                depth = [c["detail"] for c in body["check"]["checks"]
                         if c["capability"] == "chain_depth" and c.get("device") == "vdb"]
                assert depth and depth[0].startswith("vdb: 1 image(s)"), depth
                status, body = await api.call("POST", "/v1/gc", {"dry_run": True})
                assert status == 200, body
                status, body = await api.call("POST", "/v1/jobs?wait=300", {"source": src, "name": clone,
                                                                              "customize": False})
                assert status == 201 and body["job"]["state"] == "Unstunned", body
                delta = Path(body["job"]["result"]["clones"][0]["disks"]["vdb"])
                got = json.loads(qemu_img("info", "--force-share", "-f", "qcow2", "--output=json", str(delta)))
                assert got["virtual-size"] == RAW_SIZE and got["backing-filename-format"] == "raw", got
                # Inside the clone, vdb is the raw disk: its size, and the header its source's guest wrote.
                status, out = await virt.agent_exec(clone, ["cat", "/sys/block/vdb/size"], timeout_s=60)
                assert (status, out.strip()) == (0, str(RAW_SIZE // 512)), out
                status, out = await virt.agent_exec(
                    clone, ["sh", "-c", "dd if=/dev/vdb bs=4096 count=1 2>/dev/null | md5sum"], timeout_s=60)
                assert status == 0 and out.split()[0] == hashlib.md5(header).hexdigest(), out
                status, body = await api.call("POST", "/v1/gc", {"dry_run": True})
                assert status == 200, body
                status, body = await api.call("DELETE", f"/v1/clones/{clone}")
                assert status in (200, 202, 204), body
        finally:
            with suppress(Exception):
                await virt.destroy(src)
            with suppress(Exception):
                await virt.undefine(src)
    hostile.assert_untouched()
