"""Finding backends by name: the entry-point groups ``instaclone.storage`` and ``instaclone.memory``.

Built-ins and third-party backends alike are registered there (see
pyproject.toml); an unknown name fails at daemon start. The contracts
themselves are in :mod:`instaclone.plugin_api`.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from .errors import ConfigError
from .plugin_api import Backend, MemoryBackend, StorageBackend


def _load(group: str, name: str, base: type[Backend]) -> type[Backend]:
    found = {ep.name: ep for ep in entry_points(group=group)}
    if name not in found:
        known = ", ".join(sorted(found)) or "none"
        raise ConfigError(f"unknown {group.split('.')[-1]} backend {name!r} (installed: {known})")
    cls = found[name].load()
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(f"entry point {group}:{name} is not a {base.__name__}")
    return cls


def storage_backend(name: str) -> type[StorageBackend]:
    """The storage backend class registered as ``name``; ConfigError if there is none."""
    cls = _load("instaclone.storage", name, StorageBackend)
    assert issubclass(cls, StorageBackend)
    return cls


def memory_backend(name: str) -> type[MemoryBackend]:
    """The memory backend class registered as ``name``; ConfigError if there is none."""
    cls = _load("instaclone.memory", name, MemoryBackend)
    assert issubclass(cls, MemoryBackend)
    return cls
