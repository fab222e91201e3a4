"""The OpenAPI document (stream/openapi.py) lists exactly the routes the API serves, and
`tgastream serve` answers it at GET /openapi.json."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tgastream.state.serving import ServingStore
from tgastream.stream.openapi import spec
from tgastream.stream.serve import build_app
from tests.test_serve import _guarded

TOKEN = "docs-token"
METHODS = {"get", "post", "put", "patch", "delete"}  # aiohttp adds HEAD beside every GET itself


def _served_routes(tmp_path: Path) -> set[tuple[str, str]]:
    store = ServingStore(tmp_path / "serving")
    try:
        app = build_app(store)
        return {(route.resource.canonical, route.method.lower()) for route in app.router.routes()
                if route.method.lower() in METHODS}
    finally:
        store.close()


def _documented_routes(document: dict) -> set[tuple[str, str]]:
    return {(path, method) for path, ops in document["paths"].items() for method in ops}


def test_every_route_the_app_serves_is_documented_and_nothing_else(tmp_path):
    served = _served_routes(tmp_path)
    documented = _documented_routes(spec())
    assert served, "the app serves no route?"
    assert served - documented == set(), "routes missing from stream/openapi.py (then run `make docs-ref`)"
    assert documented - served == set(), "stream/openapi.py documents routes the app does not serve"


def test_every_reference_in_the_document_resolves():
    document = spec()
    text = json.dumps(document)
    refs = {part.split('"')[0] for part in text.split('"$ref": "')[1:]}
    assert refs, "no schema references: the document lost its schemas?"
    for ref in refs:
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in document["components"]["schemas"], ref
    for path, ops in document["paths"].items():
        for method, op in ops.items():
            assert op["summary"] and op["responses"], (method, path)
            for name in (p["name"] for p in op.get("parameters", []) if p["in"] == "path"):
                assert "{" + name + "}" in path, (path, name)


def test_documented_limits_are_the_ones_the_api_enforces():
    from tgastream.stream import serve

    k = spec()["paths"]["/v1/users/{user_id}/recommendations"]["get"]["parameters"][1]["schema"]
    assert k["maximum"] == serve.MAX_K
    items = spec()["components"]["schemas"]["ScoreRequest"]["properties"]["items"]
    assert items["maxItems"] == serve.MAX_CANDIDATES


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """`tgastream serve` with an api_token."""
    yield from _guarded(tmp_path_factory.mktemp("openapi"), TOKEN)


def test_serve_answers_the_document_at_openapi_json_behind_the_token(api):
    base, _ = api
    assert httpx.get(base + "/openapi.json", timeout=10).status_code == 401  # like every route but /healthz
    r = httpx.get(base + "/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    served = r.json()
    assert served["openapi"].startswith("3.1") and served["paths"] == spec()["paths"]
    assert served["info"]["version"]  # the installed package's version


def test_the_sites_copy_of_the_document_is_current():
    committed = json.loads((Path(__file__).parent.parent / "docs/api/openapi.json").read_text())
    assert committed["paths"] == spec()["paths"], "docs/api/openapi.json is stale: run `make docs-ref`"
    assert committed["components"] == spec()["components"], "docs/api/openapi.json is stale: run `make docs-ref`"
