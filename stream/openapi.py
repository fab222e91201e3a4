"""The OpenAPI 3.1 document of the HTTP API (stream/serve.py), served at ``GET /openapi.json``.

Written by hand beside the routes it describes, as plain data (no framework generates it): each
route of :func:`tgastream.stream.serve.build_app` is one entry of :data:`ROUTES`, and
``tests/test_openapi.py`` fails when the app has a route this document lacks, or the document a
route the app does not serve. The docs site renders it (``docs/api/reference.md``, written by
``python -m tgastream.stream.docgen``).
"""

from __future__ import annotations

from typing import Any

from tgastream.core.events import MAX_ID_CHARS

# the API's limits, part of its contract (stream/serve.py enforces them)
MAX_K = 1000  # most recommendations per request
MAX_CANDIDATES = 1000  # most items scored per request
MAX_BODY_BYTES = 1024 * 1024  # larger request bodies: 413

_ERROR = {"$ref": "#/components/schemas/Error"}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ERROR}}}


def _json(description: str, schema: dict[str, Any], example: Any = None) -> dict[str, Any]:
    media: dict[str, Any] = {"schema": schema}
    if example is not None:
        media["example"] = example
    return {"description": description, "content": {"application/json": media}}


_USER_ID = {
    "name": "user_id", "in": "path", "required": True,
    "description": f"the user's id as events carry it (at most {MAX_ID_CHARS} characters)",
    "schema": {"type": "string", "maxLength": MAX_ID_CHARS},
}
_AUTH_ERRORS = {"401": _error("`api_token` is set and the request has no or a wrong `Authorization: Bearer` header")}
_ID = {"oneOf": [{"type": "string"}, {"type": "integer"}]}

ROUTES: dict[str, dict[str, dict[str, Any]]] = {
    "/healthz": {"get": {
        "summary": "Liveness and what is served",
        "description": "Always answered without the token (liveness probes carry none). `serving_version` "
                       "appears only while the trainer publishes from a rolled-back or pinned version; "
                       "`source` only on a replica that follows the embeddings topic.",
        "operationId": "healthz",
        "security": [],
        "responses": {"200": _json("the server is up", {"$ref": "#/components/schemas/Health"},
                                   {"status": "ok", "model_version": 118, "model_state": "live", "scorer": True})},
    }},
    "/v1/users/{user_id}/embedding": {"get": {
        "summary": "A user's newest published vector",
        "operationId": "userEmbedding",
        "parameters": [_USER_ID],
        "responses": {
            "200": _json("the vector", {"$ref": "#/components/schemas/Embedding"},
                         {"user_id": "42", "model_version": 118, "model_state": "live", "event_ts": 1511544070.0,
                          "publish_ts": 1764830000.5, "vector": [0.012, -0.3, 0.25]}),
            "400": _error("user id too long"), **_AUTH_ERRORS, "404": _error("unknown user"),
        },
    }},
    "/v1/users/{user_id}/recommendations": {"get": {
        "summary": "Top-k items for a user",
        "description": "Items ranked by the dot product of the user's vector with the item vectors, "
                       "excluding items the user bought (and, with `category`, items of other categories): "
                       "an exact scan below `ann_exact_below` items, an approximate index (faiss IVF) above.",
        "operationId": "userRecommendations",
        "parameters": [_USER_ID, {"name": "k", "in": "query", "required": False, "description": "how many items",
                                  "schema": {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": 10}},
                       {"name": "category", "in": "query", "required": False,
                        "description": "only items of this category id", "schema": {"type": "string"}}],
        "responses": {
            "200": _json("the items, best first", {"$ref": "#/components/schemas/Recommendations"},
                         {"user_id": "42", "k": 2, "model_version": 118,
                          "items": [{"item_id": "7", "score": 3.21}, {"item_id": "9", "score": 2.8}]}),
            "400": _error("`k` not an integer in [1, 1000], or user id too long"), **_AUTH_ERRORS,
            "404": _error("unknown user"),
            "503": _error("item vectors and the user vector differ in size while the model changes; retry"),
        },
    }},
    "/v1/score": {"post": {
        "summary": "Conversion probability of candidate items",
        "description": "P(buy) of each candidate for the user, from the newest checkpoint in `checkpoint_dir` "
                       "and the user's latest context graph (an unknown user is scored without one). "
                       f"At most {MAX_CANDIDATES} items; a body over {MAX_BODY_BYTES} bytes is refused with 413.",
        "operationId": "score",
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/ScoreRequest"},
            "example": {"user_id": "42", "items": ["7", {"item_id": "9", "category_id": "3"}]}}}},
        "responses": {
            "200": _json("one probability per candidate, in request order", {"$ref": "#/components/schemas/Scores"},
                         {"user_id": "42", "known_user": True,
                          "scores": [{"item_id": "7", "probability": 0.031}, {"item_id": "9", "probability": 0.004}]}),
            "400": _error("body not JSON or not of the schema"), **_AUTH_ERRORS,
            "413": _error("body over 1 MiB"), "503": _error("no model checkpoint is loaded yet"),
        },
    }},
    "/metrics": {"get": {
        "summary": "Prometheus metrics of this API process",
        "operationId": "metrics",
        "responses": {"200": {"description": "Prometheus text exposition format",
                              "content": {"text/plain": {"schema": {"type": "string"}}}}, **_AUTH_ERRORS},
    }},
    "/openapi.json": {"get": {
        "summary": "This document",
        "operationId": "openapi",
        "responses": {"200": {"description": "the OpenAPI 3.1 document of this API",
                              "content": {"application/json": {"schema": {"type": "object"}}}}, **_AUTH_ERRORS},
    }},
    "/ui": {"get": {
        "summary": "The live page (HTML; docs/ui.md)",
        "description": "Answered without the token: the page holds no data; it reads `/ui/stream` with the token.",
        "operationId": "uiPage",
        "security": [],
        "responses": {"200": {"description": "the page", "content": {"text/html": {"schema": {"type": "string"}}}}},
    }},
    "/ui/{file}": {"get": {
        "summary": "The live page's script and style files",
        "description": "`app.js`, `chart.js`, `ui.css`; any other name is 404. Answered without the token.",
        "operationId": "uiFile",
        "security": [],
        "parameters": [{"name": "file", "in": "path", "required": True, "schema": {"type": "string"}}],
        "responses": {"200": {"description": "the file", "content": {"text/javascript": {"schema": {"type": "string"}},
                                                                     "text/css": {"schema": {"type": "string"}}}},
                      "404": _json("no such page file", {"$ref": "#/components/schemas/Error"})},
    }},
    "/ui/stream": {"get": {
        "summary": "The live page's data: server-sent events",
        "description": "`hello` (the series so far, rollback markers, status), then `rows` (new rows of the "
                       "worker's and trainer's metrics, once a second), `status` (sources up or down, stream "
                       "live or ended, guard state, active users) and, with `?user=`, `user` (that user's recent "
                       "events, vector's model version and top-10) whenever one of them changes. Read-only.",
        "operationId": "uiStream",
        "parameters": [{"name": "user", "in": "query", "required": False, "schema": {"type": "string"},
                        "description": "the user of the user panel"}],
        "responses": {"200": {"description": "an event stream (until the client or the server closes it)",
                              "content": {"text/event-stream": {"schema": {"type": "string"}}}}, **_AUTH_ERRORS},
    }},
}
"""Path (aiohttp's canonical form) → method → OpenAPI operation: every route ``build_app`` adds."""

