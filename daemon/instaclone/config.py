"""Configuration: one TOML file, every key with a working default.

``load(path)`` returns a validated :class:`Config`. Errors name the offending
key (``clone.stun_deadline_ms: must be an integer between 50 and 600000``).
"""

from __future__ import annotations

import grp
import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from . import events
from .errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/instaclone/instaclone.toml")

#: The group the installer creates; members may drive the daemon.
SERVICE_GROUP = "instaclone"


def default_socket_group() -> str:
    """``instaclone`` if that group exists and this process may give it a file, else "" (its primary group).

    root may give any group; another user only one of its own: a daemon run
    by hand by a user outside the group keeps its own group instead of failing.
    """
    try:
        gid = grp.getgrnam(SERVICE_GROUP).gr_gid
    except KeyError:
        return ""
    if os.geteuid() != 0 and gid != os.getegid() and gid not in os.getgroups():
        return ""
    return SERVICE_GROUP


@dataclass(frozen=True)
class DaemonConfig:
    socket: Path = Path("/run/instaclone/control.sock")
    socket_mode: int = 0o660
    # Group of the socket the daemon binds itself (a socket-activated one is
    # the socket unit's: SocketGroup=). "": the daemon's primary group.
    socket_group: str = field(default_factory=default_socket_group)
    state_dir: Path = Path("/var/lib/instaclone")
    max_concurrent_jobs: int = 4
    # auto: journald (with JOB_ID, CLONE, ... fields) under systemd, else JSON lines on stdout.
    log_format: str = "auto"  # auto | json | console | journald
    log_level: str = "info"
    # On SIGTERM: running jobs get this long to finish, then are rolled back.
    shutdown_grace_s: float = 30.0
    # Prometheus metrics on a loopback TCP port too ("127.0.0.1:9464"); "" = only
    # on the control socket (GET /metrics).
    metrics_listen: str = ""


@dataclass(frozen=True)
class AccessConfig:
    # Callers are identified by SO_PEERCRED. root and the daemon's own user may
    # do anything. Members of write_groups may also clone, destroy, freeze,
    # replay; members of read_groups may only read. With read_groups empty,
    # anyone who can open the socket (mode daemon.socket_mode) may read.
    write_groups: tuple[str, ...] = ("instaclone",)
    read_groups: tuple[str, ...] = ()


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
    # Clones started at once, across all jobs (QEMU start, NIC replug, identity
    # reset, network): more at once only share the CPU more thinly. Read at start.
    start_parallel: int = 4
    # Guest-side identity reset through the guest agent, per clone.
    customize_timeout_s: float = 60.0
    # Keep the source's SSH host keys in clones (default: regenerate them).
    keep_ssh_host_keys: bool = False
    # A shell script (host path) run in every clone after its identity reset,
    # unless the request brings its own ("" : none).
    customize_script: str = ""
    # Images in a disk's backing chain above which the running domain's chain
    # is consolidated after a job (a live block pull into its own top image).
    max_chain_depth: int = 32


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
    #         the frozen file (no copy; the stun includes a QEMU restart);
    # "precopy": before the stun, the running source is live-migrated into a
    #         paused shadow QEMU whose RAM is a fresh shared file; the stun is
    #         the migration's switchover plus the disk snapshot, and clones map
    #         the shadow's file. Falls back to "copy" if the pre-copy does not
    #         reach the switchover within precopy_timeout_s.
    source_mode: str = "copy"
    # QEMU's downtime-limit: the longest final copy (RAM still dirty plus
    # device state) the pre-copy plans for at switchover.
    precopy_downtime_ms: int = 30
    # Below clone.step_timeout_s (the Stunned step's timeout, which it runs in).
    precopy_timeout_s: float = 90.0


@dataclass(frozen=True)
class WebhookEndpoint:
    """One ``[[webhooks.endpoints]]`` table."""

    name: str
    url: str
    #: ``whsec_<base64>`` secrets; all of them sign each message (rotation).
    secrets: tuple[str, ...]
    #: Event types or globs (``clone.*``); ``*`` is every event.
    events: tuple[str, ...] = ("*",)

    def keys(self) -> list[bytes]:
        return [events.decode_secret(s) for s in self.secrets]


@dataclass(frozen=True)
class WebhooksConfig:
    # Per attempt: a receiver slower than this counts as failed and is retried.
    timeout_s: float = 10.0
    # Attempts per delivery before it is marked failed (replayable by hand).
    max_attempts: int = 12
    # Exponential backoff with jitter: about initial * 2^(attempt-1), capped.
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 600.0
    # Requests in flight at once, per endpoint.
    max_in_flight: int = 8
    # Events whose deliveries are all settled are pruned after this long.
    retention_days: float = 7.0
    endpoints: tuple[WebhookEndpoint, ...] = ()


