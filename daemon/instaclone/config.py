"""Configuration: one TOML file, every key with a working default.

``load(path)`` returns a validated :class:`Config`. Errors name the offending
key (``clone.stun_deadline_ms: must be an integer between 50 and 600000``).
"""

from __future__ import annotations

import errno
import grp
import os
import re
import stat
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


#: The group libvirt runs QEMU in on Debian (user libvirt-qemu, group kvm).
QEMU_GROUP = "kvm"


def default_qemu_group() -> str:
    """``kvm`` if that group exists here, else "" (see ``DaemonConfig.qemu_group``)."""
    try:
        grp.getgrnam(QEMU_GROUP)
    except KeyError:
        return ""
    return QEMU_GROUP


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
    # The group libvirt runs QEMU in (qemu.conf "group"). The directories QEMU
    # must pass through to reach a clone's disks and NVRAM (state, clones,
    # deltas, jobs and each clone's) are root's, mode 0710 with this group:
    # QEMU may traverse them, not list them; nobody else may do either. ""
    # (no such group): those directories are 0711 instead.
    qemu_group: str = field(default_factory=default_qemu_group)

    def qemu_reach(self) -> tuple[int, int]:
        """(mode, gid) of a directory QEMU must pass through; gid -1 keeps root's."""
        if self.qemu_group:
            try:
                return 0o710, grp.getgrnam(self.qemu_group).gr_gid
            except KeyError:
                pass
        return 0o711, -1


@dataclass(frozen=True)
class AccessConfig:
    # Callers are identified by SO_PEERCRED (uid) and SO_PEERGROUPS (groups).
    # Admins (root, the daemon's own user, members of admin_groups) may do
    # anything and see everything. Members of write_groups may also clone,
    # destroy, freeze, replay; members of read_groups may only read. With
    # read_groups empty, anyone who can open the socket (mode
    # daemon.socket_mode) may read. A non-admin sees and acts on only the
    # jobs, clones and claims it owns (its uid made them).
    write_groups: tuple[str, ...] = ("instaclone",)
    read_groups: tuple[str, ...] = ()
    admin_groups: tuple[str, ...] = ()
    # Per group, the source names (glob patterns) its non-admin members may
    # clone, freeze, prepare or make a pool of: ((group, (pattern, ...)), ...),
    # "*" for every caller. Empty (the default): every source.
    sources: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def sources_of(self, groups: set[str]) -> tuple[str, ...] | None:
        """The source patterns a non-admin in ``groups`` may use (None: every source)."""
        if not self.sources:
            return None
        return tuple(p for g, patterns in self.sources if g == "*" or g in groups for p in patterns)


@dataclass(frozen=True)
class LibvirtConfig:
    uri: str = "qemu:///system"
    threads: int = 8
    # Worker threads for guest-agent calls only (exec, files, identity reset):
    # a hung guest holds these, never the threads a stun's libvirt calls use.
    agent_threads: int = 4


