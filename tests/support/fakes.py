"""Fakes for fault injection in unit tests. Never used where a test claims a VM was cloned."""

from __future__ import annotations

import asyncio
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from instaclone.errors import DomainExists, DomainNotFound, DomainReplaced, LibvirtError
from instaclone.hv import DomainInfo, Hypervisor, MigrationInfo, Outcome, QemuFacts, file_disks
from instaclone.jobs.capacity import HostProbe
from instaclone.plugin_api import CloneTarget, Recorder, ResourceKind, StorageBackend, StunContext

SOURCE_XML = """<domain type='qemu'>
  <name>{name}</name><uuid>{uuid}</uuid>
  <memory unit='KiB'>262144</memory>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='{disk}'/><target dev='vda' bus='virtio'/></disk>
    <interface type='user'><mac address='52:54:00:00:00:01'/><model type='virtio'/></interface>
    <serial type='file'><source path='/tmp/{name}.serial.log'/><target port='0'/></serial>
  </devices>
</domain>"""


def image_bytes(kind: str, backing: str) -> bytes:
    """A fake image's content: what it is and, like a qcow2 header, the image it is backed by."""
    return f"{kind}\nbacking={backing}\n".encode()


def image_chain(top: Path) -> list[Path]:
    """A fake image's chain, top first, following ``backing=`` lines (like ``qemu-img info --backing-chain``).

    Stops at a file without one (a base image), or at a missing file.
    """
    chain = [top]
    while True:
        try:
            lines = chain[-1].read_bytes().split(b"\n")
        except OSError:
            return chain
        backing = next((ln[8:].decode() for ln in lines if ln.startswith(b"backing=")), "")
        if not backing or Path(backing) in chain:
            return chain
        chain.append(Path(backing))


@dataclass
class FakeDomain:
    name: str
    uuid: str
    xml: str
    state: str = "shutoff"
    inactive: str | None = None  # the persistent definition, when it differs from the running one
    migration: str = "none"  # QEMU's status of the domain's outgoing migration
    migrating_to: str = ""
    was_running: bool = False  # running when its migration began: a cancel lets it run again


