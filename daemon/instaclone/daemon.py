"""``instacloned``: the daemon's entry point and lifecycle."""

from __future__ import annotations

import argparse
import asyncio
import grp
import os
import signal
import socket
import sys
from contextlib import suppress
from dataclasses import replace
from pathlib import Path
from typing import Any

from aiohttp import web

#: What the "daemon" extra installs (the base install is the client and the CLI).
DAEMON_EXTRA = ("libvirt", "libvirt_qemu", "libvirtaio", "structlog", "prometheus_client", "pydantic")

try:
    from . import backends, config as cfg, log as logsetup, safefs, systemd
    from .api import ACCESS, RUNNER_ARGS, Access, make_app
    from .config import Config
    from .errors import ConfigError, InstacloneError
    from .hv import LibvirtHypervisor
    from .jobs.engine import Engine
    from .jobs.gc import GarbageCollector
    from .outbox.bus import EventBus
    from .outbox.metrics import Metrics
    from .outbox.webhooks import WebhookSender
    from .store import Store
except ModuleNotFoundError as _exc:
    if _exc.name not in DAEMON_EXTRA:
        raise
    # Said plainly instead of a traceback: `pip install instaclone` is the client only.
    raise SystemExit(f"instacloned: the daemon's dependencies are not installed ({_exc.name} is missing); "
                     "install them with: pip install 'instaclone[daemon]'") from None

#: How often the daemon checks libvirt and refreshes STATUS= (and feeds the watchdog).
WATCH_PERIOD_S = 5.0
#: How often the outbox's delivery counts (instaclone_webhook_deliveries) are refreshed.
DELIVERY_COUNTS_PERIOD_S = 15.0