@dataclass(frozen=True)
class CloneConfig:
    storage_backend: str = "qcow2"
    memory_backend: str = "filecow"
    # Used for sources the first backend cannot serve ("none": refuse them).
    memory_fallback: str = "saverestore"
    stun_deadline_ms: int = 2000
    step_timeout_s: float = 120.0
    max_count: int = 64
    # Clones started at once host-wide, across all jobs and pools (QEMU start,
    # NIC replug, identity reset, network): more at once only share the CPU
    # more thinly. 0: the host's core count. Read at start. The old name
    # clone.start_parallel is still read as this key.
    max_starting: int = 0
    # Guest-side identity reset through the guest agent, per clone.
    customize_timeout_s: float = 60.0
    # A clone's guest must release its old NIC (ACPI hot-unplug) within this
    # when the NIC is replaced, or the clone fails and is removed.
    nic_release_timeout_s: float = 60.0
    # Keep the source's SSH host keys in clones (default: regenerate them).
    keep_ssh_host_keys: bool = False
    # A shell script (host path) run in every clone after its identity reset,
    # unless the request brings its own ("" : none).
    customize_script: str = ""
    # Images in a disk's backing chain above which the running domain's chain
    # is consolidated after a job (a live block pull into its own top image).
    max_chain_depth: int = 32

    @property
    def starting_slots(self) -> int:
        """``max_starting``, with 0 read as the host's core count."""
        return self.max_starting or max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class AdmissionConfig:
    # A job is accepted only if what its clones will not share fits the host
    # now (jobs accepted and not yet finished count with what they reserved).
    # Memory: MemAvailable must keep memory_reserve_mib after each clone's
    # private part: a saverestore clone's whole guest RAM, a filecow clone's
    # filecow_private_fraction of it (measured 0.4-3.4 % at hand-over,
    # docs/design/benchmarks.md; it grows with what the clone writes), plus clone_overhead_mib
    # for QEMU itself (TCG translation cache: ~75-100 MiB private per busybox
    # clone, 160-390 MiB per Debian guest; KVM has none). A RAM image on a
    # memory filesystem (tmpfs memory_backing_dir) counts as memory too.
    memory_reserve_mib: int = 512
    filecow_private_fraction: float = 0.25
    clone_overhead_mib: int = 128
    # Disk: the delta, clone and RAM/state filesystems must keep
    # min_free_disk_mib free after the job's expected growth: disk_growth_mib
    # per new delta (the source's and each clone's), and the guest RAM once
    # per stun for the memory image (filecow's RAM copy, saverestore's state).
    min_free_disk_mib: int = 1024
    disk_growth_mib: int = 256
    # Jobs accepted and not finished (queued or running) at most; more: 503.
    max_queued_jobs: int = 64


@dataclass(frozen=True)
class JournalConfig:
    # Finished jobs (with their states, events and released ledger rows) and
    # delivered webhook deliveries older than this are pruned, hourly and at
    # start. Never an unfinished job, one whose ledger still holds something,
    # or one whose clones are still registered. 0: keep everything.
    retention_days: float = 7.0


@dataclass(frozen=True)
class Qcow2Config:
    delta_dir: Path | None = None  # default: <state_dir>/deltas
    qemu_img: str = "qemu-img"
    # Images a backing chain may have when instaclone walks it (one qemu-img
    # call per image); a longer chain is refused as unsafe_image. Keep it
    # above clone.max_chain_depth, or chains are refused before consolidation.
    max_chain_images: int = 1024


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
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    journal: JournalConfig = field(default_factory=JournalConfig)
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
    def store_path(self) -> Path:
        return self.daemon.state_dir / "journal.sqlite"


# Section name in the TOML file -> dataclass field of Config.
_SECTIONS = {"daemon": "daemon", "libvirt": "libvirt", "clone": "clone", "storage.qcow2": "qcow2",
             "memory.filecow": "filecow", "webhooks": "webhooks", "access": "access", "pools": "pools",
             "admission": "admission", "journal": "journal",
             "gc": "gc"}