class FakeHypervisor:
    """In-memory stand-in for instaclone.hv.LibvirtHypervisor; satisfies the Protocol instaclone.hv.Hypervisor.

    mypy checks that (the assignment after the class, and tests/unit/hv/test_hv_protocol.py).
    """

    def __init__(self) -> None:
        self.domains: dict[str, FakeDomain] = {}
        self.calls: list[tuple[str, str]] = []
        self.fail: dict[str, Exception] = {}  # method name -> error to raise
        self.delay: dict[str, float] = {}  # method name -> seconds to sleep
        self.exec_log: list[tuple[str, list[str], bytes]] = []  # agent_exec calls: (domain, argv, stdin)
        self.interfaces: dict[str, list[dict[str, Any]]] = {}  # guest-network-get-interfaces answers
        self.agent_log: list[tuple[str, str]] = []  # agent calls: (domain, command)
        self.guests: dict[str, FakeGuestAgent] = {}  # domains whose agent a FakeGuestAgent answers
        #: what every fake QEMU says of itself (tests set an older one, or KVM)
        self.qemu = QemuFacts((10, 0, 2), "tcg")

    async def _hook(self, method: str, name: str) -> None:
        self.calls.append((method, name))
        if method in self.delay:
            await asyncio.sleep(self.delay[method])
        if method in self.fail:
            raise self.fail[method]

    def add_source(self, name: str, disk: Path, state: str = "running") -> FakeDomain:
        ident = str(uuid.uuid4())
        dom = FakeDomain(name, ident, SOURCE_XML.format(name=name, uuid=ident, disk=disk), state)
        self.domains[name] = dom
        return dom

    def _get(self, name: str) -> FakeDomain:
        if name not in self.domains:
            raise DomainNotFound(f"no domain {name!r}")
        return self.domains[name]

    def _get_id(self, name: str, uuid: str) -> FakeDomain:
        """Like libvirt's lookup by UUID, refused unless the name matches (hv.connection._dom_id)."""
        d = next((d for d in self.domains.values() if d.uuid == uuid), None)
        if d is None:
            if name in self.domains:
                raise DomainReplaced(f"domain {name!r} is not the one instaclone made: its UUID is "
                                     f"{self.domains[name].uuid}, not {uuid}; it was left alone")
            raise DomainNotFound(f"no domain {name!r} (UUID {uuid})")
        if d.name != name:
            raise DomainReplaced(f"the domain made as {name!r} (UUID {uuid}) is named {d.name!r} now")
        return d

    def _outcome(self, name: str, uuid: str) -> Outcome:
        try:
            self._get_id(name, uuid)
        except DomainReplaced:
            return Outcome.REPLACED
        except DomainNotFound:
            return Outcome.GONE
        return Outcome.DONE

    async def connect(self) -> None: ...

    async def ensure_connected(self) -> bool:
        return True

    async def is_connected(self) -> bool:
        return True

    async def close(self) -> None: ...

    async def lookup(self, name: str) -> DomainInfo:
        await self._hook("lookup", name)
        d = self._get(name)
        return DomainInfo(d.name, d.uuid, d.state, 0, d.xml, file_disks(d.xml))

    async def lookup_id(self, name: str, uuid: str) -> DomainInfo:
        await self._hook("lookup", name)
        d = self._get_id(name, uuid)
        return DomainInfo(d.name, d.uuid, d.state, 0, d.xml, file_disks(d.xml))

    async def exists(self, name: str) -> bool:
        return name in self.domains

    async def state(self, name: str) -> str:
        return self._get(name).state

    async def list_names(self) -> list[str]:
        return sorted(self.domains)

    async def suspend(self, name: str) -> None:
        await self._hook("suspend", name)
        self._get(name).state = "paused"

    async def resume(self, name: str) -> None:
        await self._hook("resume", name)
        d = self._get(name)
        if d.state == "paused":
            d.state = "running"

    async def define(self, xml: str) -> str:
        name = ET.fromstring(xml).findtext("name") or ""
        await self._hook("define", name)
        old = self.domains.get(name)
        if (old is not None and "instaclone" not in old.xml and "incoming" not in xml
                and ET.fromstring(old.xml).findtext("uuid") == ET.fromstring(xml).findtext("uuid")):
            # The same domain defined anew: like libvirt, a running domain keeps
            # running as it is and the new definition applies at its next start.
            if old.state in ("running", "paused"):
                old.inactive = xml
            else:
                old.xml = xml
            return name
        if name in self.domains and self.domains[name].xml.find("instaclone") < 0 and "incoming" not in xml:
            raise DomainExists(f"domain {name!r} exists")
        self.domains[name] = FakeDomain(name, ET.fromstring(xml).findtext("uuid") or "", xml,
                                        old.state if old else "shutoff")
        return name

    async def inactive_xml(self, name: str) -> str:
        d = self._get(name)
        return d.inactive or d.xml

    async def start(self, name: str, *, paused: bool = False) -> None:
        await self._hook("start", name)
        d = self._get(name)
        if d.inactive is not None:
            d.xml, d.inactive = d.inactive, None
        d.state = "paused" if paused else "running"

    async def destroy(self, name: str) -> None:
        if name in self.domains:
            self.domains[name].state = "shutoff"

    async def undefine(self, name: str) -> None:
        await self._hook("undefine", name)
        self.domains.pop(name, None)

    # By identity: checked, then the by-name call (which a subclass may extend) on the very domain.
    async def destroy_id(self, name: str, uuid: str) -> Outcome:
        outcome = self._outcome(name, uuid)
        if outcome is Outcome.DONE:
            await self.destroy(name)
        return outcome

    async def undefine_id(self, name: str, uuid: str) -> Outcome:
        outcome = self._outcome(name, uuid)
        if outcome is Outcome.DONE:
            await self.undefine(name)
        return outcome

    async def snapshot_disks(self, name: str, overlays: dict[str, Path], *, reuse: bool = False) -> None:
        await self._hook("snapshot_disks", name)
        if reuse:
            missing = [str(p) for p in overlays.values() if not p.exists()]
            assert not missing, f"reused overlays must exist: {missing}"
        d = self._get(name)
        root = ET.fromstring(d.xml)
        for disk in root.iterfind("./devices/disk"):
            tgt, src = disk.find("target"), disk.find("source")
            if tgt is None or src is None:
                continue
            dev = tgt.get("dev", "")
            if dev in overlays:
                overlays[dev].write_bytes(image_bytes("overlay", src.get("file", "")))
                src.set("file", str(overlays[dev]))
        d.xml = ET.tostring(root, encoding="unicode")

    async def agent(self, name: str, command: str, arguments: dict[str, Any] | None = None,
                    *, timeout_s: int = 10) -> Any:
        await self._hook("agent", name)
        self.agent_log.append((name, command))
        if name in self.guests:
            return await self.guests[name].agent(command, arguments or {})
        if command == "guest-network-get-interfaces":
            # The guest's NIC has the domain's MAC (as after a replug).
            macs = [m.get("address", "") for m in ET.fromstring(self._get(name).xml).iterfind(
                "./devices/interface/mac")] or ["52:54:00:00:00:99"]
            ifaces = self.interfaces.get(name, [{"name": "eth0", "ip-addresses": [
                {"ip-address": "10.0.2.15", "ip-address-type": "ipv4", "prefix": 24}]}])
            # As many NICs as both lists name (a test may give fewer interfaces than MACs).
            return [{"hardware-address": mac, **i} for i, mac in zip(ifaces, macs, strict=False)]
        return {}

    async def agent_exec(self, name: str, argv: list[str], *, stdin: bytes = b"",
                         timeout_s: float = 30.0) -> tuple[int, str]:
        await self._hook("agent_exec", name)
        self.exec_log.append((name, argv, stdin))
        if name in self.guests:
            return await self.guests[name].agent_exec(argv)
        if any("IC-DONE" in a for a in argv):  # the identity reset script
            return 0, ("IC-RESULT machine_id reset new\nIC-RESULT ssh_host_keys not_present no keys\n"
                       "IC-DONE\n")
        return 0, "ok"

    async def set_link(self, name: str, mac: str, *, up: bool) -> None:
        await self._hook("set_link", name)
        assert self._get(name).state == ("running" if up else "paused") or up

    async def replace_nic(self, name: str, mac: str, *, link_up: bool, timeout_s: float) -> None:
        await self._hook("replace_nic", name)
        assert self._get(name).state == "running", "NICs are replaced in a running guest"

    async def ram_file(self, name: str, alias: str = "pc.ram") -> tuple[Path, bool] | None:
        await self._hook("ram_file", name)
        self._get(name)
        return None  # no fake domain has file-backed RAM

    async def qemu_facts(self, name: str) -> QemuFacts:
        await self._hook("qemu_facts", name)
        if self._get(name).state not in ("running", "paused"):
            raise LibvirtError(f"QEMU version of {name!r}: domain is not running")
        return self.qemu

    async def save_state(self, name: str, path: Path, *, ignore_shared: bool = False,
                         mapped_ram_channels: int = 0, timeout_s: float = 120.0) -> dict[str, Any]:
        await self._hook("save_state", name)
        if mapped_ram_channels and not self.qemu.mapped_ram:
            raise LibvirtError(f"the mapped-ram format needs QEMU 9.0 or later; this domain runs QEMU {self.qemu.text}")
        # The header says how it was written: a load must say the same.
        path.write_bytes(f"state mapped-ram={mapped_ram_channels}".encode())
        return {}

    async def load_state(self, name: str, path: Path, *, ignore_shared: bool = False,
                         mapped_ram_channels: int = 0, timeout_s: float = 120.0) -> None:
        await self._hook("load_state", name)
        assert path.exists()
        header = path.read_bytes()
        if header.startswith(b"state mapped-ram=") and header != f"state mapped-ram={mapped_ram_channels}".encode():
            raise LibvirtError(f"load of {path} with mapped_ram_channels={mapped_ram_channels}: it was saved as "
                               f"{header.decode()!r}")

    async def migrate_live(self, name: str, target: str, *, downtime_ms: int, auto_converge: bool = True) -> None:
        await self._hook("migrate_live", name)
        src, dst = self._get(name), self._get(target)
        if src.migration in ("active", "pre-switchover"):
            raise LibvirtError(f"{name!r} is already being migrated")
        assert dst.state == "paused" and "incoming" in dst.xml, "the target waits for an incoming migration"
        src.migration, src.migrating_to, src.was_running = "active", target, src.state == "running"

    async def wait_migration(self, name: str, *, until: tuple[str, ...], timeout_s: float) -> MigrationInfo:
        """The fake's migrations move at once: active -> pre-switchover (source stopped) -> completed."""
        await self._hook("wait_migration", name)
        d = self._get(name)
        if d.migration == "active" and "pre-switchover" in until:
            d.migration, d.state = "pre-switchover", "paused"
        elif d.migration == "none" and d.state == "paused" and "incoming" in d.xml:
            d.migration = "completed"  # the incoming side, once its source completed
        if d.migration not in until:
            raise LibvirtError(f"migration of {name!r} is {d.migration}, not {'/'.join(until)}")
        return MigrationInfo(d.migration, {"ram": {"transferred": 4096}}, time.monotonic())

    async def continue_migration(self, name: str) -> None:
        await self._hook("continue_migration", name)
        d = self._get(name)
        if d.migration != "pre-switchover":
            raise LibvirtError(f"migration of {name!r} is not at pre-switchover")
        d.migration = "completed"

    async def cancel_migration(self, name: str) -> bool:
        await self._hook("cancel_migration", name)
        d = self._get(name)
        if d.migration not in ("active", "pre-switchover"):
            return False
        if d.migration == "pre-switchover" and d.was_running:
            d.state = "running"  # QEMU resumes a source it stopped for the switchover
        d.migration = "cancelled"
        return True

    async def backing_chain(self, name: str, target: str) -> list[Path]:
        """The disk's chain as the fake images' ``backing=`` lines say (see :func:`image_chain`)."""
        await self._hook("backing_chain", name)
        for disk in file_disks(self._get(name).xml):
            if disk.target == target:
                return image_chain(disk.path)
        raise LibvirtError(f"{name!r} has no disk {target!r}")

    async def block_pull(self, name: str, target: str, *, base: Path | None, timeout_s: float) -> None:
        await self._hook("block_pull", name)
        await self.backing_chain(name, target)


