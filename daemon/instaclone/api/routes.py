"""Route declarations: what each route takes and answers, in one place.

A handler module lists its routes as :class:`Route` values (``ROUTES``); the
app (:mod:`.app`) registers them, :func:`bind` validates every request
through the route's models before its handler runs, and the OpenAPI document
(:mod:`.openapi`) is built from the same list. A route therefore cannot take
an input or answer a status its document does not show:

* ``path_params``, ``query``, ``headers``: models of :mod:`.models` (text read as
  documented; a header model's fields are aliased to the header names);
* ``body``: a JSON body model (or a factory of one from the config, for
  bounds such as ``clone.max_count``), or :class:`RawBody` for a body the
  handler streams itself (``application/octet-stream``: it is not read here);
* ``ok``: the success statuses with their :class:`Reply` (JSON schema, or
  another media type such as ``application/x-ndjson`` with the schema of one
  line, and response headers);
* ``errors``: the error statuses the handler and the engine can answer, each
  with the codes it carries. The document adds the statuses every route of
  its kind can answer: 400 (any input), 413 (a body), 403 (a mutating route,
  or any route when ``access.read_groups`` is set).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import annotated_types
from aiohttp import web
from pydantic import BaseModel, ValidationError

from .. import identity
from ..config import Config
from ..errors import BodyTooLarge, InvalidName, InvalidRequest
from .common import ENGINE, MAX_BODY_BYTES, body as read_body
from .models import NameRule

MUTATING = ("POST", "PUT", "PATCH", "DELETE")
#: The 503 and 500 of routes that call the hypervisor (``Route.errors`` values).
LIBVIRT_DOWN = "libvirt_unavailable (libvirt is down; retry), shutting_down"
HV_FAILED = "libvirt_error, step_failed: the hypervisor failed (see the message and the daemon log)"
#: The 403 of routes that take a source (its ``rule``: which refused it).
SOURCE_FORBIDDEN = ("forbidden: rule access.sources (the source is outside the patterns of the caller's groups), "
                    "clone owner (a clone of another user), or the caller's write access")
#: The 404 of routes on one clone.
CLONE_NOT_FOUND = "not_found (not a clone made by instaclone, or another user's)"

M = TypeVar("M", bound=BaseModel)

#: pydantic's error types of a number outside a Field's ge/le.
_BOUND_ERRORS = frozenset({"greater_than_equal", "less_than_equal"})


@dataclass(frozen=True)
class Call:
    """A request's validated inputs, as the route's models made them."""

    path: BaseModel | None = None
    query: BaseModel | None = None
    body: BaseModel | None = None
    headers: BaseModel | None = None

    def headers_as(self, cls: type[M]) -> M:
        return _as(self.headers, cls)

    def path_as(self, cls: type[M]) -> M:
        return _as(self.path, cls)

    def query_as(self, cls: type[M]) -> M:
        return _as(self.query, cls)

    def body_as(self, cls: type[M]) -> M:
        return _as(self.body, cls)


def _as(value: BaseModel | None, cls: type[M]) -> M:
    if not isinstance(value, cls):  # a route whose declaration and handler disagree: a bug
        raise TypeError(f"expected {cls.__name__}, the route gave {type(value).__name__}")
    return value


RouteHandler = Callable[[web.Request, Call], Awaitable[web.StreamResponse]]
BodyModel = type[BaseModel] | Callable[[Config], type[BaseModel]]


@dataclass(frozen=True)
class RawBody:
    """A body the handler reads itself (``request.content``), e.g. a file's bytes."""

    media_type: str = "application/octet-stream"
    #: A Content-Length over it is 413 before the handler runs; a chunked body's handler counts
    #: (None: no limit of ours, and 413 is not documented).
    max_bytes: int | None = None
    description: str = ""


@dataclass(frozen=True)
class Reply:
    """One documented answer: a JSON schema (a model or a dict) or another media type."""

    description: str
    schema: type[BaseModel] | dict[str, Any] | None = None
    media_type: str = "application/json"
    headers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # name -> {"schema":..., ...}


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: RouteHandler
    summary: str
    ok: Mapping[int, Reply]
    errors: Mapping[int, str] = field(default_factory=dict)  # status -> which codes and when
    path_params: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    headers: type[BaseModel] | None = None  # request headers: fields aliased to the header names
    body: BodyModel | RawBody | None = None
    body_required: bool = True  # the document's requestBody.required (an empty body is {} either way)
    #: Largest JSON body (default the app's MAX_BODY_BYTES); a RawBody has its own max_bytes.
    body_max_bytes: int | None = None
    description: str = ""
    #: Needs write access (root, the daemon's user, access.write_groups). None: by method (mutating
    #: methods do); True for a read that must be guarded as a write (a guest file's GET).
    needs_write: bool | None = None
    #: Only admins (root, the daemon's user, access.admin_groups) may call it: it acts on or shows what
    #: belongs to every user (garbage collection, webhook deliveries).
    needs_admin: bool = False
    operation_id: str | None = None  # the document's operationId (unique); default: the handler's name

    @property
    def write(self) -> bool:
        return self.method in MUTATING if self.needs_write is None else self.needs_write

    def body_model(self, config: Config) -> type[BaseModel] | None:
        """The JSON body model of this route for ``config`` (None: no JSON body)."""
        if self.body is None or isinstance(self.body, RawBody):
            return None
        if isinstance(self.body, type):
            return self.body
        return self.body(config)