# (min, max) for numeric keys.
_RANGES: dict[str, tuple[float, float]] = {
    "daemon.socket_mode": (0, 0o777),
    "daemon.max_concurrent_jobs": (1, 256),
    "libvirt.threads": (2, 128),
    "libvirt.agent_threads": (1, 64),
    "clone.stun_deadline_ms": (50, 600_000),
    "clone.step_timeout_s": (1, 3600),
    "clone.max_count": (1, 1000),
    "clone.max_starting": (0, 256),
    "clone.customize_timeout_s": (1, 3600),
    "clone.nic_release_timeout_s": (1, 3600),
    "clone.max_chain_depth": (2, 1000),
    "storage.qcow2.max_chain_images": (2, 65536),
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
    "admission.memory_reserve_mib": (0, 1 << 30),
    "admission.filecow_private_fraction": (0, 1),
    "admission.clone_overhead_mib": (0, 1 << 20),
    "admission.min_free_disk_mib": (0, 1 << 30),
    "admission.disk_growth_mib": (0, 1 << 30),
    "admission.max_queued_jobs": (1, 100_000),
    "journal.retention_days": (0, 3650),
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
    if key in ("daemon.socket_group", "daemon.qemu_group"):
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
            if attr == "clone" and key == "start_parallel":  # its old name
                if "max_starting" in table:
                    raise ConfigError("clone.start_parallel: the old name of clone.max_starting; give only one")
                key = "max_starting"
            if attr == "webhooks" and key == "endpoints":
                values[key] = _endpoints(value)
                continue
            if attr == "access" and key == "sources":
                values[key] = _source_rules(value)
                continue
            if key not in known:
                raise ConfigError(f"{section}.{key}: unknown key (known: {', '.join(known)})")
            f = known[key]
            values[key] = _coerce(f"{section}.{key}", value, f.default, str(f.type))
        built[attr] = cls(**values)
    return Config(**built)


#: A glob of source names: what a domain name may hold, plus the glob characters * ? [ ] !.
_SOURCE_GLOB = re.compile(r"^[A-Za-z0-9_.*?\[\]!+-]{1,128}$")


def _source_rules(raw: Any) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Validate ``[access.sources]``: group name (or "*") -> list of source name globs.

    A group unknown on this host is logged when the API starts (as in write_groups), not refused:
    it may be created later.
    """
    if not isinstance(raw, dict):
        raise ConfigError('access.sources: must be a table of group = ["source glob", ...] '
                          '(e.g. ci = ["ci-*"]; "*" = [...] for every caller)')
    out: list[tuple[str, tuple[str, ...]]] = []
    for group, patterns in raw.items():
        key = f"access.sources.{group}"
        if not isinstance(patterns, list) or not all(isinstance(p, str) and _SOURCE_GLOB.match(p)
                                                      for p in patterns):
            raise ConfigError(f"{key}: must be a list of source name globs (letters, digits, '.', '_', "
                              f"'+', '-' and * ? [ ] !), got {patterns!r}")
        out.append((group, tuple(patterns)))
    return tuple(out)


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
        unknown = sorted(set(table) - {"name", "url", "secret", "secrets", "secret_file", "events"})
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}: unknown key "
                              "(known: name, url, secret, secrets, secret_file, events)")
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
        given = [k for k in ("secret", "secrets", "secret_file") if k in table]
        if len(given) > 1:
            raise ConfigError(f"{where}.{given[1]}: give one of 'secret', 'secrets' or 'secret_file', not both")
        if "secret_file" in table:
            key = f"{where}.secret_file"
            secrets: Any = read_secret_file(key, table["secret_file"])
        else:
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


def read_secret_file(key: str, value: Any) -> list[str]:
    """The ``whsec_`` secrets in the file ``value``, one a line (newest first while rotating).

    The file must be a regular file (not a link), owned by the daemon's user
    and readable by it alone (mode 0600 or stricter): it signs every webhook.
    Blank lines and lines starting with '#' are skipped.
    """
    if not isinstance(value, str) or not value or not Path(value).is_absolute():
        raise ConfigError(f"{key}: must be an absolute path, got {value!r}")
    try:
        fd = os.open(value, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(f"{key}: {value} is a symbolic link; name the file itself") from None
        raise ConfigError(f"{key}: cannot read {value}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{key}: {value} is not a regular file")
        if st.st_mode & 0o177:
            raise ConfigError(f"{key}: {value} is mode {stat.S_IMODE(st.st_mode):04o}; it holds webhook secrets "
                              f"and must be 0600 or stricter (chmod 600 {value})")
        if st.st_uid != os.geteuid():
            raise ConfigError(f"{key}: {value} belongs to uid {st.st_uid}, not to the daemon's user "
                              f"(uid {os.geteuid()}); chown it")
        raw = f.read(1 << 16)
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise ConfigError(f"{key}: {value} is not UTF-8 text") from None
    found = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not found:
        raise ConfigError(f"{key}: {value} holds no 'whsec_...' secret (one a line)")
    return found


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
