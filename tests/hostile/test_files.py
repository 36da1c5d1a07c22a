"""Hostile tests of instaclone's files: private by default, symlink-safe as root, a confined unit.

Issue 21, items 2 (files private to the daemon and QEMU), 4 (no link
followed as root; the libvirt hook's alias) and 9 (systemd exposure).
"""

from __future__ import annotations

import asyncio
import grp
import io
import json
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from instaclone.hv import LibvirtHypervisor as Hypervisor
from tests.support.host import libvirt_ready
from tests.support.proclib import EXE, DaemonProcess, NotifySocket, write_config
from tests.support.vmlib import Api, Scratch, assert_no_qemu_left, boot_source

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "instacloned.service"

#: The most `systemd-analyze security` may score instacloned.service (issue 21: <= 4.0).
MAX_EXPOSURE = 4.0


# -- item 9: the unit's exposure -----------------------------------------------------------

def test_unit_exposure_at_most_4() -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not on PATH (package systemd)")
    proc = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(UNIT)],
                          capture_output=True, text=True, timeout=60)
    found = re.search(r"Overall exposure level for instacloned\.service: (\d+\.\d+)", proc.stdout)
    assert found is not None, proc.stdout + proc.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE, found.group(0)


# -- item 2: private by default --------------------------------------------------------------

RAM_ROOT = Path("/var/lib/libvirt/qemu/ram")
PREFIX = "hf-"
#: An unprivileged user and group with no other groups (nobody:nogroup).
NOBODY = ("--reuid=65534", "--regid=65534", "--clear-groups")


def walk(root: Path) -> list[Path]:
    """``root`` and everything below it (links not followed)."""
    if not root.exists():
        return []
    out = [root]
    for dirpath, dirnames, filenames in os.walk(root):
        out += [Path(dirpath, n) for n in dirnames + filenames]
    return out


def exposed(paths: list[Path]) -> list[str]:
    """Each path with a permission bit for others, as 'mode uid:gid path'.

    A UNIX socket is the exception: libvirt makes the ones a clone's
    definition names (a serial port's, mode 0775 by QEMU's umask) in the
    clone's directory; it counts as exposed only if an unprivileged user can
    connect to it (the directories above it must stop them).
    """
    out = []
    for p in paths:
        try:
            st = p.lstat()
        except FileNotFoundError:  # gone while walking (a job's directory)
            continue
        if not st.st_mode & 0o007 or stat.S_ISLNK(st.st_mode):
            continue
        if stat.S_ISSOCK(st.st_mode) and connect_as_nobody(p).returncode != 0:
            continue
        out.append(f"{stat.filemode(st.st_mode)} {st.st_uid}:{st.st_gid} {p}")
    return out


def read_as_nobody(path: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["setpriv", *NOBODY, "head", "-c", "1", str(path)], capture_output=True, timeout=30)


def connect_as_nobody(path: Path) -> subprocess.CompletedProcess[bytes]:
    code = f"import socket; socket.socket(socket.AF_UNIX).connect({str(path)!r})"
    return subprocess.run(["setpriv", *NOBODY, "python3", "-c", code], capture_output=True, timeout=30)


