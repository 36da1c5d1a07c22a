from pathlib import Path

import pytest

from instaclone import config
from instaclone.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[3] / "config" / "instaclone.toml"


def test_defaults_work():
    c = config.from_dict({})
    assert c.clone.stun_deadline_ms == 2000
    assert c.delta_dir == Path("/var/lib/instaclone/deltas")


def test_example_config_is_valid_and_documents_every_key():
    c = config.load(EXAMPLE)
    text = EXAMPLE.read_text()
    for section in ("daemon", "libvirt", "clone", "access"):
        for key in getattr(c, section).__dataclass_fields__:
            assert f"{key} =" in text or f"# {key} =" in text, f"{section}.{key} undocumented"
    for key in c.qcow2.__dataclass_fields__:
        assert f"{key} =" in text, f"storage.qcow2.{key} undocumented"
    for key in c.filecow.__dataclass_fields__:
        assert f"{key} =" in text, f"memory.filecow.{key} undocumented"
    for key in c.webhooks.__dataclass_fields__:
        if key != "endpoints":
            assert f"{key} =" in text, f"webhooks.{key} undocumented"
    for key in ("name", "url", "secret", "secrets", "events"):
        assert f"# {key} =" in text or f"# # {key} =" in text, f"webhooks.endpoints[].{key} undocumented"
    # The commented endpoint example is valid once uncommented (with a real secret).
    from instaclone import events
    block = text.split("# [[webhooks.endpoints]]", 1)[1]
    lines = [ln[2:] for ln in block.splitlines() if ln.startswith("# ") and not ln.startswith("# #")]
    example = "[[webhooks.endpoints]]\n" + "\n".join(lines).replace("whsec_...", events.new_secret())
    import tomllib
    assert config.from_dict(tomllib.loads(example)).webhooks.endpoints[0].name == "ops"


@pytest.mark.parametrize("raw,key", [
    ({"clone": {"stun_deadline_ms": "fast"}}, "clone.stun_deadline_ms"),
    ({"clone": {"stun_deadline_ms": 10}}, "clone.stun_deadline_ms"),
    ({"clone": {"bogus": 1}}, "clone.bogus"),
    ({"daemon": {"socket": "relative/path"}}, "daemon.socket"),
    ({"daemon": {"log_format": "xml"}}, "daemon.log_format"),
    ({"nope": {}}, "nope"),
    ({"memory": {"filecow": {"source_mode": "teleport"}}}, "memory.filecow.source_mode"),
    ({"storage": {"qcow2": {"delta_dir": 3}}}, "storage.qcow2.delta_dir"),
])
def test_errors_name_the_key(raw, key):
    with pytest.raises(ConfigError) as ei:
        config.from_dict(raw)
    assert ei.value.message.startswith(key)


def test_bad_toml_is_reported(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[clone\n")
    with pytest.raises(ConfigError, match=r"c\.toml"):
        config.load(p)
