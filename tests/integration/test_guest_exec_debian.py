"""Integration: exec and files inside a clone of the real Debian 12 guest (Debian's qemu-guest-agent).

The same host code as on the busybox guest's ic-agent, here against the
real agent (systemd, dash, coreutils). Prints exec latency and cp throughput
with ``pytest -s``.
"""

from __future__ import annotations

import base64
import hashlib
import os
import statistics
import time

import aiohttp
import pytest

from tests.support.execlib import exec_events, output, run
from tests.support.guests import debianguest as dg
from tests.support.host import libvirt_ready
from tests.support.vmlib import Api

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(libvirt_ready() is not None, reason=str(libvirt_ready())),
    pytest.mark.skipif(dg.debian_ready() is not None, reason=str(dg.debian_ready())),
]


async def test_exec_and_files_in_a_debian_clone(world):
    scratch, virt, _daemon, config = world
    sock = config.daemon.socket
    src = await dg.boot(virt, scratch, "db-gx-src")
    async with Api(sock) as api:
        status, body = await api.call("POST", "/v1/jobs?wait=600", {"source": src.name, "name": "db-gx-c"})
    assert status == 201 and body["job"]["state"] == "Unstunned", body
    c = "db-gx-c"

    last, out, _ = await run(sock, c, ["systemctl", "is-system-running"])
    assert out.strip() in (b"running", b"degraded"), out
    last, out, err = await run(sock, c, ["sh", "-c", 'id -u; echo "$FOO" >&2; exit 4'], env={"FOO": "bar"})
    assert (last["exit_code"], out, err) == (4, b"0\n", b"bar\n")
    data = os.urandom(200_000)
    last, out, _ = await run(sock, c, ["sha256sum"], stdin=base64.b64encode(data).decode())
    assert out.split()[0].decode() == hashlib.sha256(data).hexdigest()
    status, evs = await exec_events(sock, c, {"argv": ["sh", "-c", "echo a; sleep 1.5; echo b"]})
    assert output(evs, "stdout") == b"a\nb\n" and len([e for _, e in evs if e["type"] == "stdout"]) == 2, evs
    status, evs = await exec_events(sock, c, {"argv": ["sleep", "300"], "timeout_s": 2})
    assert evs[-1][1]["error"]["code"] == "exec_timeout"
    _, out, _ = await run(sock, c, ["sh", "-c", "pgrep -x sleep; ls -A /run/instaclone"])
    assert b"exec-" not in out and not out.strip().split(b"\n")[0].isdigit(), out

    times = []
    for _ in range(10):
        t0 = time.monotonic()
        await run(sock, c, ["true"])
        times.append(time.monotonic() - t0)
    print(f"\ndebian exec true: p50 {statistics.median(times) * 1000:.0f} ms")

    blob = os.urandom(5 << 20)
    sha = hashlib.sha256(blob).hexdigest()
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock))) as s:
        t0 = time.monotonic()
        async with s.put(f"http://x/v1/clones/{c}/files?path=/root/blob", data=blob,
                         headers={"X-Instaclone-SHA256": sha}) as r:
            assert r.status == 200, await r.text()
        put_s = time.monotonic() - t0
        t0 = time.monotonic()
        async with s.get(f"http://x/v1/clones/{c}/files?path=/root/blob") as r:
            assert r.status == 200 and r.headers["X-Instaclone-SHA256"] == sha
            assert await r.read() == blob
        get_s = time.monotonic() - t0
        print(f"debian cp 5 MiB: put {5 / put_s:.1f} MiB/s, get {5 / get_s:.1f} MiB/s")
        async with s.get(f"http://x/v1/clones/{c}/files?path=/root/nope") as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "guest_file_not_found"
    _, out, _ = await run(sock, c, ["stat", "-c", "%a %U", "/root/blob"])
    assert out.strip() == b"644 root", out
