"""Every error takes the shape its router chose (app/errors.py): the service's envelope on /v1 and elsewhere,
the inference protocols' {"error": "..."} on /v2 and on KServe's /v1/models/{name}:predict, also when the
request is refused before any route has taken it (a body too large by its Content-Length, a 404, a 405)."""

from __future__ import annotations

import json

import pytest

from scripts.harness.samples import IRIS_ROW
from tests.app_client import app_client

LIMIT = 2048
TOO_LARGE = {"instances": [IRIS_ROW] * 100}  # well over LIMIT bytes


def _service(r) -> dict:
    body = r.json()
    assert isinstance(body["error"], dict), f"{r.request.method} {r.request.url.path}: not the service's shape: {body}"
    assert set(body["error"]) == {"code", "message", "request_id", "details"}
    assert body["error"]["request_id"] == r.headers["x-request-id"]
    return body["error"]


def _protocol(r) -> str:
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str), (
        f"{r.request.method} {r.request.url.path}: not the protocols' shape: {body}")
    return body["error"]


@pytest.fixture(scope="module")
def small_bodies(demo_models):
    with app_client(demo_models, max_body_bytes=LIMIT) as c:
        yield c


@pytest.mark.parametrize(("path", "protocol"), [
    ("/v1/predict/batch", False),
    ("/v1/models/iris/predict/batch", False),
    ("/v1/models/iris:predict", True),
    ("/v1/models/not-loaded:predict", True),
    ("/v2/models/iris/infer", True),
])
def test_a_body_refused_by_its_content_length_has_the_shape_of_the_route_it_was_sent_to(small_bodies, path, protocol):
    body = json.dumps(TOO_LARGE if not path.startswith("/v2") else {"inputs": [TOO_LARGE]}).encode()
    assert len(body) > LIMIT
    r = small_bodies.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 413
    message = _protocol(r) if protocol else _service(r)["message"]
    assert f"larger than {LIMIT} bytes" in message


@pytest.mark.parametrize(("method", "path", "status", "protocol"), [
    ("GET", "/v1/nowhere", 404, False),
    ("GET", "/nowhere", 404, False),
    ("GET", "/v2/nowhere", 404, True),
    ("GET", "/v2/models/iris/nowhere", 404, True),
    ("GET", "/v1/predict", 405, False),
    ("GET", "/v2/models/iris/infer", 405, True),
])
def test_an_unknown_path_or_method_has_the_shape_of_the_routes_there(client, method, path, status, protocol):
    """A 404 takes the shape every route under the path's first segment shares; a 405 its route's."""
    r = client.request(method, path)
    assert r.status_code == status
    message = _protocol(r) if protocol else _service(r)["message"]
    if status == 404:
        assert f"no route {method} {path}" in message


def test_a_routed_error_has_the_shape_of_its_route(client):
    assert _service(client.post("/v1/predict", json={"features": {}}))["code"] == "invalid_request"
    assert "instances" in _protocol(client.post("/v1/models/iris:predict", json={"instances": "x"}))
    assert "inputs" in _protocol(client.post("/v2/models/iris/infer", json={"inputs": "x"}))
    # The same unknown model, by each protocol's route.
    assert _service(client.get("/v1/models/not-loaded"))["code"] == "model_not_found"
    assert "not-loaded" in _protocol(client.get("/v2/models/not-loaded"))
