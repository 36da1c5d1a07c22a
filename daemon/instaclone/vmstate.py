"""Moved to :mod:`instaclone.hv.vmstate`; this name stays until every import uses the new one."""

from .hv.vmstate import (
    Decision,
    StateItem,
    clone_nvram_name,
    disk_source,
    nvram_path,
    refusal_message,
    refusals,
    walk,
)

__all__ = ["Decision", "StateItem", "clone_nvram_name", "disk_source", "nvram_path", "refusal_message",
           "refusals", "walk"]
