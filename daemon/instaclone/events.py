"""Events: what a state change looks like on the wire, and how it is signed.

Pure: no I/O. Every job transition (and every clone destroy, freeze and
unfreeze) becomes one event, built here and written to the store's outbox in
the same transaction as the change itself. The payload follows the Standard
Webhooks shape ``{"type", "timestamp", "data"}``; the event id travels in the
``webhook-id`` header and is the same for every attempt, every endpoint and
every replay, so a receiver deduplicates on it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import uuid
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from typing import Any

from .model import CloneRecord, JobRecord, NewEvent
from .states import State

#: Event type of each job state.
STATE_TYPES: dict[State, str] = {s: s.event_type for s in State}
CLONE_DESTROYED = "clone.destroyed"
CLONE_EXPIRED = "clone.expired"
SOURCE_FROZEN = "source.frozen"
SOURCE_UNFROZEN = "source.unfrozen"
POOL_CREATED = "pool.created"
POOL_UPDATED = "pool.updated"
POOL_DELETED = "pool.deleted"
POOL_CLAIMED = "pool.claimed"
POOL_RELEASED = "pool.released"
POOL_REPLENISHING = "pool.replenishing"
POOL_TYPES = (POOL_CREATED, POOL_UPDATED, POOL_DELETED, POOL_CLAIMED, POOL_RELEASED, POOL_REPLENISHING)

#: Every event type the daemon emits.
TYPES: tuple[str, ...] = (*STATE_TYPES.values(), CLONE_DESTROYED, CLONE_EXPIRED, SOURCE_FROZEN, SOURCE_UNFROZEN,
                          *POOL_TYPES)

SECRET_PREFIX = "whsec_"


def new_id() -> str:
    return f"evt_{uuid.uuid4().hex}"


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def envelope(event_type: str, at: float, data: dict[str, Any]) -> dict[str, Any]:
    """The body of a webhook: ``{"type", "timestamp", "data"}``."""
    return {"type": event_type, "timestamp": iso(at), "data": data}


# -- payloads: what each change looks like (the store writes them in the change's transaction) --


def job_event(job: JobRecord, state: State, at: float) -> NewEvent:
    """The event of ``job``'s transition to ``state`` (already in its history)."""
    durations = job.history.durations_ms()
    data: dict[str, Any] = {
        "job_id": job.id,
        "source": job.source,
        "clones": list(job.spec.names),
        "state": state.value,
        "sequence": len(job.history.entries),
        "at": at,
        "started_at": job.created_at,
        "duration_ms": durations.get(state.value),
        "error": job.error if state.failed else None,
    }
    if state is State.UNSTUNNED:
        data["durations_ms"] = durations
        data["stun_ms"] = (job.result or {}).get("stun_ms")
    return NewEvent(state.event_type, job.id, at, data)


def clone_destroyed(clone: CloneRecord, at: float, *, reason: str = "destroyed") -> NewEvent:
    """A clone made by instaclone was destroyed (``reason``: destroyed, expired, released, pool)."""
    return NewEvent(CLONE_DESTROYED, clone.job_id, at, {"clone": clone.name, "uuid": clone.uuid,
                                                        "source": clone.source, "job_id": clone.job_id, "at": at,
                                                        "reason": reason, "pool": clone.pool})


def clone_expired(clone: CloneRecord, at: float) -> NewEvent:
    """A clone's TTL ran out: the daemon destroys it (``clone.destroyed`` follows)."""
    return NewEvent(CLONE_EXPIRED, clone.job_id, at, {"clone": clone.name, "source": clone.source,
                                                      "job_id": clone.job_id, "expires_at": clone.expires_at,
                                                      "at": at, "pool": clone.pool})


def pool_event(type_: str, pool: str, at: float, **data: Any) -> NewEvent:
    """A pool's change (created, updated, deleted, a member claimed or released, replenishing)."""
    return NewEvent(type_, None, at, {"pool": pool, "at": at, **data})


def source_frozen(source: str, at: float, *, freeze_ms: float) -> NewEvent:
    """A freeze completed: the source is a template now."""
    return NewEvent(SOURCE_FROZEN, None, at, {"source": source, "at": at, "freeze_ms": freeze_ms})


def source_unfrozen(source: str, at: float, *, clones: int) -> NewEvent:
    """A frozen source runs again; ``clones`` were taken from it while it was frozen."""
    return NewEvent(SOURCE_UNFROZEN, None, at, {"source": source, "at": at, "clones": clones})


# -- filters -----------------------------------------------------------------------------


def valid_pattern(pattern: str) -> bool:
    """A filter is an event type, ``*``, or a glob such as ``clone.*``."""
    return any(fnmatchcase(t, pattern) for t in TYPES)


def matches(event_type: str, patterns: tuple[str, ...] | list[str]) -> bool:
    return any(fnmatchcase(event_type, p) for p in patterns)


# -- Standard Webhooks signatures -------------------------------------------------------


def decode_secret(secret: str) -> bytes:
    """The key bytes of a ``whsec_<base64>`` secret; ValueError if malformed."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"must start with {SECRET_PREFIX!r}")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("is not valid base64 after the whsec_ prefix") from None
    if len(key) < 16:
        raise ValueError(f"decodes to {len(key)} bytes; use at least 16 (24 to 64 recommended)")
    return key


def new_secret() -> str:
    import secrets

    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def sign(keys: list[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header: one ``v1,<base64 HMAC-SHA256>`` per key.

    Several keys sign at once while a secret is rotated; a receiver accepts
    the message if any signature verifies with a secret it knows.
    """
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(k, signed, hashlib.sha256).digest()).decode() for k in keys
    )


def headers(keys: list[bytes], msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(keys, msg_id, timestamp, body),
        "content-type": "application/json",
    }


def body_bytes(payload: dict[str, Any]) -> bytes:
    """Canonical bytes of a payload: the exact bytes that are signed and sent."""
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