if TYPE_CHECKING:
    # mypy: the fake has every method of the Protocol, with compatible signatures.
    _fake_is_a_hypervisor: Hypervisor = FakeHypervisor()


class FakeStorage(StorageBackend):
    """File-creating storage backend without qemu-img."""

    name = "fake"

    async def create_source_delta(self, *, ctx: StunContext, record: Recorder) -> dict[str, Path]:
        overlays = {}
        for d in ctx.source.disks:
            p = self.config.delta_dir / f"{ctx.source.name}.{d.target}.{ctx.job_id}.qcow2"
            await record(ResourceKind.SOURCE_DELTA, str(p))
            overlays[d.target] = p
        self.config.delta_dir.mkdir(parents=True, exist_ok=True)
        await self.virt.snapshot_disks(ctx.source.name, overlays)
        return {d.target: d.path for d in ctx.source.disks}

    async def create_clone_delta(self, *, ctx: StunContext, clone: CloneTarget, record: Recorder) -> dict[str, Path]:
        out = {}
        for tgt in ctx.tops:
            p = clone.dir / f"{tgt}.qcow2"
            await record(ResourceKind.FILE, str(p), clone=clone.name)
            p.write_bytes(image_bytes("delta", str(ctx.tops[tgt])))
            out[tgt] = p
        return out

    async def remove(self, *, paths: list[Path]) -> None:
        for p in paths:
            p.unlink(missing_ok=True)

    async def chain_depth(self, *, path: Path, fmt: str) -> int:
        return 2

    async def chain(self, *, path: Path, fmt: str) -> list[Path]:
        return image_chain(path)