# -- validation -------------------------------------------------------------------------------


def parse(model: type[M], data: Any, where: str) -> M:
    """``data`` validated by ``model``; raises InvalidRequest (or InvalidName) naming the field.

    ``where``: "body", "query" or "path", for the message.
    """
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise refusal(model, exc, where) from None


def _label(where: str, field_name: str) -> str:
    return {"query": f"query parameter {field_name!r}", "path": f"{field_name!r} in the path",
            "header": f"header {field_name!r}"}.get(
        where, f"field {field_name!r}")


def refusal(model: type[BaseModel], exc: ValidationError, where: str) -> InvalidRequest:
    """One clear 400 for a validation failure: the first problem, with the field it is about."""
    errs = exc.errors(include_url=False)
    extra = sorted(str(e["loc"][0]) for e in errs if e["type"] == "extra_forbidden" and e["loc"])
    if extra:
        return InvalidRequest(f"unknown field(s): {', '.join(extra)} "
                              f"(allowed: {', '.join(sorted(model.model_fields))})")
    err = errs[0]
    loc = [str(p) for p in err["loc"]]
    top = loc[0] if loc else ""
    info = model.model_fields.get(top)
    if len(loc) > 1 and any(e["type"] == "none_required" and [str(p) for p in e["loc"]] == [top, "none"]
                            for e in errs):
        # A field that may be absent but not null (models.Absent) is a union with None: pydantic
        # tags each member's errors with it ("constrained-str"), which is no place in the input.
        del loc[1]
    if err["type"] == "missing":
        return InvalidRequest(f"{_label(where, top)} is required")
    rule = next((m for m in info.metadata if isinstance(m, NameRule)), None) if info and len(loc) == 1 else None
    if rule is not None:
        try:
            identity.validate_name(err.get("input"), what=rule.what)
        except InvalidName as named:
            return named
        return InvalidName(f"{rule.what}: {err['msg']}")
    msg = err["msg"].removeprefix("Value error, ")
    if not loc:
        return InvalidRequest(msg)
    got = repr(err.get("input"))
    got = got if len(got) <= 80 else got[:77] + "..."
    if err["type"] in _BOUND_ERRORS and info is not None and len(loc) == 1:
        # Both bounds of the range, as the engine's own checks say it (a config-made bound such
        # as clone.max_count included), rather than pydantic's one-sided "less than or equal to".
        lo = next((b.ge for b in info.metadata if isinstance(b, annotated_types.Ge)), None)
        hi = next((b.le for b in info.metadata if isinstance(b, annotated_types.Le)), None)
        if lo is not None and hi is not None:
            return InvalidRequest(f"{_label(where, top)} must be between {lo} and {hi} (got {got})")
    return InvalidRequest(f"{_label(where, '.'.join(loc))}: {msg[0].lower() + msg[1:]} (got {got})")


def _header_values(model: type[BaseModel], request: web.Request) -> dict[str, str]:
    """The request's values of the headers ``model`` names (by alias; HTTP header names are case-blind)."""
    names = [f.alias or name for name, f in model.model_fields.items()]
    return {n: request.headers[n] for n in names if n in request.headers}


def bind(route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The aiohttp handler of ``route``: validate path, query and body, then call the route's handler.

    A body model made from the config (``clone.max_count``) is the one of the engine's config at
    the time of the request: a reload moves the bound (the factories cache their models).
    """
    raw = route.body if isinstance(route.body, RawBody) else None

    async def handle(request: web.Request) -> web.StreamResponse:
        body_model = route.body_model(request.app[ENGINE].config)
        if raw is not None and raw.max_bytes is not None and (request.content_length or 0) > raw.max_bytes:
            # A declared length over the limit is refused before the handler; a chunked body the
            # handler counts as it streams it.
            raise BodyTooLarge(f"request body is larger than {raw.max_bytes} bytes")
        call = Call(
            path=parse(route.path_params, dict(request.match_info), "path") if route.path_params else None,
            query=parse(route.query, {k: request.query.get(k) for k in request.query}, "query")
            if route.query else None,
            headers=parse(route.headers, _header_values(route.headers, request), "header")
            if route.headers else None,
            body=parse(body_model, await read_body(request, route.body_max_bytes or MAX_BODY_BYTES), "body")
            if body_model else None)
        return await route.handler(request, call)

    handle.__name__ = handle.__qualname__ = route.handler.__name__
    setattr(handle, WRITE_ATTR, route.write)  # read by access.peer_credentials
    setattr(handle, ADMIN_ATTR, route.needs_admin)
    return handle


#: The attribute of a bound handler that says whether its route needs write access.
WRITE_ATTR = "instaclone_needs_write"
#: ... and whether it needs an admin.
ADMIN_ATTR = "instaclone_needs_admin"


def needs_write(request: web.Request) -> bool:
    """Does the route ``request`` reached need write access (by its declaration, else by method)?"""
    return bool(getattr(request.match_info.handler, WRITE_ATTR, request.method in MUTATING))


def needs_admin(request: web.Request) -> bool:
    """Is the route ``request`` reached for admins only?"""
    return bool(getattr(request.match_info.handler, ADMIN_ATTR, False))
