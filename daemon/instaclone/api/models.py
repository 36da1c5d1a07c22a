"""The API's typed inputs: every request body, query and path parameter as a pydantic model.

These models are the contract at the edge: the routes (:mod:`.routes`)
validate each request through them, and the OpenAPI document (:mod:`.openapi`)
is their JSON Schema. A constraint the server enforces on a request belongs
here, so that the document states it, with its limit taken from
:mod:`instaclone.requests`; a model then builds the engine's typed record once
(``to_request``). What only the engine can know (does the source exist, is
the name free) is a documented status code instead.

Bodies are strict (JSON types as they are: ``1`` is not ``true``, ``"2"`` is
not a count) and refuse unknown fields. Query values arrive as text: the
``Query*`` types read them with the exact spellings their schema documents.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Self, cast

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic.json_schema import SkipJsonSchema

from .. import events
from ..errors import InvalidName, InvalidRequest
from ..identity import MAX_NAME_LEN
from ..requests import (
    MAX_CLAIM_WAIT_S,
    MAX_GUEST_CONFIG_BYTES,
    MAX_POOL_SIZE,
    MAX_SCRIPT_BYTES,
    MAX_TTL_S,
    ClaimRequest,
    CloneRequest,
    PoolRequest,
    PoolUpdate,
    PrepareRequest,
    validate_script,
)
from ..store import DeliveryStatus
from .common import MAX_WAIT_S

# -- names ------------------------------------------------------------------------------

#: identity.validate_name's rule as one regex without look-arounds (JSON Schema and the
#: Rust regex engine pydantic uses both take it): a letter or digit, then letters, digits,
#: '_', '-' and single dots (no "..").
NAME_PATTERN = r"^[A-Za-z0-9](?:[A-Za-z0-9_-]|\.[A-Za-z0-9_-])*\.?$"
#: What config.py allows as a webhook endpoint name ("a..b" included).
ENDPOINT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


@dataclass(frozen=True)
class NameRule:
    """Metadata of a name field: its failures are ``invalid_name``, worded by identity.validate_name."""

    what: str


def _name(what: str) -> Any:
    return Field(min_length=1, max_length=MAX_NAME_LEN, pattern=NAME_PATTERN,
                 description=f"{what}: letters, digits, '.', '_' and '-', starting with a letter or digit, no '..'")


CloneName = Annotated[str, _name("a clone name"), NameRule("clone name")]
SourceName = Annotated[str, _name("a source domain's name"), NameRule("source name")]
PoolName = Annotated[str, _name("a pool's name"), NameRule("pool name")]
EndpointName = Annotated[str, Field(min_length=1, max_length=MAX_NAME_LEN, pattern=ENDPOINT_PATTERN,
                                    description="a [[webhooks.endpoints]] name")]


# -- values shared by bodies ----------------------------------------------------------------


def _config_size(config: dict[str, str] | None) -> dict[str, str] | None:
    if config is not None and len(json.dumps(config)) > MAX_GUEST_CONFIG_BYTES:
        raise ValueError(f"larger than {MAX_GUEST_CONFIG_BYTES} bytes as JSON")
    return config


def _script(script: str) -> str:
    validate_script(script)  # the core's own rule (InvalidRequest; turned into a 400 by routes.parse)
    return script


GuestConfig = Annotated[dict[str, str] | None, Field(
    description=f"key/value strings for the guest (/run/instaclone/config.json), at most "
                f"{MAX_GUEST_CONFIG_BYTES} bytes as JSON"), AfterValidator(_config_size)]
#: Python's white space (str.isspace, what validate_script strips), spelled out: regex engines' \\s
#: differ (\\x1c-\\x1f are white space to Python only).
_SPACE = r"\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
Script = Annotated[str, Field(
    min_length=1, max_length=MAX_SCRIPT_BYTES, pattern=rf"^[^\u0000]*[^\u0000{_SPACE}][^\u0000]*$",
    description=f"shell script run in each clone after its identity reset (default: clone.customize_script); "
                f"not only white space, no NUL, at most {MAX_SCRIPT_BYTES} bytes as UTF-8"), AfterValidator(_script)]
Ttl = Annotated[float, Field(ge=1, le=MAX_TTL_S, allow_inf_nan=False,
                             description="seconds: the daemon destroys the clone this long after it is ready")]


def _integral(v: object) -> object:
    """JSON has numbers: 2.0 is the integer 2, as JSON Schema's "integer" has it."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


#: An integer in a JSON body (2 or 2.0; not true, not "2").
Int = Annotated[int, BeforeValidator(_integral)]


#: A field that may be left out but not sent as null (``x: T | Absent = None``): the document
#: does not offer null, and :class:`Body` refuses it for the fields named in ``NOT_NULL``.
Absent = SkipJsonSchema[None]