@dataclass(frozen=True)
class PoolsConfig:
    # The host budget every pool's replenishment stays within: clones on the
    # host (registered plus being made, pooled or not), and the guest RAM they
    # are defined with (0: no memory budget). Claimed members count too.
    max_clones: int = 64
    max_memory_mib: int = 0
    # A claim on a pool with no idle member waits this long for the next one.
    claim_wait_s: float = 60.0
    # Pools are checked this often (and at once after each claim, release and job).
    check_interval_s: float = 5.0


@dataclass(frozen=True)
class GcConfig:
    # A full garbage collection (every file instaclone made and no chain uses)
    # runs this often, the first one this long after start; 0: only on request
    # (POST /v1/gc). Destroy collects what the destroyed clone released itself.
    interval_s: float = 3600.0


@dataclass(frozen=True)
class Config:
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    libvirt: LibvirtConfig = field(default_factory=LibvirtConfig)
    clone: CloneConfig = field(default_factory=CloneConfig)
    qcow2: Qcow2Config = field(default_factory=Qcow2Config)
    filecow: FileCowConfig = field(default_factory=FileCowConfig)
    webhooks: WebhooksConfig = field(default_factory=WebhooksConfig)
    access: AccessConfig = field(default_factory=AccessConfig)
    pools: PoolsConfig = field(default_factory=PoolsConfig)
    gc: GcConfig = field(default_factory=GcConfig)

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
    def own_dirs(self) -> tuple[Path, ...]:
        """instaclone's own directories: only files made below them are ever deleted by garbage collection."""
        return (self.delta_dir, self.clones_dir, self.jobs_dir, self.daemon.state_dir / "frozen")

    @property
    def journal_path(self) -> Path:
        return self.daemon.state_dir / "journal.sqlite"


# Section name in the TOML file -> dataclass field of Config.
_SECTIONS = {"daemon": "daemon", "libvirt": "libvirt", "clone": "clone", "storage.qcow2": "qcow2",
             "memory.filecow": "filecow", "webhooks": "webhooks", "access": "access", "pools": "pools",
             "gc": "gc"}

# (min, max) for numeric keys.
_RANGES: dict[str, tuple[float, float]] = {
    "daemon.socket_mode": (0, 0o777),
    "daemon.max_concurrent_jobs": (1, 256),
    "libvirt.threads": (2, 128),
    "clone.stun_deadline_ms": (50, 600_000),
    "clone.step_timeout_s": (1, 3600),
    "clone.max_count": (1, 1000),
    "clone.start_parallel": (1, 256),
    "clone.customize_timeout_s": (1, 3600),
    "clone.max_chain_depth": (2, 1000),
    "webhooks.timeout_s": (0.1, 300),
    "webhooks.max_attempts": (1, 1000),
    "webhooks.backoff_initial_s": (0.01, 3600),
    "webhooks.backoff_max_s": (0.01, 86400),
    "webhooks.max_in_flight": (1, 256),
    "webhooks.retention_days": (0, 3650),
    "daemon.shutdown_grace_s": (0, 3600),
    "memory.filecow.precopy_downtime_ms": (1, 10_000),
    "memory.filecow.precopy_timeout_s": (1, 3600),
    "pools.max_clones": (1, 100_000),
    "pools.max_memory_mib": (0, 1 << 30),
    "pools.claim_wait_s": (0, 3600),
    "pools.check_interval_s": (0.1, 3600),
    "gc.interval_s": (0, 7 * 86400),
}
_CHOICES = {
    "daemon.log_format": ("auto", "json", "console", "journald"),
    "daemon.log_level": ("debug", "info", "warning", "error"),
    "memory.filecow.source_mode": ("precopy", "copy", "respawn"),
}


