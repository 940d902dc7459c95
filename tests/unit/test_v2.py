"""Open Inference Protocol v2: the REST endpoints KServe, MLServer and Triton clients call."""

from __future__ import annotations

import json

import pytest

ROW = [5.1, 3.5, 1.4, 0.2]
FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def tensor(data, shape, name="input-0", datatype="FP64"):
    return {"name": name, "shape": shape, "datatype": datatype, "data": data}


def test_server_metadata_and_health(client):
    assert client.get("/v2").json()["name"] == "mlapi"
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}


@pytest.mark.parametrize("path", ["/v2/models/iris", "/v2/models/iris/versions/1"])
def test_model_metadata_describes_inputs_and_outputs(client, path):
    meta = client.get(path).json()
    assert meta["name"] == "iris"
    assert meta["inputs"][0]["shape"] == [-1, 4]
    assert meta["inputs"][0]["parameters"]["features"] == FEATURES
    assert [o["name"] for o in meta["outputs"]] == ["predict", "predict_proba"]


@pytest.mark.parametrize("path", ["/v2/models/iris/ready", "/v2/models/iris/versions/1/ready"])
def test_model_ready(client, path):
    assert client.get(path).json() == {"name": "iris", "ready": True}


@pytest.mark.parametrize("path", ["/v2/models/nope/ready", "/v2/models/iris/versions/9/ready", "/v2/models/nope"])
def test_unknown_model_or_version_is_404_with_a_string_error(client, path):
    r = client.get(path)
    assert r.status_code == 404
    assert isinstance(r.json()["error"], str)


def test_infer_echoes_the_id_and_returns_labels_and_probabilities(client):
    body = {"id": "req-9", "inputs": [tensor(ROW + [6.7, 3.0, 5.2, 2.3], [2, 4], datatype="FP32")]}
    r = client.post("/v2/models/iris/infer", json=body)
    assert r.status_code == 200
    out = r.json()
    assert out["id"] == "req-9"
    assert out["model_name"] == "iris" and out["model_version"] == "1"
    predict, proba = out["outputs"]
    assert predict == {"name": "predict", "shape": [2], "datatype": "BYTES", "data": ["setosa", "virginica"]}
    assert proba["shape"] == [2, 3] and len(proba["data"]) == 6
    assert proba["parameters"]["classes"] == ["setosa", "versicolor", "virginica"]


def test_infer_accepts_one_tensor_per_feature(client):
    body = {"inputs": [tensor([v], [1], name=n) for n, v in zip(FEATURES, ROW)]}
    r = client.post("/v2/models/iris/versions/1/infer", json=body)
    assert r.status_code == 200
    assert r.json()["outputs"][0]["data"] == ["setosa"]


def test_infer_can_select_outputs(client):
    body = {"inputs": [tensor(ROW, [1, 4])], "outputs": [{"name": "predict_proba"}]}
    out = client.post("/v2/models/iris/infer", json=body).json()["outputs"]
    assert [o["name"] for o in out] == ["predict_proba"]


@pytest.mark.parametrize(
    ("inputs", "words"),
    [
        ([tensor(ROW, [1, 3])], "expected shape [n, 4]"),
        ([tensor(ROW, [2, 4])], "needs 8 values"),
        ([tensor(["a", "b", "c", "d"], [1, 4])], "must be numbers"),
        ([tensor([float("nan"), 1, 1, 1], [1, 4])], "finite"),
        ([tensor([1e20, 1, 1, 1], [1, 4])], "feature 'sepal_length': 1e+20 is beyond the accepted magnitude"),
        ([tensor([1.0], [1], name="sepal_length")], "missing"),
    ],
    ids=["shape", "count", "strings", "nan", "huge", "missing-feature"],
)
def test_bad_infer_requests_get_400_with_a_string_error(client, inputs, words):
    # json.dumps writes NaN as the literal clients such as numpy-based ones send
    content = json.dumps({"inputs": inputs})
    r = client.post("/v2/models/iris/infer", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert words in r.json()["error"]


def test_infer_schema_violation_is_422_with_a_string_error(client):
    r = client.post("/v2/models/iris/infer", json={"inputs": [{"name": "x"}]})
    assert r.status_code == 422
    assert isinstance(r.json()["error"], str) and "inputs" in r.json()["error"]



MAX_ROWS = 2
OVER = MAX_ROWS + 1


def _infer_with_row_limit(make_client, demo_models, inputs):
    with make_client(demo_models, max_batch_size=MAX_ROWS) as c:
        return c.post("/v2/models/iris/infer", json={"inputs": inputs})


@pytest.mark.parametrize(
    "inputs",
    [
        [tensor(["x"] * 4 * OVER, [OVER, 4])],
        [tensor(ROW, [OVER, 4])],
        [tensor(["x"] * OVER, [OVER], name=n) for n in FEATURES],
    ],
    ids=["strings", "too-few-values", "one-tensor-per-feature"],
)
def test_declared_rows_over_the_limit_are_413_whatever_the_data(make_client, demo_models, inputs):
    """The declared shape alone decides: data that would fail its own checks never gets to them."""
    r = _infer_with_row_limit(make_client, demo_models, inputs)
    assert r.status_code == 413
    assert f"{OVER} rows is more than the limit of {MAX_ROWS}" in r.json()["error"]


@pytest.mark.parametrize(
    ("inputs", "words"),
    [
        ([tensor(ROW + ["x"], [1, 4])], "needs 4 values, got 5"),
        ([tensor(ROW, [-1, 4])], "negative dimension"),
        ([tensor([1.0, 2.0], [1, 2], name=n) for n in FEATURES], "shape [n] or [n, 1]"),
    ],
    ids=["count-with-a-string", "negative-rows", "feature-tensor-of-two-columns"],
)
def test_a_shape_that_cannot_hold_the_data_is_400_before_the_values_are_read(make_client, demo_models, inputs, words):
    r = _infer_with_row_limit(make_client, demo_models, inputs)
    assert r.status_code == 400
    assert words in r.json()["error"]