class Body(BaseModel):
    """A JSON object body: JSON types as sent, unknown fields refused."""

    model_config = ConfigDict(strict=True, extra="forbid")
    NOT_NULL: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="before")
    @classmethod
    def _absent_is_not_null(cls, data: Any) -> Any:
        if isinstance(data, dict):
            null = sorted(k for k in cls.NOT_NULL if k in data and data[k] is None)
            if null:
                raise InvalidRequest(f"field {null[0]!r} must not be null (leave it out instead)")
        return data


# -- bodies ---------------------------------------------------------------------------------


class CreateJobBase(Body):
    """``POST /v1/jobs``: clone ``source`` as ``name`` (``count`` > 1: ``name-1`` .. ``name-N``)."""

    source: SourceName
    name: CloneName
    count: Int = 1  # bounded per app by clone.max_count: see create_job_model
    keep_network: bool = False
    customize: bool = True
    config: GuestConfig = None
    keep_ssh_host_keys: bool | None = Field(None, description="keep the source's SSH host keys "
                                                              "(default: clone.keep_ssh_host_keys)")
    script: Script | None = None
    ttl_s: Ttl | None = None

    @model_validator(mode="after")
    def _names_fit(self) -> Self:
        if self.count > 1 and len(self.name) + 1 + len(str(self.count)) > MAX_NAME_LEN:
            raise InvalidName(f"with count {self.count} the clone names {self.name}-1..{self.name}-{self.count} "
                             f"are longer than {MAX_NAME_LEN} characters")
        return self

    def to_request(self, *, owner: int | None) -> CloneRequest:
        """The engine's record of this request, made by ``owner`` (a uid)."""
        return CloneRequest(source=self.source, name=self.name, count=self.count, keep_network=self.keep_network,
                            customize=self.customize, config=self.config,
                            keep_ssh_host_keys=self.keep_ssh_host_keys, script=self.script, ttl_s=self.ttl_s,
                            owner=owner)


def _names_fit_schema(max_count: int) -> list[dict[str, Any]]:
    """The name/count rule as JSON Schema: per number of digits of count, the longest name."""
    out: list[dict[str, Any]] = [{"properties": {"count": {"maximum": 1}}}]
    lo = 2
    while lo <= max_count:
        digits = len(str(lo))
        hi = min(10 ** digits - 1, max_count)
        out.append({"properties": {"count": {"minimum": lo, "maximum": hi},
                                   "name": {"maxLength": MAX_NAME_LEN - 1 - digits}}})
        lo = hi + 1
    return out


@functools.cache
def create_job_model(max_count: int) -> type[CreateJobBase]:
    """The job request of a daemon whose ``clone.max_count`` is ``max_count``."""

    class CreateJob(CreateJobBase):
        __doc__ = CreateJobBase.__doc__
        model_config = ConfigDict(json_schema_extra={"anyOf": cast(Any, _names_fit_schema(max_count))})
        count: Int = Field(1, ge=1, le=max_count, description="clones to make (1..clone.max_count)")

    return CreateJob


class CreatePool(Body):
    name: PoolName
    source: SourceName
    size: Int = Field(ge=0, le=MAX_POOL_SIZE)
    config: GuestConfig = None
    customize: bool = True
    keep_network: bool = False
    freeze: bool = Field(False, description="freeze the source first (if it is not)")

    def to_request(self, *, owner: int | None) -> PoolRequest:
        """The engine's record of this request, made by ``owner`` (a uid)."""
        return PoolRequest(name=self.name, source=self.source, size=self.size, config=self.config,
                           customize=self.customize, keep_network=self.keep_network, freeze=self.freeze,
                           owner=owner)


class UpdatePool(Body):
    """``size``: resize; ``source``: move the pool to a new source (image push). At least one.

    Absent is not null: a field is read only if it was sent (``model_fields_set``).
    """

    model_config = ConfigDict(json_schema_extra={"minProperties": 1})
    NOT_NULL = frozenset({"size", "source"})
    size: Annotated[int, Field(ge=0, le=MAX_POOL_SIZE), BeforeValidator(_integral)] | Absent = None
    source: SourceName | Absent = None

    @model_validator(mode="after")
    def _something(self) -> Self:
        if not self.model_fields_set:
            raise ValueError("give 'size' or 'source' (or both)")
        return self

    def to_request(self, name: str) -> PoolUpdate:
        """The engine's record of this change of pool ``name`` (a field not sent is left alone)."""
        return PoolUpdate(name=name, size=self.size, source=self.source)


class Claim(Body):
    ttl_s: Ttl | None = None
    config: GuestConfig = Field(None, description="written over the pool's config to /run/instaclone/config.json")
    wait_s: Annotated[float, Field(ge=0, le=MAX_CLAIM_WAIT_S, allow_inf_nan=False)] | None = Field(
        None, description="how long to wait for a member (default pools.claim_wait_s)")

    def to_request(self, pool: str, *, owner: int | None, claimed_by: dict[str, Any] | None) -> ClaimRequest:
        """The engine's record of a claim on ``pool`` by ``owner`` (a uid; ``claimed_by``: its peer)."""
        return ClaimRequest(pool=pool, ttl_s=self.ttl_s, config=self.config, wait_s=self.wait_s,
                            claimed_by=claimed_by, owner=owner)


