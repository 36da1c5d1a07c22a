"""Moved to :mod:`instaclone.store` (re-exported here until the move is done).

``Journal`` is :class:`instaclone.store.Store`; the old constants are the
members of :class:`~instaclone.model.ResourceKind`, ``ResourceStatus`` and
``DeliveryStatus``.
"""

from __future__ import annotations

from .model import CloneRecord, Delivery, Event, JobRecord, Resource, ResourceKind, ResourceStatus
from .store import SCHEMA_VERSION, DeliveryStatus, Router, Store

Journal = Store

FILE = ResourceKind.FILE
DOMAIN = ResourceKind.DOMAIN
STUN = ResourceKind.STUN
SOURCE_DELTA = ResourceKind.SOURCE_DELTA

PLANNED = ResourceStatus.PLANNED
DONE = ResourceStatus.DONE
RELEASED = ResourceStatus.RELEASED

PENDING = DeliveryStatus.PENDING
DELIVERED = DeliveryStatus.DELIVERED
FAILED = DeliveryStatus.FAILED
DISABLED = DeliveryStatus.DISABLED

__all__ = [
    "DELIVERED", "DISABLED", "DOMAIN", "DONE", "FAILED", "FILE", "PENDING", "PLANNED", "RELEASED",
    "SCHEMA_VERSION", "SOURCE_DELTA", "STUN", "CloneRecord", "Delivery", "Event", "JobRecord", "Journal",
    "Resource", "Router", "Store",
]
