"""Fixtures of the integration tier: a real daemon on real libvirtd + QEMU with the test guests."""

from __future__ import annotations

from dataclasses import replace

import pytest

from instaclone import events
from instaclone.config import WebhookEndpoint
from instaclone.hv import LibvirtHypervisor as Hypervisor
from tests.support.receiver import Receiver
from tests.support.vmlib import TEST_PREFIXES, Scratch, assert_no_qemu_left, make_config, running_daemon, undefine_new

WEBHOOK_SECRET = events.new_secret()


@pytest.fixture
async def world():
    """A scratch dir, a daemon on it, a libvirt handle; everything removed afterwards."""
    scratch = Scratch()
    virt = Hypervisor()
    await virt.connect()
    before = set(await virt.list_names())
    receiver = await Receiver([WEBHOOK_SECRET]).start()
    config = make_config(scratch)
    config = replace(config, webhooks=replace(config.webhooks, endpoints=(
        WebhookEndpoint("test", receiver.url, (WEBHOOK_SECRET,)),)))
    daemon = await running_daemon(config)
    daemon.receiver = receiver  # type: ignore[attr-defined]
    try:
        yield scratch, virt, daemon, config
    finally:
        await daemon.stop()
        await receiver.stop()
        # Only what this test made (other users' domains may come and go meanwhile).
        await undefine_new(virt, before, TEST_PREFIXES)
        await virt.close()
        scratch.cleanup()
    # Nothing of ours may survive the test.
    assert_no_qemu_left(scratch)