class DryRun(Body):
    dry_run: bool = False

    def to_request(self, source: str) -> PrepareRequest:
        """The engine's record of a prepare of ``source``."""
        return PrepareRequest(source=source, dry_run=self.dry_run)


class Replay(Body):
    """Queue deliveries again: by ``ids``, or by filter; at least one field."""

    model_config = ConfigDict(json_schema_extra={"minProperties": 1})
    # Absent, not null: {"webhook": null} would be no filter, and replay everything.
    NOT_NULL = frozenset({"ids", "status", "webhook", "event_id"})
    ids: Annotated[list[Annotated[int, Field(ge=1, le=2**63 - 1), BeforeValidator(_integral)]],
                   Field(max_length=10_000)] | Absent = Field(None, description="delivery ids "
                                                                            "(GET /v1/webhooks/deliveries)")
    status: Annotated[DeliveryStatus, Field(strict=False)] | Absent = None
    webhook: str | Absent = None
    event_id: str | Absent = None

    @model_validator(mode="after")
    def _something(self) -> Self:
        if not self.model_fields_set:
            raise ValueError("say what to replay: ids, or a filter (status, webhook, event_id)")
        return self


# -- query values: text, read exactly as documented --------------------------------------------

_INT = re.compile(r"-?[0-9]+")
_NUMBER = re.compile(r"-?[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_BOOLS = {"true": True, "false": False, "1": True, "0": False}


def _int_text(v: object) -> object:
    return int(v) if isinstance(v, str) and _INT.fullmatch(v) else v


def _number_text(v: object) -> object:
    return float(v) if isinstance(v, str) and _NUMBER.fullmatch(v) else v


def _bool_text(v: object) -> object:
    return _BOOLS.get(v, v) if isinstance(v, str) else v


class Query(BaseModel):
    """Query parameters (strict after the text is read; unknown ones are ignored, as HTTP has it).

    A parameter's None is its absence: the document does not offer null.
    """

    model_config = ConfigDict(strict=True, extra="ignore")


Wait = Annotated[float, Field(ge=0, le=MAX_WAIT_S, allow_inf_nan=False, description="seconds to wait for the job "
                                                                                   "to finish"),
                 BeforeValidator(_number_text)]


class WaitQuery(Query):
    wait: Wait = 0


def _type_pattern() -> str:
    one = "|".join([*(re.escape(t) for t in events.TYPES), r"\*",
                    *sorted({re.escape(t.split(".")[0]) + r"\.\*" for t in events.TYPES})])
    return f"^(?:(?:{one})(?:,(?:{one}))*)?$"


#: The event filter: comma-separated types, ``*`` or ``<kind>.*`` (``clone.*``, ``pool.*``...).
TYPE_PATTERN = _type_pattern()


class EventsQuery(Query):
    follow: Annotated[bool, BeforeValidator(_bool_text)] = False  # its schema: QUERY_SCHEMA_OVERRIDES
    job: str | None = Field(None, description="only the events of this job id")
    type: str = Field("", pattern=TYPE_PATTERN,
                      description="comma-separated event types, '*' or '<kind>.*' (e.g. clone.*)")
    since: Annotated[int, Field(ge=0, le=2**62), BeforeValidator(_int_text)] | None = Field(
        None, description="the events after this cursor (else the last `tail`)")
    tail: Annotated[int, Field(ge=0, le=10_000), BeforeValidator(_int_text)] = 100


class DeliveriesQuery(Query):
    status: Annotated[DeliveryStatus, Field(strict=False)] | None = None
    webhook: str | None = None
    job: str | None = None
    event: str | None = None
    limit: Annotated[int, Field(ge=1, le=10_000), BeforeValidator(_int_text)] = 100


# -- path parameters ------------------------------------------------------------------------


class Path(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class ClonePath(Path):
    name: CloneName


class SourcePath(Path):
    name: SourceName


class PoolPath(Path):
    name: PoolName


class EndpointPath(Path):
    name: EndpointName


class JobPath(Path):
    job_id: str = Field(min_length=1, description="a job id (GET /v1/jobs lists them)")


#: Query parameters the schema of which is not pydantic's default rendering.
QUERY_SCHEMA_OVERRIDES: dict[tuple[str, str], dict[str, Any]] = {
    ("EventsQuery", "follow"): {"anyOf": [{"type": "boolean"}, {"type": "integer", "enum": [0, 1]}],
                                "default": False,
                                "description": "keep the answer open and send new events as they are "
                                               "committed (true/false, or 1/0)"},
}
