"""Configuration: one TOML file, every key with a working default.

``load(path)`` returns a validated :class:`Config`. Errors name the offending
key (``clone.stun_deadline_ms: must be between 50 and 600000, got 10``). Each
key declares its default, bounds and help where it is defined (``setting()``,
:mod:`instaclone.settings`); backends declare their own sections
(``[storage.<name>]``, ``[memory.<name>]``), which :func:`from_dict` reads
when it is given their classes. ``docs/reference/config.md`` and the example
``config/instaclone.toml`` are generated from all of them.
"""

from __future__ import annotations

import errno
import grp
import os
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from . import events
from .errors import ConfigError
from .settings import check_section_class, read_section, setting

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


def _group(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: must be a group name (\"\" for the daemon's own group), got {value!r}")
    if value:
        try:
            grp.getgrnam(value)
        except KeyError:
            raise ConfigError(f"{key}: no group named {value!r} on this host "
                              f"(create it with groupadd --system {value}, or set \"\")") from None
    return value


def _listen(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: must be a string, got {value!r}")
    if value:
        parse_listen(key, value)
    return value


def _script(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: must be a path string (\"\" for none), got {value!r}")
    if value:
        if not Path(value).is_absolute():
            raise ConfigError(f"{key}: must be an absolute path, got {value!r}")
        if not Path(value).is_file():
            raise ConfigError(f"{key}: {value} is not a readable file")
    return value


def _backend_names(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{key}: must be a non-empty list of backend names, got {value!r}")
    twice = sorted({v for v in value if value.count(v) > 1})
    if twice:
        raise ConfigError(f"{key}: {twice[0]!r} is named twice")
    return tuple(value)


@dataclass(frozen=True)
class DaemonConfig:
    """The daemon process: its control socket, state directory, logging and shutdown."""

    socket: Path = setting(Path("/run/instaclone/control.sock"), help=(
        "Control socket (HTTP+JSON, API under /v1). The CLI finds it through --socket or INSTACLONE_SOCKET."))
    socket_mode: int = setting(0o660, min=0, max=0o777, toml="0o660", help="Permission bits of the control socket.")
    socket_group: str = setting(factory=default_socket_group, parse=_group, example='socket_group = "instaclone"',
                                default_text='"instaclone" if that group exists, else ""', help=(
        "Group of the control socket when the daemon binds it itself (with instacloned.socket, the unit's "
        "SocketGroup= applies). Default: \"instaclone\" if that group exists (scripts/install-service.sh creates "
        "it), else the daemon's own group (\"\"). A group that does not exist is a config error."))
    state_dir: Path = setting(Path("/var/lib/instaclone"), help=(
        "The store (SQLite), clone directories, job scratch space and deltas live here."))
    max_concurrent_jobs: int = setting(4, min=1, max=256, help=(
        "Clone jobs running at once (jobs for one source always run one at a time)."))
    log_format: str = setting("auto", choices=("auto", "json", "console", "journald"), help=(
        "\"auto\": to journald, with fields (JOB_ID, CLONE, STATE, ...) when running under systemd, else "
        "\"json\" (one JSON object per line on stdout); \"console\" for people; \"journald\" to force the journal."))
    log_level: str = setting("info", choices=("debug", "info", "warning", "error"),
                             help="How much is logged (SIGHUP applies a change).")
    shutdown_grace_s: float = setting(30.0, min=0, max=3600, help=(
        "On SIGTERM: no new jobs; running jobs get this long to finish, then are rolled back (their sources "
        "resumed). systemd's TimeoutStopSec must be larger."))
    metrics_listen: str = setting("", parse=_listen, help=(
        "Prometheus metrics are always at GET /metrics on the control socket; set HOST:PORT on a loopback "
        "address to serve them over TCP too (unauthenticated)."))
    qemu_group: str = setting(factory=default_qemu_group, parse=_group, example='qemu_group = "kvm"',
                              default_text='"kvm" if that group exists, else ""', help=(
        "The group libvirt runs QEMU in (qemu.conf \"group\"; Debian: kvm). Files the daemon makes are private "
        "(umask 077): the directories QEMU must pass through to a clone's disks (state_dir, its clones, deltas "
        "and jobs directories, each clone's) are root's, mode 0710 with this group: QEMU may traverse them, not "
        "list them; the store and frozen images 0600 root; clone disks, NVRAM and RAM copies 0600, QEMU's "
        "user's. \"\" makes those directories 0711 instead. A group that does not exist is a config error."))

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
    """Who may do what through the control socket.

    Callers are identified by SO_PEERCRED (uid) and SO_PEERGROUPS (groups) on the control socket and
    logged on every mutating call. Admins (root, the daemon's own user, members of admin_groups) may do
    anything and see everything; members of write_groups may clone, destroy, freeze, replay; members of
    read_groups may only read. With read_groups empty, anyone who can open the socket (see
    daemon.socket_mode and the socket's group) may read. Every job, clone and claim has an owner (the uid
    that asked): a non-admin sees, execs into, copies to/from, destroys and releases only its own (others'
    answer 404), and sees scripts and guest configs of its own jobs and pools only.
    """

    write_groups: tuple[str, ...] = setting(("instaclone",), help="Groups whose members may also clone, "
                                            "destroy, freeze and replay.")
    read_groups: tuple[str, ...] = setting((), help="Groups whose members may only read (empty: anyone who can "
                                           "open the socket may read).")
    admin_groups: tuple[str, ...] = setting((), help="Groups whose members are admins.")
    sources: tuple[tuple[str, tuple[str, ...]], ...] = setting(
        (), parse=lambda key, value: _source_rules(value),
        example='sources = { ci = ["ci-*", "build-*"], "*" = ["sandbox-*"] }', default_text="(every source)", help=(
            "Per group, which sources its non-admin members may clone, freeze, prepare or make a pool of: a "
            "table of group = [glob patterns on source names], checked by name at the request (\"*\" as the "
            "group: every caller). Not set: every source. A clone made by instaclone is a source only to its "
            "owner (and admins)."))

    def sources_of(self, groups: set[str]) -> tuple[str, ...] | None:
        """The source patterns a non-admin in ``groups`` may use (None: every source)."""
        if not self.sources:
            return None
        return tuple(p for g, patterns in self.sources if g == "*" or g in groups for p in patterns)


@dataclass(frozen=True)
class LibvirtConfig:
    """The connection to libvirt."""

    uri: str = setting("qemu:///system", help="The libvirt connection URI.")
    threads: int = setting(8, min=2, max=128, help=(
        "Worker threads for libvirt calls (libvirt-python blocks; the event loop never does)."))
    agent_threads: int = setting(4, min=1, max=64, help=(
        "Worker threads for guest-agent calls only (exec, files, identity reset): a guest that does not "
        "answer holds these, never the threads a stun needs."))


@dataclass(frozen=True)
class CloneConfig:
    """How clones are made: the backends, the stun's limits, identity reset."""

    storage_backend: str = setting("qcow2", help=(
        "How delta disks are made: a backend of the entry point group \"instaclone.storage\"; its settings "
        "are the section [storage.<name>]."))
    memory_backends: tuple[str, ...] = setting(("filecow", "saverestore"), parse=_backend_names, help=(
        "How a clone's memory is linked to its source's: backends of the entry point group "
        "\"instaclone.memory\", in order; each source is cloned by the first that can serve it (a source none "
        "can serve is refused). Their settings are the sections [memory.<name>]. filecow maps the source's RAM "
        "file copy-on-write (it needs a source with <memoryBacking><source type='file'/><access "
        "mode='shared'/></memoryBacking>); saverestore copies the RAM and serves any source. The older "
        "spelling memory_backend = \"A\" with memory_fallback = \"B\" (or \"none\") is still read as "
        "memory_backends = [\"A\", \"B\"] (or [\"A\"])."))
    stun_deadline_ms: int = setting(2000, min=50, max=600_000, help=(
        "Hard limit on how long a running source stays paused. Past it the job is aborted, rolled back and "
        "the source resumed."))
    step_timeout_s: float = setting(120.0, min=1, max=3600, help=(
        "Limit for any single step (the stun deadline is usually the tighter one)."))
    max_count: int = setting(64, min=1, max=1000, help="Most clones one job may make.")
    max_starting: int = setting(0, min=0, max=256, help=(
        "Clones started at once host-wide, across all jobs and pools (QEMU start, NIC replug, identity reset, "
        "network: CPU work); 0 = the host's core count. Read at daemon start. The older name "
        "clone.start_parallel is still read as this key."))
    customize_timeout_s: float = setting(60.0, min=1, max=3600, help=(
        "Time allowed for a clone's guest-side identity reset (hostname, machine-id, DHCP, config data) "
        "through the QEMU guest agent; past it the job fails and the clone is removed."))
    nic_release_timeout_s: float = setting(60.0, min=1, max=3600, help=(
        "Time a clone's guest has to release its old NIC (ACPI hot-unplug) when the NIC is replaced so that "
        "the guest reads the clone's MAC; past it the job fails and the clone is removed."))
    keep_ssh_host_keys: bool = setting(False, help=(
        "Clones get new SSH host keys (made after the guest's random generator is reseeded from the host); "
        "true keeps the source's keys in every clone."))
    customize_script: str = setting("", parse=_script, help=(
        "A shell script on this host run in every clone (/bin/sh -s, through the guest agent) after its "
        "identity reset, like Horizon's post-clone script; a request's own \"script\" replaces it. \"\" runs "
        "none."))
    max_chain_depth: int = setting(16, min=2, max=24, help=(
        "Every clone of a running source adds one image to the source's backing chain (and a clone's chain "
        "is its source's plus one). Past this many images, a running domain's chain is consolidated after the "
        "job, live: the images only it uses are pulled into its own top (libvirt block pull, keeping the base "
        "image shared). Frozen sources are never consolidated. At most 24: libvirt 11 cannot start a domain "
        "whose disk has a chain of more than 25 images (\"failed to parse JSON: nesting too deep\": QEMU "
        "describes each image's backing image inside the image's own description, and libvirt's JSON parser "
        "stops at 32 levels of nesting)."))

    @property
    def starting_slots(self) -> int:
        """``max_starting``, with 0 read as the host's core count."""
        return self.max_starting or max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class PoolsConfig:
    """Pools keep ready clones ("instaclone pool create")."""

    max_clones: int = setting(64, min=1, max=100_000, help=(
        "Pool replenishment stays within this host budget of clones on the host (registered or being made, "
        "pooled or not, claimed or idle)."))
    max_memory_mib: int = setting(0, min=0, max=1 << 30, help=(
        "... and of the guest RAM (MiB) those clones are defined with (0: no memory budget)."))
    claim_wait_s: float = setting(60.0, min=0, max=3600, help=(
        "A claim on a pool with no idle member waits this long for the next one."))
    check_interval_s: float = setting(5.0, min=0.1, max=3600, help=(
        "Pools are checked this often, and at once after each claim, release or job."))


@dataclass(frozen=True)
class AdmissionConfig:
    """A job is accepted only if the host can take what its clones will not share.

    Jobs accepted and not finished count with what they reserved; else HTTP 507 insufficient_capacity
    naming the resource, the need and what is free.
    """

    memory_reserve_mib: int = setting(512, min=0, max=1 << 30, help=(
        "Memory: MemAvailable must keep this much after the job (a RAM image on a memory filesystem counts "
        "as memory too)."))
    filecow_private_fraction: float = setting(0.25, min=0, max=1, help=(
        "A filecow clone's private share of its guest RAM (measured 0.4-3.4 % at hand-over, "
        "docs/design/benchmarks.md; it grows with what the clone writes). A saverestore clone needs all of "
        "its guest RAM."))
    clone_overhead_mib: int = setting(128, min=0, max=1 << 20, help=(
        "QEMU's own memory per clone (under TCG its translation cache: ~75-100 MiB private for the busybox "
        "guest, 160-390 MiB for a Debian guest; KVM: less)."))
    min_free_disk_mib: int = setting(1024, min=0, max=1 << 30, help=(
        "Disk: the delta, clone and RAM/state filesystems must keep this much free after the job's expected "
        "growth ..."))
    disk_growth_mib: int = setting(256, min=0, max=1 << 30, help=(
        "... which is this much per new delta (the source's and each clone's), plus the guest RAM once per "
        "stun for the memory image."))
    max_queued_jobs: int = setting(64, min=1, max=100_000, help=(
        "Jobs accepted and not finished at once; more get HTTP 503 insufficient_capacity."))


@dataclass(frozen=True)
class JournalConfig:
    """Pruning of the store (the section keeps its older name)."""

    retention_days: float = setting(7.0, min=0, max=3650, help=(
        "Finished jobs (their states, events, released ledger rows) and delivered webhook deliveries are "
        "pruned after this many days (hourly, and at start); never an unfinished job, one the ledger still "
        "holds or whose clones still exist. 0 keeps everything."))


@dataclass(frozen=True)
class GcConfig:
    """Garbage collection of the files instaclone made."""

    interval_s: float = setting(3600.0, min=0, max=7 * 86400, help=(
        "A full garbage collection (every file instaclone made that no domain uses) runs this often, the "
        "first one this long after start; 0: only on request (\"instaclone gc\", POST /v1/gc). Each destroy "
        "collects what the destroyed clone released itself. Only files the store recorded as made by "
        "instaclone (by path and inode) are ever deleted."))


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


_ENDPOINT_EXAMPLE = """\
[[webhooks.endpoints]]
name = "ops"                                   # letters, digits, . _ -
url = "https://hooks.example.com/instaclone"   # http:// or https://, no credentials
secret = "whsec_..."                           # base64 after whsec_, >= 16 bytes
# secrets = ["whsec_new...", "whsec_old..."]   # while rotating: both sign
# secret_file = "/etc/instaclone/ops.whsec"    # or: read from this file, one secret a line;
#                                              # it must be 0600 (or stricter), the daemon's
#                                              # user's, and not a link
events = ["clone.ready", "clone.failed"]       # types or globs; default ["*"]"""


@dataclass(frozen=True)
class WebhooksConfig:
    """Events to HTTP receivers, signed and delivered at least once.

    Every state change of every job (clone.requested, clone.stunned, ..., clone.ready, clone.failed),
    clone.destroyed, source.frozen and source.unfrozen is written to an outbox in the same transaction as
    the change and POSTed to each endpoint, signed per the Standard Webhooks scheme (webhook-id,
    webhook-timestamp, webhook-signature). Delivery is at least once: the same event keeps its webhook-id
    across retries, restarts and replays, so receivers deduplicate on it. Nothing is sent while a source is
    stunned. A slow or failing receiver never slows a clone.
    """

    timeout_s: float = setting(10.0, min=0.1, max=300, help=(
        "Seconds one attempt may take; a slower receiver counts as failed and is retried."))
    max_attempts: int = setting(12, min=1, max=1000, help=(
        "Attempts before a delivery is marked failed (then: instaclone webhooks deliveries replay)."))
    backoff_initial_s: float = setting(1.0, min=0.01, max=3600, help=(
        "Retry delay: about backoff_initial_s * 2^(attempt-1), half of it random (jitter), at most "
        "backoff_max_s. A Retry-After header from the receiver wins."))
    backoff_max_s: float = setting(600.0, min=0.01, max=86400, help="The longest retry delay.")
    max_in_flight: int = setting(8, min=1, max=256, help=(
        "Requests in flight at once per endpoint (a hanging receiver holds only its own)."))
    retention_days: float = setting(7.0, min=0, max=3650, help=(
        "Events whose deliveries are all settled are pruned after this many days."))
    endpoints: tuple[WebhookEndpoint, ...] = setting(
        (), parse=lambda key, value: _endpoints(value), example=_ENDPOINT_EXAMPLE, default_text="(none)", help=(
            "One [[webhooks.endpoints]] table per receiver: name, url, and secret (or secrets while rotating, "
            "or secret_file), events (types or globs, default every event). A receiver answering 410 Gone is "
            "disabled until \"instaclone webhooks enable NAME\"; redirects are never followed."))


#: A backend's settings: "storage.<name>" or "memory.<name>" -> an instance of its section class.
BackendSections = tuple[tuple[str, Any], ...]
_T = TypeVar("_T")


@dataclass(frozen=True)
class Config:
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    access: AccessConfig = field(default_factory=AccessConfig)
    libvirt: LibvirtConfig = field(default_factory=LibvirtConfig)
    clone: CloneConfig = field(default_factory=CloneConfig)
    pools: PoolsConfig = field(default_factory=PoolsConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    journal: JournalConfig = field(default_factory=JournalConfig)
    gc: GcConfig = field(default_factory=GcConfig)
    webhooks: WebhooksConfig = field(default_factory=WebhooksConfig)
    #: The backends' sections that the file has, as read (see :meth:`section`).
    backends: BackendSections = ()

    def section(self, name: str, cls: type[_T]) -> _T:
        """The backend section ``name`` (``"memory.filecow"``) as read, or ``cls()`` (its defaults) if absent."""
        for n, value in self.backends:
            if n == name and isinstance(value, cls):
                return value
        return cls()

    def with_section(self, name: str, value: object) -> Config:
        """This config with the backend section ``name`` replaced by ``value``."""
        return replace(self, backends=(*((n, v) for n, v in self.backends if n != name), (name, value)))

    @property
    def delta_dir(self) -> Path:
        """Where source deltas go: the storage backend section's ``delta_dir`` if set, else <state_dir>/deltas."""
        ours = f"storage.{self.clone.storage_backend}"
        chosen = next((getattr(v, "delta_dir", None) for n, v in self.backends if n == ours), None)
        return chosen if isinstance(chosen, Path) else self.daemon.state_dir / "deltas"

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


#: The core's sections: TOML table -> section class (the field of Config with that name).
SECTIONS: dict[str, type[Any]] = {f.name: f.default_factory().__class__  # type: ignore[operator]
                                  for f in fields(Config) if f.name != "backends"}
# A key added without setting() (no help, no bounds) fails here, at import, naming itself.
for _cls in SECTIONS.values():
    check_section_class(_cls)


def _old_names(section: str, table: dict[str, Any]) -> dict[str, Any]:
    """``table`` with keys of older spellings rewritten to today's; ConfigError if both are given."""
    if section != "clone":
        return table
    table = dict(table)
    if "start_parallel" in table:
        if "max_starting" in table:
            raise ConfigError("clone.start_parallel: the old name of clone.max_starting; give only one")
        table["max_starting"] = table.pop("start_parallel")
    old = [k for k in ("memory_backend", "memory_fallback") if k in table]
    if old:
        if "memory_backends" in table:
            raise ConfigError(f"clone.{old[0]}: the older spelling of clone.memory_backends; give only one")
        first, fallback = table.pop("memory_backend", "filecow"), table.pop("memory_fallback", "saverestore")
        for key, value in (("memory_backend", first), ("memory_fallback", fallback)):
            if not isinstance(value, str) or not value:
                raise ConfigError(f"clone.{key}: must be a backend name, got {value!r}")
        if first == "none":
            raise ConfigError("clone.memory_backend: must be a backend name, got 'none'")
        table["memory_backends"] = [first] + ([fallback] if fallback not in ("none", first) else [])
    return table


def _flatten_sections(raw: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, table in raw.items():
        if name in ("storage", "memory") and isinstance(table, dict):
            for sub, subtable in table.items():
                out[f"{name}.{sub}"] = subtable
        else:
            out[name] = table
    return out


def from_dict(raw: dict[str, Any], backend_sections: Mapping[str, type[Any]] | None = None) -> Config:
    """Build a validated Config from parsed TOML. Unknown sections and keys are errors.

    ``backend_sections`` are the sections backends declare (``"memory.filecow"``
    -> its section class; ``instaclone.backends.sections()`` finds them all);
    a ``[storage.*]`` or ``[memory.*]`` table not among them is unknown.
    """
    extra = dict(backend_sections or {})
    built: dict[str, Any] = {}
    found: list[tuple[str, Any]] = []
    for section, table in _flatten_sections(raw).items():
        if section in SECTIONS:
            if not isinstance(table, dict):
                raise ConfigError(f"{section}: must be a table")
            built[section] = read_section(section, SECTIONS[section], _old_names(section, table))
        elif section in extra:
            found.append((section, read_section(section, extra[section], table)))
        else:
            raise ConfigError(f"{section}: unknown section (known: {', '.join([*SECTIONS, *extra])})")
    return Config(**built, backends=tuple(found))



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


def load(path: Path | None, backend_sections: Mapping[str, type[Any]] | None = None) -> Config:
    """Read and validate ``path``; ``None`` or a missing default file gives defaults.

    ``backend_sections``: as for :func:`from_dict` (``instaclone.backends.load_config`` passes them all).
    """
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
    return from_dict(raw, backend_sections)
