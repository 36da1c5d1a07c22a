"""Guest identity reset (fake hypervisor): what is sent to the guest, what the result says.

The guest side itself is proven on the real Debian guest
(tests/integration/test_debian_identity.py); here: the secrets come from the host and
differ per clone, options reach the guest, failures fail the clone, the
source's clock is set after a long stun and after unfreeze.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from instaclone.errors import InvalidRequest
from instaclone.jobs import guestscript
from instaclone.requests import MAX_SCRIPT_BYTES, CloneRequest, FreezeRequest
from instaclone.states import State
from tests.support.enginelib import AGENT, run_job


def with_clone_config(engine, **changes) -> None:
    engine.config = replace(engine.config, clone=replace(engine.config.clone, **changes))


@pytest.fixture
def agent_env(env):
    engine, virt, _journal, _c = env
    virt.domains["src"].xml = virt.domains["src"].xml.replace("</devices>", AGENT + "</devices>")
    # Each clone's SSH host keys are made on the host (about 1 s of CPU each).
    with_clone_config(engine, step_timeout_s=60)
    return env


def octal_bytes(escapes: bytes) -> bytes:
    """What printf makes of a format of \\ooo escapes."""
    assert re.fullmatch(rb"(\\[0-7]{3})+", escapes), escapes[:40]
    return bytes(int(escapes[i + 1:i + 4], 8) for i in range(0, len(escapes), 4))


def identity_calls(virt) -> dict[str, tuple[list[str], bytes]]:
    return {name: (argv, stdin) for name, argv, stdin in virt.exec_log if any("IC-DONE" in a for a in argv)}


def test_guest_scripts_are_valid_posix_sh():
    for text in (guestscript.identity_script(), guestscript.RENEW, guestscript.SCRIPT_WRAPPER):
        subprocess.run(["sh", "-n", "-c", text], check=True)
    subprocess.run(["perl", "-c", "-e", guestscript._PERL_RESEED], check=True, capture_output=True)


async def test_each_clone_gets_host_made_secrets_and_its_result(agent_env):
    engine, virt, store, _ = agent_env
    job = await run_job(engine, store, name="c", count=3)
    assert job.state is State.UNSTUNNED, job.error
    calls = identity_calls(virt)
    assert set(calls) == {"c-1", "c-2", "c-3"}
    seen = set()
    for name, (argv, stdin) in calls.items():
        assert argv[-3:] == [name, "0", ""]  # hostname; SSH host keys are regenerated; clock offset unknown
        rng, seed, mid, config, rest = stdin.split(b"\n", 4)
        assert octal_bytes(rng) and len(octal_bytes(rng)) == guestscript.RNG_BYTES
        assert len(octal_bytes(seed)) == guestscript.SEED_BYTES
        assert len(mid) == 32 and int(mid, 16) >= 0
        assert json.loads(config) == {} and rest.endswith(b"END-KEYS\n")
        # SSH host keys made on the host, one pair per type, for this clone.
        blocks = rest[:-len(b"END-KEYS\n")].split(b"KEY ")[1:]
        assert sorted(b.split(b"\n", 1)[0].decode() for b in blocks) == sorted(guestscript.SSH_KEY_TYPES)
        for b in blocks:
            _t, priv, pub = re.fullmatch(rb"(\w+)\n(-----BEGIN OPENSSH PRIVATE KEY-----\n.*"
                                        rb"-----END OPENSSH PRIVATE KEY-----)\nPUB (.*)\n", b, re.S).groups()
            assert pub.decode().endswith(f" root@{name}")
            seen.add(priv)
        seen.update([rng, seed, mid])
    assert len(seen) == 3 * (3 + len(guestscript.SSH_KEY_TYPES))  # nothing repeats across clones
    assert b"PRIVATE KEY" not in json.dumps(job.result).encode()
    for cl in job.result["clones"]:
        ident = cl["identity"]
        assert ident["machine_id"].encode() == calls[cl["name"]][1].split(b"\n")[2]
        assert ident["reset"]["machine_id"]["status"] == "reset"
        assert ident["reset"]["ssh_host_keys"] == {"status": "not_present", "detail": "no keys"}
        assert ident["reset"]["clock"]["status"] == "reset"
        assert ident["ipv4_waited_for"] == ["eth0"]


async def test_keep_ssh_host_keys_from_request_and_config(agent_env):
    engine, virt, store, _c = agent_env
    job = await run_job(engine, store, name="k1", keep_ssh_host_keys=True)
    assert job.state is State.UNSTUNNED
    argv, stdin = identity_calls(virt)["k1"]
    assert argv[-2] == "1" and b"\nKEY " not in stdin  # no keys made when they are kept
    with pytest.raises(InvalidRequest, match="keep_ssh_host_keys"):
        await engine.submit(CloneRequest(source="src", name="k2", keep_ssh_host_keys="yes"))


async def test_user_script_runs_after_the_reset_with_its_environment(agent_env):
    engine, virt, store, _ = agent_env
    job = await run_job(engine, store, name="s1", script="echo hello from $IC_CLONE_NAME\n")
    assert job.state is State.UNSTUNNED, job.error
    name, argv, stdin = virt.exec_log[-1]
    assert name == "s1" and stdin == b"echo hello from $IC_CLONE_NAME\n"
    assert argv[-3:] == ["s1", "src", job.id]
    assert job.result["clones"][0]["identity"]["script"] == {"exit_status": 0, "output_tail": "ok"}
    order = [("IC-DONE" in " ".join(a)) for n, a, _ in virt.exec_log if n == "s1"]
    assert order[0] is True  # the reset ran first


@pytest.mark.parametrize("bad", ["", "   ", 5, "x" * (MAX_SCRIPT_BYTES + 1), "a\x00b"])
async def test_bad_scripts_are_refused(agent_env, bad):
    engine, *_ = agent_env
    with pytest.raises(InvalidRequest, match="script"):
        await engine.submit(CloneRequest(source="src", name="b1", script=bad))


async def test_a_failing_user_script_fails_the_clone(agent_env):
    engine, virt, store, _c = agent_env
    real = virt.agent_exec

    async def failing(name, argv, **kw):
        if kw.get("stdin") == b"exit 3\n":
            return 3, "boom"
        return await real(name, argv, **kw)

    virt.agent_exec = failing
    job = await run_job(engine, store, name="f1", script="exit 3\n")
    assert job.state is State.FAILED
    assert job.error["code"] == "customization_failed" and "exited 3: boom" in job.error["message"]
    assert set(virt.domains) == {"src"}


async def test_clone_without_ipv4_where_the_source_had_it_fails(agent_env, tmp_path):
    engine, virt, store, _c = agent_env
    with_clone_config(engine, customize_timeout_s=1.0)
    virt.interfaces["n1"] = [{"name": "eth0", "ip-addresses": [
        {"ip-address": "fe80::1", "ip-address-type": "ipv6", "prefix": 64}]}]
    job = await run_job(engine, store, name="n1")
    assert job.state is State.FAILED
    assert "no IPv4 address on eth0" in job.error["message"]


async def test_source_clock_is_set_after_a_long_stun_and_after_unfreeze(agent_env):
    engine, virt, store, _c = agent_env
    job = await run_job(engine, store, name="t1")
    assert job.result["source_clock"] is None  # a short stun
    assert ("src", "guest-set-time") not in virt.agent_log
    virt.delay["save_state"] = 1.2
    with_clone_config(engine, stun_deadline_ms=5000)
    job = await run_job(engine, store, name="t2")
    assert job.state is State.UNSTUNNED, job.error
    assert job.result["stun_ms"] > 1000 and job.result["source_clock"] == {"set": True}
    assert ("src", "guest-set-time") in virt.agent_log
    virt.delay.clear()
    virt.agent_log.clear()
    await engine.freeze(FreezeRequest("src"))
    out = await engine.unfreeze(FreezeRequest("src"))
    assert out["clock"] == {"set": True} and ("src", "guest-set-time") in virt.agent_log


async def test_customization_waits_for_the_replugged_nic_to_appear(agent_env):
    engine, virt, store, _c = agent_env
    with_clone_config(engine, customize_timeout_s=1.0)
    virt.interfaces["w1"] = []  # the hot-plugged NIC never shows up in the guest
    job = await run_job(engine, store, name="w1")
    assert job.state is State.FAILED
    assert "does not show its new NIC" in job.error["message"], job.error
    assert set(virt.domains) == {"src"}


async def test_result_parsing_and_fingerprints_match_ssh_keygen():
    keys = await guestscript.make_host_keys("root@c1")
    assert keys is not None
    out = "noise\nIC-RESULT ssh_host_keys reset regenerated: ed25519(host)\nIC-RESULT bad\nIC-PUB not a key\n"
    want = []
    for _, (_, pub) in sorted(keys.items()):
        out += f"IC-PUB {pub.decode().strip()}\n"
        want.append(subprocess.run(["ssh-keygen", "-lf", "-"], input=pub, capture_output=True,
                                   check=True).stdout.decode().strip())
    items, fps = guestscript.parse_results(out)
    assert items == {"ssh_host_keys": {"status": "reset", "detail": "regenerated: ed25519(host)"}}
    assert fps == want


def test_printf_octal_is_what_printf_writes(tmp_path):
    data = bytes(range(256)) + b"%s%%\\'\"$(x)"
    fmt = guestscript.printf_octal(data)
    out = tmp_path / "out"
    subprocess.run(["sh", "-c", 'printf "$1" > "$2"', "sh", fmt.decode(), str(out)], check=True)
    assert out.read_bytes() == data
    assert octal_bytes(fmt) == data


def test_config_script_key(tmp_path: Path):
    from instaclone import config as cfg
    from instaclone.errors import ConfigError

    script = tmp_path / "post.sh"
    script.write_text("true\n")
    got = cfg.from_dict({"clone": {"customize_script": str(script), "keep_ssh_host_keys": True}})
    assert got.clone.customize_script == str(script) and got.clone.keep_ssh_host_keys is True
    with pytest.raises(ConfigError, match=r"clone\.customize_script"):
        cfg.from_dict({"clone": {"customize_script": str(tmp_path / "missing.sh")}})
    with pytest.raises(ConfigError, match=r"clone\.keep_ssh_host_keys"):
        cfg.from_dict({"clone": {"keep_ssh_host_keys": "no"}})


async def test_host_keys_are_made_in_a_private_dir_that_is_removed(monkeypatch, tmp_path):
    import asyncio
    import glob
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    keys = await guestscript.make_host_keys("root@k")
    assert keys is not None and set(keys) == set(guestscript.SSH_KEY_TYPES)
    assert not glob.glob(str(tmp_path / "instaclone-keys-*"))
    # Cancelled mid-way: the ssh-keygen processes are gone, and so is the directory.
    task = asyncio.ensure_future(guestscript.make_host_keys("root@k"))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not glob.glob(str(tmp_path / "instaclone-keys-*"))
    monkeypatch.setenv("PATH", str(tmp_path))  # no ssh-keygen: the guest makes its own
    assert await guestscript.make_host_keys("root@k") is None
