"""GET /v1/sources/{name}/check and POST /v1/sources/{name}/prepare on the fake hypervisor, and the CLI."""

from __future__ import annotations

import asyncio
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from instaclone import cli
from instaclone.api import ROUTES, document
from instaclone.config import Config
from instaclone.errors import LibvirtError
from instaclone.jobs import preflight
from instaclone.jobs.prepare import prepare_definition
from instaclone_plugins._filecow_xml import FIX_MEMORY, has_shared_file_ram
from instaclone_plugins.filecow import FileCowMemory
from tests.support.fakes import fake_api


@pytest.fixture
async def api(tmp_path: Path):
    # The default memory backends: filecow's findings, saverestore serving the fake's anonymous-RAM source.
    async with fake_api(tmp_path, memories=("filecow", "saverestore")) as (client, virt, sock):
        yield client, virt, sock


#: What prepare gives a definition (filecow's and the core's), in the order it reports them.
PREPARED = ["cow_memory", "mac_reset", "guest_customization", "vm_generation_id"]


def by_cap(report: dict, cap: str) -> dict:
    found = [c for c in report["checks"] if c["capability"] == cap]
    assert len(found) == 1, report
    return found[0]


async def test_check_reports_each_capability(api):
    client, virt, _ = api
    status, body = await client.call("GET", "/v1/sources/src/check")
    assert status == 200, body
    report = body["check"]
    assert report["source"] == "src" and report["state"] == "running" and report["frozen"] is False
    mem = by_cap(report, "cow_memory")
    assert (mem["ok"], mem["level"], mem["fix"]) == (False, "warn", FIX_MEMORY)
    assert "clones use saverestore instead" in mem["detail"]
    assert by_cap(report, "mac_reset")["level"] == "error"  # the fake source has no <acpi/>
    assert report["cloneable"] is False
    assert by_cap(report, "chain_depth")["detail"].startswith("vda: 2 image(s)")  # FakeStorage.chain_depth
    assert ("agent", "src") not in virt.calls  # no channel: the agent is not asked


async def test_check_pings_the_agent_when_there_is_a_channel(api):
    client, virt, _ = api
    src = virt.domains["src"]
    src.xml = prepare_definition(src.xml, [FileCowMemory(config=Config(), virt=virt)]).xml  # as if booted prepared
    _, body = await client.call("GET", "/v1/sources/src/check")
    assert by_cap(body["check"], "guest_customization")["ok"] is True
    assert ("agent", "src") in virt.calls
    assert body["check"]["cloneable"] is True
    virt.fail["agent"] = LibvirtError("guest agent is not connected")
    _, body = await client.call("GET", "/v1/sources/src/check")
    item = by_cap(body["check"], "guest_customization")
    assert item["level"] == "error" and "not connected" in item["detail"]


async def test_check_a_frozen_source(api):
    client, _virt, _ = api
    assert (await client.call("POST", "/v1/sources/src/freeze"))[0] == 200
    _, body = await client.call("GET", "/v1/sources/src/check")
    assert body["check"]["frozen"] is True and "frozen by instaclone" in by_cap(body["check"], "state")["detail"]
    assert (await client.call("POST", "/v1/sources/src/unfreeze"))[0] == 200


@pytest.mark.parametrize("method,path,body,status,code", [
    ("GET", "/v1/sources/ghost/check", None, 404, "source_not_found"),
    ("POST", "/v1/sources/ghost/prepare", {}, 404, "source_not_found"),
    ("GET", "/v1/sources/a..b/check", None, 400, "invalid_name"),
    ("POST", "/v1/sources/-x/prepare", {}, 400, "invalid_name"),
    ("POST", "/v1/sources/src/prepare", {"dry_run": "yes"}, 400, "invalid_request"),
    ("POST", "/v1/sources/src/prepare", {"dryrun": True}, 400, "invalid_request"),
    ("PUT", "/v1/sources/src/check", None, 405, "method_not_allowed"),
])
async def test_errors(api, method, path, body, status, code):
    client, virt, _ = api
    before = virt.domains["src"].xml
    got, answer = await client.call(method, path, body)
    assert (got, answer["error"]["code"]) == (status, code), answer
    assert virt.domains["src"].xml == before and virt.domains["src"].inactive is None