def _coerce(key: str, value: Any, default: Any, annotation: str) -> Any:
    if "Path" in annotation:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: must be a non-empty path string")
        path = Path(value)
        if not path.is_absolute():
            raise ConfigError(f"{key}: must be an absolute path, got {value!r}")
        return path
    if annotation.startswith("tuple[str"):
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{key}: must be a list of non-empty strings, got {value!r}")
        return tuple(value)
    if key == "daemon.socket_group":
        if not isinstance(value, str):
            raise ConfigError(f"{key}: must be a group name (\"\" for the daemon's own group), got {value!r}")
        if value:
            try:
                grp.getgrnam(value)
            except KeyError:
                raise ConfigError(f"{key}: no group named {value!r} on this host "
                                  f"(create it with groupadd --system {value}, or set \"\")") from None
        return value
    if key == "daemon.metrics_listen":
        if not isinstance(value, str):
            raise ConfigError(f"{key}: must be a string, got {value!r}")
        if value:
            parse_listen(key, value)
        return value
    if key == "clone.customize_script":
        if not isinstance(value, str):
            raise ConfigError(f"{key}: must be a path string (\"\" for none), got {value!r}")
        if value:
            if not Path(value).is_absolute():
                raise ConfigError(f"{key}: must be an absolute path, got {value!r}")
            if not Path(value).is_file():
                raise ConfigError(f"{key}: {value} is not a readable file")
        return value
    if annotation == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: must be true or false, got {value!r}")
        return value
    if annotation == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: must be an integer, got {value!r}")
    elif annotation == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: must be a number, got {value!r}")
        value = float(value)
    elif annotation == "str" and (not isinstance(value, str) or not value):
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
            if attr == "webhooks" and key == "endpoints":
                values[key] = _endpoints(value)
                continue
            if key not in known:
                raise ConfigError(f"{section}.{key}: unknown key (known: {', '.join(known)})")
            f = known[key]
            values[key] = _coerce(f"{section}.{key}", value, f.default, str(f.type))
        built[attr] = cls(**values)
    return Config(**built)


_ENDPOINT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def _endpoints(raw: Any) -> tuple[WebhookEndpoint, ...]:
    """Validate ``[[webhooks.endpoints]]``; errors name ``webhooks.endpoints[i].key``."""
    if not isinstance(raw, list):
        raise ConfigError("webhooks.endpoints: must be an array of tables ([[webhooks.endpoints]])")
    out: list[WebhookEndpoint] = []
    for i, table in enumerate(raw):
        where = f"webhooks.endpoints[{i}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: must be a table")
        unknown = sorted(set(table) - {"name", "url", "secret", "secrets", "events"})
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}: unknown key (known: name, url, secret, secrets, events)")
        name = table.get("name", f"endpoint{i}")
        if not isinstance(name, str) or not _ENDPOINT_NAME.match(name):
            raise ConfigError(f"{where}.name: must be 1-63 letters, digits, '.', '_' or '-', got {name!r}")
        if any(e.name == name for e in out):
            raise ConfigError(f"{where}.name: {name!r} is used by another endpoint")
        url = table.get("url")
        if not isinstance(url, str) or not url:
            raise ConfigError(f"{where}.url: required: an http:// or https:// URL")
        problem = _url_problem(url)
        if problem:
            raise ConfigError(f"{where}.url: {problem}")
        if "secret" in table and "secrets" in table:
            raise ConfigError(f"{where}.secrets: give either 'secret' or 'secrets', not both")
        secrets = table.get("secrets", [table["secret"]] if "secret" in table else None)
        key = f"{where}.{'secrets' if 'secrets' in table else 'secret'}"
        if not isinstance(secrets, list) or not secrets or not all(isinstance(s, str) for s in secrets):
            raise ConfigError(f"{key}: required: a 'whsec_...' secret, or a list of them while rotating")
        for s in secrets:
            try:
                events.decode_secret(s)
            except ValueError as exc:
                raise ConfigError(f"{key}: secret {exc}") from None
        filters = table.get("events", ["*"])
        if not isinstance(filters, list) or not filters or not all(isinstance(f, str) for f in filters):
            raise ConfigError(f"{where}.events: must be a non-empty list of event types or globs")
        for f in filters:
            if not events.valid_pattern(f):
                raise ConfigError(f"{where}.events: {f!r} matches no event type "
                                  f"(types: {', '.join(events.TYPES)})")
        out.append(WebhookEndpoint(name, url, tuple(secrets), tuple(filters)))
    return tuple(out)


def _url_problem(url: str) -> str | None:
    """Why ``url`` cannot be a webhook target, or None."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"{url!r} is not a valid URL: {exc}"
    if parts.scheme not in ("http", "https"):
        return f"must be an http:// or https:// URL, got {url!r}"
    if not parts.hostname:
        return f"has no host: {url!r}"
    if parts.username or parts.password:
        return "must not carry credentials (the signature authenticates the daemon)"
    if parts.fragment:
        return f"must not have a #fragment: {url!r}"
    if port == 0:
        return f"port 0 is not a valid port: {url!r}"
    if any(c.isspace() or ord(c) < 0x20 for c in url):
        return f"contains whitespace or control characters: {url!r}"
    return None


def parse_listen(key: str, value: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:port`` for IPv6) on a loopback address."""
    import ipaddress

    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{key}: must be HOST:PORT, e.g. 127.0.0.1:9464, got {value!r}")
    if host != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            raise ConfigError(f"{key}: {host!r} is not an IP address or localhost") from None
        if not loopback:
            raise ConfigError(f"{key}: must be a loopback address (metrics are not authenticated), got {host!r}")
    return host, int(port)


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
