"""A third party's memory backend, ``stash`` (tests/thirdparty), found by entry point and run like a built-in.

Nothing of instaclone names it: the daemon's registry, the config, preflight,
the engine and the contract suite find it through its entry point (its
``.dist-info``, on ``sys.path`` by ``tests/__init__.py``) and its own
declarations: its config section, its preflight finding.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import replace
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from instaclone import backends
from instaclone.errors import ConfigError, SourceNotCloneable
from instaclone.jobs import preflight as pf
from instaclone.requests import CloneRequest
from instaclone_plugins.saverestore import SaveRestoreMemory
from tests.support.fakes import SOURCE_XML, fake_engine, fake_world

REPO = Path(__file__).resolve().parents[2]
THIRD_PARTY = REPO / "tests" / "thirdparty"
XML = SOURCE_XML.format(name="src", uuid="6c0f9a62-3e1d-4b8e-9a57-000000000001", disk="/tmp/src.qcow2")


def stash_class() -> type:
    return backends.memory_backend("stash")


def test_found_by_its_entry_point_not_by_instaclone():
    (ep,) = [ep for ep in entry_points(group="instaclone.memory") if ep.name == "stash"]
    assert ep.value == "instaclone_stash:StashMemory"
    assert ep.dist is not None and ep.dist.name == "instaclone-stash"
    cls = stash_class()
    assert Path(sys.modules[cls.__module__].__file__).is_relative_to(THIRD_PARTY)
    assert "stash" in backends.names("instaclone.memory")
    assert backends.sections()["memory.stash"] is cls.settings_class
    # No file of instaclone (the daemon, the plugins, the contract suite) names it; this test does.
    named = subprocess.run(["grep", "-rlw", "--exclude", Path(__file__).name, "stash", "daemon", "plugins",
                            "tests/contract", "tests/support/contract", "pyproject.toml"],
                           capture_output=True, text=True, cwd=REPO)
    assert named.stdout == ""


def test_its_config_section_is_read_and_checked():
    c = backends.config_from_dict({"memory": {"stash": {"refuse": ["ci-*"]}},
                                   "clone": {"memory_backends": ["stash", "saverestore"]}})
    assert c.section("memory.stash", stash_class().settings_class).refuse == ("ci-*",)
    with pytest.raises(ConfigError, match=r"^memory\.stash\.bogus: unknown key"):
        backends.config_from_dict({"memory": {"stash": {"bogus": 1}}})
    with pytest.raises(ConfigError, match=r"^memory\.stash\.refuse: must be a list"):
        backends.config_from_dict({"memory": {"stash": {"refuse": "*"}}})


def _facts(order: list[str], refuse: tuple[str, ...]) -> pf.Facts:
    c = backends.config_from_dict({"memory": {"stash": {"refuse": list(refuse)}}})
    parts = {"stash": stash_class()(config=c, virt=None), "saverestore": SaveRestoreMemory(config=c, virt=None)}
    reasons = {"stash": parts["stash"]._refusal("src"), "saverestore": None}
    return pf.Facts(state="running", memory_backends=[(n, reasons[n]) for n in order],
                    backends=[parts[n] for n in order])


def test_preflight_asks_it_and_merges_its_finding():
    ok = pf.check(XML, _facts(["stash", "saverestore"], ()))
    (f,) = [f for f in ok.checks if f.capability == "stash_memory"]
    assert (f.ok, f.level) == (True, "ok")
    # Refused, with saverestore after it: a warning that names the backend clones use.
    report = pf.check(XML, _facts(["stash", "saverestore"], ("*",)))
    (f,) = [f for f in report.checks if f.capability == "stash_memory"]
    assert (f.ok, f.level) == (False, "warn")
    assert f.detail == ("memory.stash.refuse has '*': stash does not clone 'src'; clones use saverestore instead: "
                        "one full RAM copy per clone")
    # Alone: the source cannot be cloned, and the report says why.
    alone = pf.check(XML, _facts(["stash"], ("*",)))
    (f,) = [f for f in alone.checks if f.capability == "stash_memory"]
    assert f.level == "error"
    assert "no configured memory backend can clone it (stash: memory.stash.refuse has '*'" in f.detail


@pytest.mark.parametrize("order,refuse,served", [
    (("stash",), (), "stash"),
    (("stash", "saverestore"), ("s*",), "saverestore"),
])
async def test_the_engine_clones_with_it_in_memory_backends_order(tmp_path, order, refuse, served):
    c, store, virt = await fake_world(tmp_path, clone={"memory_backends": order})
    c = c.with_section("memory.stash", replace(stash_class().settings_class(), refuse=refuse))
    engine = fake_engine(c, store, virt, order)
    try:
        job = await engine.submit(CloneRequest(source="src", name="c1"))
        await engine.wait(job.id, 10)
        done = await store.get_job(job.id)
        assert done.state.value == "Unstunned", done.error
        assert done.result["memory_backend"] == served
    finally:
        await engine.shutdown(5)
        await store.close()


async def test_a_source_it_alone_refuses_is_not_cloneable(tmp_path):
    c, store, virt = await fake_world(tmp_path, clone={"memory_backends": ("stash",)})
    c = c.with_section("memory.stash", stash_class().settings_class(refuse=("*",)))
    engine = fake_engine(c, store, virt, ("stash",))
    try:
        with pytest.raises(SourceNotCloneable, match=r"stash: memory\.stash\.refuse has '\*'"):
            await engine.submit(CloneRequest(source="src", name="c1"))
    finally:
        await engine.shutdown(5)
        await store.close()


def test_the_contract_suite_runs_it_unchanged():
    """The suite's cases for stash are made from its entry point, and they pass (a live and a kill slice)."""
    cases = "fake-stash-job-live-0 or fake-stash-job-kill-0"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not integration",
                          "tests/contract/test_contract_fakes.py", "-k", cases],
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    passed = int(re.search(r"(\d+) passed", run.stdout).group(1))
    assert passed >= 10, run.stdout[-2000:]
    assert re.search(r"fake-stash-job-live: \d+ cases, 0 failed", run.stdout), run.stdout[-2000:]
    assert re.search(r"fake-stash-job-kill: \d+ cases, 0 failed", run.stdout), run.stdout[-2000:]


def test_a_plugin_that_cannot_be_loaded_is_a_clear_error(tmp_path, monkeypatch):
    """An installed plugin whose import fails stops the config with its entry point named, not a traceback."""
    info = tmp_path / "broken_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[instaclone.memory]\nbroken = broken_plugin:Nothing\n")
    (tmp_path / "broken_plugin.py").write_text("raise RuntimeError('half installed')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"entry point instaclone\.memory:broken \(broken_plugin:Nothing\) "
                                          r"cannot be loaded: RuntimeError: half installed"):
        backends.config_from_dict({})
