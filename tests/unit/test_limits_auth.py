"""Rate limits and API keys, in one process (the cross-worker case is in tests/integration)."""

from __future__ import annotations

import hashlib
import json

import pytest

from scripts.harness.metrics import metric
from scripts.harness.samples import IRIS_ROW
from tests.app_client import TestClient

KEY = "s3cret-key-for-tests"
KEY_HASH = hashlib.sha256(KEY.encode()).hexdigest()


@pytest.mark.parametrize(
    "path,body",
    [
        ("/v1/predict", {"features": IRIS_ROW}),
        (
            "/v2/models/iris/infer",
            {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64", "data": [5.1, 3.5, 1.4, 0.2]}]},
        ),
    ],
)
def test_limit_admits_exactly_n_then_429_with_retry_after(make_client, demo_models, path, body):
    with make_client(demo_models, rate_limit_predict="5/minute") as c:
        statuses = [c.post(path, json=body).status_code for _ in range(8)]
        last = c.post(path, json=body)
    assert statuses == [200] * 5 + [429] * 3
    assert int(last.headers["retry-after"]) >= 1
    if path.startswith("/v1"):
        assert last.json()["error"]["code"] == "rate_limited"
    else:
        assert "rate limit" in last.json()["error"]


def test_prediction_routes_share_one_budget(make_client, demo_models):
    with make_client(demo_models, rate_limit_predict="4/minute") as c:
        a = [c.post("/v1/predict", json={"features": IRIS_ROW}).status_code for _ in range(2)]
        b = [c.post("/v1/models/iris/predict/batch", json={"instances": [IRIS_ROW]}).status_code for _ in range(3)]
    assert a + b == [200, 200, 200, 200, 429]


def test_health_and_metrics_are_never_limited(make_client, demo_models):
    with make_client(demo_models, rate_limit_predict="1/minute", rate_limit_default="1/minute") as c:
        for path in ("/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"):
            assert {c.get(path).status_code for _ in range(5)} == {200}, path


def test_rejections_are_counted(make_client, demo_models):
    with make_client(demo_models, rate_limit_predict="1/minute") as c:
        before = metric(c.get("/metrics").text, "mlapi_rate_limited_total", route="/v1/predict")
        for _ in range(3):
            c.post("/v1/predict", json={"features": IRIS_ROW})
        after = metric(c.get("/metrics").text, "mlapi_rate_limited_total", route="/v1/predict")
    assert after - before == 2


def test_missing_api_key_is_401(make_client, demo_models):
    with make_client(demo_models, api_key_hashes=[KEY_HASH]) as c:
        r = c.post("/v1/predict", json={"features": IRIS_ROW})
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "unauthorized"


def test_wrong_api_key_is_403(make_client, demo_models):
    with make_client(demo_models, api_key_hashes=[KEY_HASH]) as c:
        r = c.post("/v1/predict", json={"features": IRIS_ROW}, headers={"X-API-Key": "nope"})
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "forbidden"


def test_right_api_key_is_accepted_and_never_logged(make_client, demo_models, capsys):
    with make_client(demo_models, api_key_hashes=[KEY_HASH]) as c:
        assert c.post("/v1/predict", json={"features": IRIS_ROW}, headers={"X-API-Key": KEY}).status_code == 200
        assert c.get("/v1/models", headers={"X-API-Key": KEY}).status_code == 200
        assert c.get("/healthz").status_code == 200
    out = capsys.readouterr()
    assert KEY not in out.out + out.err
    assert any(json.loads(ln).get("path") == "/v1/predict" for ln in out.out.splitlines() if ln.startswith("{"))


FAILURES = 3


def _wrong_keys_until_blocked(c) -> list[int]:
    """FAILURES wrong keys from one client, then one more request."""
    return [
        c.post("/v1/predict", json={"features": IRIS_ROW}, headers={"X-API-Key": "guess"}).status_code
        for _ in range(FAILURES + 1)
    ]


@pytest.mark.parametrize("limits_on", [True, False], ids=["limits-on", "limits-off"])
def test_wrong_keys_over_the_failure_limit_get_429_with_retry_after(make_client, demo_models, limits_on):
    with make_client(
        demo_models, api_key_hashes=[KEY_HASH], api_key_failure_limit=f"{FAILURES}/minute", rate_limit_enabled=limits_on
    ) as c:
        statuses = _wrong_keys_until_blocked(c)
        refused = c.post("/v1/predict", json={"features": IRIS_ROW}, headers={"X-API-Key": "guess"})
    assert statuses == [403] * FAILURES + [429]
    assert refused.json()["error"]["code"] == "rate_limited"
    assert "MLAPI_API_KEY_FAILURE_LIMIT" in refused.json()["error"]["message"]
    assert int(refused.headers["retry-after"]) >= 1


@pytest.mark.parametrize(
    "path,body",
    [
        ("/v1/predict", {"features": IRIS_ROW}),
        ("/v1/predict", {"features": {"sepal_length": "x"}}),
        ("/v2/models/iris/infer", {"inputs": []}),
    ],
    ids=["v1", "v1-invalid-body", "v2-invalid-body"],
)
def test_a_right_key_is_refused_too_while_its_client_is_blocked(make_client, demo_models, path, body):
    """Answering a right key during the block would tell a guess from a miss."""
    with make_client(demo_models, api_key_hashes=[KEY_HASH], api_key_failure_limit=f"{FAILURES}/minute") as c:
        _wrong_keys_until_blocked(c)
        r = c.post(path, json=body, headers={"X-API-Key": KEY})
    assert r.status_code == 429


def test_a_blocked_client_does_not_block_another_address(make_client, demo_models):
    with make_client(demo_models, api_key_hashes=[KEY_HASH], api_key_failure_limit=f"{FAILURES}/minute") as c:
        _wrong_keys_until_blocked(c)
        other = TestClient(c.app, client=("192.0.2.7", 40000))
        r = other.post("/v1/predict", json={"features": IRIS_ROW}, headers={"X-API-Key": KEY})
    assert r.status_code == 200


def test_failed_key_refusals_are_counted_in_the_rate_limit_metric(make_client, demo_models):
    with make_client(demo_models, api_key_hashes=[KEY_HASH], api_key_failure_limit=f"{FAILURES}/minute") as c:
        before = metric(c.get("/metrics").text, "mlapi_rate_limited_total", route="/v1/predict")
        _wrong_keys_until_blocked(c)
        c.post("/v1/predict", json={"features": IRIS_ROW}, headers={"X-API-Key": "guess"})
        after = metric(c.get("/metrics").text, "mlapi_rate_limited_total", route="/v1/predict")
    assert after - before == 2


def test_limits_are_per_api_key(make_client, demo_models):
    other = "another-key"
    hashes = [KEY_HASH, hashlib.sha256(other.encode()).hexdigest()]
    with make_client(demo_models, api_key_hashes=hashes, rate_limit_predict="2/minute") as c:
        first = [
            c.post("/v1/predict", json={"features": IRIS_ROW}, headers={"X-API-Key": KEY}).status_code for _ in range(3)
        ]
        second = [
            c.post("/v1/predict", json={"features": IRIS_ROW}, headers={"X-API-Key": other}).status_code
            for _ in range(2)
        ]
    assert first == [200, 200, 429]
    assert second == [200, 200]


def test_cors_is_off_by_default_and_on_when_configured(make_client, demo_models):
    headers = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    with make_client(demo_models) as c:
        assert "access-control-allow-origin" not in c.options("/v1/predict", headers=headers).headers
    with make_client(demo_models, cors_origins=["https://app.example"]) as c:
        r = c.options("/v1/predict", headers=headers)
        assert r.headers["access-control-allow-origin"] == "https://app.example"


def test_trusted_hosts_refuse_other_host_headers(make_client, demo_models):
    with make_client(demo_models, trusted_hosts=["api.example"]) as c:
        assert c.get("/healthz", headers={"Host": "api.example"}).status_code == 200
        assert c.get("/healthz", headers={"Host": "evil.example"}).status_code == 400
