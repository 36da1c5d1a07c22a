"""The control API (docs/guide/api.md): app and middleware (:mod:`.app`), access by peer
credentials (:mod:`.access`), route declarations (:mod:`.routes`) with their typed inputs
(:mod:`.models`) and answers (:mod:`.answers`), handlers by resource (:mod:`.jobs`,
:mod:`.sources`, :mod:`.pools`, :mod:`.webhooks`, :mod:`.gc`, :mod:`.guest`), the event stream (:mod:`.stream`),
the OpenAPI document built from the routes (:mod:`.openapi`), and what it needs of the engine
(:mod:`.protocol`)."""

from .access import ACCESS, Access
from .app import ROUTES, make_app
from .common import MAX_BODY_BYTES, MAX_WAIT_S, RUNNER_ARGS
from .openapi import document
from .protocol import EngineView
from .routes import Call, RawBody, Reply, Route

__all__ = ["ACCESS", "MAX_BODY_BYTES", "MAX_WAIT_S", "ROUTES", "RUNNER_ARGS", "Access", "Call", "EngineView",
           "RawBody", "Reply", "Route", "document", "make_app"]
