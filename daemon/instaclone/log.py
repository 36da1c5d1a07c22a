"""structlog set-up: JSON lines by default, a console renderer on request."""

from __future__ import annotations

import logging
import os
import sys

import structlog

from . import systemd


def resolve_format(fmt: str) -> str:
    """``auto`` is ``journald`` under systemd (when journald listens), else ``json``."""
    if fmt != "auto":
        return fmt
    if systemd.under_systemd() and os.path.exists(systemd.JOURNAL_SOCKET):
        return "journald"
    return "json"


def setup(fmt: str = "json", level: str = "info") -> None:
    lvl = getattr(logging, level.upper(), logging.INFO)
    renderer: structlog.types.Processor
    fmt = resolve_format(fmt)
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    elif fmt == "journald":
        # Fields JOB_ID, CLONE, STATE, ... per entry; JSON on stdout if journald is away.
        renderer = systemd.JournaldRenderer()
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=False,
    )


def get(**bound: object) -> structlog.typing.FilteringBoundLogger:
    """A logger with ``bound`` context that follows :func:`setup` even if made before it.

    (``get_logger().bind()`` at import time would freeze structlog's default
    configuration into module-level loggers.)
    """
    return structlog.get_logger("instaclone", **bound)  # type: ignore[no-any-return]
