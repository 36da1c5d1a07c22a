import dataclasses
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from instaclone import backends, config
from instaclone.errors import ConfigError
from instaclone.settings import setting_of
from instaclone_plugins.filecow import FileCowSettings
from instaclone_plugins.qcow2 import Qcow2Settings

REPO = Path(__file__).resolve().parents[3]
EXAMPLE = REPO / "config" / "instaclone.toml"


def test_defaults_work():
    c = config.from_dict({})
    assert c.clone.stun_deadline_ms == 2000
    assert c.clone.memory_backends == ("filecow", "saverestore")
    assert c.delta_dir == Path("/var/lib/instaclone/deltas")
    assert c.section("memory.filecow", FileCowSettings).source_mode == "auto"


def test_example_config_is_valid_and_documents_every_key():
    c = backends.load_config(EXAMPLE)
    assert c.clone == config.CloneConfig()
    text = EXAMPLE.read_text()
    built_in = {s: cls for s, cls in backends.sections().items() if cls.__module__.startswith("instaclone_plugins.")}
    for section, cls in {**config.SECTIONS, **built_in}.items():
        assert f"[{section}]" in text, f"[{section}] missing"
        for f in dataclasses.fields(cls):
            assert f"{f.name} =" in text or f"[[{section}.{f.name}]]" in text, f"{section}.{f.name} undocumented"
    # The commented endpoint example is valid once uncommented (with a real secret).
    from instaclone import events
    block = text.split("# [[webhooks.endpoints]]", 1)[1]
    lines = [ln[2:] for ln in block.splitlines() if ln.startswith("# ") and not ln.startswith("# #")]
    example = "[[webhooks.endpoints]]\n" + "\n".join(lines).replace("whsec_...", events.new_secret())
    assert config.from_dict(tomllib.loads(example)).webhooks.endpoints[0].name == "ops"


def test_every_key_has_help_and_numbers_have_bounds():
    for section, cls in {**config.SECTIONS, **backends.sections()}.items():
        hints = cls.__annotations__
        for f in dataclasses.fields(cls):
            s = setting_of(f)
            assert len(s.help) > 10, f"{section}.{f.name}: no help"
            if hints[f.name] in ("int", "float") and s.parse is None:
                assert s.min is not None and s.max is not None, f"{section}.{f.name}: no bounds"


@pytest.mark.parametrize("raw,key", [
    ({"clone": {"stun_deadline_ms": "fast"}}, "clone.stun_deadline_ms"),
    ({"clone": {"stun_deadline_ms": 10}}, "clone.stun_deadline_ms"),
    ({"clone": {"bogus": 1}}, "clone.bogus"),
    ({"clone": {"nic_release_timeout_s": 0}}, "clone.nic_release_timeout_s"),
    ({"daemon": {"socket": "relative/path"}}, "daemon.socket"),
    ({"daemon": {"log_format": "xml"}}, "daemon.log_format"),
    ({"nope": {}}, "nope"),
    ({"memory": {"filecow": {"source_mode": "teleport"}}}, "memory.filecow.source_mode"),
    ({"memory": {"filecow": {"precopy_timeout_s": 0}}}, "memory.filecow.precopy_timeout_s"),
    ({"memory": {"filecow": {"bogus": 1}}}, "memory.filecow.bogus"),
    ({"memory": {"nobody": {}}}, "memory.nobody"),
    ({"storage": {"qcow2": {"delta_dir": 3}}}, "storage.qcow2.delta_dir"),
    ({"storage": {"qcow2": {"max_chain_images": 1.5}}}, "storage.qcow2.max_chain_images"),
    ({"clone": {"memory_backends": []}}, "clone.memory_backends"),
    ({"clone": {"memory_backends": ["filecow", "filecow"]}}, "clone.memory_backends"),
    ({"clone": {"memory_backends": ["filecow"], "memory_fallback": "none"}}, "clone.memory_fallback"),
    ({"clone": {"memory_backend": 3}}, "clone.memory_backend"),
])
def test_errors_name_the_key(raw, key):
    with pytest.raises(ConfigError) as ei:
        backends.config_from_dict(raw)
    assert ei.value.message.startswith(key)


