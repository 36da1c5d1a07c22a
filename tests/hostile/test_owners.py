"""Owners and policy (issue 21, item 5): local users must not reach each other's VMs.

Real users and groups are made for each test (useradd/groupadd with unique
names, removed at teardown); each request is made by a real process of one of
them (``setpriv --reuid --regid --init-groups``) on a real Unix socket, so
the daemon sees their credentials as the kernel gives them. Every group that
grants access is a *supplementary* group of its users (their primary group
grants nothing): access depends on the daemon reading the peer's groups.
The engine runs on the fake hypervisor: these claims are about policy.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import secrets
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from tests.support.fakes import fake_engine, fake_world

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv") or not shutil.which("useradd"),
                                reason="needs root, setpriv and useradd (makes real users)")

REPO = Path(__file__).resolve().parents[2]
PYTHONPATH = f"{REPO / 'daemon'}:{REPO / 'plugins'}"

#: One HTTP call on the control socket, printed as {"status", "text"}: run as another user.
_CALL = r"""
import asyncio, json, sys
import aiohttp

async def main():
    sock, method, path, body = sys.argv[1:5]
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=sock)) as s:
        async with s.request(method, "http://instaclone" + path, data=body.encode() if body else None,
                             headers={"Content-Type": "application/json"} if body else {}) as r:
            print(json.dumps({"status": r.status, "text": await r.text()}))

asyncio.run(main())
"""

#: Connect, then hand the connection to a child and exit: the request is sent after the process that
#: connected is gone (its /proc/<pid> with it, or taken by another process).
_CALL_AFTER_EXIT = r"""
import json, os, socket, sys, time

sock_path, path = sys.argv[1:3]
s = socket.socket(socket.AF_UNIX)
s.connect(sock_path)
parent = os.getpid()
if os.fork():
    os._exit(0)
while os.getppid() == parent:
    time.sleep(0.01)
time.sleep(0.2)
s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
raw = b""
while chunk := s.recv(65536):
    raw += chunk
head, _, body = raw.partition(b"\r\n\r\n")
print(json.dumps({"status": int(head.split()[1]), "text": body.decode(errors="replace")}))
"""


@dataclass
class Accounts:
    """The test's users and groups (names unique per test)."""

    tag: str
    groups: dict[str, str] = field(default_factory=dict)  # role -> group name
    users: dict[str, str] = field(default_factory=dict)  # role -> user name

    def uid(self, role: str) -> int:
        return pwd.getpwnam(self.users[role]).pw_uid


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@pytest.fixture
def accounts() -> Iterator[Accounts]:
    """Groups plain (everyone's primary: grants nothing), writers, readers, admins, ci; users:
    alice and bob (writers), carol (admin), dave (writer in ci), rita (reader only)."""
    acc = Accounts(secrets.token_hex(3))
    try:
        for role in ("plain", "writers", "readers", "admins", "ci"):
            acc.groups[role] = f"ic{acc.tag}{role[:3]}"
            _run("groupadd", acc.groups[role])
        members = {"alice": ["writers"], "bob": ["writers"], "carol": ["admins"], "dave": ["writers", "ci"],
                   "rita": ["readers"]}
        for role, extra in members.items():
            acc.users[role] = f"ic{acc.tag}{role}"
            _run("useradd", "-M", "-N", "-d", "/nonexistent", "-s", "/usr/sbin/nologin", "-g", acc.groups["plain"],
                 "-G", ",".join(acc.groups[g] for g in extra), acc.users[role])
        yield acc
    finally:
        for name in acc.users.values():
            subprocess.run(["userdel", name], capture_output=True)
        for name in acc.groups.values():
            subprocess.run(["groupdel", name], capture_output=True)


@dataclass
class Daemon:
    sock: Path
    acc: Accounts
    virt: Any
    engine: Any

    async def call(self, role: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """``method path`` as user ``role`` ("root": this process's user): (status, JSON body or text)."""
        argv = [sys.executable, "-c", _CALL, str(self.sock), method, path, json.dumps(body) if body is not None else ""]
        out = await _as(self.acc, role, argv)
        answer = json.loads(out)
        try:
            return answer["status"], json.loads(answer["text"])
        except ValueError:
            return answer["status"], answer["text"]

    async def cli(self, role: str, *args: str) -> tuple[int, str, str]:
        """The CLI as user ``role``: (exit status, stdout, stderr)."""
        argv = [sys.executable, "-m", "instaclone.cli", "--socket", str(self.sock), *args]
        proc = await asyncio.create_subprocess_exec(*_setpriv(self.acc, role), *argv, stdout=subprocess.PIPE,
                                                    stderr=subprocess.PIPE, env=_env())
        out, err = await proc.communicate()
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()


def _env() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": PYTHONPATH, "HOME": "/",
            "LANG": "C.UTF-8"}


