"""Guest identity reset after a clone runs, through the QEMU guest agent.

A clone made from memory is its source byte for byte: hostname, machine-id,
SSH host keys, the kernel's random state, DHCP client id and address are the
source's. While the clone's NICs are still link-down, :func:`customize`
makes each of them the clone's own, sets its clock and hands over the
caller's key/value data (``/run/instaclone/config.json``); after the host
brings the links up, :func:`renew_network` re-reads the network and waits
for IPv4 where the source had it; :func:`run_script` runs the user's own
customization script.

Every secret is made *after* the guest's kernel random generator has been
given fresh host entropy and forced to reseed: until then a clone's RNG is
its source's (and its siblings'), and keys made from it could repeat. The
machine-id and the random seed file come from the host's generator.

The guest-side scripts, what they are fed and the SSH host keys made on the
host are in :mod:`.guestscript`; the job result carries each item per clone.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
import xml.etree.ElementTree as ET
from collections.abc import Awaitable
from typing import Any

from ..errors import CustomizationFailed, InstacloneError, LibvirtError
from ..hv import Hypervisor, guestfiles
from . import guestscript
from .guestscript import SSH_KEY_TYPES, make_host_keys
from .timings import Timings

__all__ = [
    "AGENT_CHANNEL",
    "SSH_KEY_TYPES",
    "CustomizationFailed",
    "clock_offset",
    "customize",
    "has_agent",
    "has_agent_channel",
    "has_rsa_host_key",
    "ipv4_interfaces",
    "make_host_keys",
    "renew_network",
    "run_script",
    "set_clock",
    "wait_agent",
    "wait_nics",
]

AGENT_CHANNEL = "org.qemu.guest_agent.0"
#: The public half of a guest's RSA SSH host key (the one key type that takes long to make).
RSA_HOST_KEY = "/etc/ssh/ssh_host_rsa_key.pub"
#: Pause between pings while a clone's agent is not connected yet (a ping fails at once then).
AGENT_RETRY_S = 0.05
#: Longest pause between two looks at the guest's interfaces while waiting for its NICs or IPv4.
POLL_MAX_S = 0.25


def has_agent_channel(root: ET.Element) -> bool:
    """Whether the parsed domain has a QEMU guest agent channel."""
    return any(t.get("name") == AGENT_CHANNEL for t in root.iterfind("./devices/channel/target"))


def has_agent(xml: str) -> bool:
    """Whether the domain ``xml`` has a guest agent channel (so that asking the agent makes sense)."""
    return has_agent_channel(ET.fromstring(xml))


async def wait_agent(virt: Hypervisor, name: str, timeout_s: float, timings: Timings | None = None) -> None:
    """Wait until the clone's guest agent answers ``guest-ping``; CustomizationFailed if not in time.

    Until libvirt has connected to its channel each try fails at once; it is
    repeated every ``AGENT_RETRY_S``.
    """
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while True:
        try:
            if timings is not None:
                timings.agent_calls += 1
            await virt.agent(name, "guest-ping", timeout_s=2)
            return
        except InstacloneError as exc:
            if loop.time() > end:
                raise CustomizationFailed(f"guest agent of {name!r} did not answer within {timeout_s:g} s: "
                                          f"{exc.message}") from None
            await asyncio.sleep(AGENT_RETRY_S)


async def customize(virt: Hypervisor, name: str, *, hostname: str, config: dict[str, str],
                    timeout_s: float, keep_ssh_host_keys: bool = False,
                    host_keys: Awaitable[dict[str, tuple[bytes, bytes]] | None] | None = None,
                    macs: list[str] | None = None, timings: Timings | None = None) -> dict[str, Any]:
    """Make the clone's identity its own; its links must still be down.

    Returns what was reset: ``reset`` maps each item (clock, kernel_rng,
    random_seed, hostname, hosts, machine_id, ssh_host_keys, dhcp,
    vm_generation_id) to ``{"status", "detail"}`` with status one of
    ``reset``, ``partial``, ``kept``, ``not_present``, ``unsupported`` or
    ``failed``; ``ssh_host_key_fingerprints`` the new keys' ``ssh-keygen -l``
    lines, computed from the public keys the guest holds afterwards;
    ``guest_ms`` the milliseconds of each step inside the guest.

    The clock: the agent's ``guest-get-time`` gives the guest clock's
    offset from the host's, and the reset script moves the clock by it
    (GNU ``date -s "now +N seconds"``: a relative move, so the time the
    script takes to start does not matter). ``guest-set-time`` is used only
    where that ``date`` is missing (busybox), after the script: Debian's agent
    runs ``hwclock -w`` for it, which busy-waits for the RTC's next
    half-second (about 1.5 s of the guest's one vCPU here).

    With ``macs`` (the replugged NICs) it first waits until the guest has
    them all: a hot-plugged NIC appears in the guest a while after the plug.
    ``host_keys`` (awaited once the agent answers; from
    :func:`.guestscript.make_host_keys`) replace the guest's SSH host keys
    of the same types; a type without one is made in the guest.
    Raises CustomizationFailed if the agent does not answer, a NIC does not
    appear or the reset script fails. ``timings`` gets each step's milliseconds.
    """
    t = timings or Timings()
    with t.phase("agent_wait"):
        await wait_agent(virt, name, timeout_s, t)
    with t.phase("host_keys_wait"):
        keys = await host_keys if host_keys is not None else None
    with t.phase("clock_offset"):
        t.agent_calls += 1
        offset = await clock_offset(virt, name)
    if macs:
        with t.phase("nics_seen"):
            await wait_nics(virt, name, macs, timeout_s=timeout_s, timings=t)
    machine_id = secrets.token_hex(16)
    with t.phase("identity_script"):
        t.agent_calls += 1
        rc, out = await virt.agent_exec(
            name, ["/bin/sh", "-c", guestscript.identity_script(), "sh", hostname, "1" if keep_ssh_host_keys else "0",
                   "" if offset is None else f"{offset / 1e9:+.9f}"],
            stdin=guestscript.identity_stdin(machine_id, config, keys or {}), timeout_s=timeout_s)
    if rc != 0 or "IC-DONE" not in out:
        raise CustomizationFailed(f"identity reset in {name!r} exited {rc}: {out.strip()[-400:]}")
    items, fingerprints = guestscript.parse_results(out)
    if "clock" not in items:  # no GNU date in the guest
        with t.phase("set_time"):
            t.agent_calls += 1
            await virt.agent(name, "guest-set-time", {"time": time.time_ns()})
        items["clock"] = {"status": "reset", "detail": "set from the host (guest-set-time)"}
    items = {"clock": items.pop("clock"), **items}
    return {
        "customized": True,
        "hostname": hostname,
        "machine_id": machine_id,
        "clock_set": True,
        "config_path": guestscript.CONFIG_PATH if config else None,
        "reset": items,
        "ssh_host_key_fingerprints": fingerprints,
        "guest_ms": guestscript.parse_marks(out),
    }


def _ipv4(ifaces: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Interface name -> its IPv4 addresses (link-local and loopback left out)."""
    out: dict[str, list[str]] = {}
    for i in ifaces:
        if i.get("name") == "lo":
            continue
        addrs = [f"{a.get('ip-address')}/{a.get('prefix')}" for a in i.get("ip-addresses", [])
                 if a.get("ip-address-type") == "ipv4"
                 and not str(a.get("ip-address", "")).startswith(("169.254.", "127."))]
        out[str(i.get("name"))] = addrs
    return out


async def ipv4_interfaces(virt: Hypervisor, name: str, *, timeout_s: int = 3,
                          attempts: int = 2) -> list[str] | None:
    """Names of the guest's interfaces that have IPv4 now; None if its agent does not answer."""
    for attempt in range(attempts):
        try:
            ifaces = await virt.agent(name, "guest-network-get-interfaces", timeout_s=timeout_s) or []
        except InstacloneError:
            if attempt + 1 < attempts:
                await asyncio.sleep(0.2)
            continue
        return sorted(n for n, addrs in _ipv4(ifaces).items() if addrs)
    return None


async def clock_offset(virt: Hypervisor, name: str) -> int | None:
    """Nanoseconds the guest's clock is behind the host's (``guest-get-time``); None if it does not say.

    Off by at most half the call's round trip.
    """
    before = time.time_ns()
    try:
        guest = await virt.agent(name, "guest-get-time")
    except InstacloneError:
        return None
    after = time.time_ns()
    if not isinstance(guest, int) or isinstance(guest, bool):
        return None
    return (before + after) // 2 - guest


async def has_rsa_host_key(virt: Hypervisor, name: str) -> bool | None:
    """Whether the running guest has an RSA SSH host key (its public half); None if its agent cannot say.

    One or two agent calls (no program run in the guest).
    """
    try:
        handle = await guestfiles.file_open(virt, name, RSA_HOST_KEY, "r")
    except LibvirtError as exc:
        return False if guestfiles.guest_errno(exc) == "ENOENT" else None
    except (InstacloneError, TypeError, ValueError):  # no agent, or an answer that is no handle
        return None
    with contextlib.suppress(InstacloneError):
        await guestfiles.file_close(virt, name, handle)
    return True


async def wait_nics(virt: Hypervisor, name: str, macs: list[str], *, timeout_s: float,
                    timings: Timings | None = None) -> None:
    """Wait until the guest lists a NIC with each of ``macs``; CustomizationFailed if not in time."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    want = {m.lower() for m in macs}
    delay = 0.05
    while True:
        if timings is not None:
            timings.agent_calls += 1
        ifaces = await virt.agent(name, "guest-network-get-interfaces") or []
        missing = want - {str(i.get("hardware-address", "")).lower() for i in ifaces}
        if not missing:
            return
        if loop.time() > end:
            raise CustomizationFailed(f"the guest of {name!r} does not show its new NIC(s) "
                                      f"{', '.join(sorted(missing))} within {timeout_s:g} s of the hot-plug")
        await asyncio.sleep(delay)
        delay = min(delay * 2, POLL_MAX_S)


async def renew_network(virt: Hypervisor, name: str, *, timeout_s: float,
                        want_ipv4: list[str] | None = None, timings: Timings | None = None) -> list[dict[str, Any]]:
    """Re-read the network after the links came up; returns the guest's interfaces.

    With ``want_ipv4`` (the interfaces that had IPv4 in the source), waits
    until each of them has IPv4 again, within ``timeout_s``; raises
    CustomizationFailed if one does not. ``timings`` gets each step's milliseconds.
    """
    t = timings or Timings()
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    with t.phase("network_renew"):
        t.agent_calls += 1
        rc, out = await virt.agent_exec(name, ["/bin/sh", "-c", guestscript.RENEW], timeout_s=timeout_s)
    if rc != 0:
        raise CustomizationFailed(f"network renewal in {name!r} exited {rc}: {out.strip()[-400:]}")
    delay = 0.1
    t_wait = loop.time()
    while True:
        t.agent_calls += 1
        ifaces = await virt.agent(name, "guest-network-get-interfaces") or []
        v4 = _ipv4(ifaces)
        missing = sorted(n for n in (want_ipv4 or []) if not v4.get(n))
        if not missing:
            break
        if loop.time() > end:
            raise CustomizationFailed(
                f"{name!r} has no IPv4 address on {', '.join(missing)} within {timeout_s:g} s "
                "(the source had one there)")
        await asyncio.sleep(delay)
        delay = min(delay * 2, POLL_MAX_S)
    t.add("ipv4_wait", loop.time() - t_wait)
    return [
        {"name": i.get("name"), "mac": i.get("hardware-address"),
         "addresses": [f"{a.get('ip-address')}/{a.get('prefix')}" for a in i.get("ip-addresses", [])],
         "ipv4": v4.get(str(i.get("name")), [])}
        for i in ifaces if i.get("name") != "lo"
    ]


async def run_script(virt: Hypervisor, name: str, script: str, *, source: str, job_id: str,
                     timeout_s: float) -> dict[str, Any]:
    """Run the user's customization script in the clone (``/bin/sh -s``, after the reset).

    The script sees ``IC_CLONE_NAME``, ``IC_SOURCE`` and ``IC_JOB_ID``.
    Returns its exit status and output tail; raises CustomizationFailed if it
    exits non-zero or does not finish within ``timeout_s``.
    """
    try:
        rc, out = await virt.agent_exec(name, ["/bin/sh", "-c", guestscript.SCRIPT_WRAPPER, "sh", name, source, job_id],
                                        stdin=script.encode(), timeout_s=timeout_s)
    except InstacloneError as exc:
        raise CustomizationFailed(f"customization script in {name!r}: {exc.message}") from None
    tail = out[-guestscript.SCRIPT_TAIL_CHARS:]
    if rc != 0:
        raise CustomizationFailed(f"customization script in {name!r} exited {rc}: {tail.strip()[-400:]}")
    return {"exit_status": rc, "output_tail": tail}


async def set_clock(virt: Hypervisor, name: str, *, timeout_s: float = 10.0) -> dict[str, Any]:
    """Set ``name``'s clock from the host's through its agent; never raises.

    For a source that was paused (frozen, or stunned for long): its clock
    stood still meanwhile and stays behind unless set.
    """
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    last = ""
    while True:
        try:
            await virt.agent(name, "guest-set-time", {"time": time.time_ns()}, timeout_s=3)
            return {"set": True}
        except InstacloneError as exc:
            last = exc.message
        if loop.time() > end:
            return {"set": False, "reason": f"guest agent did not set the time within {timeout_s:g} s: {last}"}
        await asyncio.sleep(0.3)
