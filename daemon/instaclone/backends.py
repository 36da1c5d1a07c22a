"""Finding backends by name: the entry-point groups ``instaclone.storage`` and ``instaclone.memory``.

Built-ins and third-party backends alike are registered there (see
pyproject.toml); an unknown name fails at daemon start. Every installed
backend's config section (``[storage.<name>]``, ``[memory.<name>]``) is
known to :func:`load_config`, whether the backend is configured or not. The
contracts themselves are in :mod:`instaclone.plugin_api`.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from . import config as cfg
from .errors import ConfigError
from .plugin_api import Backend, MemoryBackend, StorageBackend
from .settings import check_section_class

GROUPS: dict[str, type[Backend]] = {"instaclone.storage": StorageBackend, "instaclone.memory": MemoryBackend}


def _load(group: str, name: str, base: type[Backend]) -> type[Backend]:
    found = {ep.name: ep for ep in entry_points(group=group)}
    if name not in found:
        known = ", ".join(sorted(found)) or "none"
        raise ConfigError(f"unknown {group.split('.')[-1]} backend {name!r} (installed: {known})")
    try:
        cls = found[name].load()
    except Exception as exc:  # noqa: BLE001 - a plugin's import may raise anything: said once, no traceback
        raise ConfigError(f"entry point {group}:{name} ({found[name].value}) cannot be loaded: "
                          f"{type(exc).__name__}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(f"entry point {group}:{name} is not a {base.__name__}")
    if cls.name != name:
        raise ConfigError(f"entry point {group}:{name} names a backend called {cls.name!r}: the names must agree")
    return cls


def names(group: str) -> list[str]:
    """The names registered in the entry-point group ``group``, sorted."""
    return sorted({ep.name for ep in entry_points(group=group)})


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


def all_backends() -> list[type[Backend]]:
    """Every installed backend class: storage, then memory, each sorted by name."""
    return [_load(group, name, base) for group, base in GROUPS.items() for name in names(group)]


def sections() -> dict[str, type[Any]]:
    """Every installed backend's config section: ``"memory.filecow"`` -> its settings class.

    Every installed backend is loaded, configured or not (its section is checked whether it is used or
    not): a plugin that cannot be loaded is a ConfigError naming its entry point.
    """
    out: dict[str, type[Any]] = {}
    for cls in all_backends():
        if cls.settings_class is None:
            continue
        try:
            check_section_class(cls.settings_class)
        except TypeError as exc:
            raise ConfigError(f"backend {cls.section()}: its settings_class is not a config section: {exc}") from None
        out[cls.section()] = cls.settings_class
    return out


def configured(config: cfg.Config) -> tuple[type[StorageBackend], list[type[MemoryBackend]]]:
    """The classes of the storage backend and the memory backends (in order) ``config`` names."""
    return (storage_backend(config.clone.storage_backend),
            [memory_backend(name) for name in config.clone.memory_backends])


def load_config(path: Path | None) -> cfg.Config:
    """:func:`instaclone.config.load` with every installed backend's section; ConfigError names the key."""
    return cfg.load(path, sections())


def config_from_dict(raw: dict[str, Any]) -> cfg.Config:
    """:func:`instaclone.config.from_dict` with every installed backend's section."""
    return cfg.from_dict(raw, sections())