@pytest.mark.integration
@pytest.mark.skipif(libvirt_ready() is not None, reason=str(libvirt_ready()))
async def test_nothing_the_daemon_makes_is_open_to_others(tmp_path: Path) -> None:
    """A clone of a running UEFI source (filecow's pre-copy: a shadow QEMU too), a freeze and a pool's refill;
    each job held at Configured to look."""
    scratch = Scratch()
    virt = Hypervisor()
    await virt.connect()
    notify = NotifySocket(tmp_path / "notify")
    conf = write_config(tmp_path / "d.toml", scratch.path, **{"memory.filecow": {"source_mode": "precopy"}})
    state = scratch.path / "state"
    src = f"{PREFIX}src"
    marker = tmp_path / "marker"
    found: list[str] = []
    seen: set[Path] = set()
    proc = DaemonProcess(conf, env={"NOTIFY_SOCKET": str(notify.path),
                                    "INSTACLONE_FAULT_PAUSE": f"Configured:3:{marker}"})
    mine = [state, RAM_ROOT / "instaclone"]

    def look() -> None:
        paths = [p for root in mine for p in walk(root)]
        seen.update(paths)
        found.extend(exposed(paths))

    async def held_job() -> None:
        """Look while the next job waits at Configured (its directory and memory image exist)."""
        end = time.monotonic() + 240
        while not marker.exists():
            assert time.monotonic() < end, f"no job reached Configured; log:\n{proc.log_text()[-3000:]}"
            await asyncio.sleep(0.1)
        look()
        marker.unlink()

    try:
        await boot_source(virt, scratch, src, file_backed_ram=True, firmware="uefi")
        proc.start()
        await notify.wait("READY", "1")
        async with Api(scratch.path / "ctl.sock") as api:
            call = asyncio.ensure_future(api.call("POST", "/v1/jobs?wait=300", {
                "source": src, "name": f"{PREFIX}c1", "keep_network": True}))
            await held_job()
            status, body = await call
            assert status == 201 and body["job"]["state"] == "Unstunned", body
            assert '"mode": "precopy"' in json.dumps(body), body  # not fallen back to a copy
            look()
            assert found == [], "open to others after a clone:\n" + "\n".join(found)
            clone_dir = state / "clones" / f"{PREFIX}c1"
            # Not world-readable, and not readable by an unprivileged user either.
            for f in (state / "journal.sqlite", clone_dir / "vda.qcow2",
                      *clone_dir.glob("*VARS*"), *clone_dir.glob("*nvram*")):
                st = f.stat()
                assert stat.S_IMODE(st.st_mode) == 0o600, f"{f}: {stat.filemode(st.st_mode)}"
                if f.parent == clone_dir:  # the clone's disk and NVRAM are QEMU's
                    assert st.st_uid == pwd.getpwnam("libvirt-qemu").pw_uid, f"{f}: owned by {st.st_uid}"
                r = read_as_nobody(f)
                assert r.returncode != 0 and b"Permission denied" in r.stderr, (f, r)
            assert any(p.name == "journal.sqlite-wal" for p in seen)
            status, body = await api.call("POST", "/v1/pools", {"name": "hfp", "source": src, "size": 1,
                                                                "freeze": True})
            assert status == 201, body
            await held_job()
            end = time.monotonic() + 240
            while True:
                status, body = await api.call("GET", "/v1/pools/hfp")
                if len(body["pool"]["idle"]) == 1:
                    break
                assert time.monotonic() < end, body
                await asyncio.sleep(0.3)
            look()
            frozen = [p for p in seen if "frozen" in p.parts]
            ram = [p for p in seen if p.name == "pc.ram"]
            assert frozen and ram, sorted(map(str, seen))
            for f in ram:
                if f.exists():
                    r = read_as_nobody(f)
                    assert r.returncode != 0, (f, r)
            status, body = await api.call("DELETE", "/v1/pools/hfp")
            assert status == 200, body
            status, body = await api.call("POST", f"/v1/sources/{src}/unfreeze")
            assert status == 200, body
            status, _ = await api.call("DELETE", f"/v1/clones/{PREFIX}c1")
            assert status == 200
        assert found == [], "\n".join(found)
    finally:
        proc.kill()
        for name in await virt.list_names():
            if name.startswith((PREFIX, "hfp-")):
                await virt.undefine(name)
        shutil.rmtree(RAM_ROOT / "instaclone" / f"frozen-{src}", ignore_errors=True)
        await virt.close()
        notify.close()
        scratch.cleanup()
    assert_no_qemu_left(scratch)


# -- item 2: webhook secrets from a private file; the installed config ----------------------