class RoomyHost(HostProbe):
    """A host probe for admission (``jobs.capacity.HostProbe``) with room for anything: 1 TiB free everywhere."""

    def mem_available_mib(self) -> float:
        return float(1 << 20)

    def filesystem(self, path: Path) -> tuple[int, float]:
        return 0, float(1 << 20)

    def ram_dir(self) -> tuple[Path, bool]:
        return Path("/var/lib/libvirt/qemu/ram"), True


def fake_engine(config: Any, store: Any, virt: FakeHypervisor, memories: tuple[str, ...] = ("saverestore",)) -> Any:
    """An Engine on the fake hypervisor and storage, with real memory backends (by name: saverestore)."""
    from instaclone import backends
    from instaclone.jobs.engine import Engine

    return Engine(config=config, store=store, virt=virt, storage=FakeStorage(config=config, virt=virt),
                  memory=[backends.memory_backend(m)(config=config, virt=virt) for m in memories])


async def fake_world(tmp_path: Path, **sections: Any) -> tuple[Any, Any, FakeHypervisor]:
    """(config, open journal, fake hypervisor with a running source "src") under ``tmp_path``.

    ``sections`` replace fields per config section, e.g. ``clone={"max_count": 2}``
    (``qcow2=``, ``filecow=`` and ``saverestore=``: the backends' sections); the caller closes the journal.
    """
    from dataclasses import replace

    from instaclone import config as cfg
    from instaclone.store import Store
    from instaclone_plugins.filecow import FileCowSettings
    from instaclone_plugins.qcow2 import Qcow2Settings
    from instaclone_plugins.saverestore import SaveRestoreSettings

    backends = {"qcow2": ("storage.qcow2", Qcow2Settings), "filecow": ("memory.filecow", FileCowSettings),
                "saverestore": ("memory.saverestore", SaveRestoreSettings)}
    c = cfg.Config()
    c = replace(c, daemon=replace(c.daemon, state_dir=tmp_path / "state"))
    for name, changes in sections.items():
        if name in backends:
            section, cls = backends[name]
            c = c.with_section(section, replace(c.section(section, cls), **changes))
        else:
            c = replace(c, **{name: replace(getattr(c, name), **changes)})
    store = Store(c.store_path)
    await store.open()
    virt = FakeHypervisor()
    base = tmp_path / "base.qcow2"
    base.write_bytes(b"base")
    virt.add_source("src", base)
    return c, store, virt


