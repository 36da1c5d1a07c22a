"""Domains: look up, define, start, pause, stop, undefine, disk snapshots."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import DomainNotFound, DomainReplaced, DomainStateInvalid
from ..log import get as get_logger
from . import _libvirt as lv
from .connection import Connection
from .records import DomainInfo, Outcome, file_disks

log = get_logger(component="hv")

_STATE_NAMES = {
    lv.VIR_DOMAIN_RUNNING: "running",
    lv.VIR_DOMAIN_PAUSED: "paused",
    lv.VIR_DOMAIN_SHUTOFF: "shutoff",
    lv.VIR_DOMAIN_SHUTDOWN: "shutdown",
    lv.VIR_DOMAIN_CRASHED: "crashed",
    lv.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
    lv.VIR_DOMAIN_BLOCKED: "running",
}

# KEEP_NVRAM / KEEP_TPM: libvirt would delete whatever path the definition
# names, which may be a file that is not ours (a clone defined with its
# source's <nvram> lost the source's UEFI variables that way). Files we made
# are removed by their owner.
_UNDEFINE_FLAGS = (lv.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | lv.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                   | lv.VIR_DOMAIN_UNDEFINE_KEEP_NVRAM | lv.VIR_DOMAIN_UNDEFINE_KEEP_TPM
                   | lv.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)


def state_name(state: int) -> str:
    """Our name for a libvirt domain state (see DomainInfo.state)."""
    return _STATE_NAMES.get(state, "other")


class Domains(Connection):
    """Domain lifecycle calls."""

    async def lookup(self, name: str) -> DomainInfo:
        """Name, UUID, state and migratable XML of a domain; DomainNotFound if absent."""

        return await self._call(f"look up domain {name!r}", lambda: _info(self._dom(name)))

    async def lookup_id(self, name: str, uuid: str) -> DomainInfo:
        """:meth:`lookup` of the domain with ``uuid``, which must be named ``name``.

        DomainNotFound if it is gone; DomainReplaced if the name now belongs to
        another domain (or the UUID to another name).
        """
        return await self._call(f"look up domain {name!r}", lambda: _info(self._dom_id(name, uuid)))

    async def inactive_xml(self, name: str) -> str:
        """The persistent (next-boot) definition of ``name``."""

        def do() -> str:
            return str(self._dom(name).XMLDesc(lv.VIR_DOMAIN_XML_INACTIVE | lv.VIR_DOMAIN_XML_SECURE))

        return await self._call(f"definition of {name!r}", do)

    async def exists(self, name: str) -> bool:
        """Whether a domain ``name`` is defined."""
        try:
            await self._call(f"look up domain {name!r}", lambda: self._dom(name))
        except DomainNotFound:
            return False
        return True

    async def state(self, name: str) -> str:
        """Our state name of ``name``; DomainNotFound if absent."""

        def do() -> str:
            return state_name(self._dom(name).state()[0])

        return await self._call(f"state of {name!r}", do)

    async def list_names(self) -> list[str]:
        """The names of all domains, sorted."""

        def do() -> list[str]:
            return sorted(d.name() for d in self._connection().listAllDomains(0))

        return await self._call("list domains", do)

    async def suspend(self, name: str) -> None:
        """Pause the vCPUs of ``name``."""
        await self._call(f"pause {name!r}", lambda: self._dom(name).suspend())

    async def resume(self, name: str) -> None:
        """Resume ``name``; a domain that is already running is left alone."""

        def do() -> None:
            dom = self._dom(name)
            if dom.state()[0] == lv.VIR_DOMAIN_PAUSED:
                dom.resume()
                return
            # QEMU stops a source by itself at a migration's switchover, and
            # libvirt learns it from an event: until then it says "running",
            # and a source left in postmigrate would stay stopped. Ask QEMU.
            if dom.state()[0] != lv.VIR_DOMAIN_RUNNING or not _qemu_stopped_by_migration(dom):
                return
            deadline = time.monotonic() + 5.0
            while dom.state()[0] != lv.VIR_DOMAIN_PAUSED:
                if time.monotonic() > deadline:
                    raise DomainStateInvalid(f"{name!r} is stopped in QEMU (postmigrate) but libvirt says it runs")
                time.sleep(0.005)
            dom.resume()

        await self._call(f"resume {name!r}", do)

    async def define(self, xml: str) -> str:
        """Define a persistent domain; returns its name."""

        def do() -> str:
            return str(self._connection().defineXML(xml).name())

        return await self._call("define domain", do)

    async def start(self, name: str, *, paused: bool = False) -> None:
        """Boot the defined ``name``, with its vCPUs paused if ``paused``."""
        flags = lv.VIR_DOMAIN_START_PAUSED if paused else 0
        await self._call(f"start {name!r}", lambda: self._dom(name).createWithFlags(flags))

    async def destroy(self, name: str) -> None:
        """Power off ``name`` if it runs; absent or stopped domains are fine."""

        def do() -> None:
            dom = self._dom_or_none(name)
            if dom is not None:
                _power_off(dom)

        await self._call(f"destroy {name!r}", do)

    async def destroy_id(self, name: str, uuid: str) -> Outcome:
        """:meth:`destroy` of the domain with ``uuid`` if it is named ``name``; never another domain."""

        def do() -> Outcome:
            dom = self._dom_id(name, uuid)
            _power_off(dom)
            return Outcome.DONE

        return await self._by_id("destroy", name, uuid, do)

    async def undefine_id(self, name: str, uuid: str) -> Outcome:
        """:meth:`undefine` of the domain with ``uuid`` if it is named ``name``; never another domain.

        GONE if neither is defined, REPLACED (logged, nothing touched) if the
        name belongs to another domain now or the UUID to another name.
        """

        def do() -> Outcome:
            dom = self._dom_id(name, uuid)
            _power_off(dom)
            dom.undefineFlags(_UNDEFINE_FLAGS)
            return Outcome.DONE

        return await self._by_id("undefine", name, uuid, do)

    async def _by_id(self, verb: str, name: str, uuid: str, do: Callable[[], Outcome]) -> Outcome:
        try:
            return await self._call(f"{verb} {name!r} (UUID {uuid})", do)
        except DomainReplaced as exc:
            log.warning("domain.replaced", domain=name, uuid=uuid, action=verb, detail=exc.message)
            return Outcome.REPLACED
        except DomainNotFound:
            return Outcome.GONE

    async def undefine(self, name: str) -> None:
        """Remove the definition of ``name`` (stopping it first); absent is fine.

        Never deletes a file: NVRAM and TPM state named by the definition are
        kept (whoever created them removes them).
        """

        def do() -> None:
            dom = self._dom_or_none(name)
            if dom is None:
                return
            _power_off(dom)
            dom.undefineFlags(_UNDEFINE_FLAGS)

        await self._call(f"undefine {name!r}", do)

    async def snapshot_disks(self, name: str, overlays: dict[str, Path], *, reuse: bool = False) -> None:
        """External disk-only snapshot: each disk target gets a new overlay file.

        The old top image becomes the read-only backing file of the overlay.
        No snapshot metadata is kept (the overlays belong to instaclone).
        ``reuse``: the overlay files exist (``VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT``);
        libvirt attaches them instead of creating them inside the call.
        """
        disks = "".join(
            f"<disk name='{_xml_attr(tgt)}' snapshot='external'><driver type='qcow2'/>"
            f"<source file='{_xml_attr(str(path))}'/></disk>"
            for tgt, path in overlays.items()
        )
        xml = f"<domainsnapshot><description>instaclone</description><disks>{disks}</disks></domainsnapshot>"
        flags = (lv.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY | lv.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
                 | lv.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC)
        if reuse:
            flags |= lv.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT
        await self._call(f"disk snapshot of {name!r}", lambda: self._dom(name).snapshotCreateXML(xml, flags))


def _info(dom: lv.Domain) -> DomainInfo:
    state, reason = dom.state()
    flags = lv.VIR_DOMAIN_XML_SECURE
    if dom.isActive():
        flags |= lv.VIR_DOMAIN_XML_MIGRATABLE
    xml = dom.XMLDesc(flags)
    return DomainInfo(name=dom.name(), uuid=dom.UUIDString(), state=state_name(state), reason=reason,
                      xml=xml, disks=file_disks(xml))


def _power_off(dom: lv.Domain) -> None:
    """Stop ``dom`` if it runs; one that stopped by itself meanwhile is fine."""
    if dom.isActive():
        try:
            dom.destroy()
        except lv.RawLibvirtError:
            # It stopped by itself meanwhile (a QEMU whose incoming
            # migration failed exits): "domain is not running".
            if dom.isActive():
                raise


def _xml_attr(value: str) -> str:
    return (value.replace("&", "&amp;").replace("'", "&apos;").replace("<", "&lt;")
            .replace(">", "&gt;").replace('"', "&quot;"))


def _qemu_stopped_by_migration(dom: lv.Domain) -> bool:
    """QEMU's own run state is postmigrate (or finish-migrate): a migration stopped the vCPUs."""
    try:
        answer = json.loads(lv.qemu_monitor_command(dom, json.dumps({"execute": "query-status"}), None))
    except lv.RawLibvirtError:  # gone meanwhile, or no monitor: nothing we could resume
        return False
    return (answer.get("return") or {}).get("status") in ("postmigrate", "finish-migrate")
