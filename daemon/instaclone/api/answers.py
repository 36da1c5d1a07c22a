"""What the API answers, as models for its OpenAPI document.

The handlers build their answers from the records' ``to_dict`` (``model.py``);
these models describe those dictionaries (the fuzz test checks every answer
against them). They name the fields a client may rely on and allow more
(``extra="allow"``): a field added later does not break a client.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..states import State
from ..store import DeliveryStatus


class Answer(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorDetail(Answer):
    code: str = Field(description="stable, snake_case (errors.py)")
    message: str
    step: str | None = Field(None, description="the step that failed, for a job's error")
    rule: str | None = Field(None, description="of a 403 forbidden: the rule that refused the call "
                                               "(access.write_groups, access.sources, pool owner, ...)")


class Error(Answer):
    """Every 4xx and 5xx answer."""

    error: ErrorDetail


class HistoryEntry(Answer):
    state: State
    at: float


class Job(Answer):
    id: str
    owner: int | None = Field(description="uid of its owner (None: made before owners were recorded)")
    source: str
    state: State
    spec: dict[str, Any] = Field(description="names, count, backends, flags, config, script, ttl_s, pool")
    error: dict[str, Any] | None = Field(description="code, message, step of a failed job")
    result: dict[str, Any] = Field(description=(
        "clones made (name, uuid, dir, identity...), stun_ms, and where the time went: phases_ms (the job's "
        "phases outside the states, ms: queue, set_up, source_ipv4, stamp, clones_start, result, hand_over) and "
        "per clone identity.phases_ms (its start's phases, ms; they overlap), identity.ready_ms, "
        "identity.guest_ms"))
    created_at: float
    updated_at: float
    history: list[HistoryEntry]
    durations_ms: dict[str, float]


class JobAnswer(Answer):
    job: Job


class Jobs(Answer):
    jobs: list[Job]


class Clone(Answer):
    name: str
    uuid: str
    source: str
    job_id: str
    dir: str
    created_at: float
    expires_at: float | None
    pool: str | None
    claimed_at: float | None
    owner: int | None = Field(description="uid of its owner (None: made before owners were recorded)")


class ListedClone(Clone):
    state: str = Field(description="the domain's state, or 'missing'")


class Clones(Answer):
    clones: list[ListedClone]


class Destroyed(Answer):
    destroyed: Clone


class Frozen(Answer):
    name: str
    since: float
    status: str
    paused_by_us: bool
    backend: str
    image: dict[str, Any] | None
    clones: int


class FrozenList(Answer):
    frozen: list[Frozen]


class FrozenAnswer(Answer):
    frozen: Frozen


class UnfrozenAnswer(Answer):
    unfrozen: Frozen


class Pool(Answer):
    name: str
    source: str
    size: int
    config: dict[str, str]
    customize: bool
    keep_network: bool
    generation: int
    created_at: float
    updated_at: float
    owner: int | None = Field(description="uid of its owner (None: made before owners were recorded)")
    idle: list[str]
    idle_old_source: list[str]
    claimed: list[str]
    pending: int
    held: str | None = Field(description="why replenishment waits (the host budget), if it does")
    last_error: dict[str, Any] | None = Field(description="the error of the last failed replenishing job")
    failures: int


class PoolAnswer(Answer):
    pool: Pool


class Pools(Answer):
    pools: list[Pool]


class PoolDeletion(Answer):
    pool: str
    destroyed: list[str]
    not_destroyed: dict[str, str] = Field(description="member -> why it could not be destroyed")


class PoolDeleted(Answer):
    deleted: PoolDeletion


class ClaimInfo(Answer):
    pool: str
    clone: Clone
    waited_ms: float
    config_path: str | None


class Claimed(Answer):
    claim: ClaimInfo


class ReleaseInfo(Answer):
    pool: str | None
    clone: str
    destroyed: bool


class Released(Answer):
    released: ReleaseInfo


class Health(Answer):
    version: str
    libvirt_connected: bool
    active_jobs: int
    accepting: bool
    storage_backend: str
    memory_backend: str
    disk: dict[str, Any] | None = Field(None, description="bytes under instaclone's directories per source")


class Webhooks(Answer):
    webhooks: list[dict[str, Any]]


class WebhookEnabled(Answer):
    webhook: str
    enabled: bool
    was_disabled: bool


class Delivery(Answer):
    id: int
    event_cursor: int
    event_id: str
    event_type: str
    job_id: str | None
    webhook: str
    status: DeliveryStatus
    attempts: int
    next_at: float | None
    last_status: int | None
    last_error: str | None
    updated_at: float


class Deliveries(Answer):
    deliveries: list[Delivery]


class Replayed(Answer):
    replayed: list[int]


class Event(Answer):
    """One line of the event stream."""

    cursor: int
    id: str
    type: str
    timestamp: str
    data: dict[str, Any]
