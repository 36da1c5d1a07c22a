"""The hypervisor as the rest of instaclone sees it: a ``typing.Protocol``.

:class:`~instaclone.hv.hypervisor.LibvirtHypervisor` implements it on
libvirt; the tests' ``FakeHypervisor`` implements it in memory. mypy checks
both against it (``tests/unit/hv/test_hv_protocol.py``), so a fake cannot drift from
the real thing. Pure: importing this module imports no libvirt.

Every method may raise :class:`~instaclone.errors.LibvirtError` or one of its
subclasses: ``DomainNotFound`` for an absent domain, ``LibvirtUnavailable``
when libvirtd cannot be reached, ``DomainStateInvalid``, ``LibvirtTimeout``.

A domain instaclone made (a clone, a shadow) is acted on by identity: the
``*_id`` methods take its name *and* the UUID recorded for it, look it up
by UUID and refuse it unless the name matches too, so that a domain defined
under a freed name is never destroyed or undefined. The by-name calls are
for sources (named by the user) and for domains the caller just defined.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from .records import Disk, DomainInfo, MigrationInfo, Outcome, QemuFacts, file_disks

__all__ = ["Disk", "DomainInfo", "Hypervisor", "MigrationInfo", "Outcome", "QemuFacts", "file_disks"]


class Hypervisor(Protocol):
    """Async access to one hypervisor connection."""

    # -- connection ---------------------------------------------------------------

    async def connect(self) -> None:
        """Open the connection; LibvirtUnavailable if libvirtd cannot be reached."""

    async def is_connected(self) -> bool:
        """Whether the connection is open and libvirtd answers (no reconnect)."""

    async def ensure_connected(self) -> bool:
        """:meth:`is_connected`, reconnecting first if the connection died; never raises."""

    async def close(self) -> None:
        """Close the connection and stop the worker threads; the object is unusable after."""

    # -- domains ------------------------------------------------------------------

    async def lookup(self, name: str) -> DomainInfo:
        """Name, UUID, state and migratable XML of ``name``; DomainNotFound if absent."""

    async def lookup_id(self, name: str, uuid: str) -> DomainInfo:
        """:meth:`lookup` of the domain with ``uuid``, which must be named ``name``.

        DomainNotFound if it is gone; DomainReplaced (a DomainNotFound) if the
        name now belongs to another domain, or the UUID goes by another name.
        """

    async def inactive_xml(self, name: str) -> str:
        """The persistent (next-boot) definition of ``name``."""

    async def exists(self, name: str) -> bool:
        """Whether a domain ``name`` is defined."""

    async def state(self, name: str) -> str:
        """``running``, ``paused``, ``shutoff``, ... of ``name`` (see DomainInfo.state)."""

    async def list_names(self) -> list[str]:
        """The names of all domains, sorted."""

    async def suspend(self, name: str) -> None:
        """Pause the vCPUs of ``name``."""

    async def resume(self, name: str) -> None:
        """Resume ``name``; a domain that is already running is left alone."""

    async def define(self, xml: str) -> str:
        """Define (or redefine) a persistent domain; returns its name."""

    async def start(self, name: str, *, paused: bool = False) -> None:
        """Boot the defined ``name``, with its vCPUs paused if ``paused``."""

    async def destroy(self, name: str) -> None:
        """Power off ``name`` if it runs; absent or stopped domains are fine."""

    async def undefine(self, name: str) -> None:
        """Stop and remove the definition of ``name``; absent is fine; never deletes a file."""

    async def destroy_id(self, name: str, uuid: str) -> Outcome:
        """Power off the domain with ``uuid`` if it is named ``name`` and runs (see :class:`Outcome`)."""

    async def undefine_id(self, name: str, uuid: str) -> Outcome:
        """:meth:`undefine` of the domain with ``uuid`` if it is named ``name``.

        GONE: nothing has that UUID or that name. REPLACED: the name belongs to
        another domain now (or the UUID to another name); nothing was touched
        (logged). Idempotent undo takes both as done; a user's request naming
        the domain is refused on REPLACED.
        """

    async def snapshot_disks(self, name: str, overlays: dict[str, Path], *, reuse: bool = False) -> None:
        """External disk-only snapshot: disk target -> its new overlay file (no metadata kept).

        ``reuse``: the overlays exist already (made outside the stun, backed by
        the current tops, with their formats named) and are attached as they
        are; otherwise libvirt creates them inside the call.
        """

    # -- guest agent --------------------------------------------------------------

    async def agent(self, name: str, command: str, arguments: dict[str, Any] | None = None,
                    *, timeout_s: int = 10) -> Any:
        """Run one QEMU guest agent command; returns its ``return`` value (decoded JSON)."""

    async def agent_exec(self, name: str, argv: list[str], *, stdin: bytes = b"",
                         timeout_s: float = 30.0) -> tuple[int, str]:
        """Run ``argv`` in the guest; (exit status, stdout+stderr); LibvirtTimeout after ``timeout_s``."""

    # -- network interfaces -------------------------------------------------------

    async def set_link(self, name: str, mac: str, *, up: bool) -> None:
        """Set the link state of the running domain's NIC with ``mac``."""

    async def replace_nic(self, name: str, mac: str, *, link_up: bool, timeout_s: float) -> None:
        """Replace the running domain's NIC with ``mac`` by an identical one (the guest reads the new MAC).

        LibvirtTimeout if the guest does not release the old one within ``timeout_s``.
        """

    # -- memory and device state (QEMU migration stream) --------------------------

    async def ram_file(self, name: str, alias: str = "pc.ram") -> tuple[Path, bool] | None:
        """(path, shared) of the file behind the domain's RAM backend, or None if not file-backed."""

    async def qemu_facts(self, name: str) -> QemuFacts:
        """The active domain's QEMU version and accelerator, asked of that very QEMU."""

    async def save_state(self, name: str, path: Path, *, ignore_shared: bool = False,
                         mapped_ram_channels: int = 0, timeout_s: float = 120.0) -> dict[str, Any]:
        """Write the paused domain's migration stream to ``path``; QEMU's final statistics.

        ``ignore_shared``: device state only (RAM in shared files is left
        out). ``mapped_ram_channels`` > 0: QEMU's mapped-ram format (RAM pages
        at fixed offsets, zero pages never written: a sparse file) written by
        that many parallel channels; LibvirtError on a QEMU before 9.0. 0: the
        sequential stream, which every QEMU writes.
        """

    async def load_state(self, name: str, path: Path, *, ignore_shared: bool = False,
                         mapped_ram_channels: int = 0, timeout_s: float = 120.0) -> None:
        """Feed ``path`` into a domain started paused with ``-incoming defer``.

        ``ignore_shared`` and ``mapped_ram_channels`` must be those of the save that wrote ``path``.
        """

    async def migrate_live(self, name: str, target: str, *, downtime_ms: int, auto_converge: bool = True) -> None:
        """Start a live pre-copy migration of the running ``name`` into ``target``; returns once it runs.

        ``target`` is a domain started paused with ``-incoming defer`` whose
        devices match ``name``'s. The stream goes over a socket pair, RAM
        included (``x-ignore-shared`` off). The source stops by itself at
        switchover and waits there (``pause-before-switchover``) until
        :meth:`continue_migration`; QEMU plans a final copy of at most
        ``downtime_ms``. ``auto_converge`` throttles vCPUs that dirty RAM
        faster than it is copied.
        """

    async def wait_migration(self, name: str, *, until: tuple[str, ...], timeout_s: float) -> MigrationInfo:
        """Poll ``name``'s migration until its status is one of ``until``; LibvirtError if it failed.

        LibvirtTimeout after ``timeout_s``; the migration is left as it is then.
        """

    async def continue_migration(self, name: str) -> None:
        """Let a migration stopped at pre-switchover complete (the source's vCPUs stay stopped)."""

    async def cancel_migration(self, name: str) -> bool:
        """Cancel ``name``'s outgoing migration if one is in flight and wait until it is over.

        QEMU lets a source it stopped for the switchover run again. True if
        there was one to cancel.
        """

    # -- block jobs ---------------------------------------------------------------

    async def backing_chain(self, name: str, target: str) -> list[Path]:
        """Disk ``target`` of the running ``name`` as QEMU uses it, active layer first."""

    async def block_pull(self, name: str, target: str, *, base: Path | None, timeout_s: float) -> None:
        """Live block pull of ``target`` down to ``base`` (None: everything); returns when done."""