class Daemon:
    """Owns the store, the libvirt connection, the engine, the outbox's readers and the API server."""

    def __init__(self, config: Config, *, listen_socks: list[socket.socket] | None = None,
                 config_path: Path | None = None, overrides: dict[str, object] | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self._overrides = overrides or {}
        self.log = logsetup.get(component="daemon")
        # Committed events reach the sender, the event stream and the metrics through the bus.
        self.bus = EventBus()
        self.store = Store(config.store_path, on_commit=self.bus.publish)
        self.virt = LibvirtHypervisor(config.libvirt.uri, threads=config.libvirt.threads,
                                      agent_threads=config.libvirt.agent_threads)
        self.metrics = Metrics()
        self.bus.subscribe(self.metrics.on_event)
        self.notifier = systemd.Notifier()
        self.engine: Engine | None = None
        self.webhooks: WebhookSender | None = None
        self._listen_socks = listen_socks or []
        self._tasks: list[asyncio.Task[None]] = []
        self._runner: web.AppRunner | None = None
        self._metrics_runner: web.AppRunner | None = None
        self._libvirt_up: bool | None = None

    async def start(self) -> None:
        c = self.config
        storage_cls, memory_classes = backends.configured(c)
        prepare_dirs(c)
        await self.store.open()
        await self.virt.connect()
        storage = storage_cls(config=c, virt=self.virt)
        memories = [cls(config=c, virt=self.virt) for cls in memory_classes]
        await storage.check()
        for m in memories:
            await m.check()
        self.engine = Engine(config=c, store=self.store, virt=self.virt, storage=storage, memory=memories)
        self.engine.pools.observe = self.metrics.on_pool
        self.metrics.configure(c.clone.stun_deadline_ms)
        self.metrics.set_pools(await self.store.list_pools())
        _fault_injection(self.engine)
        # Routes events to endpoints from here on, recovery's own events included.
        self.webhooks = WebhookSender(c.webhooks, self.store, bus=self.bus, gate=self.engine.outside_stun)
        self.webhooks.on_outcome = self.metrics.on_delivery
        recovered = await self.engine.recover()
        if recovered:
            self.log.info("daemon.recovered", jobs=recovered)
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._send_webhooks(), name="webhooks"))
        self._tasks.append(loop.create_task(self._watch(), name="watch"))
        # Pools reconciled (dead idle members replaced, claimed ones left alone), expired clones destroyed.
        self._tasks.append(loop.create_task(self.engine.run_background(), name="engine-background"))
        app = make_app(self.engine, self.store, self.webhooks, bus=self.bus, metrics=self.metrics,
                       gc=GarbageCollector(self.engine.svc))
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, **RUNNER_ARGS)
        await self._runner.setup()
        if self._listen_socks:
            # Socket activation: systemd owns the path, its mode and group.
            sock = self._listen_socks[0]
            await web.SockSite(self._runner, sock).start()
            where = f"{sock.getsockname()} (socket-activated)"
        else:
            sock_path = c.daemon.socket
            if not sock_path.parent.exists():
                # Clients must reach the socket (whose own mode and group say who may use it).
                sock_path.parent.mkdir(parents=True)
                sock_path.parent.chmod(0o755)
            _remove_stale_socket(sock_path)
            await web.UnixSite(self._runner, str(sock_path)).start()
            _set_socket_owner(sock_path, c.daemon.socket_group, c.daemon.socket_mode)
            where = str(sock_path)
        if c.daemon.metrics_listen:
            host, port = cfg.parse_listen("daemon.metrics_listen", c.daemon.metrics_listen)
            self._metrics_runner = web.AppRunner(self.metrics.app(), handle_signals=False, access_log=None)
            await self._metrics_runner.setup()
            await web.TCPSite(self._metrics_runner, host, port).start()
        self.log.info("daemon.ready", socket=where, state_dir=str(c.daemon.state_dir), storage=storage.name,
                      memory=[m.name for m in memories], libvirt=c.libvirt.uri,
                      metrics=c.daemon.metrics_listen or None, recovered=len(recovered))
        # Only now: crash recovery is done and the API answers.
        self.notifier.ready(await self._status_text())

    async def _send_webhooks(self) -> None:
        """Run the webhook sender; restart it if it ever fails (deliveries stay queued)."""
        assert self.webhooks is not None
        while True:
            try:
                await self.webhooks.run()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.log.exception("webhooks.sender_failed")
                await asyncio.sleep(1.0)

    async def _status_text(self) -> str:
        assert self.engine is not None
        up = await self._libvirt_alive()
        pending = self.webhooks.in_flight if self.webhooks else 0
        return (f"{self.engine.active_jobs} jobs active ({self.engine.queued_jobs} queued); "
                f"libvirt {'connected' if up else 'DISCONNECTED'}; {pending} webhook requests in flight")

    async def _libvirt_alive(self) -> bool:
        up = await self.virt.ensure_connected()
        if up != self._libvirt_up:
            (self.log.info if up else self.log.error)("libvirt.connection", up=up, uri=self.config.libvirt.uri)
            self._libvirt_up = up
        self.metrics.libvirt_up.set(1 if up else 0)
        return up

    async def _watch(self) -> None:
        """Keep libvirt connected, STATUS= current, and the watchdog fed from this loop."""
        interval = self.notifier.watchdog_interval_s()
        period = min(WATCH_PERIOD_S, interval) if interval else WATCH_PERIOD_S
        last_status = ""
        last_counts = 0.0
        loop = asyncio.get_running_loop()
        while True:
            self.notifier.watchdog()
            try:
                text = await self._status_text()
            except Exception:  # never let the watchdog task die
                self.log.exception("watch.failed")
                text = last_status
            if text != last_status:
                self.notifier.status(text)
                last_status = text
            if self.webhooks is not None:
                self.metrics.webhook_in_flight.set(self.webhooks.in_flight)
            if loop.time() - last_counts >= DELIVERY_COUNTS_PERIOD_S:
                # A GROUP BY over the outbox (up to webhooks.retention_days of it): not every tick.
                last_counts = loop.time()
                try:
                    self.metrics.set_deliveries(await self.store.delivery_counts())
                except Exception:
                    self.log.exception("watch.delivery_counts_failed")
            await asyncio.sleep(period)

    async def reload(self) -> None:
        """SIGHUP: re-read the config file; apply what is safe to change while running."""
        self.notifier.reloading()
        try:
            new = _apply_overrides(backends.load_config(self.config_path), self._overrides)
        except InstacloneError as exc:
            self.log.error("config.reload_failed", error=exc.message)
            self.notifier.ready(await self._status_text())
            return
        old = self.config
        # Safe: clone limits and timeouts (read per job), admission's budget (per
        # request), retention (per pruning), webhooks, access, log level.
        applied = replace(old, clone=replace(new.clone, storage_backend=old.clone.storage_backend,
                                             memory_backends=old.clone.memory_backends),
                          admission=new.admission, journal=new.journal,
                          webhooks=new.webhooks, access=new.access,
                          daemon=replace(old.daemon, log_level=new.daemon.log_level,
                                         shutdown_grace_s=new.daemon.shutdown_grace_s))
        self.config = applied
        assert self.engine is not None and self.webhooks is not None and self._runner is not None
        self.engine.config = applied
        self.metrics.configure(applied.clone.stun_deadline_ms)
        self.webhooks.configure(applied.webhooks)
        self._runner.app[ACCESS] = Access(applied.access)
        logsetup.setup(applied.daemon.log_format, applied.daemon.log_level)
        changed = [k for k, _, _ in _diff(applied, old)]
        needs_restart = [k for k, _, _ in _diff(new, old) if k not in changed]
        self.log.info("config.reloaded", changed=changed, needs_restart=needs_restart)
        self.notifier.ready(await self._status_text())

    async def stop(self, grace_s: float | None = None) -> None:
        grace = self.config.daemon.shutdown_grace_s if grace_s is None else grace_s
        self.notifier.stopping()
        if self.engine is not None:
            # No new jobs from here; running ones finish or are rolled back
            # (their sources resumed) within the grace period.
            await self.engine.shutdown(grace)
        for runner in (self._runner, self._metrics_runner):
            if runner is not None:
                await runner.cleanup()
        self._runner = self._metrics_runner = None
        # Undelivered events stay in the outbox and go out after the next start.
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()
        await self.virt.close()
        await self.store.close()
        self.log.info("daemon.stopped")

    async def serve(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        reloads: set[asyncio.Task[None]] = set()

        def on_hup() -> None:
            t = loop.create_task(self.reload(), name="reload")
            reloads.add(t)
            t.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, on_hup)
        # Keep systemd's watchdog fed during a long crash recovery too.
        early_watchdog = loop.create_task(self.notifier.watchdog_loop(stop), name="watchdog")
        try:
            await self.start()
            await stop.wait()
            self.log.info("daemon.stopping")
        finally:
            stop.set()
            await early_watchdog
            for t in list(reloads):
                await t
            await self.stop()


