"""Configuration: one TOML file, every key with a working default.

``load(path)`` returns a validated :class:`Config`. Errors name the offending
key (``clone.stun_deadline_ms: must be an integer between 50 and 600000``).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/instaclone/instaclone.toml")


@dataclass(frozen=True)
class DaemonConfig:
    socket: Path = Path("/run/instaclone/control.sock")
    socket_mode: int = 0o660
    state_dir: Path = Path("/var/lib/instaclone")
    max_concurrent_jobs: int = 4
    log_format: str = "json"  # json | console
    log_level: str = "info"


@dataclass(frozen=True)
class LibvirtConfig:
    uri: str = "qemu:///system"
    threads: int = 8


@dataclass(frozen=True)
class CloneConfig:
    storage_backend: str = "qcow2"
    memory_backend: str = "filecow"
    # Used for sources the first backend cannot serve ("none": refuse them).
    memory_fallback: str = "saverestore"
    stun_deadline_ms: int = 2000
    step_timeout_s: float = 120.0
    max_count: int = 64
    # Guest-side identity reset through the guest agent, per clone.
    customize_timeout_s: float = 60.0


@dataclass(frozen=True)
class Qcow2Config:
    delta_dir: Path | None = None  # default: <state_dir>/deltas
    qemu_img: str = "qemu-img"


@dataclass(frozen=True)
class FileCowConfig:
    # How a running source is kept from writing into the RAM its clones map:
    # "copy": clones map a sparse copy of the RAM file made during the stun
    #         (the source runs on in place and stays cloneable);
    # "respawn": the source's QEMU is restarted as one more private child of
    #         the frozen file (no copy; the stun includes a QEMU restart).
    source_mode: str = "copy"


@dataclass(frozen=True)
class Config:
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    libvirt: LibvirtConfig = field(default_factory=LibvirtConfig)
    clone: CloneConfig = field(default_factory=CloneConfig)
    qcow2: Qcow2Config = field(default_factory=Qcow2Config)
    filecow: FileCowConfig = field(default_factory=FileCowConfig)

    @property
    def delta_dir(self) -> Path:
        return self.qcow2.delta_dir or self.daemon.state_dir / "deltas"

    @property
    def clones_dir(self) -> Path:
        return self.daemon.state_dir / "clones"

    @property
    def jobs_dir(self) -> Path:
        return self.daemon.state_dir / "jobs"

    @property
    def journal_path(self) -> Path:
        return self.daemon.state_dir / "journal.sqlite"


# Section name in the TOML file -> dataclass field of Config.
_SECTIONS = {"daemon": "daemon", "libvirt": "libvirt", "clone": "clone", "storage.qcow2": "qcow2",
             "memory.filecow": "filecow"}

# (min, max) for numeric keys.
_RANGES: dict[str, tuple[float, float]] = {
    "daemon.socket_mode": (0, 0o777),
    "daemon.max_concurrent_jobs": (1, 256),
    "libvirt.threads": (2, 128),
    "clone.stun_deadline_ms": (50, 600_000),
    "clone.step_timeout_s": (1, 3600),
    "clone.max_count": (1, 1000),
    "clone.customize_timeout_s": (1, 3600),
}
_CHOICES = {
    "daemon.log_format": ("json", "console"),
    "daemon.log_level": ("debug", "info", "warning", "error"),
    "memory.filecow.source_mode": ("copy", "respawn"),
}


def _coerce(key: str, value: Any, default: Any, annotation: str) -> Any:
    if "Path" in annotation:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: must be a non-empty path string")
        path = Path(value)
        if not path.is_absolute():
            raise ConfigError(f"{key}: must be an absolute path, got {value!r}")
        return path
    if annotation == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: must be an integer, got {value!r}")
    elif annotation == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: must be a number, got {value!r}")
        value = float(value)
    elif annotation == "str":
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: must be a non-empty string, got {value!r}")
    if key in _RANGES:
        lo, hi = _RANGES[key]
        if not lo <= value <= hi:
            raise ConfigError(f"{key}: must be between {lo:g} and {hi:g}, got {value!r}")
    if key in _CHOICES and value not in _CHOICES[key]:
        raise ConfigError(f"{key}: must be one of {', '.join(_CHOICES[key])}, got {value!r}")
    return value


def _flatten_sections(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, table in raw.items():
        if name in ("storage", "memory") and isinstance(table, dict):
            for sub, subtable in table.items():
                out[f"{name}.{sub}"] = subtable
        else:
            out[name] = table
    return out


def from_dict(raw: dict[str, Any]) -> Config:
    """Build a validated Config from parsed TOML. Unknown keys are errors."""
    built: dict[str, Any] = {}
    for section, table in _flatten_sections(raw).items():
        if section not in _SECTIONS:
            raise ConfigError(f"{section}: unknown section (known: {', '.join(_SECTIONS)})")
        if not isinstance(table, dict):
            raise ConfigError(f"{section}: must be a table")
        attr = _SECTIONS[section]
        cls = type(getattr(Config(), attr))
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in table.items():
            if key not in known:
                raise ConfigError(f"{section}.{key}: unknown key (known: {', '.join(known)})")
            f = known[key]
            values[key] = _coerce(f"{section}.{key}", value, f.default, str(f.type))
        built[attr] = cls(**values)
    return Config(**built)


def load(path: Path | None) -> Config:
    """Read and validate ``path``; ``None`` or a missing default file gives defaults."""
    if path is None:
        if not DEFAULT_CONFIG_PATH.exists():
            return Config()
        path = DEFAULT_CONFIG_PATH
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    return from_dict(raw)
