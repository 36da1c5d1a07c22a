"""The control API (docs/architecture.md): app and middleware (:mod:`.app`), access by peer
credentials (:mod:`.access`), handlers by resource (:mod:`.jobs`, :mod:`.sources`,
:mod:`.webhooks`), the event stream (:mod:`.stream`), the OpenAPI document (:mod:`.openapi`),
and what it needs of the engine (:mod:`.protocol`)."""

from .access import ACCESS, Access
from .app import make_app
from .common import MAX_BODY_BYTES, MAX_WAIT_S
from .openapi import OPENAPI
from .protocol import EngineView

__all__ = ["ACCESS", "MAX_BODY_BYTES", "MAX_WAIT_S", "OPENAPI", "Access", "EngineView", "make_app"]
