"""A source's preflight, as the engine's facade offers it: ``check`` (a report) and ``prepare`` (a fix).

The API asks through :meth:`Engine.check_source` and :meth:`Engine.prepare_source`
with a :class:`~instaclone.requests.CheckRequest` or
:class:`~instaclone.requests.PrepareRequest` and renders the dicts these
return. What a capability needs is :mod:`.preflight`'s and :mod:`.prepare`'s;
this module gathers the live facts they read (the domain, its agent, its disks'
chains, libvirt's memory directory) and holds the source's lock while a
definition is rewritten.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

from ..errors import DomainNotFound, InstacloneError, SourceNotFound
from ..hv import DomainInfo, hostfs
from ..requests import CheckRequest, PrepareRequest
from . import preflight, prepare as prep_xml
from .context import JobContext
from .customize import has_agent

#: How long ``check`` waits for the source's guest agent to answer guest-ping.
AGENT_PING_S = 3


async def check(svc: JobContext, req: CheckRequest) -> dict[str, Any]:
    """The preflight report of ``req.source``: per capability, ok or not and the exact change; raises
    SourceNotFound."""
    facts, xml = await _source_facts(svc, req.source)
    return preflight.check(xml, facts).to_dict()


async def prepare(svc: JobContext, req: PrepareRequest) -> dict[str, Any]:
    """Write what instant clones need into ``req.source``'s persistent definition (dry run: only say what);
    returns the answer's ``prepare`` object (``changed``, ``diff``, ``pending``, ``note``, ...). Raises
    SourceNotFound."""
    name, dry_run = req.source, req.dry_run
    # Under the source's lock: a clone job's disk snapshot rewrites the
    # definition's disk paths, and writing back one read before it would put
    # the source on an image its clones are backed by.
    async with svc.lock(name):
        try:
            info = await svc.virt.lookup(name)
            before = await svc.virt.inactive_xml(name)
        except DomainNotFound:
            raise SourceNotFound(f"source domain {name!r} does not exist") from None
        prep = prep_xml.prepare_definition(before, [svc.storage, *svc.memories])
        after = prep.xml
        if prep.changed and not dry_run:
            await svc.virt.define(prep.xml)
            after = await svc.virt.inactive_xml(name)  # libvirt's own rendering, with what it filled in
    # What the definition has and the running domain not yet (for a dry run: before any change).
    parts = [svc.storage, *svc.memories]
    pending = prep_xml.pending(info.xml, before if dry_run else after, parts) if info.active else []
    note = _prepare_note(name, changed=bool(prep.changed), dry_run=dry_run, active=info.active, pending=pending)
    return {"source": name, "state": info.state, "dry_run": dry_run, "applied": bool(prep.changed) and not dry_run,
            **prep.to_dict(), "diff": prep_xml.diff(before, after, name), "pending": pending, "note": note}


def _prepare_note(name: str, *, changed: bool, dry_run: bool, active: bool, pending: list[str]) -> str:
    if not changed:
        return "nothing to change" + (f"; pending until the next boot: {', '.join(pending)}" if pending else "")
    if dry_run:
        return "dry run: nothing was changed"
    if active:
        return (f"the changes apply at the next boot of {name}: shut it down and start it again (a reboot "
                "inside the guest is not enough); the running domain is unchanged")
    return f"the changes apply when {name} is started"


async def _agent_ping(svc: JobContext, name: str) -> tuple[bool, str | None]:
    """(whether the guest agent of ``name`` answers guest-ping, why not)."""
    try:
        await svc.virt.agent(name, "guest-ping", timeout_s=AGENT_PING_S)
    except InstacloneError as exc:
        return False, exc.message
    return True, None


async def _chain_depths(svc: JobContext, info: DomainInfo) -> dict[str, int | str]:
    """Backing chain depth of each writable disk (or why it could not be read)."""
    depths: dict[str, int | str] = {}
    for disk in info.disks:
        if disk.readonly:
            continue
        try:
            depths[disk.target] = await svc.storage.chain_depth(path=disk.path, fmt=disk.format)
        except InstacloneError as exc:
            depths[disk.target] = exc.message
        except OSError as exc:
            depths[disk.target] = str(exc)
    return depths


def local_system_uri(uri: str) -> bool:
    """Does ``uri`` name the QEMU driver of this host's system libvirtd (whose qemu.conf is /etc/libvirt)?"""
    u = urlsplit(uri)
    return u.scheme in ("qemu", "qemu+unix") and not u.netloc and u.path.rstrip("/") == "/system"


async def _ram_dir(svc: JobContext) -> hostfs.RamDir | None:
    """libvirt's memory backing directory and its filesystem, when libvirt runs on this host."""
    if not local_system_uri(svc.config.libvirt.uri):
        return None
    return await asyncio.to_thread(hostfs.ram_dir)


async def _source_facts(svc: JobContext, name: str) -> tuple[preflight.Facts, str]:
    """(the live facts preflight needs, the XML to check: live if the domain runs) of ``name``."""
    try:
        info = await svc.virt.lookup(name)
    except DomainNotFound:
        raise SourceNotFound(f"source domain {name!r} does not exist") from None
    inactive = await svc.virt.inactive_xml(name) if info.active else None
    ping: bool | None = None
    ping_error = None
    if info.state == "running" and has_agent(info.xml):
        ping, ping_error = await _agent_ping(svc, name)
    clone = await svc.store.get_clone(name)
    facts = preflight.Facts(
        state=info.state, frozen=name in await svc.store.frozen(), clone_of=clone.source if clone else None,
        agent_ping=ping, agent_error=ping_error, chain_depths=await _chain_depths(svc, info),
        max_chain_depth=svc.config.clone.max_chain_depth,
        memory_backends=[(m.name, m.can_serve(info)) for m in svc.memories],
        storage_backend=svc.storage.name, backends=[svc.storage, *svc.memories], inactive_xml=inactive,
        ram_dir=await _ram_dir(svc))
    return facts, info.xml