def _setpriv(acc: Accounts, role: str) -> list[str]:
    if role == "root":
        return []
    return ["setpriv", f"--reuid={acc.users[role]}", f"--regid={acc.groups['plain']}", "--init-groups", "--"]


async def _as(acc: Accounts, role: str, argv: list[str]) -> str:
    proc = await asyncio.create_subprocess_exec(*_setpriv(acc, role), *argv, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE, env=_env())
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode()


@asynccontextmanager
async def daemon(acc: Accounts, **access: Any) -> AsyncIterator[Daemon]:
    """The control API (engine on the fake hypervisor, pool keeper running) on a socket every test user
    can open: write_groups = writers, read_groups = readers, plus ``access``; sources "src" and "other"."""
    from aiohttp import web

    from instaclone.api import RUNNER_ARGS, make_app

    top = Path(tempfile.mkdtemp(prefix="instaclone-owners-"))
    top.chmod(0o755)
    runner = None
    services = None
    c, store, virt = await fake_world(top, pools={"check_interval_s": 0.2},
                                        clone={"stun_deadline_ms": 5000, "step_timeout_s": 30})
    try:
        c = replace(c, access=replace(c.access, write_groups=(acc.groups["writers"],),
                                      read_groups=(acc.groups["readers"],), **access))
        other = top / "other.qcow2"
        other.write_bytes(b"other")
        virt.add_source("other", other)
        engine = fake_engine(c, store, virt)
        runner = web.AppRunner(make_app(engine, store), **RUNNER_ARGS)
        await runner.setup()
        sock = top / "ctl.sock"
        await web.UnixSite(runner, str(sock)).start()
        sock.chmod(0o666)  # the groups in [access] are the gate here, not the socket's mode
        services = asyncio.get_running_loop().create_task(engine.run_background())
        yield Daemon(sock, acc, virt, engine)
    finally:
        if services is not None:
            services.cancel()
            with suppress(asyncio.CancelledError):
                await services
        if runner is not None:
            await runner.cleanup()
        await store.close()
        shutil.rmtree(top)


async def _clone(d: Daemon, role: str, name: str, source: str = "src", **extra: Any) -> dict[str, Any]:
    status, body = await d.call(role, "POST", "/v1/jobs?wait=20", {"source": source, "name": name, **extra})
    assert status == 201 and body["job"]["state"] == "Unstunned", body
    job: dict[str, Any] = body["job"]
    return job


def _names(body: dict[str, Any], key: str = "clones") -> set[str]:
    return {c["name"] for c in body[key]}


