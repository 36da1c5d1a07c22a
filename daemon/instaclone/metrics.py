"""Moved to :mod:`instaclone.outbox.metrics` (re-exported here until the move is done)."""

from .outbox.metrics import Metrics

__all__ = ["Metrics"]