async def test_prepare_running_source_changes_the_definition_only(api):
    client, virt, _ = api
    live = virt.domains["src"].xml
    status, body = await client.call("POST", "/v1/sources/src/prepare", {"dry_run": True})
    assert status == 200, body
    p = body["prepare"]
    assert p["dry_run"] is True and p["applied"] is False and len(p["changed"]) == 4
    assert "+    <access mode=\"shared\" />" in p["diff"]
    assert virt.domains["src"].inactive is None and ("define", "src") not in virt.calls

    status, body = await client.call("POST", "/v1/sources/src/prepare", {})
    p = body["prepare"]
    assert status == 200 and p["applied"] is True and p["diff"] == body["prepare"]["diff"] != ""
    assert "next boot of src" in p["note"] and p["pending"] == PREPARED
    assert virt.domains["src"].xml == live  # the running domain is unchanged
    root = ET.fromstring(virt.domains["src"].inactive)
    assert has_shared_file_ram(root) and preflight.has_acpi(root)

    _, body = await client.call("GET", "/v1/sources/src/check")
    report = body["check"]
    assert report["pending"] == PREPARED
    assert "pending: the persistent definition has it, applies at next boot" in by_cap(report, "cow_memory")["detail"]

    # Idempotent: nothing more to change, still pending until the next boot.
    _, body = await client.call("POST", "/v1/sources/src/prepare", {})
    p = body["prepare"]
    assert p["changed"] == [] and p["applied"] is False and p["diff"] == ""
    assert p["note"].startswith("nothing to change; pending until the next boot: cow_memory")

    # After a power cycle the domain runs its new definition.
    await virt.destroy("src")
    await virt.start("src")
    _, body = await client.call("GET", "/v1/sources/src/check")
    assert body["check"]["pending"] == [] and by_cap(body["check"], "cow_memory")["ok"] is True


async def test_prepare_shut_off_source_and_a_clone(tmp_path: Path):
    # saverestore only: the fake hypervisor keeps no RAM file for filecow to clone.
    async with fake_api(tmp_path) as (client, virt, _):
        await _prepare_shut_off_source_and_a_clone(client, virt)


async def _prepare_shut_off_source_and_a_clone(client, virt) -> None:
    virt.domains["src"].state = "shutoff"
    _, body = await client.call("POST", "/v1/sources/src/prepare")
    assert body["prepare"]["note"] == "the changes apply when src is started"
    assert preflight.has_acpi(ET.fromstring(virt.domains["src"].xml))
    virt.domains["src"].state = "running"
    # Preparing a domain instaclone made is fine.
    status, body = await client.call("POST", "/v1/jobs?wait=10", {"source": "src", "name": "c1"})
    assert status == 201, body
    status, body = await client.call("POST", "/v1/sources/c1/prepare", {"dry_run": True})
    assert status == 200 and body["prepare"]["source"] == "c1"
    _, body = await client.call("GET", "/v1/sources/c1/check")
    assert body["check"]["clone_of"] == "src"


async def test_openapi_has_the_new_paths(api):
    client, _, _ = api
    _, doc = await client.call("GET", "/v1/openapi.json")
    assert "get" in doc["paths"]["/v1/sources/{name}/check"]
    assert "post" in doc["paths"]["/v1/sources/{name}/prepare"]
    schemas = doc["components"]["schemas"]
    assert {"Check", "CheckItem", "Prepare"} <= set(schemas)
    about = schemas["CheckItem"]["properties"]["capability"]["description"]
    filecow = FileCowMemory(config=Config(), virt=None)
    report = preflight.check(prepare_definition(_fake_xml(), [filecow]).xml, preflight.Facts(
        state="running", chain_depths={"vda": 2}, memory_backends=[("filecow", None)], backends=[filecow]))
    # Host and device findings appear only when they apply (a fact gathered, a balloon present).
    for cap in {f.capability for f in report.checks} | {"ram_filesystem", "balloon", "memory_backend"}:
        assert cap in about, cap
    assert doc == json.loads(json.dumps(document(ROUTES, Config())))