@asynccontextmanager
async def fake_api(tmp_path: Path, memories: tuple[str, ...] = ("saverestore",),
                   ) -> AsyncIterator[tuple[Any, FakeHypervisor, Path]]:
    """The control API on a Unix socket over a fake engine: (client, fake hypervisor, socket path)."""
    from aiohttp import web

    from instaclone.api import RUNNER_ARGS, make_app
    from instaclone.jobs.gc import GarbageCollector

    from .apiclient import Api

    c, store, virt = await fake_world(tmp_path)
    engine = fake_engine(c, store, virt, memories)
    runner = web.AppRunner(make_app(engine, store, gc=GarbageCollector(engine.svc)), **RUNNER_ARGS)
    await runner.setup()
    sock = tmp_path / "ctl.sock"
    await web.UnixSite(runner, str(sock)).start()
    services = asyncio.get_running_loop().create_task(engine.run_background())
    try:
        async with Api(sock) as client:
            yield client, virt, sock
    finally:
        services.cancel()
        with suppress(asyncio.CancelledError):
            await services
        await engine.shutdown(5)
        await runner.cleanup()
        await store.close()


@dataclass
class FakeProcess:
    """A command a FakeGuestAgent runs for guest-exec: its output files and how it ended."""

    argv: list[str]
    env: dict[str, str]
    stdin: bytes
    out: bytearray
    err: bytearray
    task: asyncio.Task[int] | None = None
    signal: int | None = None


