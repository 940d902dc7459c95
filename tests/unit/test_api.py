"""Every endpoint and every error case, through the real app in-process."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from scripts.harness.samples import IRIS_ROW
from tests.app_client import TestClient

PREDICT = "/v1/predict"


def assert_error_shape(body: dict, code: str) -> dict:
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"code", "message", "request_id", "details"}
    assert err["code"] == code
    assert err["message"]
    assert err["request_id"]
    return err


def test_predict_by_name_returns_label_probabilities_and_request_id(client):
    r = client.post(PREDICT, json={"features": IRIS_ROW})
    assert r.status_code == 200
    body = r.json()
    assert body["model"] == "iris"
    assert body["version"] == "1"
    assert body["prediction"] == "setosa"
    assert set(body["probabilities"]) == {"setosa", "versicolor", "virginica"}
    assert body["probabilities"]["setosa"] == max(body["probabilities"].values())
    assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert body["request_id"] == r.headers["x-request-id"]


def test_predict_accepts_an_ordered_list(client):
    by_name = client.post(PREDICT, json={"features": IRIS_ROW}).json()
    by_list = client.post(PREDICT, json={"features": list(IRIS_ROW.values())}).json()
    assert by_list["prediction"] == by_name["prediction"]
    assert by_list["probabilities"] == by_name["probabilities"]


def test_a_client_request_id_is_kept_beside_the_service_id(client):
    r = client.post(PREDICT, json={"features": IRIS_ROW}, headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-client-request-id"] == "abc-123"
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])
    assert r.json()["request_id"] == r.headers["x-request-id"]


def test_two_clients_sending_the_same_request_id_get_distinct_ids_in_the_log(make_client, demo_models, capsys):
    with make_client(demo_models) as c:  # its log handlers write to this test's captured output
        ids = {c.post(PREDICT, json={"features": IRIS_ROW}, headers={"X-Request-ID": "same-id"}).json()["request_id"]
               for _ in range(2)}
    logged = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"same-id"' in line]
    assert len(ids) == 2
    assert {(e["request_id"], e["client_request_id"]) for e in logged} == {(i, "same-id") for i in ids}


@pytest.mark.parametrize(
    ("headers", "request_id", "client_request_id"),
    [
        ({"X-Request-ID": "edge-1", "X-Client-Request-ID": "theirs-1"}, "edge-1", "theirs-1"),
        ({"X-Request-ID": "edge-2"}, "edge-2", None),
    ],
    ids=["with-the-client-id", "without"],
)
def test_a_trusted_proxy_sends_the_request_id_and_the_client_id(client, headers, request_id, client_request_id):
    proxied = TestClient(client.app, client=("127.0.0.1", 40000))  # in MLAPI_TRUSTED_PROXIES by default
    r = proxied.post(PREDICT, json={"features": IRIS_ROW}, headers=headers)
    assert (r.headers["x-request-id"], r.json()["request_id"]) == (request_id, request_id)
    assert r.headers.get("x-client-request-id") == client_request_id


def test_an_untrusted_client_cannot_set_the_client_id_header(client):
    r = client.post(PREDICT, json={"features": IRIS_ROW}, headers={"X-Client-Request-ID": "forged"})
    assert "x-client-request-id" not in r.headers


def test_invalid_incoming_request_id_is_dropped(client):
    r = client.post(PREDICT, json={"features": IRIS_ROW}, headers={"X-Request-ID": "bad id with spaces"})
    assert "x-client-request-id" not in r.headers
    assert len(r.headers["x-request-id"]) == 32


def test_regressor_returns_a_value_and_no_probabilities(client):
    row = [0.01, -0.04, 0.06, 0.02, -0.04, -0.03, -0.04, -0.0, 0.02, -0.02]
    r = client.post("/v1/models/diabetes/predict", json={"features": row})
    assert r.status_code == 200
    body = r.json()
    assert body["model"] == "diabetes"
    assert isinstance(body["prediction"], float)
    assert body["probabilities"] is None


def test_batch_scores_every_instance_in_order(client):
    rows = [IRIS_ROW, [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5]]
    r = client.post("/v1/predict/batch", json={"instances": rows})
    assert r.status_code == 200
    body = r.json()
    singles = [client.post(PREDICT, json={"features": row}).json()["prediction"] for row in rows]
    assert body["predictions"] == singles
    assert len(body["probabilities"]) == 3


@pytest.mark.parametrize(
    ("features", "loc", "words"),
    [
        (
            {k: v for k, v in IRIS_ROW.items() if k != "petal_width"},
            ["body", "features", "petal_width"],
            "feature is missing",
        ),
        ({**IRIS_ROW, "colour": 1.0}, ["body", "features", "colour"], "is not a feature of this model"),
        (
            {**IRIS_ROW, "sepal_width": "wide"},
            ["body", "features", "sepal_width"],
            "must be a number, got the string 'wide'",
        ),
        ({**IRIS_ROW, "sepal_width": True}, ["body", "features", "sepal_width"], "must be a number, got bool"),
        ({**IRIS_ROW, "sepal_width": None}, ["body", "features", "sepal_width"], "must be a number, got NoneType"),
        ({**IRIS_ROW, "sepal_width": 1e12}, ["body", "features", "sepal_width"], "is beyond the accepted magnitude"),
        ({**IRIS_ROW, "sepal_width": -1e12}, ["body", "features", "sepal_width"], "is beyond the accepted magnitude"),
        ([5.1, 3.5, 1.4], ["body", "features"], "expected 4 values"),
    ],
    ids=["missing", "extra", "string", "bool", "null", "huge", "huge-negative", "wrong-count"],
)
def test_invalid_features_get_422_naming_the_field(client, features, loc, words):
    r = client.post(PREDICT, json={"features": features})
    assert r.status_code == 422
    err = assert_error_shape(r.json(), "invalid_request")
    matching = [d for d in err["details"] if d["loc"] == loc]
    assert matching, err["details"]
    assert words in matching[0]["msg"]


def test_misspelled_feature_suggests_the_right_name(client):
    row = {**IRIS_ROW}
    row["sepl_length"] = row.pop("sepal_length")
    err = client.post(PREDICT, json={"features": row}).json()["error"]
    extra = [d for d in err["details"] if d["loc"][-1] == "sepl_length"]
    assert "did you mean 'sepal_length'" in extra[0]["msg"]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_refused(client, literal):
    body = f'{{"features": {{"sepal_length": {literal}, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}}}}'
    r = client.post(PREDICT, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422
    err = assert_error_shape(r.json(), "invalid_request")
    assert err["details"][0]["loc"] == ["body", "features", "sepal_length"]
    assert "finite" in err["details"][0]["msg"]


def test_malformed_json_is_400_not_500(client):
    r = client.post(PREDICT, content=b'{"features": {', headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert_error_shape(r.json(), "malformed_json")


def test_missing_body_is_422(client):
    r = client.post(PREDICT)
    assert r.status_code == 422
    assert_error_shape(r.json(), "invalid_request")


def test_batch_over_the_limit_is_413(make_client, demo_models):
    with make_client(demo_models, max_batch_size=5) as c:
        r = c.post("/v1/predict/batch", json={"instances": [IRIS_ROW] * 6})
    assert r.status_code == 413
    err = assert_error_shape(r.json(), "payload_too_large")
    assert "5" in err["message"]


def test_body_over_the_size_limit_is_413(make_client, demo_models):
    with make_client(demo_models, max_body_bytes=2048) as c:
        r = c.post("/v1/predict/batch", json={"instances": [IRIS_ROW] * 100})
    assert r.status_code == 413
    assert_error_shape(r.json(), "payload_too_large")


def test_chunked_body_over_the_size_limit_is_413(make_client, demo_models):
    payload = json.dumps({"instances": [IRIS_ROW] * 100}).encode()

    def chunks():
        for i in range(0, len(payload), 512):
            yield payload[i : i + 512]

    with make_client(demo_models, max_body_bytes=2048) as c:
        r = c.post("/v1/predict/batch", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert_error_shape(r.json(), "payload_too_large")


def test_unknown_model_is_404(client):
    r = client.get("/v1/models/nope")
    assert r.status_code == 404
    assert_error_shape(r.json(), "model_not_found")


def test_unknown_version_is_404(client):
    r = client.post("/v1/models/iris/versions/9/predict", json={"features": IRIS_ROW})
    assert r.status_code == 404
    assert "no loaded version '9'" in r.json()["error"]["message"]


def test_unknown_route_is_404_in_the_error_shape(client):
    r = client.get("/v1/nothing-here")
    assert r.status_code == 404
    assert_error_shape(r.json(), "not_found")


def test_wrong_method_is_405_in_the_error_shape(client):
    r = client.get(PREDICT)
    assert r.status_code == 405
    assert_error_shape(r.json(), "method_not_allowed")


def test_models_lists_manifest_data_engine_and_drift(client):
    body = client.get("/v1/models").json()
    assert body["default_model"] == "iris"
    names = {m["name"] for m in body["models"]}
    assert {"iris", "iris-logreg", "diabetes"} <= names
    iris = client.get("/v1/models/iris").json()
    v1 = iris["versions"][0]
    assert [f["name"] for f in v1["features"]] == list(IRIS_ROW)
    assert v1["classes"] == ["setosa", "versicolor", "virginica"]
    assert v1["engine"] in {"onnx", "sklearn"}
    assert "validation_accuracy" in v1["metrics"]
    assert v1["drift"]["method"] == "psi"
    # The row the deploy gates send, with the answer recorded when the package was built.
    assert list(v1["smoke"]["features"]) == list(IRIS_ROW) and v1["smoke"]["prediction"] in v1["classes"]


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert "iris" in ready.json()["models"]


def test_not_ready_without_models(make_client, tmp_path):
    with make_client(tmp_path) as c:
        r = c.get("/readyz")
        assert r.status_code == 503
        err = assert_error_shape(r.json(), "not_ready")
        assert "no model packages" in err["message"]
        assert c.get("/healthz").status_code == 200


def test_ready_while_the_rate_limit_store_is_down(make_client, demo_models):
    from scripts.harness.servers import free_port

    with make_client(demo_models, rate_limit_storage_uri=f"redis://127.0.0.1:{free_port()}/0") as c:
        ready = c.get("/readyz")
        store = c.get("/healthz/store")
        prediction = c.post(PREDICT, json={"features": IRIS_ROW})
    assert ready.status_code == 200
    assert store.status_code == 503
    assert "rate-limit store does not answer" in assert_error_shape(store.json(), "not_ready")["message"]
    assert prediction.status_code == 200


STORE_PASSWORD = "Sup3rS3cret-store-password"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/readyz"),
        ("GET", "/healthz/store"),
        ("GET", "/v2/health/ready"),
        ("GET", "/metrics"),
        ("GET", "/v1/models"),
        ("POST", PREDICT),
    ],
)
def test_the_store_password_is_in_no_answer(make_client, demo_models, capsys, method, path):
    from scripts.harness.servers import free_port

    uri = f"redis://:{STORE_PASSWORD}@127.0.0.1:{free_port()}/0"
    with make_client(demo_models, rate_limit_storage_uri=uri) as c:
        c.post(PREDICT, json={"features": IRIS_ROW})  # the first store call fails and is logged
        r = c.request(method, path, json={"features": IRIS_ROW} if method == "POST" else None)
    assert r.status_code in (200, 503)
    assert STORE_PASSWORD not in r.text
    assert STORE_PASSWORD not in str(r.headers)
    captured = capsys.readouterr()
    assert "rate-limit store does not answer" in captured.out + captured.err
    assert STORE_PASSWORD not in captured.out + captured.err


def test_openapi_shows_the_real_feature_names_and_types(client):
    schema = client.get("/openapi.json").json()
    features = schema["components"]["schemas"]["IrisFeatures"]
    assert list(features["properties"]) == list(IRIS_ROW)
    assert all(p["type"] == "number" for p in features["properties"].values())
    assert set(features["required"]) == set(IRIS_ROW)
    assert "/v1/models/iris/predict" in schema["paths"]
    assert "/v2/models/{name}/infer" in schema["paths"]


def test_docs_page_is_served(client):
    r = client.get("/docs")
    assert r.status_code == 200
    assert "swagger" in r.text.lower()


def test_metrics_expose_request_and_prediction_counts(client):
    client.post(PREDICT, json={"features": IRIS_ROW})
    text = client.get("/metrics").text
    assert 'mlapi_predictions_total{label="setosa",model="iris",version="1"}' in text
    assert 'mlapi_http_requests_total{method="POST",model="iris",route="/v1/predict",status="200",version="1"}' in text


def test_unhandled_errors_are_500_without_a_traceback(make_client, demo_models, monkeypatch, capsys):
    from app.packages.gate import ModelVersion

    def broken(self, X):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(ModelVersion, "infer", broken)
    with make_client(demo_models) as c:
        r = c.post(PREDICT, json={"features": IRIS_ROW})
    assert r.status_code == 500
    err = assert_error_shape(r.json(), "internal_error")
    assert "secret" not in r.text and "Traceback" not in r.text
    logged = capsys.readouterr().err
    line = next(json.loads(ln) for ln in logged.splitlines() if "unhandled error" in ln)
    assert line["request_id"] == err["request_id"]
    assert "secret internal detail" in line["traceback"]


def test_drift_is_scored_against_the_reference_and_exported(client):
    from scripts.harness.metrics import metric

    shifted = [[7.9 + i * 0.001, 4.4, 6.9, 2.5] for i in range(250)]
    assert client.post("/v1/predict/batch", json={"instances": shifted}).status_code == 200
    drift = client.get("/v1/models/iris").json()["versions"][0]["drift"]
    assert drift["samples"] >= 250
    assert drift["scores"] is not None
    assert "sepal_length" in drift["drifted"]
    text = client.get("/metrics").text
    assert metric(text, "mlapi_feature_drift_psi", model="iris", version="1", feature="sepal_length") >= 0.2


def test_drift_waits_for_its_minimum_sample_without_failing_a_request(make_client, demo_models):
    """A refresh of the drift gauges (every 200 rows) before MLAPI_DRIFT_MIN_SAMPLES rows have been seen has no
    scores to publish; the requests go on being answered, and the gauges appear once the sample is there."""
    from scripts.harness.metrics import metric

    shifted = [[7.9 + i * 0.001, 4.4, 6.9, 2.5] for i in range(250)]
    with make_client(demo_models, drift_min_samples=400) as c:
        assert c.post("/v1/predict/batch", json={"instances": shifted}).status_code == 200
        assert c.get("/v1/models/iris").json()["versions"][0]["drift"]["scores"] is None
        # 250 rows refreshed with nothing to publish; the count starts again: 150 more do not refresh, 50 more do.
        assert c.post("/v1/predict/batch", json={"instances": shifted[:150]}).status_code == 200
        assert c.post("/v1/predict/batch", json={"instances": shifted[:50]}).status_code == 200
        assert metric(c.get("/metrics").text, "mlapi_feature_drift_psi", model="iris", version="1",
                      feature="sepal_length") >= 0.2


DOC_ROUTES = ["/openapi.json", "/docs", "/redoc", "/docs/static/swagger-ui-bundle.js", "/docs/static/docs.js"]
DOCS_KEY = "docs-key-for-tests"
DOCS_KEY_HASH = hashlib.sha256(DOCS_KEY.encode()).hexdigest()


def test_the_schema_needs_the_api_key_when_keys_are_required(make_client, demo_models):
    with make_client(demo_models, api_key_hashes=[DOCS_KEY_HASH]) as c:
        statuses = (
            c.get("/openapi.json").status_code,
            c.get("/openapi.json", headers={"X-API-Key": DOCS_KEY}).status_code,
        )
    assert statuses == (401, 200)


@pytest.mark.parametrize("path", DOC_ROUTES)
def test_docs_are_gone_when_turned_off(make_client, demo_models, path):
    with make_client(demo_models, docs="off") as c:
        r = c.get(path)
    assert r.status_code == 404
    assert_error_shape(r.json(), "not_found")
    assert "see /docs" not in r.json()["error"]["message"]


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
def test_health_and_metrics_need_no_key_when_keys_are_required(make_client, demo_models, path):
    with make_client(demo_models, api_key_hashes=[DOCS_KEY_HASH]) as c:
        assert c.get(path).status_code == 200