def prepare_dirs(c: Config) -> None:
    """Create the state directories (or narrow those an older daemon made 0755).

    QEMU must pass through the state, clones, jobs and deltas directories to
    reach a clone's disks and NVRAM: root's, 0710 with ``daemon.qemu_group``
    (:meth:`~instaclone.config.DaemonConfig.qemu_reach`). The frozen
    sources' directory is the daemon's alone (0700). None is a link.
    """
    mode, gid = c.daemon.qemu_reach()
    for d in (c.daemon.state_dir, c.clones_dir, c.jobs_dir, c.delta_dir, c.daemon.state_dir / "frozen"):
        d.parent.mkdir(parents=True, exist_ok=True)
        try:
            if d.name == "frozen" and d.parent == c.daemon.state_dir:
                safefs.make_dir(d, mode=0o700, exist_ok=True)
            else:
                safefs.make_dir(d, mode=mode, owner=(-1, gid), exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot make the state directory {d} private: {exc.strerror or exc}") from None


def _sections(c: Config) -> dict[str, Any]:
    """Every section of ``c`` by its TOML name: the core's, then the backends' the file has."""
    return {**{name: getattr(c, name) for name in cfg.SECTIONS}, **dict(c.backends)}


def _diff(a: Config, b: Config) -> list[tuple[str, object, object]]:
    """(``section.key``, value in ``a``, value in ``b``) of every key that differs."""
    out = []
    sections_a, sections_b = _sections(a), _sections(b)
    for section in {**sections_a, **sections_b}:
        sa: Any = sections_a.get(section)
        sb: Any = sections_b.get(section)
        # A backend section only one file has: the other has its defaults.
        sa = type(sb)() if sa is None else sa
        sb = type(sa)() if sb is None else sb
        for key in sa.__dataclass_fields__:
            va, vb = getattr(sa, key), getattr(sb, key)
            if va != vb:
                out.append((f"{section}.{key}", va, vb))
    return out


def _apply_overrides(config: Config, overrides: dict[str, object]) -> Config:
    """``config`` with the command line's ``daemon.*`` settings (names and types checked by argparse)."""
    if not overrides:
        return config
    fields: dict[str, Any] = dict(overrides)
    return replace(config, daemon=replace(config.daemon, **fields))


def _fault_injection(engine: Engine) -> None:
    """Test hook: ``INSTACLONE_FAULT_PAUSE=State:seconds:marker`` pauses every job at that step.

    The daemon writes ``marker`` (a file path) with the job id when it gets
    there, so a test can kill it at exactly that point. Unset in production.
    """
    spec = os.environ.get("INSTACLONE_FAULT_PAUSE")
    if not spec:
        return
    step, seconds, marker = spec.split(":", 2)
    log = logsetup.get(component="fault")

    async def hook(job_id: str, at: str) -> None:
        if at == step:
            log.warning("fault.pause", job_id=job_id, step=at, seconds=float(seconds))
            await asyncio.to_thread(_write_marker, Path(marker), job_id)
            await asyncio.sleep(float(seconds))

    engine.step_hook = hook


def _write_marker(path: Path, text: str) -> None:
    """``path`` appears with ``text`` in it at once: a reader never sees it empty."""
    part = path.with_name(path.name + ".part")
    part.write_text(text)
    part.rename(path)


def _set_socket_owner(path: Path, group: str, mode: int) -> None:
    """``path`` becomes root's (the daemon's user's) and ``group``'s, with ``mode``.

    The group first, then the mode: the socket is never group-accessible to
    the wrong group. ``group`` "" keeps the daemon's primary group.
    """
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfigError(f"daemon.socket_group: no group named {group!r} on this host") from None
        try:
            os.chown(path, -1, gid)
        except PermissionError as exc:  # a daemon not run as root, outside that group
            raise ConfigError(f"daemon.socket_group: cannot give {path} to group {group!r}: {exc.strerror} "
                              f"(run as root or as a member of {group!r}, or set \"\")") from None
    os.chmod(path, mode)


def _remove_stale_socket(path: Path) -> None:
    if not path.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # nobody listens: left over from a crash
    else:
        raise ConfigError(f"daemon.socket: {path} is in use by another running daemon")
    finally:
        probe.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="instacloned", description="instaclone daemon")
    p.add_argument("-c", "--config", type=Path, help=f"TOML config (default {cfg.DEFAULT_CONFIG_PATH} if present)")
    p.add_argument("--check-config", action="store_true", help="validate the config and exit")
    p.add_argument("--socket", type=Path, help="control socket path (overrides daemon.socket)")
    p.add_argument("--state-dir", type=Path, help="state directory (overrides daemon.state_dir)")
    p.add_argument("--log-format", choices=("auto", "json", "console", "journald"),
                   help="overrides daemon.log_format")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    # Before anything is created: every file and directory the daemon (and
    # qemu-img, its child) makes is its own unless it says otherwise.
    os.umask(0o077)
    args = parse_args(argv)
    overrides: dict[str, object] = {}
    if args.socket:
        overrides["socket"] = args.socket.absolute()
    if args.state_dir:
        overrides["state_dir"] = args.state_dir.absolute()
    if args.log_format:
        overrides["log_format"] = args.log_format
    try:
        config = _apply_overrides(backends.load_config(args.config), overrides)
        backends.configured(config)
    except InstacloneError as exc:
        print(f"instacloned: {exc.message}", file=sys.stderr)
        return 2
    if args.check_config:
        print(f"instacloned: config OK ({args.config or 'built-in defaults'})")
        return 0
    logsetup.setup(config.daemon.log_format, config.daemon.log_level)
    # Taken before anything else can spawn a child that would inherit them.
    socks = systemd.listen_fds()
    try:
        asyncio.run(Daemon(config, listen_socks=socks, config_path=args.config, overrides=overrides).serve())
    except InstacloneError as exc:
        print(f"instacloned: {exc.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
