"""The examples of the docs' "Python client library" page, run as they are, against the API over the fake engine.

The exec/files routes come from tests/support/guestroutes.py's fake (in front
of the real app's routes), so the CI example runs end to end: claim, put,
exec, get, release.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

from aiohttp import web

from instaclone import client as ic
from tests.support.fakes import FakeHypervisor, fake_engine, fake_world
from tests.support.guestroutes import FakeGuestRoutes

REPO = Path(__file__).resolve().parents[3]


def examples() -> list[str]:
    text = (REPO / "docs" / "guide" / "client.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, re.S)


@asynccontextmanager
async def api_with_guest(tmp_path: Path) -> AsyncIterator[tuple[Path, FakeHypervisor, FakeGuestRoutes]]:
    from instaclone.api import make_app
    from instaclone.jobs.gc import GarbageCollector

    c, store, virt = await fake_world(tmp_path, pools={"check_interval_s": 0.2})
    base = tmp_path / "tmpl.qcow2"
    base.write_bytes(b"base")
    virt.add_source("tmpl", base)
    engine = fake_engine(c, store, virt)
    guest = FakeGuestRoutes(any_clone=True)
    app = make_app(engine, store, gc=GarbageCollector(engine.svc))
    app.middlewares.insert(0, guest.middleware())
    runner = web.AppRunner(app)
    await runner.setup()
    sock = tmp_path / "ctl.sock"
    await web.UnixSite(runner, str(sock)).start()
    services = asyncio.get_running_loop().create_task(engine.run_background())
    try:
        yield sock, virt, guest
    finally:
        services.cancel()
        with suppress(asyncio.CancelledError):
            await services
        await engine.shutdown(5)
        await runner.cleanup()
        await store.close()


def _env(sock: Path) -> dict[str, str]:
    return {**os.environ, "INSTACLONE_SOCKET": str(sock),
            "PYTHONPATH": os.pathsep.join([str(REPO / "daemon"), str(REPO / "plugins")])}


async def _run(code: str, sock: Path, cwd: Path) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, cwd=cwd, env=_env(sock),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def _lines_until(code: str, sock: Path, cwd: Path, pred: Any, settled: Any = lambda: True) -> list[str]:
    """Run a never-ending example until a line satisfies ``pred`` and ``settled()``, then stop it; its lines."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, cwd=cwd, env=_env(sock),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        while True:
            raw = await asyncio.wait_for(proc.stdout.readline(), 60)
            assert raw, f"example ended: {lines} {(await proc.stderr.read()).decode() if proc.stderr else ''}"
            lines.append(raw.decode().strip())
            if pred(lines[-1]):
                for _ in range(100):  # e.g. the cursor file written just after the line
                    if settled():
                        return lines
                    await asyncio.sleep(0.05)
                raise AssertionError(f"not settled after {lines[-1]!r}")
    finally:
        proc.terminate()
        await proc.wait()


def test_the_client_page_has_an_example_per_use_case():
    codes = examples()
    assert len(codes) == 4
    for code in codes:
        compile(code, "docs/guide/client.md", "exec")
    assert "c.clone(" in codes[0] and "since=" in codes[1] and 'c.claim("ci-pool"' in codes[2]
    assert "SyncClient" in codes[3]


async def test_readme_examples_run(tmp_path):
    clone_ex, events_ex, ci_ex, sync_ex = examples()
    work = tmp_path / "work"
    work.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    (work / "run-tests").write_text("#!/bin/sh\necho ok\n")
    for cmd in (["init", "-q"], ["add", "run-tests"], ["commit", "-qm", "x"]):
        subprocess.run([*git, *cmd], cwd=work, check=True)
    async with api_with_guest(tmp_path) as (sock, _virt, guest), ic.Client(sock) as c:
        # Clone and wait.
        rc, out = await _run(clone_ex, sock, work)
        assert rc == 0 and "Unstunned ('ci-1', 'ci-2')" in out, out

        # Follow events, stop, resume from the saved cursor: nothing seen twice.
        top = [ev async for ev in c.events(tail=1)][-1].cursor
        cursor_file = work / "events.cursor"
        first = await _lines_until(events_ex, sock, work, lambda line: line.startswith(f"{top} "),
                                   lambda: cursor_file.exists() and cursor_file.read_text() == str(top))
        assert first[-1].startswith(f"{top} clone.ready")
        await c.clone("tmpl", name="later", wait=True, timeout_s=20)
        resumed = await _lines_until(events_ex, sock, work, lambda line: "clone.ready" in line)
        assert all(int(line.split()[0]) > top for line in resumed), resumed

        # The CI job: claim from the pool, put the repo, run the tests, get the results, released after.
        await c.create_pool("ci-pool", source="tmpl", size=1)
        rc, out = await _run(ci_ex, sock, work)
        assert rc == 0 and "2 passed" in out, out
        assert (work / "results.xml").read_bytes() == guest.files["/root/results.xml"]
        assert guest.files["/root/repo.tgz"] == (work / "repo.tgz").read_bytes()
        assert (await c.pool("ci-pool")).claimed == ()

        # The sync wrapper.
        rc, out = await _run(sync_ex, sock, work)
        assert rc == 0 and "['ci-pool']" in out and "Linux fake" in out, out
        await c.resize_pool("ci-pool", 0)
