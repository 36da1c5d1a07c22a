"""A restartable hub for webhook tests: store, engine (fakes), event bus, webhook sender and control API."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from aiohttp import web

from instaclone import config as cfg, events
from instaclone.api import make_app
from instaclone.jobs.engine import Engine
from instaclone.outbox.bus import EventBus
from instaclone.outbox.webhooks import WebhookSender
from instaclone.requests import CloneRequest
from instaclone.store import Store
from instaclone_plugins.saverestore import SaveRestoreMemory

from .fakes import FakeHypervisor, FakeStorage
from .receiver import Receiver

SECRET_A = events.new_secret()
SECRET_B = events.new_secret()


async def until(pred: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    """Wait until ``pred()`` holds; AssertionError naming ``what`` after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


class Hub:
    """Store + engine (fakes) + event bus + webhook sender + control API, restartable on the same state dir."""

    def __init__(self, tmp: Path, receiver: Receiver, **webhook_kw: Any) -> None:
        self.tmp = tmp
        self.receiver = receiver
        c = cfg.Config()
        endpoint = cfg.WebhookEndpoint("rx", receiver.url, (SECRET_A, SECRET_B), ("*",))
        self.config = replace(
            c, daemon=replace(c.daemon, state_dir=tmp / "state"),
            webhooks=replace(c.webhooks, endpoints=(endpoint,), **{
                "timeout_s": 1.0, "backoff_initial_s": 0.05, "backoff_max_s": 0.2, "max_attempts": 100,
                **webhook_kw}),
        )
        self.virt = FakeHypervisor()
        (tmp / "b.qcow2").write_bytes(b"")
        self.virt.add_source("src", tmp / "b.qcow2")

    async def start(self) -> Hub:
        self.bus = EventBus()
        self.store = Store(self.config.store_path, on_commit=self.bus.publish)
        await self.store.open()
        self.engine = Engine(config=self.config, store=self.store, virt=self.virt,  # type: ignore[arg-type]
                             storage=FakeStorage(config=self.config, virt=self.virt),  # type: ignore[arg-type]
                             memory=SaveRestoreMemory(config=self.config, virt=self.virt))  # type: ignore[arg-type]
        self.sender = WebhookSender(self.config.webhooks, self.store, bus=self.bus, gate=self.engine.outside_stun)
        await self.engine.recover()
        self.task = asyncio.get_running_loop().create_task(self.sender.run())
        self.runner = web.AppRunner(make_app(self.engine, self.store, self.sender, bus=self.bus))
        await self.runner.setup()
        self.sock = self.tmp / "ctl.sock"
        await web.UnixSite(self.runner, str(self.sock)).start()
        return self

    async def stop(self) -> None:
        await self.engine.shutdown(5)
        await self.runner.cleanup()
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.store.close()

    async def clone(self, name: str) -> str:
        job = await self.engine.submit(CloneRequest(source="src", name=name))
        await self.engine.wait(job.id, 10)
        got = await self.store.get_job(job.id)
        assert got is not None and got.state.value == "Unstunned", got and got.error
        return job.id

    async def event_ids(self) -> set[str]:
        return {e.id for e in await self.store.events(since=0)}


async def settled(hub: Hub, timeout: float = 10.0) -> list[Any]:
    """The deliveries once none is pending (the receiver sees a request before its row is settled)."""
    end = time.monotonic() + timeout
    while True:
        rows = await hub.store.list_deliveries(limit=10_000)
        if all(d.status != "pending" for d in rows) or time.monotonic() > end:
            return rows
        await asyncio.sleep(0.05)