_VERSIONED = {"model_version": {"type": "integer", "description": "the model version that made the vector"}}
SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": {"type": "object", "required": ["error"], "description": "every 4xx/5xx answer, unknown routes (404) "
              "and methods (405) included", "properties": {"error": {"type": "string"}}},
    "Health": {"type": "object", "required": ["status", "model_version", "model_state", "scorer"], "properties": {
        "status": {"type": "string", "const": "ok"},
        "model_version": {"type": ["integer", "null"], "description": "newest model version in the serving store"},
        "model_state": {"type": "string", "enum": ["live", "pinned", "rolled_back"]},
        "serving_version": {"type": ["integer", "null"], "description": "the good or pinned version published now"},
        "scorer": {"type": "boolean", "description": "a checkpoint is loaded for /v1/score"},
        "source": {"type": "object", "description": "a replica's progress on the embeddings topic", "properties": {
            "topic": {"type": "string"}, "records": {"type": "integer"}, "bad_records": {"type": "integer"},
            "caught_up": {"type": "boolean"}, "error": {"type": ["string", "null"]}}},
    }},
    "Embedding": {"type": "object", "required": ["user_id", "model_version", "model_state", "event_ts", "publish_ts", "vector"],
                  "properties": {"user_id": {"type": "string"}, **_VERSIONED,
                                 "model_state": {"type": "string", "enum": ["live", "pinned", "rolled_back"]},
                                 "event_ts": {"type": "number", "description": "event time of the newest event in the vector"},
                                 "publish_ts": {"type": "number", "description": "wall-clock time it was published"},
                                 "vector": {"type": "array", "items": {"type": "number"}}}},
    "Recommendations": {"type": "object", "required": ["user_id", "k", "model_version", "items"], "properties": {
        "user_id": {"type": "string"}, "k": {"type": "integer"}, **_VERSIONED,
        "items": {"type": "array", "items": {"type": "object", "properties": {
            "item_id": {"type": "string"}, "score": {"type": "number"}}}}}},
    "ScoreRequest": {"type": "object", "required": ["user_id", "items"], "properties": {
        "user_id": {**_ID, "maxLength": MAX_ID_CHARS},
        "items": {"type": "array", "minItems": 1, "maxItems": MAX_CANDIDATES, "items": {"oneOf": [
            _ID, {"type": "object", "required": ["item_id"], "properties": {
                "item_id": _ID, "category_id": {**_ID, "description": "default \"0\" (unknown)"}}}]}}}},
    "Scores": {"type": "object", "required": ["user_id", "known_user", "scores"], "properties": {
        "user_id": {"type": "string"}, "known_user": {"type": "boolean", "description": "a context graph was found"},
        "scores": {"type": "array", "items": {"type": "object", "properties": {
            "item_id": {"type": "string"}, "probability": {"type": "number"}}}}}},
}


def spec(version: str | None = None) -> dict[str, Any]:
    """The whole OpenAPI document (a fresh dict each call); ``version``: the package's by default."""
    import copy
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    if version is None:
        try:
            version = package_version("tgastream")
        except PackageNotFoundError:  # run from a checkout that was never installed
            version = "0.0.0"

    return {
        "openapi": "3.1.0",
        "info": {"title": "tgastream HTTP API", "version": version,
                 "description": "Embeddings, recommendations and conversion scores of the online-trained TGA model, "
                                "served by `tgastream serve`. Errors are JSON `{\"error\": ...}`."},
        "paths": copy.deepcopy(ROUTES),
        "components": {"schemas": copy.deepcopy(SCHEMAS),
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                      "description": "only when `api_token` is set"}}},
        "security": [{"bearer": []}, {}],
    }
