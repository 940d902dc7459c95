"""Open Inference Protocol v2: the REST endpoints KServe, MLServer and Triton clients call."""

from __future__ import annotations

import functools
import gzip
import json
import struct
import zlib

import numpy as np
import pytest

from app.api import tensors
from app.errors import APIError

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
    assert meta["outputs"][0]["shape"] == [-1, 1]


@pytest.mark.parametrize("path", ["/v2/models/iris/ready", "/v2/models/iris/versions/1/ready"])
def test_model_ready(client, path):
    assert client.get(path).json() == {"name": "iris", "ready": True}


@pytest.mark.parametrize("path", ["/v2/models/nope/ready", "/v2/models/iris/versions/9/ready", "/v2/models/nope"])
def test_unknown_model_or_version_is_404_with_a_string_error(client, path):
    r = client.get(path)
    assert r.status_code == 404
    assert isinstance(r.json()["error"], str)


TWO_ROWS = [*ROW, 6.7, 3.0, 5.2, 2.3]


def test_infer_echoes_the_id_and_returns_predict_alone_as_mlserver_does(client):
    body = {"id": "req-9", "inputs": [tensor(TWO_ROWS, [2, 4], datatype="FP32")]}
    r = client.post("/v2/models/iris/infer", json=body)
    assert r.status_code == 200
    out = r.json()
    assert out["id"] == "req-9"
    assert out["model_name"] == "iris" and out["model_version"] == "1"
    assert out["outputs"] == [
        {"name": "predict", "shape": [2, 1], "datatype": "BYTES", "parameters": {"content_type": "np"},
         "data": ["setosa", "virginica"]}
    ]


def test_infer_gives_probabilities_on_request_with_the_class_order(client):
    body = {"inputs": [tensor(TWO_ROWS, [2, 4])], "outputs": [{"name": "predict_proba"}, {"name": "predict"}]}
    proba, predict = client.post("/v2/models/iris/infer", json=body).json()["outputs"]
    assert proba["name"] == "predict_proba" and proba["shape"] == [2, 3] and len(proba["data"]) == 6
    assert proba["parameters"] == {"content_type": "np", "classes": ["setosa", "versicolor", "virginica"]}
    assert predict["data"] == ["setosa", "virginica"]


def test_a_regressor_has_no_predict_proba(client):
    body = {"inputs": [tensor([0.0] * 10, [1, 10])], "outputs": [{"name": "predict_proba"}]}
    r = client.post("/v2/models/diabetes/infer", json=body)
    assert r.status_code == 400
    assert "unknown output 'predict_proba'; this model gives ['predict']" in r.json()["error"]


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/json; charset=utf-8",
                                          "application/octet-stream"])