async def test_a_writer_reaches_only_its_own_clones_and_jobs(accounts: Accounts) -> None:
    """bob (same write group as alice) cannot see, exec into, copy to or from, destroy, or clone alice's
    clone, nor see her job, its script and config, or its events; root can."""
    async with daemon(accounts) as d:
        job = await _clone(d, "alice", "a1", config={"token": "alice-secret"}, script="echo alice-script")
        await _clone(d, "bob", "b1")

        status, body = await d.call("bob", "GET", "/v1/clones")
        assert status == 200 and _names(body) == {"b1"}, body
        status, body = await d.call("alice", "GET", "/v1/clones")
        assert _names(body) == {"a1"} and body["clones"][0]["owner"] == accounts.uid("alice")
        assert job["owner"] == accounts.uid("alice")
        status, body = await d.call("bob", "GET", "/v1/jobs")
        assert "alice-secret" not in json.dumps(body) and "alice-script" not in json.dumps(body), body
        assert {j["id"] for j in body["jobs"]} != set() and job["id"] not in {j["id"] for j in body["jobs"]}
        status, body = await d.call("bob", "GET", f"/v1/jobs/{job['id']}")
        assert status == 404 and body["error"]["code"] == "not_found", body
        status, body = await d.call("bob", "GET", "/v1/events?tail=1000")
        seen = [json.loads(line)["data"] for line in body.splitlines()]
        assert seen and all(e["job_id"] != job["id"] and "a1" not in e["clones"] for e in seen), body

        # Acting on alice's clone: 404, as for a clone that does not exist.
        for method, path, payload in [
            ("POST", "/v1/clones/a1/exec", {"argv": ["id"]}),
            ("GET", "/v1/clones/a1/files?path=/etc/shadow", None),
            ("PUT", "/v1/clones/a1/files?path=/tmp/x", None),
            ("DELETE", "/v1/clones/a1", None),
            ("POST", "/v1/clones/a1/release", None),
        ]:
            status, body = await d.call("bob", method, path, payload)
            assert status == 404 and body["error"]["code"] == "not_found", (method, path, body)
        # Nor may alice's clone be bob's source: cloning, freezing, checking or preparing it.
        for method, path, payload in [("POST", "/v1/jobs", {"source": "a1", "name": "b2"}),
                                      ("POST", "/v1/sources/a1/freeze", None),
                                      ("POST", "/v1/sources/a1/prepare", {"dry_run": True}),
                                      ("GET", "/v1/sources/a1/check", None)]:
            status, body = await d.call("bob", method, path, payload)
            assert status == 403 and body["error"]["code"] == "forbidden", (path, body)
            assert body["error"]["rule"] == "clone owner", body
        assert "a1" in d.virt.domains and "b2" not in d.virt.domains

        # The CLI says so, without a traceback.
        rc, _, err = await d.cli("bob", "destroy", "a1")
        assert rc == 1 and "not_found" in err and "Traceback" not in err, err
        rc, _, err = await d.cli("bob", "exec", "a1", "--", "id")
        assert rc == 125 and "not_found" in err and "Traceback" not in err, err

        # alice reaches her own clone (the fake guest has no agent: past the policy, the engine answers).
        status, body = await d.call("alice", "POST", "/v1/clones/a1/exec", {"argv": ["id"]})
        assert status != 404, body
        # root sees everything and may destroy it.
        status, body = await d.call("root", "GET", "/v1/clones")
        assert _names(body) == {"a1", "b1"}
        status, body = await d.call("root", "DELETE", "/v1/clones/a1")
        assert status == 200, body


async def test_an_admin_group_reaches_every_users_objects(accounts: Accounts) -> None:
    """carol (access.admin_groups, in no write group) sees alice's job with its config, and destroys her
    clone; without admin_groups she could not."""
    async with daemon(accounts, admin_groups=(accounts.groups["admins"],)) as d:
        job = await _clone(d, "alice", "a1", config={"token": "alice-secret"})
        status, body = await d.call("carol", "GET", "/v1/clones")
        assert _names(body) == {"a1"}
        status, body = await d.call("carol", "GET", f"/v1/jobs/{job['id']}")
        assert status == 200 and body["job"]["spec"]["config"] == {"token": "alice-secret"}
        status, body = await d.call("carol", "GET", "/v1/events?tail=1000")
        assert job["id"] in body
        status, body = await d.call("carol", "DELETE", "/v1/clones/a1")
        assert status == 200, body
        assert "a1" not in d.virt.domains


async def test_a_reader_sees_no_other_users_script_or_config(accounts: Accounts) -> None:
    """rita (read_groups only) sees no job's script or guest config but her own (she has none)."""
    async with daemon(accounts) as d:
        await _clone(d, "alice", "a1", config={"token": "alice-secret"}, script="echo alice-script")
        for path in ("/v1/jobs", "/v1/events?tail=1000", "/v1/clones"):
            status, body = await d.call("rita", "GET", path)
            assert status == 200 and "alice-secret" not in json.dumps(body), (path, body)
            assert "alice-script" not in json.dumps(body), (path, body)
        status, body = await d.call("rita", "GET", "/v1/clones")
        assert _names(body) == set()
        # A reader may not change anything, and the refusal names the rule.
        status, body = await d.call("rita", "DELETE", "/v1/clones/a1")
        assert status == 403 and body["error"]["rule"] == "access.write_groups", body


