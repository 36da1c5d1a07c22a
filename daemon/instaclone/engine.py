"""Re-export: the engine lives in :mod:`instaclone.jobs.engine` (docs/architecture.md)."""

from .jobs.engine import Engine

__all__ = ["Engine"]