def test_webhook_secret_file_must_be_private_and_no_link(tmp_path: Path) -> None:
    from instaclone import config, events
    from instaclone.errors import ConfigError

    secret = events.new_secret()
    f = tmp_path / "ops.whsec"
    f.write_text(f"# rotated 2026-12\n{secret}\n")
    f.chmod(0o600)

    def load(path: Path) -> config.Config:
        return config.from_dict({"webhooks": {"endpoints": [
            {"name": "ops", "url": "https://hooks.example.com/x", "secret_file": str(path)}]}})

    assert load(f).webhooks.endpoints[0].secrets == (secret,)
    f.chmod(0o640)
    with pytest.raises(ConfigError, match=r"secret_file: .* is mode 0640; .* must be 0600 or stricter"):
        load(f)
    f.chmod(0o400)
    assert load(f).webhooks.endpoints[0].secrets == (secret,)
    link = tmp_path / "link.whsec"
    link.symlink_to(f)
    with pytest.raises(ConfigError, match=r"secret_file: .* is a symbolic link"):
        load(link)
    with pytest.raises(ConfigError, match=r"give one of 'secret', 'secrets' or 'secret_file'"):
        config.from_dict({"webhooks": {"endpoints": [{"url": "https://h.example/x", "secret": secret,
                                                      "secret_file": str(f)}]}})
    # Through the daemon's own check: a clear error, no traceback.
    conf = tmp_path / "d.toml"
    conf.write_text(f'[[webhooks.endpoints]]\nurl = "https://h.example/x"\nsecret_file = "{link}"\n')
    r = subprocess.run([str(EXE), "--check-config", "--config", str(conf)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "is a symbolic link" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_installer_writes_the_config_0640_root_instaclone(tmp_path: Path) -> None:
    from tests.support.installlib import Install

    inst = Install(tmp_path)
    inst.run("--no-start")
    st = (tmp_path / "etc" / "instaclone.toml").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 0, grp.getgrnam("instaclone").gr_gid)
    r = read_as_nobody(tmp_path / "etc" / "instaclone.toml")
    assert r.returncode != 0
    # An existing config open to others (an older install's 0644) loses that.
    (tmp_path / "etc" / "instaclone.toml").chmod(0o644)
    out, _ = inst.run("--no-start")
    assert "no longer" in out
    assert stat.S_IMODE((tmp_path / "etc" / "instaclone.toml").stat().st_mode) == 0o640


# -- item 4: links planted where the daemon creates or reads files ---------------------------

@pytest.fixture
def canary(tmp_path: Path) -> Path:
    """A root-owned file outside every directory the daemon works in: must never be read, written or punched."""
    outside = tmp_path / "outside"
    outside.mkdir(mode=0o700)
    f = outside / "canary"
    f.write_bytes(b"host secret\n" + bytes(1 << 20))  # 1 MiB of zeros after it: allocated, punchable
    f.chmod(0o600)
    os.sync()
    return f


def untouched(canary: Path) -> tuple[bytes, int, int]:
    st = canary.stat()
    return canary.read_bytes(), st.st_blocks, st.st_mtime_ns


async def test_clone_delta_is_never_created_through_a_planted_link(tmp_path: Path, canary: Path) -> None:
    """qemu-img create's target (a clone's vda.qcow2) planted as a link to a root file: refused, file untouched."""
    from instaclone.config import Config
    from instaclone.errors import StorageError
    from instaclone.hv import Disk, DomainInfo
    from instaclone.plugin_api import CloneTarget, StunContext
    from instaclone_plugins.qcow2 import Qcow2Storage

    top = tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(top), "16M"], check=True)
    clone_dir = tmp_path / "clone"
    clone_dir.mkdir()
    (clone_dir / "vda.qcow2").symlink_to(canary)
    before = untouched(canary)
    storage = Qcow2Storage(config=Config(), virt=None)  # type: ignore[arg-type]  # no libvirt call on this path
    source = DomainInfo("s", "u", "running", 0, "<domain/>", disks=(Disk("vda", top, "qcow2"),))
    ctx = StunContext("j1", source, tmp_path, tops={"vda": top})

    async def record(kind: object, ref: str, *, clone: str | None = None) -> int:
        return 1

    with pytest.raises(StorageError, match="cannot create"):
        await storage.create_clone_delta(ctx=ctx, clone=CloneTarget("c", "u", clone_dir), record=record)
    assert untouched(canary) == before


def test_nvram_and_ram_copies_never_read_or_write_through_links(tmp_path: Path, canary: Path) -> None:
    """A source's NVRAM or RAM file swapped for a link to a root file is not copied; a planted target is not written."""
    from instaclone.jobs.files import copy_private
    from instaclone.safefs import sparse_copy

    before = untouched(canary)
    qemu_dir = tmp_path / "qemu-writable"
    qemu_dir.mkdir()
    (qemu_dir / "src_VARS.fd").symlink_to(canary)
    (qemu_dir / "pc.ram").symlink_to(canary)
    for copy, src in ((copy_private, qemu_dir / "src_VARS.fd"), (sparse_copy, qemu_dir / "pc.ram")):
        dst = tmp_path / f"copy-of-{src.name}"
        with pytest.raises(OSError):
            copy(src, dst)
        assert not dst.exists(), f"{copy.__name__} copied the file behind a link"
    real = tmp_path / "real.fd"
    real.write_bytes(b"vars")
    (tmp_path / "planted").symlink_to(canary)
    for copy in (copy_private, sparse_copy):
        with pytest.raises(FileExistsError):
            copy(real, tmp_path / "planted")
    assert untouched(canary) == before