async def test_access_sources_binds_per_group(accounts: Accounts) -> None:
    """With access.sources, dave (group ci: "src") may clone src, not "other"; bob (no listed group) no
    source at all; refusals are 403 forbidden naming access.sources, in the API and the CLI (exit 4);
    admins are not bound."""
    rules = ((accounts.groups["ci"], ("sr?",)),)
    async with daemon(accounts, sources=rules, admin_groups=(accounts.groups["admins"],)) as d:
        await _clone(d, "dave", "d1")
        status, body = await d.call("dave", "POST", "/v1/jobs", {"source": "other", "name": "d2"})
        assert status == 403 and body["error"]["code"] == "forbidden", body
        assert body["error"]["rule"] == "access.sources" and "'other'" in body["error"]["message"], body
        for method, path, payload in [("POST", "/v1/jobs", {"source": "src", "name": "b1"}),
                                      ("POST", "/v1/sources/src/freeze", None),
                                      ("POST", "/v1/sources/src/prepare", {"dry_run": True}),
                                      ("POST", "/v1/pools", {"name": "bp", "source": "src", "size": 1})]:
            status, body = await d.call("bob", method, path, payload)
            assert status == 403 and body["error"]["rule"] == "access.sources", (path, body)
        rc, out, err = await d.cli("bob", "clone", "src", "--name", "b1")
        assert rc == 4 and "access.sources" in err and "Traceback" not in err, (rc, out, err)
        assert set(d.virt.domains) == {"src", "other", "d1"}
        assert d.virt.domains["src"].state == "running"
        await _clone(d, "carol", "c1", source="other")


async def test_claims_belong_to_the_claimer_and_pools_to_their_owner(accounts: Accounts) -> None:
    """alice's pool: bob's claim is bob's (alice cannot see, exec into or release it; bob can release it);
    bob cannot resize or delete alice's pool (403 pool owner) and sees its config redacted."""
    async with daemon(accounts) as d:
        status, body = await d.call("alice", "POST", "/v1/pools",
                                    {"name": "ap", "source": "src", "size": 1, "config": {"k": "alice-secret"}})
        assert status == 201, body
        status, body = await d.call("bob", "POST", "/v1/pools/ap/claim", {"wait_s": 30})
        assert status == 200, body
        member = body["claim"]["clone"]["name"]

        status, body = await d.call("alice", "GET", "/v1/clones")
        assert member not in _names(body)
        status, body = await d.call("bob", "GET", "/v1/pools/ap")
        assert body["pool"]["claimed"] == [member] and body["pool"]["config"] == {"k": "(redacted)"}, body
        status, body = await d.call("alice", "GET", "/v1/pools/ap")
        assert body["pool"]["claimed"] == [] and body["pool"]["config"] == {"k": "alice-secret"}, body
        assert body["pool"]["owner"] == accounts.uid("alice")
        for method, path, payload in [("POST", f"/v1/clones/{member}/release", None),
                                      ("POST", f"/v1/clones/{member}/exec", {"argv": ["id"]}),
                                      ("DELETE", f"/v1/clones/{member}", None)]:
            status, body = await d.call("alice", method, path, payload)
            assert status == 404 and body["error"]["code"] == "not_found", (path, body)
        for method, path, payload in [("PATCH", "/v1/pools/ap", {"size": 0}), ("DELETE", "/v1/pools/ap", None)]:
            status, body = await d.call("bob", method, path, payload)
            assert status == 403 and body["error"]["rule"] == "pool owner", (path, body)
        status, body = await d.call("bob", "GET", "/v1/clones")
        assert [c["owner"] for c in body["clones"] if c["name"] == member] == [accounts.uid("bob")], body
        status, body = await d.call("bob", "POST", f"/v1/clones/{member}/release")
        assert status == 200, body
        status, body = await d.call("alice", "DELETE", "/v1/pools/ap")
        assert status == 200, body


async def test_peer_groups_come_from_the_socket_not_proc(accounts: Accounts) -> None:
    """bob's write access is a supplementary group. A request sent after the process that connected has
    exited (its pid free for reuse) is judged by the groups it had at connect (SO_PEERGROUPS)."""
    async with daemon(accounts) as d:
        # A GET that needs write access (a guest file's).
        argv = [sys.executable, "-c", _CALL_AFTER_EXIT, str(d.sock), "/v1/clones/nope/files?path=/x"]
        answer = json.loads(await _as(accounts, "bob", argv))
        assert answer["status"] == 404, answer  # past access (write): the clone does not exist
        answer = json.loads(await _as(accounts, "rita", argv))
        assert answer["status"] == 403, answer  # a reader is refused all the same