def _fake_xml() -> str:
    from tests.support.fakes import SOURCE_XML
    return SOURCE_XML.format(name="x", uuid="u", disk="/tmp/x.qcow2")


async def test_cli_check_and_prepare(api, capsys):
    _, virt, sock = api
    run = lambda *argv: asyncio.to_thread(cli.main, ["--socket", str(sock), *argv])  # noqa: E731
    assert await run("check", "src") == 1  # no <acpi/>: not cloneable
    out = capsys.readouterr().out
    assert out.startswith("src: NOT cloneable (running)")
    assert "  WARN  cow_memory" in out and "  FAIL  mac_reset" in out and "  OK    disk vda" in out
    assert f"  cow_memory: {FIX_MEMORY}" in out
    assert await run("prepare", "src", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "--- src (before)" in out and "would change: cow_memory" in out and "dry run" in out
    assert await run("prepare", "src") == 0
    out = capsys.readouterr().out
    assert "changed: mac_reset" in out and "next boot of src" in out
    assert await run("-o", "json", "check", "src") == 1
    report = json.loads(capsys.readouterr().out)
    assert report["pending"] == PREPARED
    await virt.destroy("src")
    await virt.start("src")
    assert await run("check", "src") == 0
    assert capsys.readouterr().out.startswith("src: cloneable (running)")
    assert await run("check", "ghost") == 1
    assert "[source_not_found]" in capsys.readouterr().err


async def test_check_reports_the_ram_filesystem_of_libvirts_memory_backing_dir(api, tmp_path, monkeypatch, capsys):
    client, _virt, sock = api
    from instaclone.hv import hostfs

    conf = tmp_path / "qemu.conf"
    conf.write_text(f'memory_backing_dir = "{tmp_path}/ram"\n')
    monkeypatch.setattr(hostfs, "QEMU_CONF", conf)
    monkeypatch.setattr(hostfs, "fs_magic", lambda path: 0xEF53)  # as if on ext4
    _, body = await client.call("GET", "/v1/sources/src/check")
    item = by_cap(body["check"], "ram_filesystem")
    assert (item["ok"], item["level"]) == (False, "warn")
    assert f"memory_backing_dir {tmp_path}/ram, not made yet: judged by {tmp_path}" in item["detail"]
    assert "ext4, a disk filesystem" in item["detail"] and "writeback" in item["detail"]
    assert f"tmpfs {tmp_path}/ram" in item["fix"]
    assert await asyncio.to_thread(cli.main, ["--socket", str(sock), "check", "src"]) == 1
    out = capsys.readouterr().out
    assert "  WARN  ram_filesystem" in out and "  ram_filesystem: with no domain running" in out

    monkeypatch.setattr(hostfs, "fs_magic", lambda path: hostfs.TMPFS_MAGIC)
    _, body = await client.call("GET", "/v1/sources/src/check")
    item = by_cap(body["check"], "ram_filesystem")
    assert (item["ok"], item["level"], item["fix"]) == (True, "ok", None) and "on tmpfs" in item["detail"]


@pytest.mark.parametrize("uri,local", [
    ("qemu:///system", True), ("qemu+unix:///system?socket=/run/x.sock", True), ("qemu:///session", False),
    ("qemu+ssh://host/system", False), ("qemu://host/system", False), ("test:///default", False),
])
def test_ram_filesystem_is_checked_for_the_local_system_libvirtd_only(uri, local):
    from instaclone.jobs.sources import local_system_uri

    assert local_system_uri(uri) is local