def test_backend_sections_are_read_into_their_classes():
    c = backends.config_from_dict({"storage": {"qcow2": {"delta_dir": "/srv/deltas", "max_chain_images": 64}},
                                   "memory": {"filecow": {"source_mode": "precopy"}}})
    assert c.section("storage.qcow2", Qcow2Settings) == Qcow2Settings(delta_dir=Path("/srv/deltas"),
                                                                       max_chain_images=64)
    assert c.delta_dir == Path("/srv/deltas")
    assert c.section("memory.filecow", FileCowSettings).source_mode == "precopy"
    # Without the backends' classes, the core knows no backend section.
    with pytest.raises(ConfigError, match=r"^storage\.qcow2: unknown section"):
        config.from_dict({"storage": {"qcow2": {}}})


@pytest.mark.parametrize("clone,want", [
    ({"memory_backend": "filecow", "memory_fallback": "saverestore"}, ("filecow", "saverestore")),
    ({"memory_backend": "saverestore"}, ("saverestore",)),  # the fallback's default is the same backend
    ({"memory_backend": "filecow", "memory_fallback": "none"}, ("filecow",)),
    ({"memory_fallback": "none"}, ("filecow",)),
    ({"memory_backends": ["saverestore", "filecow"]}, ("saverestore", "filecow")),
    ({"start_parallel": 3}, ("filecow", "saverestore")),
])
def test_memory_backends_and_the_older_spelling(clone, want):
    c = backends.config_from_dict({"clone": clone})
    assert c.clone.memory_backends == want


def test_bad_toml_is_reported(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[clone\n")
    with pytest.raises(ConfigError, match=r"c\.toml"):
        config.load(p)


def test_unknown_backend_fails_at_check_config(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[clone]\nmemory_backends = ["filecow", "warp"]\n')
    run = subprocess.run([sys.executable, "-m", "instaclone.daemon", "--check-config", "-c", str(p)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "unknown memory backend 'warp'" in run.stderr and "Traceback" not in run.stderr


def test_config_reference_and_example_are_generated():
    """docs/reference/config.md and config/instaclone.toml are what scripts/gen-config-reference.py writes."""
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "gen-config-reference.py"), "--check"],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert run.returncode == 0, run.stderr  # the message says which command regenerates them


def test_config_reference_check_names_the_command(tmp_path):
    """A stale file fails the check with the command that fixes it, and the check writes nothing."""
    script = tmp_path / "scripts" / "gen-config-reference.py"
    script.parent.mkdir()
    script.write_text((REPO / "scripts" / "gen-config-reference.py").read_text())
    (tmp_path / "docs" / "reference").mkdir(parents=True)
    (tmp_path / "config").mkdir()
    (tmp_path / "docs" / "reference" / "config.md").write_text((REPO / "docs/reference/config.md").read_text())
    stale = tmp_path / "config" / "instaclone.toml"
    stale.write_text(EXAMPLE.read_text().replace("max_count = 64", "max_count = 65"))
    run = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert "config/instaclone.toml is out of date" in run.stderr
    assert "scripts/gen-config-reference.py" in run.stderr
    assert "max_count = 65" in stale.read_text()


def test_a_reload_names_changed_keys_of_backend_sections_too():
    from instaclone.daemon import _diff

    old = backends.config_from_dict({"clone": {"max_count": 3}})
    new = backends.config_from_dict({"memory": {"filecow": {"source_mode": "precopy"}}, "clone": {"max_count": 3}})
    assert _diff(new, old) == [("memory.filecow.source_mode", "precopy", "auto")]
    assert _diff(old, old) == []
