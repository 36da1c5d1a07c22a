"""LibvirtHypervisor: the :class:`~instaclone.hv.protocol.Hypervisor` on libvirt.

One class made of one mixin per concern, all on the same
:class:`~instaclone.hv.connection.Connection` (its worker threads and its
one libvirt connection).
"""

from __future__ import annotations

from .agent import Agent
from .blockjobs import BlockJobs
from .domains import Domains
from .migration import Migration
from .nics import Nics


class LibvirtHypervisor(Domains, Agent, Nics, Migration, BlockJobs):
    """Async access to one libvirt connection (``LibvirtHypervisor(uri, threads=8)``)."""


__all__ = ["LibvirtHypervisor"]
