"""The OpenAPI document of the control API (``GET /v1/openapi.json``)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .. import __version__
from .common import MAX_WAIT_S
from .webhooks import DELIVERY_STATUSES

_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
_ERR = {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "instaclone control API", "version": __version__},
    "paths": {
        "/v1/health": {"get": {"responses": {"200": {
            "description": "daemon status; disk: bytes under instaclone's directories per source"}}}},
        "/v1/jobs": {
            "get": {"responses": {"200": {"description": "jobs, newest first"}}},
            "post": {
                "parameters": [{"name": "wait", "in": "query", "schema": {"type": "number", "minimum": 0,
                                                                           "maximum": MAX_WAIT_S}}],
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "additionalProperties": False, "required": ["source", "name"],
                    "properties": {
                        "source": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"},
                        "name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"},
                        "count": {"type": "integer", "minimum": 1},
                        "keep_network": {"type": "boolean"},
                        "customize": {"type": "boolean"},
                        "config": {"type": "object", "additionalProperties": {"type": "string"}},
                        "keep_ssh_host_keys": {"type": "boolean",
                                               "description": "keep the source's SSH host keys "
                                                              "(default: clone.keep_ssh_host_keys, false)"},
                        "script": {"type": "string", "minLength": 1, "maxLength": 65536,
                                   "description": "shell script run in each clone after its identity "
                                                  "reset (default: clone.customize_script)"},
                        "ttl_s": {"type": "number", "minimum": 1,
                                  "description": "the daemon destroys each clone this long after it is ready"},
                    }}}}},
                "responses": {"201": {"description": "job finished"}, "202": {"description": "job accepted"},
                              "400": _ERR, "404": _ERR, "409": _ERR},
            },
        },
        "/v1/jobs/{job_id}": {"get": {
            "parameters": [{"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "one job"}, "404": _ERR}}},
        "/v1/clones": {"get": {"responses": {"200": {"description": "clones made by instaclone"}}}},
        "/v1/frozen": {"get": {"responses": {"200": {"description": "frozen sources"}}}},
        "/v1/clones/{name}/release": {"post": {
            "description": "destroy a pool member (claimed or idle); its pool makes another",
            "parameters": [_NAME], "responses": {"200": {"description": "released"}, "404": _ERR, "409": _ERR}}},
        "/v1/pools": {
            "get": {"responses": {"200": {"description": "every pool with its idle, claimed and pending members"}}},
            "post": {
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "additionalProperties": False, "required": ["name", "source", "size"],
                    "properties": {
                        "name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"},
                        "source": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"},
                        "size": {"type": "integer", "minimum": 0, "maximum": 1000},
                        "config": {"type": "object", "additionalProperties": {"type": "string"}},
                        "customize": {"type": "boolean"},
                        "keep_network": {"type": "boolean"},
                        "freeze": {"type": "boolean", "description": "freeze the source first (if it is not)"},
                    }}}}},
                "responses": {"201": {"description": "pool created; it fills in the background"},
                              "400": _ERR, "404": _ERR, "409": _ERR}}},
        "/v1/pools/{name}": {
            "get": {"parameters": [_NAME], "responses": {"200": {"description": "one pool"}, "404": _ERR}},
            "patch": {
                "description": "size: resize; source: move the pool to a new source (image push: idle members "
                               "are replaced in the background, claimed ones stay until released)",
                "parameters": [_NAME],
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "additionalProperties": False, "minProperties": 1, "properties": {
                        "size": {"type": "integer", "minimum": 0, "maximum": 1000},
                        "source": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"}}}}}},
                "responses": {"200": {"description": "updated"}, "400": _ERR, "404": _ERR}},
            "delete": {"description": "destroy the idle members; claimed members stay as plain clones",
                       "parameters": [_NAME], "responses": {"200": {"description": "deleted"}, "404": _ERR}}},
        "/v1/pools/{name}/claim": {"post": {
            "description": "hand out an idle member at once; with none idle, wait (bounded by wait_s, default "
                           "pools.claim_wait_s) for the next one; the answer says how long it waited",
            "parameters": [_NAME],
            "requestBody": {"required": False, "content": {"application/json": {"schema": {
                "type": "object", "additionalProperties": False, "properties": {
                    "ttl_s": {"type": "number", "minimum": 1},
                    "config": {"type": "object", "additionalProperties": {"type": "string"},
                               "description": "written over the pool's config to /run/instaclone/config.json"},
                    "wait_s": {"type": "number", "minimum": 0, "maximum": 3600}}}}}},
            "responses": {"200": {"description": "claimed"}, "400": _ERR, "404": _ERR,
                          "503": {"description": "no member became ready in time (code pool_empty, retryable)",
                                  "content": {"application/json": {"schema": {
                                      "$ref": "#/components/schemas/Error"}}}}}}},
        "/v1/sources/{name}/freeze": {"post": {
            "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "frozen"}, "404": _ERR, "409": _ERR}}},
        "/v1/sources/{name}/unfreeze": {"post": {
            "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "unfrozen"}, "404": _ERR}}},
        "/v1/sources/{name}/check": {"get": {
            "description": "preflight: per capability, whether the domain has it and the exact change",
            "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "the report", "content": {"application/json": {"schema": {
                "type": "object", "properties": {"check": {"$ref": "#/components/schemas/Check"}}}}}},
                "400": _ERR, "404": _ERR}}},
        "/v1/sources/{name}/prepare": {"post": {
            "description": "write shared file-backed RAM, <acpi/>, a guest agent channel and <genid/> into "
                           "the persistent definition; a running domain gets them at its next boot",
            "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
            "requestBody": {"required": False, "content": {"application/json": {"schema": {
                "type": "object", "additionalProperties": False,
                "properties": {"dry_run": {"type": "boolean", "default": False}}}}}},
            "responses": {"200": {"description": "what was (or would be) changed", "content": {
                "application/json": {"schema": {"type": "object", "properties": {
                    "prepare": {"$ref": "#/components/schemas/Prepare"}}}}}},
                "400": _ERR, "403": _ERR, "404": _ERR}}},
        "/v1/events": {"get": {
            "description": "NDJSON event stream (application/x-ndjson), oldest first",
            "parameters": [
                {"name": "follow", "in": "query", "schema": {"type": "boolean"}},
                {"name": "job", "in": "query", "schema": {"type": "string"}},
                {"name": "type", "in": "query", "schema": {"type": "string"},
                 "description": "comma-separated event types or globs"},
                {"name": "since", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                {"name": "tail", "in": "query", "schema": {"type": "integer", "minimum": 0, "maximum": 10000}},
            ],
            "responses": {"200": {"description": "events", "content": {"application/x-ndjson": {}}},
                          "400": _ERR}}},
        "/v1/webhooks": {"get": {"responses": {"200": {"description": "endpoints and delivery counts"},
                                               "404": _ERR}}},
        "/v1/webhooks/{name}/enable": {"post": {
            "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "enabled"}, "404": _ERR}}},
        "/v1/webhooks/deliveries": {"get": {
            "parameters": [{"name": n, "in": "query", "schema": {"type": "string"}}
                           for n in ("status", "webhook", "job", "event")]
            + [{"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 10000}}],
            "responses": {"200": {"description": "deliveries, newest first"}, "400": _ERR, "404": _ERR}}},
        "/v1/webhooks/deliveries/replay": {"post": {
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "additionalProperties": False, "properties": {
                    "ids": {"type": "array", "items": {"type": "integer"}},
                    "status": {"type": "string", "enum": list(DELIVERY_STATUSES)},
                    "webhook": {"type": "string"}, "event_id": {"type": "string"}}}}}},
            "responses": {"200": {"description": "ids queued again"}, "400": _ERR, "404": _ERR}}},
        "/v1/clones/{name}": {"delete": {
            "description": "undefine the clone (its own clones keep running), then collect garbage",
            "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "destroyed"}, "404": _ERR, "409": _ERR}}},
        "/v1/gc": {"post": {
            "description": "delete every delta or memory image under instaclone's directories that no "
                           "domain's backing chain uses and no job in flight recorded; dry_run lists them",
            "requestBody": {"required": False, "content": {"application/json": {"schema": {
                "type": "object", "additionalProperties": False,
                "properties": {"dry_run": {"type": "boolean", "default": False}}}}}},
            "responses": {"200": {"description": "what was (or would be) deleted", "content": {
                "application/json": {"schema": {"type": "object", "properties": {
                    "gc": {"$ref": "#/components/schemas/Gc"}}}}}},
                "400": _ERR, "403": _ERR, "503": _ERR}}},
    },
    "components": {"schemas": {
        "Error": {"type": "object", "properties": {"error": {
            "type": "object", "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}, "step": {"type": "string"}}}}},
        "CheckItem": {"type": "object", "required": ["capability", "ok", "level", "detail", "fix"], "properties": {
            "capability": {"type": "string", "enum": ["state", "cow_memory", "mac_reset", "guest_customization",
                                                      "vm_generation_id", "firmware", "tpm", "disk",
                                                      "chain_depth", "host_state", "ram_filesystem",
                                                      "balloon"]},
            "ok": {"type": "boolean"},
            "level": {"type": "string", "enum": ["ok", "warn", "error"]},
            "detail": {"type": "string"},
            "fix": {"type": "string", "nullable": True, "description": "the exact XML to add or change"},
            "device": {"type": "string", "description": "disk target or device the item is about"},
            "pending": {"type": "boolean", "description": "in the persistent definition; applies at next boot"}}},
        "Check": {"type": "object", "required": ["source", "state", "cloneable", "checks"], "properties": {
            "source": {"type": "string"}, "state": {"type": "string"}, "frozen": {"type": "boolean"},
            "clone_of": {"type": "string", "nullable": True},
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
            "failed": {"type": "array", "items": {"type": "string"}}}},
        "Prepare": {"type": "object", "required": ["source", "changed", "not_changed", "diff"], "properties": {
            "source": {"type": "string"}, "state": {"type": "string"}, "dry_run": {"type": "boolean"},
            "applied": {"type": "boolean", "description": "the persistent definition was written"},
            "changed": {"type": "array", "items": {"type": "string"}},
            "not_changed": {"type": "array", "items": {"type": "string"},
                            "description": "what stands in the way and prepare does not change, and why"},
            "diff": {"type": "string", "description": "unified diff of the persistent definition"},
            "pending": {"type": "array", "items": {"type": "string"},
                        "description": "capabilities defined but not yet in the running domain"},
            "note": {"type": "string"}}},
    }},
}


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(OPENAPI)
