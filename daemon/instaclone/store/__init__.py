"""The store: everything instaclone persists, in one SQLite database.

Everything a job is about to create is written here *before* it is created
(docs/design/ledger.md), so that recovery after a crash can find and remove
it; every change the outside world hears about writes its event in the same
transaction (the outbox). Imports only the core (docs/development/layers.md).

Parts: :mod:`.schema` (tables, migrations), :mod:`.db` (the writer and reader
threads), :mod:`.jobs`, :mod:`.ledger` (resource rows), :mod:`.clones`,
:mod:`.frozen`, :mod:`.gc`, :mod:`.outbox` (events, deliveries, webhook endpoints), :mod:`.pools`,
:mod:`.retention` (pruning after ``journal.retention_days``).
"""

from __future__ import annotations

from .base import CommitHook, DeliveryStatus, Router
from .clones import ClonesMixin
from .frozen import FrozenMixin
from .gc import GcMixin
from .jobs import JobsMixin
from .ledger import LedgerMixin
from .outbox import OutboxMixin
from .pools import PoolsMixin
from .retention import RetentionMixin
from .schema import SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION", "CommitHook", "DeliveryStatus", "Router", "Store"]


class Store(JobsMixin, LedgerMixin, ClonesMixin, FrozenMixin, GcMixin, OutboxMixin, PoolsMixin, RetentionMixin):
    """Async facade over the database; every call runs on the store's own threads.

    ``Store(path, on_commit=hook)``: ``hook(events)`` is called on the event
    loop after each transaction that wrote events (e.g. ``EventBus.publish``).
    Call :meth:`open` before use and :meth:`close` after.
    """