def test_infer_reads_json_whatever_the_content_type(client, content_type):
    headers = {"content-type": content_type} if content_type else {}
    r = client.post("/v2/models/iris/infer", content=json.dumps({"inputs": [tensor(ROW, [1, 4])]}), headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["data"] == ["setosa"]


def test_unknown_top_level_fields_are_ignored(client):
    body = {"model_name": "iris", "model_version": "1", "parameters": {"x": 1}, "inputs": [tensor(ROW, [1, 4])]}
    r = client.post("/v2/models/iris/infer", json=body)
    assert r.status_code == 200, r.text


def test_malformed_json_is_400_in_the_protocol_shape(client):
    r = client.post("/v2/models/iris/infer", content=b'{"inputs": [', headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert "not valid JSON" in r.json()["error"]


def test_top_classes_with_the_classification_extension(client):
    body = {
        "inputs": [tensor(TWO_ROWS, [2, 4])],
        "outputs": [{"name": "predict_proba", "parameters": {"classification": 2}}],
    }
    (out,) = client.post("/v2/models/iris/infer", json=body).json()["outputs"]
    assert out["shape"] == [2, 2] and out["datatype"] == "BYTES"
    assert out["data"][0].endswith(":0:setosa") and out["data"][2].endswith(":2:virginica")
    assert float(out["data"][0].split(":")[0]) >= float(out["data"][1].split(":")[0])


def test_classification_of_predict_is_a_clear_400(client):
    body = {"inputs": [tensor(ROW, [1, 4])], "outputs": [{"name": "predict", "parameters": {"classification": 1}}]}
    r = client.post("/v2/models/iris/infer", json=body)
    assert r.status_code == 400
    assert "ask for predict_proba with classification" in r.json()["error"]


@pytest.mark.parametrize("path", ["/v2/models/iris/config", "/v2/models/iris/versions/1/config"])
def test_model_config_says_what_the_manifest_knows(client, path):
    config = client.get(path).json()
    assert config["name"] == "iris" and config["max_batch_size"] > 0
    assert config["input"] == [{"name": "input-0", "data_type": "TYPE_FP64", "dims": [4]}]
    assert [o["name"] for o in config["output"]] == ["predict", "predict_proba"]
    assert [f["name"] for f in config["parameters"]["features"]] == FEATURES


def test_server_metadata_lists_the_extensions(client):
    assert set(client.get("/v2").json()["extensions"]) >= {
        "binary_tensor_data",
        "classification",
        "model_configuration",
    }


def test_infer_accepts_one_tensor_per_feature(client):
    body = {"inputs": [tensor([v], [1], name=n) for n, v in zip(FEATURES, ROW, strict=True)]}
    r = client.post("/v2/models/iris/versions/1/infer", json=body)
    assert r.status_code == 200
    assert r.json()["outputs"][0]["data"] == ["setosa"]


def test_infer_can_select_outputs(client):
    body = {"inputs": [tensor(ROW, [1, 4])], "outputs": [{"name": "predict_proba"}]}
    out = client.post("/v2/models/iris/infer", json=body).json()["outputs"]
    assert [o["name"] for o in out] == ["predict_proba"]


def test_unknown_output_is_400_naming_the_outputs(client):
    body = {"inputs": [tensor(ROW, [1, 4])], "outputs": [{"name": "nope"}]}
    r = client.post("/v2/models/iris/infer", json=body)
    assert r.status_code == 400
    assert "['predict', 'predict_proba']" in r.json()["error"]


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
        ([tensor([*ROW, "x"], [1, 4])], "needs 4 values, got 5"),
        ([tensor(ROW, [-1, 4])], "negative dimension"),
        ([tensor([1.0, 2.0], [1, 2], name=n) for n in FEATURES], "shape [n] or [n, 1]"),
    ],
    ids=["count-with-a-string", "negative-rows", "feature-tensor-of-two-columns"],
)
def test_a_shape_that_cannot_hold_the_data_is_400_before_the_values_are_read(make_client, demo_models, inputs, words):
    r = _infer_with_row_limit(make_client, demo_models, inputs)
    assert r.status_code == 400
    assert words in r.json()["error"]


# Binary tensor data and compressed bodies ---------------------------------------------------------