def test_ram_image_is_never_linked_or_punched_through_a_link(tmp_path: Path, canary: Path) -> None:
    from instaclone.errors import MemoryBackendError
    from instaclone_plugins.filecow import punch_ranges, punch_zero_pages

    before = untouched(canary)
    link = tmp_path / "pc.ram"
    link.symlink_to(canary)
    with pytest.raises(OSError):
        punch_zero_pages(link)
    with pytest.raises(OSError):
        punch_ranges(link, [(0, 1 << 20)])
    from instaclone.safefs import link_file
    from instaclone_plugins.filecow import make_image_dir

    with pytest.raises(OSError):
        link_file(link, tmp_path / "frozen")
    assert not (tmp_path / "frozen").exists()
    # <ramdir>/instaclone swapped for a link to another directory: nothing is made there.
    ramdir = tmp_path / "ram"
    ramdir.mkdir()
    (ramdir / "instaclone").symlink_to(canary.parent, target_is_directory=True)
    with pytest.raises(MemoryBackendError, match="never used"):
        make_image_dir(ramdir / "instaclone" / "stun-j1")
    assert sorted(p.name for p in canary.parent.iterdir()) == ["canary"]
    assert untouched(canary) == before


def test_hook_with_a_dotdot_alias_deletes_nothing(tmp_path: Path, canary: Path) -> None:
    """The metadata's alias '../../outside/canary' (issue 21's '../../../../tmp/x'): nothing is unlinked or linked."""
    from instaclone.hv import domxml
    from instaclone_plugins import libvirt_hook
    from tests.support.fakes import SOURCE_XML

    ramdir = tmp_path
    frozen = ramdir / "instaclone" / "stun-j1" / "pc.ram"
    frozen.parent.mkdir(parents=True)
    frozen.write_bytes(b"memory")
    (ramdir / "7-hf-c").mkdir()
    xml = SOURCE_XML.format(name="hf-c", uuid="00000000-0000-0000-0000-0000000000aa", disk="/d.qcow2")
    xml = xml.replace("<domain type='qemu'>", "<domain type='qemu' id='7'>")
    xml = domxml.map_frozen_ram(xml, ram=frozen, ramdir=ramdir, incoming=False)
    xml = xml.replace(f'ramdir="{ramdir}"', f'ramdir="{ramdir}" alias="../outside/canary"')
    assert "../outside/canary" in xml
    before = untouched(canary)
    r = subprocess.run([sys.executable, libvirt_hook.__file__, "hf-c", "start", "begin", "-"], input=xml,
                       capture_output=True, text=True, timeout=30)
    assert canary.exists() and untouched(canary) == before, r.stderr
    assert r.returncode == 1 and "no grant" in r.stderr, r.stderr
    assert canary.stat().st_ino != frozen.stat().st_ino
    # A grant that names such an alias (it never does) is refused as well.
    grants = tmp_path / "grants"
    grants.mkdir(mode=0o700)
    st = frozen.stat()
    (grants / "00000000-0000-0000-0000-0000000000aa").write_text(json.dumps({
        "ram": str(frozen), "ramdir": str(ramdir), "alias": "../outside/canary", "dev": st.st_dev,
        "inode": st.st_ino}))
    (grants / "00000000-0000-0000-0000-0000000000aa").chmod(0o600)
    stdin = sys.stdin
    sys.stdin = io.StringIO(xml)
    try:
        assert libvirt_hook.main(["hook", "hf-c", "start", "begin", "-"], grants=grants) == 1
    finally:
        sys.stdin = stdin
    assert untouched(canary) == before
    assert not (ramdir / "7-hf-c" / "pc.ram").exists()


