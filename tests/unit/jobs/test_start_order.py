"""The order of a clone's start (fake hypervisor): what overlaps, what waits for what.

After the resume the NIC replug runs while the definition is cleaned up;
then the identity reset, then the links come up and the network is re-read.
Each test records the calls of one clone as ``+what`` when a call begins and
``-what`` when it ends, and may hold one call open until another has begun:
a start that ran them one after the other would never get there (the wait
fails the test, not a clock).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import pytest

from instaclone.errors import LibvirtError
from instaclone.states import State
from tests.support.enginelib import AGENT, run_job

#: Longest a held call waits for the call it is held for (an order bug ends the test here).
HOLD_S = 5.0


@pytest.fixture
def agent_env(env):
    engine, virt, _journal, _c = env
    virt.domains["src"].xml = virt.domains["src"].xml.replace("</devices>", AGENT + "</devices>")
    engine.config = replace(engine.config, clone=replace(engine.config.clone, step_timeout_s=60))
    return env


class Recorder:
    """Wraps the fake's calls on one clone: the sequence of begins and ends, and calls held until another."""

    def __init__(self, virt: Any, clone: str) -> None:
        self.virt, self.clone = virt, clone
        self.seq: list[str] = []
        self.begun: dict[str, asyncio.Event] = {}
        self.hold: dict[str, str] = {}  # call -> the call it waits for to have begun
        self.fail: dict[str, Exception] = {}  # call -> error it raises after its hold
        for method in ("start", "set_link", "resume", "replace_nic", "define", "agent", "agent_exec"):
            setattr(virt, method, self._wrap(method, getattr(virt, method)))

    def _what(self, method: str, args: tuple[Any, ...], kw: dict[str, Any]) -> str:
        if method == "set_link":
            return f"link_{'up' if kw['up'] else 'down'}"
        if method == "agent":
            return args[1]
        if method == "agent_exec":
            return "identity_script" if any("IC-DONE" in a for a in args[1]) else "renew"
        return method

    def _event(self, what: str) -> asyncio.Event:
        return self.begun.setdefault(what, asyncio.Event())

    def _wrap(self, method: str, real: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def call(*args: Any, **kw: Any) -> Any:
            name = args[0] if method != "define" else ("<define>" if self.clone in args[0] else "")
            if name not in (self.clone, "<define>"):
                return await real(*args, **kw)
            what = self._what(method, args, kw)
            if not self.seq and what != "start":  # the clone's definition inside the stun: not its start
                return await real(*args, **kw)
            self.seq.append(f"+{what}")
            self._event(what).set()
            if what in self.hold:
                await asyncio.wait_for(self._event(self.hold[what]).wait(), HOLD_S)
            if what in self.fail:
                self.seq.append(f"!{what}")
                raise self.fail[what]
            try:
                return await real(*args, **kw)
            finally:
                self.seq.append(f"-{what}")

        return call

    def index(self, mark: str) -> int:
        return self.seq.index(mark)


async def test_replug_and_define_overlap_then_the_reset_then_the_links(agent_env):
    engine, virt, store, _c = agent_env
    rec = Recorder(virt, "o1")
    # The replug ends only once the definition's clean-up has begun: in one sequence it could not.
    # (SSH host keys kept: no ssh-keygen on the host, whose time would move the sequence.)
    rec.hold = {"replace_nic": "define"}
    job = await run_job(engine, store, name="o1", keep_ssh_host_keys=True)
    assert job.state is State.UNSTUNNED, job.error
    assert rec.seq == [
        # Up to the resume, one after the other, links down before the guest runs.
        "+start", "-start", "+link_down", "-link_down", "+resume", "-resume",
        # The replug while the definition is cleaned up (host work only).
        "+replace_nic", "+define", "-define", "-replace_nic",
        # Then the reset: the agent answers, the clock's offset is measured, the guest
        # shows its new NIC, the script runs.
        "+guest-ping", "-guest-ping", "+guest-get-time", "-guest-get-time",
        "+guest-network-get-interfaces", "-guest-network-get-interfaces", "+identity_script", "-identity_script",
        # The fake's script does not say it moved the clock (as on busybox): the agent sets it.
        "+guest-set-time", "-guest-set-time",
        # Only then the links come up, and the network is re-read.
        "+link_up", "-link_up", "+renew", "-renew", "+guest-network-get-interfaces", "-guest-network-get-interfaces",
    ], rec.seq


async def test_the_result_has_every_phase_of_the_start(agent_env):
    engine, _virt, store, _c = agent_env
    job = await run_job(engine, store, name="r1")
    assert job.state is State.UNSTUNNED, job.error
    ident = job.result["clones"][0]["identity"]
    phases = ident["phases_ms"]
    assert set(phases) == {"slot_wait", "memory_start", "link_down", "resume", "nic_replug", "define", "host_keys",
                           "agent_wait", "host_keys_wait", "clock_offset", "identity_script", "set_time",
                           "nics_seen", "link_up", "network_renew", "ipv4_wait"}, phases
    assert ident["ready_ms"] >= max(phases.values())
    assert ident["agent_calls"] == 7  # ping, get-time, reset script, set-time, NICs seen, renew, IPv4 seen
    assert set(job.result["phases_ms"]) == {"queue", "set_up", "source_ipv4", "source_rsa_key", "stamp",
                                            "clones_start", "result", "hand_over"}


async def test_without_customization_replug_and_define_overlap_and_nothing_asks_the_agent(env):
    engine, virt, store, _c = env
    rec = Recorder(virt, "p1")
    rec.hold = {"replace_nic": "define"}
    job = await run_job(engine, store, name="p1")
    assert job.state is State.UNSTUNNED, job.error
    assert rec.index("+define") < rec.index("-replace_nic"), rec.seq
    assert not [s for s in rec.seq if s.startswith("+guest-") or "identity" in s or "link_up" in s], rec.seq
    ident = job.result["clones"][0]["identity"]
    assert ident["customized"] is False and {"nic_replug", "define"} <= set(ident["phases_ms"])


async def test_a_failed_replug_removes_the_clone_and_nothing_asks_its_agent(agent_env):
    engine, virt, store, _c = agent_env
    rec = Recorder(virt, "f1")
    rec.hold = {"replace_nic": "define"}
    rec.fail = {"replace_nic": LibvirtError("the guest refused to release its NIC")}
    job = await run_job(engine, store, name="f1")
    assert job.state is State.FAILED
    assert "refused to release" in job.error["message"] and job.error["code"] != "customization_failed", job.error
    assert not [s for s in rec.seq if s.startswith("+guest-") or s in ("+identity_script", "+link_up")], rec.seq
    assert set(virt.domains) == {"src"}


async def test_a_failed_reset_fails_as_customization_and_never_brings_links_up(agent_env):
    engine, virt, store, _c = agent_env
    rec = Recorder(virt, "f2")
    rec.fail = {"identity_script": LibvirtError("guest-exec failed")}
    job = await run_job(engine, store, name="f2")
    assert job.state is State.FAILED
    assert job.error["code"] == "customization_failed" and "guest-exec failed" in job.error["message"], job.error
    assert "+link_up" not in rec.seq and "+renew" not in rec.seq, rec.seq
    assert set(virt.domains) == {"src"}


async def test_an_agent_that_connects_late_is_pinged_until_it_answers(agent_env):
    engine, virt, store, _c = agent_env
    real, tries = virt.agent, []

    async def late(name: str, command: str, arguments: Any = None, **kw: Any) -> Any:
        if name == "l1" and command == "guest-ping":
            tries.append(command)
            if len(tries) < 3:
                raise LibvirtError("Guest agent is not responding: QEMU guest agent is not connected")
        return await real(name, command, arguments, **kw)

    virt.agent = late
    job = await run_job(engine, store, name="l1")
    assert job.state is State.UNSTUNNED, job.error
    assert tries == ["guest-ping"] * 3
    assert [c for n, c in virt.agent_log if n == "l1"][:2] == ["guest-ping", "guest-get-time"]


def key_types(virt: Any, clone: str) -> list[str]:
    """The SSH host key types the host made for ``clone`` (from the reset script's input)."""
    (stdin,) = [i for n, a, i in virt.exec_log if n == clone and any("IC-DONE" in x for x in a)]
    return sorted(line[4:].decode() for line in stdin.split(b"\n") if line.startswith(b"KEY "))


@pytest.mark.parametrize(("answer", "want"), [
    ("absent", ["ecdsa", "ed25519"]),  # no RSA key in the source: none made (a core for a second saved)
    ("present", ["ecdsa", "ed25519", "rsa"]),
    ("error", ["ecdsa", "ed25519", "rsa"]),  # the agent cannot say: every type, as before
])
async def test_an_rsa_host_key_is_made_only_when_the_source_may_have_one(agent_env, answer, want):
    engine, virt, store, _c = agent_env
    real = virt.agent

    async def probe(name: str, command: str, arguments: Any = None, **kw: Any) -> Any:
        if name == "src" and command == "guest-file-open":
            assert arguments == {"path": "/etc/ssh/ssh_host_rsa_key.pub", "mode": "r"}
            if answer == "absent":
                raise LibvirtError("guest agent guest-file-open: failed to open file "
                                   "'/etc/ssh/ssh_host_rsa_key.pub' (mode: 'r'): No such file or directory")
            if answer == "error":
                raise LibvirtError("guest agent guest-file-open: Permission denied")
            return 7
        if name == "src" and command == "guest-file-close":
            return {}
        return await real(name, command, arguments, **kw)

    virt.agent = probe
    job = await run_job(engine, store, name=f"k-{answer}")
    assert job.state is State.UNSTUNNED, job.error
    assert key_types(virt, f"k-{answer}") == want
    # Probed before the stun, on the running source, after its interfaces.
    src = [c for n, c in virt.agent_log if n == "src"]
    assert src[:1] == ["guest-network-get-interfaces"], src


async def test_the_script_moves_the_clock_by_the_measured_offset_and_the_agent_sets_none(agent_env):
    engine, virt, store, _c = agent_env
    real_agent, real_exec = virt.agent, virt.agent_exec

    async def agent(name: str, command: str, arguments: Any = None, **kw: Any) -> Any:
        if name == "t1" and command == "guest-get-time":
            return time.time_ns() - 2_000_000_000  # the clone's clock is 2 s behind (its stun, its start)
        return await real_agent(name, command, arguments, **kw)

    async def agent_exec(name: str, argv: list[str], **kw: Any) -> Any:
        if name == "t1" and any("IC-DONE" in a for a in argv):  # GNU date in the guest moved it
            return 0, f"IC-RESULT clock reset moved by {argv[-1]} s\nIC-DONE\n"
        return await real_exec(name, argv, **kw)

    virt.agent, virt.agent_exec = agent, agent_exec
    job = await run_job(engine, store, name="t1")
    assert job.state is State.UNSTUNNED, job.error
    ident = job.result["clones"][0]["identity"]
    moved = float(ident["reset"]["clock"]["detail"].split()[2])
    assert 1.9 < moved < 2.5, moved  # "+2.0..." seconds, measured around the call
    assert ("t1", "guest-set-time") not in virt.agent_log
    assert next(iter(ident["reset"])) == "clock" and "set_time" not in ident["phases_ms"]