def binary_request(header: dict, *chunks: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + b"".join(chunks), {"Inference-Header-Content-Length": str(len(head))}


def split_response(r) -> tuple[dict, bytes]:
    n = int(r.headers["inference-header-content-length"])
    return json.loads(r.content[:n]), r.content[n:]


@pytest.mark.parametrize(("datatype", "dtype"), [("FP32", "<f4"), ("FP64", "<f8")])
def test_binary_inputs_score_like_json(client, datatype, dtype):
    values = np.array(TWO_ROWS, dtype=dtype)
    header = {
        "inputs": [
            {"name": "x", "shape": [2, 4], "datatype": datatype, "parameters": {"binary_data_size": values.nbytes}}
        ]
    }
    content, headers = binary_request(header, values.tobytes())
    r = client.post("/v2/models/iris/infer", content=content, headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["data"] == ["setosa", "virginica"]


def test_binary_outputs_follow_the_json_header(client):
    body = {
        "parameters": {"binary_data_output": True},
        "inputs": [tensor(TWO_ROWS, [2, 4])],
        "outputs": [
            {"name": "predict"},
            {"name": "predict_proba"},
            {"name": "predict", "parameters": {"binary_data": False}},
        ],
    }
    r = client.post("/v2/models/iris/infer", json=body)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/octet-stream"
    header, binary = split_response(r)
    labels, proba, json_labels = header["outputs"]
    assert json_labels["data"] == ["setosa", "virginica"] and "data" not in labels
    # BYTES: each element a 4-byte little-endian length, then its bytes.
    expected_labels = b"".join(struct.pack("<I", len(s)) + s for s in (b"setosa", b"virginica"))
    assert labels["parameters"]["binary_data_size"] == len(expected_labels)
    assert binary[: len(expected_labels)] == expected_labels
    probabilities = np.frombuffer(binary[len(expected_labels) :], dtype="<f8").reshape(proba["shape"])
    assert proba["parameters"]["binary_data_size"] == probabilities.nbytes == 2 * 3 * 8
    assert probabilities.argmax(axis=1).tolist() == [0, 2]


@pytest.mark.parametrize(
    ("size", "extra", "words"),
    [
        (32, b"", "needs 64 bytes of binary data, got 32"),
        (128, b"", "only 64 bytes"),
        (64, b"\0" * 8, "8 bytes follow the JSON header"),
    ],
    ids=["size-not-the-shape", "short-body", "bytes-left-over"],
)
def test_binary_sizes_that_do_not_add_up_are_400(client, size, extra, words):
    values = np.array(TWO_ROWS, dtype="<f8")
    header = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP64", "parameters": {"binary_data_size": size}}]}
    content, headers = binary_request(header, values.tobytes() if size != 32 else values.tobytes()[:32], extra)
    r = client.post("/v2/models/iris/infer", content=content, headers=headers)
    assert r.status_code == 400
    assert words in r.json()["error"]


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
def test_compressed_request_bodies_are_read(client, coding):
    raw = json.dumps({"inputs": [tensor(ROW, [1, 4])]}).encode()
    content = gzip.compress(raw) if coding == "gzip" else zlib.compress(raw)
    r = client.post("/v2/models/iris/infer", content=content, headers={"content-encoding": coding})
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["data"] == ["setosa"]


def test_a_response_is_compressed_when_the_client_accepts_it(client):
    body = json.dumps({"inputs": [tensor(ROW, [1, 4])]})
    r = client.post("/v2/models/iris/infer", content=body, headers={"accept-encoding": "gzip"})
    # httpx undoes the coding; the header says it was there.
    assert r.headers["content-encoding"] == "gzip"
    assert r.json()["outputs"][0]["data"] == ["setosa"]


def test_a_decompression_bomb_is_413_not_memory(make_client, demo_models):
    limit = 64 * 1024
    bomb = gzip.compress(b'{"inputs": [' + b" " * (100 * limit) + b"]}")
    assert len(bomb) < limit
    with make_client(demo_models, max_body_bytes=limit) as c:
        r = c.post("/v2/models/iris/infer", content=bomb, headers={"content-encoding": "gzip"})
    assert r.status_code == 413
    assert f"decompressed request body is larger than {limit} bytes" in r.json()["error"]


@pytest.mark.parametrize(
    ("coding", "status", "words"), [("br", 415, "not supported"), ("gzip", 400, "not valid gzip data")]
)
def test_unreadable_encodings_are_named(client, coding, status, words):
    r = client.post("/v2/models/iris/infer", content=b"not compressed", headers={"content-encoding": coding})
    assert r.status_code == status
    assert words in r.json()["error"]


def test_stacked_encodings_are_refused_before_any_is_undone(client):
    """Each layer may unpack up to the body limit: a stack of them would cost a worker that many times over."""
    raw = json.dumps({"inputs": [tensor(ROW, [1, 4])]}).encode()
    r = client.post(
        "/v2/models/iris/infer", content=gzip.compress(gzip.compress(raw)), headers={"content-encoding": "gzip, gzip"}
    )
    assert r.status_code == 415
    assert "stacks 2 codings" in r.json()["error"]
    r = client.post("/v2/models/iris/infer", content=gzip.compress(raw), headers={"content-encoding": "identity, gzip"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("length", ["\u00b2", "-4", "4.0", "0x10"])
def test_a_header_length_that_is_not_a_byte_count_is_a_400(length):
    with pytest.raises(APIError) as refused:
        tensors.split_body(b'{"inputs": []}', length)
    assert refused.value.status == 400
    assert "must be a byte count" in str(refused.value)


@pytest.mark.parametrize(
    "data",
    [
        [5.1, [3.5, 1.4], 0.2, 0.3],  # ragged
        [functools.reduce(lambda inner, _: [inner], range(70), 1), 2, 3, 4],  # 70 levels deep
    ],
)
def test_ragged_or_deep_nesting_is_a_400_naming_the_shape(client, data):
    r = client.post(
        "/v2/models/iris/infer",
        json={"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": data}]},
    )
    assert r.status_code == 400, r.text
    assert "data must be a flat list of 4 numbers, or lists nested as shape [1, 4]" in r.json()["error"]


def test_an_input_sent_twice_is_refused_not_guessed(client):
    inputs = [tensor([value], [1], name=name) for name, value in zip(FEATURES, ROW, strict=True)]
    inputs.append(tensor([7.7], [1], name="petal_length"))
    r = client.post("/v2/models/iris/infer", json={"inputs": inputs})
    assert r.status_code == 400
    assert r.json()["error"] == "inputs ['petal_length'] are sent more than once; send each input once"


# KServe's V1 protocol on /v1 ----------------------------------------------------------------------


def test_kserve_v1_predict_answers_predictions(client):
    second = dict(zip(FEATURES, TWO_ROWS[4:], strict=True))
    r = client.post("/v1/models/iris:predict", json={"instances": [ROW, second]})
    assert r.status_code == 200
    assert r.json() == {"predictions": ["setosa", "virginica"]}


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v1/models/iris:predict", {"instances": [[1.0, 2.0]]}, 422),
        ("/v1/models/iris:predict", {"instances": "x"}, 422),
        ("/v1/models/nope:predict", {"instances": [ROW]}, 404),
    ],
)
def test_kserve_v1_errors_are_one_message(client, path, body, status):
    r = client.post(path, json=body)
    assert r.status_code == status
    assert isinstance(r.json()["error"], str)


