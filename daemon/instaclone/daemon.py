"""``instacloned``: the daemon's entry point and lifecycle."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
from contextlib import suppress
from dataclasses import replace
from pathlib import Path

from aiohttp import web

from . import backends, config as cfg, log as logsetup
from .api import make_app
from .config import Config
from .engine import Engine
from .errors import ConfigError, InstacloneError
from .journal import Journal
from .virt import Hypervisor
from .webhooks import WebhookSender

SHUTDOWN_GRACE_S = 30.0


class Daemon:
    """Owns the journal, the libvirt connection, the engine and the API server."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.log = logsetup.get(component="daemon")
        self.journal = Journal(config.journal_path)
        self.virt = Hypervisor(config.libvirt.uri, threads=config.libvirt.threads)
        self.engine: Engine | None = None
        self.webhooks: WebhookSender | None = None
        self._sender_task: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        c = self.config
        storage_cls = backends.storage_backend(c.clone.storage_backend)
        memory_classes = [backends.memory_backend(c.clone.memory_backend)]
        if c.clone.memory_fallback != "none" and c.clone.memory_fallback != c.clone.memory_backend:
            memory_classes.append(backends.memory_backend(c.clone.memory_fallback))
        for d in (c.daemon.state_dir, c.clones_dir, c.jobs_dir, c.delta_dir):
            d.mkdir(parents=True, exist_ok=True)
            # libvirt's QEMU user must reach disks and logs below these.
            d.chmod(0o755)
        await self.journal.open()
        await self.virt.connect()
        storage = storage_cls(config=c, virt=self.virt)
        memories = [cls(config=c, virt=self.virt) for cls in memory_classes]
        await storage.check()
        for m in memories:
            await m.check()
        self.engine = Engine(config=c, journal=self.journal, virt=self.virt, storage=storage, memory=memories)
        # Routes events to endpoints from here on, recovery's own events included.
        self.webhooks = WebhookSender(c.webhooks, self.journal, gate=self.engine.outside_stun)
        recovered = await self.engine.recover()
        if recovered:
            self.log.info("daemon.recovered", jobs=recovered)
        self._sender_task = asyncio.get_running_loop().create_task(self._send_webhooks(), name="webhooks")
        app = make_app(self.engine, self.journal, self.webhooks)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        sock_path = c.daemon.socket
        sock_path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_socket(sock_path)
        site = web.UnixSite(self._runner, str(sock_path))
        await site.start()
        os.chmod(sock_path, c.daemon.socket_mode)
        self.log.info("daemon.ready", socket=str(sock_path), state_dir=str(c.daemon.state_dir),
                      storage=storage.name, memory=[m.name for m in memories], libvirt=c.libvirt.uri)

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

    async def stop(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        if self.engine is not None:
            await self.engine.shutdown(grace_s)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._sender_task is not None:
            # Undelivered events stay in the outbox and go out after the next start.
            self._sender_task.cancel()
            with suppress(asyncio.CancelledError):
                await self._sender_task
            self._sender_task = None
        await self.virt.close()
        await self.journal.close()
        self.log.info("daemon.stopped")

    async def serve(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        try:
            await stop.wait()
            self.log.info("daemon.stopping")
        finally:
            await self.stop()


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
    p.add_argument("--log-format", choices=("json", "console"), help="overrides daemon.log_format")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = cfg.load(args.config)
        d = config.daemon
        config = replace(config, daemon=replace(
            d,
            socket=args.socket.absolute() if args.socket else d.socket,
            state_dir=args.state_dir.absolute() if args.state_dir else d.state_dir,
            log_format=args.log_format or d.log_format,
        ))
        backends.storage_backend(config.clone.storage_backend)
        backends.memory_backend(config.clone.memory_backend)
        if config.clone.memory_fallback != "none":
            backends.memory_backend(config.clone.memory_fallback)
    except InstacloneError as exc:
        print(f"instacloned: {exc.message}", file=sys.stderr)
        return 2
    if args.check_config:
        print(f"instacloned: config OK ({args.config or 'built-in defaults'})")
        return 0
    logsetup.setup(config.daemon.log_format, config.daemon.log_level)
    try:
        asyncio.run(Daemon(config).serve())
    except InstacloneError as exc:
        print(f"instacloned: {exc.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