async def test_rows_from_before_owners_are_root_s(tmp_path: Path, accounts: Accounts) -> None:
    """A journal of schema 4 migrates: its jobs and clones have no owner, and only admins reach them."""
    from instaclone.store import Store
    from instaclone.store.schema import MIGRATIONS

    path = tmp_path / "journal.sqlite"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    for version, step in MIGRATIONS:
        if version <= 4:
            step(db)
    db.execute("INSERT INTO meta VALUES ('schema_version', '4')")
    db.execute("INSERT INTO clones(name, uuid, source, job_id, dir, created_at) VALUES "
               "('old', 'u', 'src', 'j', '/nonexistent', 0)")
    db.close()
    store = Store(path)
    await store.open()
    try:
        rec = await store.get_clone("old")
        assert rec is not None and rec.owner is None
    finally:
        await store.close()
    async with daemon(accounts) as d:
        await d.engine.store.add_clones("old-job", [rec], [])
        status, body = await d.call("bob", "GET", "/v1/clones")
        assert status == 200 and _names(body) == set(), body
        status, body = await d.call("bob", "DELETE", "/v1/clones/old")
        assert status == 404, body
        status, body = await d.call("root", "GET", "/v1/clones")
        assert _names(body) == {"old"} and body["clones"][0]["owner"] is None, body


def test_access_sources_config_is_checked() -> None:
    """``[access.sources]`` takes a table of group -> source globs; anything else is a clear config error."""
    from instaclone import config as cfg
    from instaclone.errors import ConfigError

    ok = cfg.from_dict({"access": {"sources": {"ci": ["ci-*", "build-?"], "*": ["sandbox"]}}})
    assert ok.access.sources == (("ci", ("ci-*", "build-?")), ("*", ("sandbox",)))
    assert ok.access.sources_of({"ci"}) == ("ci-*", "build-?", "sandbox")
    assert ok.access.sources_of(set()) == ("sandbox",)
    assert cfg.from_dict({}).access.sources_of(set()) is None  # not set: every source
    for bad, where in [(["x"], "access.sources"), ({"ci": "x*"}, "access.sources.ci"),
                       ({"ci": ["../x"]}, "access.sources.ci"), ({"ci": [""]}, "access.sources.ci")]:
        with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
            cfg.from_dict({"access": {"sources": bad}})


@pytest.mark.integration
async def test_a_real_daemon_keeps_users_off_each_others_clone(accounts: Accounts) -> None:
    """A real daemon and a busybox guest: alice's clone runs her command; bob cannot exec into it, copy
    from it, destroy it or clone it (exit statuses as documented), and it keeps running until alice
    destroys it."""
    from tests.support.host import libvirt_ready
    from tests.support.vmlib import (
        Hypervisor,
        Scratch,
        assert_no_qemu_left,
        boot_source,
        make_config,
        running_daemon,
        undefine_new,
    )

    if libvirt_ready() is not None:
        pytest.skip(str(libvirt_ready()))
    prefix = f"ow{accounts.tag}-"
    src, a1 = f"{prefix}src", f"{prefix}a1"
    scratch = Scratch()
    virt = Hypervisor()
    await virt.connect()
    before = set(await virt.list_names())
    c = make_config(scratch)
    c = replace(c, daemon=replace(c.daemon, socket_mode=0o666),
                access=replace(c.access, write_groups=(accounts.groups["writers"],),
                               read_groups=(accounts.groups["readers"],)))
    real = await running_daemon(c)
    try:
        await boot_source(virt, scratch, src)
        d = Daemon(c.daemon.socket, accounts, virt, None)
        status, body = await d.call("alice", "POST", "/v1/jobs?wait=300",
                                    {"source": src, "name": a1, "customize": False})
        assert status == 201 and body["job"]["state"] == "Unstunned", body
        rc, out, err = await d.cli("alice", "exec", a1, "--", "echo", "alice was here")
        assert (rc, out) == (0, "alice was here\n"), err

        rc, out, err = await d.cli("bob", "exec", a1, "--", "echo", "bob was here")
        assert rc == 125 and "not_found" in err and out == "", (rc, out, err)
        rc, out, err = await d.cli("bob", "cp", f"{a1}:/etc/passwd", "-")
        assert rc == 1 and "not_found" in err and out == "", err
        rc, out, err = await d.cli("bob", "destroy", a1)
        assert rc == 1 and "not_found" in err, err
        rc, out, err = await d.cli("bob", "clone", a1, "--name", f"{prefix}b1")
        assert rc == 4 and "clone owner" in err and "Traceback" not in err, err
        rc, out, err = await d.cli("bob", "clones", "ls")
        assert rc == 0 and a1 not in out, out
        assert await virt.state(a1) == "running"

        rc, out, err = await d.cli("alice", "destroy", a1)
        assert rc == 0, err
    finally:
        await real.stop()
        await undefine_new(virt, before, prefix)
        await virt.close()
        scratch.cleanup()
    assert_no_qemu_left(scratch)