class FakeGuestAgent:
    """A guest agent answering like qemu-guest-agent, for instaclone.jobs.guestexec's unit tests.

    Files live in ``files`` (path -> bytes, directories in ``dirs``). guest-exec
    of instaclone's exec wrapper runs ``programs[argv[0]](proc)`` (an async
    function writing to ``proc.out``/``proc.err`` and returning the exit code)
    as a task; the kill script cancels it (signal 9). ``sha256sum`` and the
    put script run here in Python; ``corrupt`` makes the guest's copy differ.
    """

    def __init__(self) -> None:
        self.files: dict[str, bytearray] = {}
        self.dirs: set[str] = {"/", "/tmp", "/run", "/etc"}
        self.handles: dict[int, list[Any]] = {}  # handle -> [data, position]
        self.procs: dict[int, FakeProcess] = {}
        self.programs: dict[str, Any] = {}
        self.corrupt = False
        self._next = 1000
        self.commands: list[str] = []

    def _id(self) -> int:
        self._next += 1
        return self._next

    async def agent(self, command: str, a: dict[str, Any]) -> Any:
        import base64
        import posixpath

        self.commands.append(command)
        if command == "guest-ping":
            return {}
        if command == "guest-file-open":
            path, mode = a["path"], a.get("mode", "r")
            if posixpath.dirname(path) not in self.dirs or (mode.startswith("r") and path not in self.files):
                raise LibvirtError(f"guest agent guest-file-open: failed to open file '{path}' (mode: '{mode}'): "
                                f"No such file or directory")
            if path in self.dirs and mode.startswith(("w", "a")):
                raise LibvirtError(f"failed to open file '{path}' (mode: '{mode}'): Is a directory")
            if mode.startswith("w"):
                self.files[path] = bytearray()
            h = self._id()
            self.handles[h] = [self.files[path], 0]
            return h
        if command == "guest-file-read":
            data, pos = self.handles[a["handle"]]
            chunk = bytes(data[pos:pos + a.get("count", 4096)])
            self.handles[a["handle"]][1] = pos + len(chunk)
            out: dict[str, Any] = {"count": len(chunk), "eof": pos + len(chunk) >= len(data)}
            if chunk:
                out["buf-b64"] = base64.b64encode(chunk).decode()
            return out
        if command == "guest-file-write":
            data, pos = self.handles[a["handle"]]
            buf = base64.b64decode(a["buf-b64"])
            data[pos:pos + len(buf)] = buf
            self.handles[a["handle"]][1] = pos + len(buf)
            return {"count": len(buf), "eof": False}
        if command == "guest-file-seek":
            data, pos = self.handles[a["handle"]]
            base = {"set": 0, "cur": pos, "end": len(data)}[a["whence"]]
            self.handles[a["handle"]][1] = base + a["offset"]
            return {"position": base + a["offset"], "eof": False}
        if command == "guest-file-close":
            del self.handles[a["handle"]]
            return {}
        if command == "guest-exec":
            return {"pid": self._exec(a)}
        if command == "guest-exec-status":
            proc = self.procs[a["pid"]]
            if proc.task is None or not proc.task.done():
                return {"exited": False}
            del self.procs[a["pid"]]
            if proc.signal is not None:
                return {"exited": True, "signal": proc.signal}
            return {"exited": True, "exitcode": proc.task.result()}
        raise LibvirtError(f"guest agent {command}: CommandNotFound")

    def _exec(self, a: dict[str, Any]) -> int:
        args = a.get("arg", [])
        assert a["path"] == "/bin/sh" and 'exec "$@"' in args[1], a  # only instaclone's exec wrapper
        base, has_in, argv = args[3], args[4], args[5:]
        for path in (base + ".out", base + ".err"):
            assert path in self.files, f"{path} not created before the start"
        proc = FakeProcess(argv, dict(e.split("=", 1) for e in a.get("env", [])),
                           bytes(self.files[base + ".in"]) if has_in == "1" else b"",
                           self.files[base + ".out"], self.files[base + ".err"])
        for suffix in (".in", ".out", ".err"):  # the wrapper unlinks them; the handles still read
            self.files.pop(base + suffix, None)
        program = self.programs.get(argv[0])
        pid = self._id()
        self.procs[pid] = proc

        async def run() -> int:
            if program is None:
                proc.err += f"sh: {argv[0]}: not found\n".encode()
                return 127
            return int(await program(proc))

        proc.task = asyncio.get_running_loop().create_task(run())
        return pid

    async def agent_exec(self, argv: list[str]) -> tuple[int, str]:
        import hashlib

        if argv[0] == "mkdir":
            self.dirs.add(argv[-1])
            return 0, ""
        if argv[0] == "rm":
            for p in argv[2:]:
                self.files.pop(p, None)
            return 0, ""
        if argv[0] == "sha256sum":
            if argv[1] in self.dirs:
                return 1, f"sha256sum: {argv[1]}: Is a directory"
            return 0, f"{hashlib.sha256(self.files[argv[1]]).hexdigest()}  {argv[1]}\n"
        script = argv[2]
        if "kill -STOP" in script:
            for pid, proc in self.procs.items():
                if pid == int(argv[4]) and proc.task is not None and not proc.task.done():
                    proc.signal = 9
                    proc.task.cancel()
                    with suppress(asyncio.CancelledError):
                        await proc.task
            return 0, ""
        if 'sha256sum "$t"' in script:
            tmp, want, _mode, dst = argv[4:8]
            data = self.files.pop(tmp)
            got = hashlib.sha256(data + (b"!" if self.corrupt else b"")).hexdigest()
            if got != want:
                return 3, got + "\n"
            if dst in self.dirs:
                return 4, ""
            self.files[dst] = data
            return 0, ""
        raise AssertionError(f"unexpected agent_exec {argv}")
