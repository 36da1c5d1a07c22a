"""Moved to :mod:`instaclone.jobs.preflight` and :mod:`instaclone.jobs.prepare`; this name stays
until every import uses the new ones. ``agent_channel`` is :func:`instaclone.jobs.customize.has_agent`."""

from .jobs.customize import AGENT_CHANNEL, has_agent as agent_channel, has_agent_channel
from .jobs.preflight import (
    DISK_FORMATS,
    ERROR,
    FIX_ACPI,
    FIX_AGENT,
    FIX_GENID,
    FIX_MEMORY,
    NEXT_BOOT,
    OK,
    PREPARABLE,
    WARN,
    Facts,
    Finding,
    Report,
    check,
    has_acpi,
    has_genid,
    has_numa,
    has_shared_file_ram,
)
from .jobs.prepare import Preparation, diff, pending, prepare, pretty

__all__ = ["AGENT_CHANNEL", "DISK_FORMATS", "ERROR", "FIX_ACPI", "FIX_AGENT", "FIX_GENID", "FIX_MEMORY", "NEXT_BOOT",
           "OK", "PREPARABLE", "WARN", "Facts", "Finding", "Preparation", "Report", "agent_channel", "check", "diff",
           "has_acpi", "has_agent_channel", "has_genid", "has_numa", "has_shared_file_ram", "pending", "prepare",
           "pretty"]
