"""The API under bad input and without its token: a JSON 4xx for each, and the server stays up."""

from __future__ import annotations

import httpx
import pytest

from tests.test_serve import _guarded

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """`tgastream serve` with an api_token (from the environment, as a deployment would set it)."""
    yield from _guarded(tmp_path_factory.mktemp("api"), TOKEN)


def test_every_route_but_healthz_needs_the_token(guarded):
    base, _ = guarded
    assert httpx.get(base + "/healthz").status_code == 200
    for path in ("/v1/users/u1/embedding", "/v1/users/u1/recommendations", "/metrics"):
        r = httpx.get(base + path)
        assert r.status_code == 401 and "bearer token" in r.json()["error"], path
        assert httpx.get(base + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(base + path, headers=AUTH).status_code == 200, path


@pytest.mark.parametrize("method,path,body,status", [
    ("POST", "/v1/score", b'{"user_id": "u1", "items": ["a"], "pad": "' + b"x" * (2 << 20) + b'"}', 413),
    ("GET", "/v1/users/u1/recommendations?k=" + "9" * 5000, None, 400),
    ("GET", "/v1/users/u1/recommendations?k=-3", None, 400),
    ("GET", "/v1/users/%ff%fe/embedding", None, 404),  # not UTF-8: kept escaped, no user has that id
    ("GET", "/v1/users/" + "u" * 5000 + "/embedding", None, 400),
    ("POST", "/v1/score", b'{"user_id": "' + b"u" * 5000 + b'", "items": ["a"]}', 400),
    ("POST", "/v1/score", b'{"user_id": "u1", "items": [{"item_id": "' + b"i" * 5000 + b'"}]}', 400),
    ("POST", "/v1/score", b"\xff\xfe{", 400),
    ("DELETE", "/v1/users/u1/embedding", None, 405),
    ("PUT", "/v1/score", b"{}", 405),
    ("GET", "/v2/anything/at/all", None, 404),
])
def test_bad_input_gets_a_json_4xx_and_the_server_stays_up(guarded, method, path, body, status):
    base, proc = guarded
    r = httpx.request(method, base + path, content=body, headers=AUTH, timeout=30)
    assert r.status_code == status, r.text[:300]
    assert r.json()["error"]
    assert proc.poll() is None
    assert httpx.get(base + "/v1/users/u1/embedding", headers=AUTH).status_code == 200
