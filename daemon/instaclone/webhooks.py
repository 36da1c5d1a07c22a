"""Moved to :mod:`instaclone.outbox.webhooks` (re-exported here until the move is done)."""

from .outbox.webhooks import IDLE_POLL_S, MAX_RETRY_AFTER_S, PRUNE_EVERY_S, WebhookSender, backoff_s, parse_retry_after

__all__ = ["IDLE_POLL_S", "MAX_RETRY_AFTER_S", "PRUNE_EVERY_S", "WebhookSender", "backoff_s", "parse_retry_after"]