def test_the_v1_model_description_says_ready(client):
    info = client.get("/v1/models/iris").json()
    assert info["ready"] is True and info["name"] == "iris"


# The OpenAPI schema documents /v2 and :predict as served ------------------------------------------


def test_versioned_routes_take_the_version_as_a_required_string(client):
    paths = client.get("/openapi.json").json()["paths"]
    versioned = {p: ops for p, ops in paths.items() if p.startswith("/v2/models/{name}/versions/{version}")}
    assert set(versioned) == {"/v2/models/{name}/versions/{version}" + s for s in ("", "/ready", "/config", "/infer")}
    for ops in versioned.values():
        for op in ops.values():
            (version,) = [p for p in op["parameters"] if p["name"] == "version"]
            assert version["in"] == "path" and version["required"] is True
            assert version["schema"]["type"] == "string"


@pytest.mark.parametrize(
    ("path", "method"),
    [("/v2/models/{name}/infer", "post"), ("/v2/models/{name}/config", "get"), ("/v1/models/iris:predict", "post")],
)
def test_protocol_errors_are_documented_in_their_shape(client, path, method):
    responses = client.get("/openapi.json").json()["paths"][path][method]["responses"]
    for status in ("400", "404", "413", "422", "429"):
        assert (
            responses[status]["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/ProtocolError"
        )