@pytest.mark.integration
@pytest.mark.skipif(libvirt_ready() is not None, reason=str(libvirt_ready()))
async def test_link_planted_at_a_running_jobs_ram_image_dir(tmp_path: Path, canary: Path) -> None:
    """While a real job is stunned, its RAM image directory's name is planted as a link to a root directory;
    in the next job, its device state file's name, as a link to a root file.

    The daemon makes or writes nothing through them: each job fails cleanly
    (source running, nothing of it left), and what is behind the links is as it was.
    """
    scratch = Scratch()
    virt = Hypervisor()
    await virt.connect()
    notify = NotifySocket(tmp_path / "notify")
    conf = write_config(tmp_path / "d.toml", scratch.path)
    src = f"{PREFIX}lsrc"
    marker = tmp_path / "marker"
    proc = DaemonProcess(conf, env={"NOTIFY_SOCKET": str(notify.path),
                                    "INSTACLONE_FAULT_PAUSE": f"MemoryLinked:4:{marker}"})
    planted: Path | None = None
    before = untouched(canary)
    try:
        await boot_source(virt, scratch, src, file_backed_ram=True)
        proc.start()
        await notify.wait("READY", "1")
        async with Api(scratch.path / "ctl.sock") as api:
            call = asyncio.ensure_future(api.call("POST", "/v1/jobs?wait=300", {
                "source": src, "name": f"{PREFIX}l1", "keep_network": True}))
            end = time.monotonic() + 240
            while not marker.exists():
                assert time.monotonic() < end, f"the job never reached MemoryLinked; log:\n{proc.log_text()[-3000:]}"
                await asyncio.sleep(0.05)
            planted = RAM_ROOT / "instaclone" / f"stun-{marker.read_text()}"
            planted.symlink_to(canary.parent, target_is_directory=True)
            _, body = await call
            job = body["job"]
            assert sorted(p.name for p in canary.parent.iterdir()) == ["canary"], "a file was made through the link"
            assert job["state"] == "Failed", job
            assert "never used" in job["error"]["message"], job["error"]
            assert await virt.state(src) == "running"
            assert not (scratch.path / "state" / "clones" / f"{PREFIX}l1").exists()
            assert f"{PREFIX}l1" not in await virt.list_names()
            # The next job: its device state file's name, in its job directory, planted as a
            # link to the root file (O_TRUNC through it would empty it).
            marker.unlink()
            call = asyncio.ensure_future(api.call("POST", "/v1/jobs?wait=300", {
                "source": src, "name": f"{PREFIX}l2", "keep_network": True}))
            end = time.monotonic() + 240
            while not marker.exists():
                assert time.monotonic() < end, f"the job never reached MemoryLinked; log:\n{proc.log_text()[-3000:]}"
                await asyncio.sleep(0.05)
            state_link = scratch.path / "state" / "jobs" / f"stun-{marker.read_text()}" / "device.state"
            state_link.symlink_to(canary)
            _, body = await call
            job = body["job"]
            assert untouched(canary) == before, "the state file was written through the link"
            assert job["state"] == "Failed" and "cannot create the state file" in job["error"]["message"], job
            assert await virt.state(src) == "running"
            assert not state_link.parent.exists()
        assert sorted(p.name for p in canary.parent.iterdir()) == ["canary"]
        assert untouched(canary) == before
    finally:
        proc.kill()
        if planted is not None and planted.is_symlink():
            planted.unlink()
        for name in await virt.list_names():
            if name.startswith(PREFIX):
                await virt.undefine(name)
        await virt.close()
        notify.close()
        scratch.cleanup()
    assert_no_qemu_left(scratch)


async def test_an_older_installs_state_is_made_private_at_start(tmp_path: Path) -> None:
    """A journal (0644) and state directories (0755) an older daemon made are narrowed when the daemon starts."""
    import sqlite3
    from dataclasses import replace

    from instaclone.config import Config
    from instaclone.store import Store

    state = tmp_path / "state"
    for d in (state, state / "clones", state / "jobs", state / "deltas", state / "frozen"):
        d.mkdir()
        d.chmod(0o755)
    store = state / "journal.sqlite"
    db = sqlite3.connect(store)
    db.execute("PRAGMA journal_mode=WAL")
    db.close()
    for p in state.glob("journal.sqlite*"):
        p.chmod(0o644)
    c = Config()
    c = replace(c, daemon=replace(c.daemon, state_dir=state))
    store = Store(c.store_path)
    await store.open()
    try:
        for p in state.glob("journal.sqlite*"):
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, f"{p}: {stat.filemode(p.stat().st_mode)}"
    finally:
        await store.close()
    from instaclone.daemon import prepare_dirs

    prepare_dirs(c)
    mode, gid = c.daemon.qemu_reach()
    for d in (state, state / "clones", state / "jobs", state / "deltas"):
        st = d.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (mode, gid if gid >= 0 else 0), d
    assert stat.S_IMODE((state / "frozen").stat().st_mode) == 0o700
    assert exposed(walk(state)) == []


def test_qemu_group_is_a_checked_config_key() -> None:
    from instaclone import config
    from instaclone.errors import ConfigError

    assert config.Config().daemon.qemu_group == ("kvm" if _group_exists("kvm") else "")
    assert config.from_dict({"daemon": {"qemu_group": ""}}).daemon.qemu_reach() == (0o711, -1)
    with pytest.raises(ConfigError, match=r"daemon.qemu_group: no group named 'no-such-group'"):
        config.from_dict({"daemon": {"qemu_group": "no-such-group"}})


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True
