"""The OpenAPI 3.1 document of the control API (``GET /v1/openapi.json``), built from the routes.

Nothing here is written by hand but the preflight, gc and prepare report
schemas: each path, parameter, body and answer comes from a route's
declaration (:mod:`.routes`) and the JSON Schema of its models
(:mod:`.models`, :mod:`.answers`), for the daemon's own config (bounds such
as ``clone.max_count``) and access (403 on reads when ``access.read_groups``
is set).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from .. import __version__
from ..config import Config
from . import answers
from .access import ACCESS, Access
from .common import ENGINE, MAX_BODY_BYTES
from .models import QUERY_SCHEMA_OVERRIDES
from .routes import Call, RawBody, Reply, Route

_REF = "#/components/schemas/{model}"
#: Preflight's capabilities (instaclone.jobs.preflight), and those of the built-in backend filecow.
CORE_CAPABILITIES = ("state", "mac_reset", "guest_customization", "vm_generation_id", "firmware", "tpm", "disk",
                     "chain_depth", "host_state", "ram_filesystem")
FILECOW_CAPABILITIES = ("cow_memory", "balloon")
_ERROR = {"$ref": "#/components/schemas/Error"}

#: The reports of preflight, gc and prepare (dictionaries built by jobs/, described here).
_STATIC: dict[str, Any] = {
    "CheckItem": {"type": "object", "required": ["capability", "ok", "level", "detail", "fix"], "properties": {
        # Not an enum: each loaded backend adds findings of its own (Backend.preflight).
        "capability": {"type": "string", "description": (
            "the core's: " + ", ".join(CORE_CAPABILITIES) + "; the loaded backends' own (built in, filecow's: "
            + ", ".join(FILECOW_CAPABILITIES) + "), and memory_backend: a memory backend that cannot serve "
            "the source and says nothing else")},
        "ok": {"type": "boolean"},
        "level": {"type": "string", "enum": ["ok", "warn", "error"]},
        "detail": {"type": "string"},
        "fix": {"type": ["string", "null"], "description": "the exact XML to add or change"},
        "device": {"type": "string", "description": "disk target or device the item is about"},
        "pending": {"type": "boolean", "description": "in the persistent definition; applies at next boot"}}},
    "Check": {"type": "object", "required": ["source", "state", "cloneable", "checks"], "properties": {
        "source": {"type": "string"}, "state": {"type": "string"}, "frozen": {"type": "boolean"},
        "clone_of": {"type": ["string", "null"]},
        "cloneable": {"type": "boolean", "description": "false if any item has level error"},
        "pending": {"type": "array", "items": {"type": "string"}},
        "checks": {"type": "array", "items": {"$ref": "#/components/schemas/CheckItem"}}}},
    "Gc": {"type": "object", "required": ["dry_run", "bytes", "deleted"], "properties": {
        "dry_run": {"type": "boolean"},
        "bytes": {"type": "integer", "description": "bytes allocated on disk by the files deleted"},
        "deleted": {"type": "array", "items": {"type": "object", "required": ["path", "bytes"], "properties": {
            "path": {"type": "string"}, "bytes": {"type": "integer"}}}},
        "released": {"type": "array", "items": {"type": "string"},
                     "description": "destroyed clones whose kept directory went (their names are free)"},
        "retained": {"type": "array", "description": "destroyed clones whose images chains still use",
                     "items": {"type": "object", "properties": {
                         "clone": {"type": "string"}, "source": {"type": "string"},
                         "dir": {"type": "string"}, "bytes": {"type": "integer"}}}},
        "failed": {"type": "array", "items": {"type": "string"}},
        "kept": {"type": "array", "description": "files instaclone made and nothing uses, not deleted: the name "
                                                 "holds another inode (replaced), a directory holds files "
                                                 "instaclone did not make (not empty), or a symlinked directory "
                                                 "is on the way (unsafe path)",
                 "items": {"type": "object", "required": ["path", "reason"], "properties": {
                     "path": {"type": "string"}, "reason": {"type": "string"}}}}}},
    "Prepare": {"type": "object", "required": ["source", "changed", "not_changed", "diff"], "properties": {
        "source": {"type": "string"}, "state": {"type": "string"}, "dry_run": {"type": "boolean"},
        "applied": {"type": "boolean", "description": "the persistent definition was written"},
        "changed": {"type": "array", "items": {"type": "string"}},
        "not_changed": {"type": "array", "items": {"type": "string"},
                        "description": "what stands in the way and prepare does not change, and why"},
        "diff": {"type": "string", "description": "unified diff of the persistent definition"},
        "pending": {"type": "array", "items": {"type": "string"},
                    "description": "capabilities defined but not yet in the running domain"},
        "note": {"type": "string"}}},}


def _models(routes: Sequence[Route], config: Config) -> list[tuple[type[BaseModel], JsonSchemaMode]]:
    out: dict[tuple[type[BaseModel], JsonSchemaMode], None] = {(answers.Error, "serialization"): None}
    for r in routes:
        for model in (r.path_params, r.query, r.headers, r.body_model(config)):
            if model is not None:
                out[model, "validation"] = None
        for reply in r.ok.values():
            if isinstance(reply.schema, type):
                out[reply.schema, "serialization"] = None
    return list(out)


def _parameters(model: type[BaseModel], where: Literal["path", "query", "header"]) -> list[dict[str, Any]]:
    schema = model.model_json_schema(ref_template=_REF)
    required = set(schema.get("required", ()))
    out = []
    for name, prop in schema.get("properties", {}).items():
        prop = QUERY_SCHEMA_OVERRIDES.get((model.__name__, name), prop)
        prop = {k: v for k, v in prop.items() if k != "title"}
        if "anyOf" in prop:  # None is the parameter's absence, never a value sent
            kinds = [k for k in prop.pop("anyOf") if k != {"type": "null"}]
            prop = {**kinds[0], **prop} if len(kinds) == 1 else {"anyOf": kinds, **prop}
        if prop.get("default", 0) is None:
            del prop["default"]
        param: dict[str, Any] = {"name": name, "in": where, "required": where == "path" or name in required,
                                 "schema": prop}
        if "description" in prop:
            param["description"] = prop["description"]
        out.append(param)
    return out


def _content(reply: Reply, refs: dict[type[BaseModel], dict[str, Any]]) -> dict[str, Any]:
    schema = refs[reply.schema] if isinstance(reply.schema, type) else reply.schema
    return {reply.media_type: {"schema": schema} if schema is not None else {}}


def _answers(route: Route, refs: dict[type[BaseModel], dict[str, Any]], *, read_groups: bool) -> dict[str, Any]:
    out: dict[int, dict[str, Any]] = {}
    for status, reply in route.ok.items():
        out[status] = {"description": reply.description, "content": _content(reply, refs)}
        if reply.headers:
            out[status]["headers"] = {k: dict(v) for k, v in reply.headers.items()}
    errors = dict(route.errors)
    if route.path_params or route.query or route.headers or route.body is not None:
        errors.setdefault(400, "")
        errors[400] = ", ".join(filter(None, ["invalid_request, invalid_name: a value the schema refuses",
                                              errors[400]]))
    if route.needs_admin:
        errors.setdefault(403, "forbidden: rule access.admin_groups (admins only: root, the daemon's user, "
                               "members of access.admin_groups)")
    elif route.write or read_groups:
        errors.setdefault(403, "forbidden: the caller's access (peer credentials against [access]) does not allow it")
    if 403 in errors and "access.write_groups" not in errors[403] and route.write:
        errors[403] += "; rule access.write_groups (the caller may not change anything)"
    if route.body is not None and not (isinstance(route.body, RawBody) and route.body.max_bytes is None):
        limit = route.body.max_bytes if isinstance(route.body, RawBody) else (route.body_max_bytes or MAX_BODY_BYTES)
        errors.setdefault(413, f"body_too_large: the body is larger than {limit} bytes")
    for status, what in errors.items():
        out[status] = {"description": what or "error", "content": {"application/json": {"schema": _ERROR}}}
    return {str(k): out[k] for k in sorted(out)}


def _body(route: Route, config: Config, refs: dict[type[BaseModel], dict[str, Any]]) -> dict[str, Any] | None:
    if isinstance(route.body, RawBody):
        return {"required": route.body_required, "description": route.body.description,
                "content": {route.body.media_type: {"schema": {"type": "string", "format": "binary"}}}}
    model = route.body_model(config)
    if model is None:
        return None
    return {"required": route.body_required, "content": {"application/json": {"schema": refs[model]}}}


def _absent_is_not_null(schema: Any) -> Any:
    """Drop ``"default": null`` from a schema that does not allow null (None there means absent)."""
    if isinstance(schema, list):
        return [_absent_is_not_null(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _absent_is_not_null(v) for k, v in schema.items()}
    if "default" in out and out["default"] is None and not _nullable(out):
        del out["default"]
    return out


def _nullable(schema: dict[str, Any]) -> bool:
    kinds = schema.get("anyOf", [])
    return schema.get("type") == "null" or any(isinstance(k, dict) and k.get("type") == "null" for k in kinds)


def operation_id(route: Route) -> str:
    return route.operation_id or route.handler.__name__


def document(routes: Iterable[Route], config: Config, *, read_groups: bool = False) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``routes`` as a daemon with ``config`` serves them."""
    routes = list(routes)
    keys, defs = models_json_schema(_models(routes, config), ref_template=_REF)
    refs: dict[Any, dict[str, Any]] = {model: ref for (model, _mode), ref in keys.items()}
    schemas = {k: _absent_is_not_null(v) for k, v in defs.get("$defs", {}).items()}
    for r in routes:  # parameters are listed one by one, not as objects
        for model in (r.path_params, r.query, r.headers):
            if model is not None:
                schemas.pop(model.__name__, None)
    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        op: dict[str, Any] = {"operationId": operation_id(r), "summary": r.summary}
        if r.description:
            op["description"] = r.description
        params = [*(_parameters(r.path_params, "path") if r.path_params else []),
                  *(_parameters(r.query, "query") if r.query else []),
                  *(_parameters(r.headers, "header") if r.headers else [])]
        if params:
            op["parameters"] = params
        body = _body(r, config, refs)
        if body is not None:
            op["requestBody"] = body
        op["responses"] = _answers(r, refs, read_groups=read_groups)
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "instaclone control API", "version": __version__,
                 "description": "HTTP+JSON on the daemon's Unix socket. Every error answer is "
                                "{\"error\": {\"code\", \"message\", ...}} with a stable code."},
        "paths": paths,
        "components": {"schemas": {**schemas, **_STATIC}},
    }


class DocumentCache:
    """The document of an app's routes, made again when the engine's config or the app's access is
    another object than the last time (a reload sets both), not on every request."""

    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = list(routes)
        self._made_for: tuple[object, object] | None = None
        self._document: dict[str, Any] = {}

    def get(self, config: Config, access: Access) -> dict[str, Any]:
        if self._made_for is None or self._made_for[0] is not config or self._made_for[1] is not access:
            self._document = document(self.routes, config, read_groups=not access.open_read)
            self._made_for = (config, access)
        return self._document


#: Set by make_app (before the app starts: a started app's state is not changed afterwards).
DOCUMENT = web.AppKey("openapi", DocumentCache)


def current_document(app: web.Application) -> dict[str, Any]:
    """The document of ``app`` for its engine's config and its access as they are now."""
    return app[DOCUMENT].get(app[ENGINE].config, app[ACCESS])


async def openapi(request: web.Request, _call: Call) -> web.Response:
    return web.json_response(current_document(request.app))


ROUTE = Route("GET", "/v1/openapi.json", openapi, "this document",
              ok={200: Reply("the OpenAPI 3.1 document", {"type": "object"})})
