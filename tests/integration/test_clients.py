"""The real inference clients against the real service: Triton's tritonclient.http, the KServe SDK's REST
client (V1 and V2), MLServer's codecs, and a real MLServer side by side on the same model file.

The service is gunicorn with two workers on loopback; every decoded answer is compared with scoring the
same rows in-process with the same package. The KServe SDK and MLServer run from venvs of their own
(scripts/harness/client_envs.py), in a subprocess.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import ssl
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from sklearn.datasets import load_iris
from tritonclient.utils import InferenceServerException

from app.packages.gate import load_package
from scripts.harness.client_envs import client_python, run_script
from scripts.harness.servers import Process, free_port, gunicorn, wait_for

from edge_service import SERVER_NAME, service_behind_edge

pytestmark = pytest.mark.integration

SCRIPTS = Path(__file__).parent / "client_scripts"
FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
# Rows of every class, some near a class boundary.
ROWS = load_iris().data[[0, 50, 100, 70, 133, 25, 83]].tolist()


@pytest.fixture(scope="module")
def server(demo_models):
    env = {"MLAPI_MODELS_DIR": str(demo_models), "MLAPI_DEFAULT_MODEL": "iris",
           "MLAPI_RATE_LIMIT_STORAGE_URI": "memory://"}
    with gunicorn(env, workers=2) as s:
        yield s


@pytest.fixture(scope="module")
def iris(demo_models):
    return load_package(demo_models / "iris" / "1")


@pytest.fixture(scope="module")
def triton_client(server):
    client = triton.InferenceServerClient(url=server.url.removeprefix("http://"), network_timeout=60)
    yield client
    client.close()


def in_process(iris, X: np.ndarray) -> tuple[list[str], np.ndarray]:
    labels, probabilities = iris.infer(np.asarray(X, dtype=np.float64))
    return [str(v) for v in labels.tolist()], probabilities


def texts(values: np.ndarray) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values.reshape(-1).tolist()]


def triton_input(X: np.ndarray, datatype: str, binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("input-0", list(X.shape), datatype)
    tensor.set_data_from_numpy(X, binary_data=binary)
    return tensor


# tritonclient.http -------------------------------------------------------------------------------


def test_triton_health_metadata_and_config(triton_client):
    assert triton_client.is_server_live() and triton_client.is_server_ready()
    assert triton_client.is_model_ready("iris") and triton_client.is_model_ready("iris", "1")
    assert {"binary_tensor_data", "classification"} <= set(triton_client.get_server_metadata()["extensions"])
    metadata = triton_client.get_model_metadata("iris", "1")
    assert metadata["inputs"][0]["shape"] == [-1, 4]
    config = triton_client.get_model_config("iris")
    assert config["input"][0]["dims"] == [4] and [o["name"] for o in config["output"]] == ["predict", "predict_proba"]


@pytest.mark.parametrize("datatype", ["FP32", "FP64"])
@pytest.mark.parametrize("binary_in", [True, False], ids=["binary-in", "json-in"])
@pytest.mark.parametrize("binary_out", [True, False], ids=["binary-out", "json-out"])
def test_triton_infer_equals_in_process_scoring(triton_client, iris, datatype, binary_in, binary_out):
    X = np.array(ROWS, dtype=np.float32 if datatype == "FP32" else np.float64)
    outputs = [triton.InferRequestedOutput("predict", binary_data=binary_out),
               triton.InferRequestedOutput("predict_proba", binary_data=binary_out)]
    result = triton_client.infer("iris", [triton_input(X, datatype, binary_in)], outputs=outputs, request_id="t-1")
    labels, probabilities = in_process(iris, X)
    assert result.get_response()["id"] == "t-1"
    assert result.as_numpy("predict").shape == (len(ROWS), 1)
    assert texts(result.as_numpy("predict")) == labels
    np.testing.assert_array_equal(result.as_numpy("predict_proba"), probabilities)


def test_triton_infer_without_outputs_gets_predict_alone(triton_client, iris):
    X = np.array(ROWS, dtype=np.float64)
    result = triton_client.infer("iris", [triton_input(X, "FP64", True)])
    assert [o["name"] for o in result.get_response()["outputs"]] == ["predict"]
    assert texts(result.as_numpy("predict")) == in_process(iris, X)[0]


def test_triton_regressor(triton_client, demo_models):
    diabetes = load_package(demo_models / "diabetes" / "1")
    X = np.linspace(-0.05, 0.05, 30).reshape(3, 10)
    result = triton_client.infer("diabetes", [triton_input(X, "FP64", True)],
                                 outputs=[triton.InferRequestedOutput("predict", binary_data=True)])
    np.testing.assert_array_equal(result.as_numpy("predict").reshape(-1), diabetes.infer(X)[0])


def test_triton_versions(triton_client, iris):
    X = np.array(ROWS[:2], dtype=np.float32)
    result = triton_client.infer("iris", [triton_input(X, "FP32", True)], model_version="1")
    assert result.get_response()["model_version"] == "1"
    assert texts(result.as_numpy("predict")) == in_process(iris, X)[0]
    with pytest.raises(InferenceServerException) as refused:
        triton_client.infer("iris", [triton_input(X, "FP32", True)], model_version="9")
    assert refused.value.status() == "404" and "9" in refused.value.message()


@pytest.mark.parametrize("compression", ["gzip", "deflate"])
def test_triton_compressed_requests_and_responses(triton_client, iris, compression):
    X = np.array(ROWS, dtype=np.float64)
    result = triton_client.infer(
        "iris", [triton_input(X, "FP64", True)],
        outputs=[triton.InferRequestedOutput("predict_proba", binary_data=True)],
        request_compression_algorithm=compression, response_compression_algorithm=compression,
    )
    np.testing.assert_array_equal(result.as_numpy("predict_proba"), in_process(iris, X)[1])


def test_triton_classification_gives_the_top_classes(triton_client, iris):
    X = np.array(ROWS, dtype=np.float64)
    result = triton_client.infer("iris", [triton_input(X, "FP64", False)],
                                 outputs=[triton.InferRequestedOutput("predict_proba", class_count=2)])
    top = result.as_numpy("predict_proba")
    assert top.shape == (len(ROWS), 2)
    labels, probabilities = in_process(iris, X)
    firsts = texts(top[:, 0])
    assert [f.split(":")[2] for f in firsts] == labels
    assert [float(f.split(":")[0]) for f in firsts] == pytest.approx(probabilities.max(axis=1).tolist(), abs=1e-6)


@pytest.mark.parametrize(
    ("model", "make_input", "status", "words"),
    [
        ("iris", lambda: triton_input(np.ones((2, 3), np.float32), "FP32", True), "400", "expected shape [n, 4]"),
        ("iris", lambda: triton_input(np.array([["a"] * 4], dtype=object), "BYTES", True), "400", "must be numbers"),
        ("iris", lambda: triton_input(np.array([["a"] * 4], dtype=object), "BYTES", False), "400", "must be numbers"),
        ("nope", lambda: triton_input(np.ones((1, 4), np.float32), "FP32", True), "404", "nope"),
    ],
    ids=["wrong-shape", "wrong-datatype-binary", "wrong-datatype-json", "unknown-model"],
)
def test_triton_errors_carry_the_status_and_the_message(triton_client, model, make_input, status, words):
    with pytest.raises(InferenceServerException) as refused:
        triton_client.infer(model, [make_input()])
    assert refused.value.status() == status
    assert words in refused.value.message()


# The KServe SDK and MLServer's codecs, each from its own venv --------------------------------------


def run_client(env: str, script: str, *args: str) -> dict:
    return run_script(env, SCRIPTS / script, *args)


def test_kserve_sdk_v1_and_v2(server, iris):
    out = run_client("kserve", "kserve_calls.py", server.url, "iris", json.dumps(ROWS))
    labels = in_process(iris, np.array(ROWS, dtype=np.float32))[0]
    assert out["v1_live"] is True and out["v1_model_ready"] is True
    assert out["v1_predictions"] == in_process(iris, np.array(ROWS))[0]
    assert out["v1_error"]["status"] == 422 and "expected 4 values" in out["v1_error"]["message"]
    assert out["v2_live"] is True and out["v2_ready"] is True and out["v2_model_ready"] is True
    for binary in ("True", "False"):
        answer = out[f"v2_binary_{binary}"]
        assert answer["id"] == f"kserve-{binary}"
        assert (answer["name"], answer["shape"], answer["datatype"]) == ("predict", [len(ROWS), 1], "BYTES")
        assert answer["data"] == labels
    assert out["v2_error"]["status"] == 400 and "expected shape [n, 4]" in out["v2_error"]["message"]


def test_mlserver_codecs_round_trip(server, iris):
    out = run_client("mlserver", "mlserver_codecs.py", server.url + "/v2/models/iris/infer",
                     json.dumps(FEATURES), json.dumps(ROWS))
    labels = in_process(iris, np.array(ROWS))[0]
    assert out["numpy"] == {"shape": [len(ROWS), 1], "values": labels}
    assert out["pandas"] == {"columns": ["predict"], "rows": len(ROWS), "values": labels}


# A real MLServer next to the service ---------------------------------------------------------------


@pytest.fixture(scope="module")
def mlserver(demo_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("mlserver")
    for name in ("iris", "diabetes"):
        (root / name).mkdir()
        shutil.copy(demo_models / name / "1" / "model.joblib", root / name / "model.joblib")
        (root / name / "model-settings.json").write_text(json.dumps({
            "name": name, "implementation": "mlserver_sklearn.SKLearnModel",
            "parameters": {"uri": "./model.joblib", "version": "1"}}))
    port = free_port()
    (root / "settings.json").write_text(json.dumps({
        "host": "127.0.0.1", "http_port": port, "grpc_port": free_port(), "metrics_port": free_port(),
        "parallel_workers": 0, "metrics_endpoint": None}))
    mlserver_bin = client_python("mlserver").parent / "mlserver"
    process = Process([str(mlserver_bin), "start", str(root)], env=dict(os.environ), cwd=root)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            if process.proc.poll() is not None:
                raise RuntimeError(f"mlserver exited:\n{process.output()[-3000:]}")
            return all(httpx.get(f"{url}/v2/models/{n}/ready", timeout=2).status_code == 200
                       for n in ("iris", "diabetes"))

        wait_for(ready, 180, what="mlserver ready")
        yield url
    finally:
        process.stop()


def _tensor(rows: list[list[float]], datatype: str = "FP64") -> dict:
    return {"name": "input-0", "shape": [len(rows), len(rows[0])], "datatype": datatype,
            "data": [v for row in rows for v in row]}


SIDE_BY_SIDE = {
    "default-outputs": ("iris", {"inputs": [_tensor(ROWS)]}),
    "fp32": ("iris", {"inputs": [_tensor(ROWS, "FP32")]}),
    "one-row": ("iris", {"id": "x-1", "inputs": [_tensor(ROWS[:1])]}),
    "predict-proba": ("iris", {"inputs": [_tensor(ROWS)], "outputs": [{"name": "predict_proba"}]}),
    "both-outputs": ("iris", {"inputs": [_tensor(ROWS)],
                              "outputs": [{"name": "predict_proba"}, {"name": "predict"}]}),
    "model-name-and-parameters": ("iris", {"model_name": "iris", "parameters": {"content_type": "np"},
                                           "inputs": [_tensor(ROWS)]}),
    "regressor": ("diabetes", {"inputs": [_tensor([[0.01] * 10, [-0.02] * 10])]}),
    "unknown-output": ("iris", {"inputs": [_tensor(ROWS)], "outputs": [{"name": "decision"}]}),
    "regressor-proba": ("diabetes", {"inputs": [_tensor([[0.01] * 10])], "outputs": [{"name": "predict_proba"}]}),
    "unknown-model": ("nope", {"inputs": [_tensor(ROWS)]}),
}


def _summary(response: httpx.Response) -> tuple:
    body = response.json()
    outputs = [(o["name"], o["datatype"], o["shape"]) for o in body.get("outputs", [])]
    return response.status_code, outputs, isinstance(body.get("error", ""), str)


@pytest.mark.parametrize("case", list(SIDE_BY_SIDE))
def test_same_bodies_same_answers_as_mlserver(server, mlserver, case):
    model, body = SIDE_BY_SIDE[case]
    content = json.dumps(body)
    headers = {"Content-Type": "application/json"}
    ours = httpx.post(f"{server.url}/v2/models/{model}/infer", content=content, headers=headers, timeout=60)
    theirs = httpx.post(f"{mlserver}/v2/models/{model}/infer", content=content, headers=headers, timeout=60)
    assert _summary(ours) == _summary(theirs), (ours.text, theirs.text)
    for mine, other in zip(ours.json().get("outputs", []), theirs.json().get("outputs", []), strict=True):
        # The service may score with ONNX: numbers agree to its equivalence gate's tolerance.
        if mine["datatype"] == "BYTES":
            assert mine["data"] == other["data"]
        else:
            assert mine["data"] == pytest.approx(other["data"], abs=1e-5)


# Through the NGINX edge, over TLS ------------------------------------------------------------------


@pytest.fixture(scope="module")
def edge(tmp_path_factory, demo_models):
    with service_behind_edge(tmp_path_factory.mktemp("clients-edge"), demo_models,
                             nginx_client_max_body_size="64k") as (edge, _server):
        yield edge


def test_triton_through_nginx_over_tls(edge, iris):
    client = triton.InferenceServerClient(
        url=f"127.0.0.1:{edge.https_port}", ssl=True, network_timeout=60,
        ssl_options={"ca_certs": str(edge.certificate), "server_hostname": SERVER_NAME},
        ssl_context_factory=ssl.create_default_context,
    )
    host = {"Host": SERVER_NAME}
    try:
        assert client.is_model_ready("iris", headers=host)
        X = np.array(ROWS, dtype=np.float32)
        result = client.infer(
            "iris", [triton_input(X, "FP32", True)], headers=host,
            outputs=[triton.InferRequestedOutput("predict", binary_data=True),
                     triton.InferRequestedOutput("predict_proba", binary_data=False)],
            request_compression_algorithm="gzip", response_compression_algorithm="gzip",
        )
        labels, probabilities = in_process(iris, X)
        assert texts(result.as_numpy("predict")) == labels
        np.testing.assert_array_equal(result.as_numpy("predict_proba"), probabilities)
    finally:
        client.close()


@pytest.mark.parametrize("path", ["/v2/models/iris/infer", "/v1/models/iris:predict"])
def test_the_edge_refuses_protocol_routes_in_their_error_shape(edge, path):
    big = json.dumps({"inputs": [_tensor(ROWS * 2000)]}).encode()
    response = edge.https("POST", path, big, {"Content-Type": "application/json"})
    assert response.status == 413
    assert isinstance(response.json()["error"], str) and "larger than 64k" in response.json()["error"]


def test_kserve_v1_through_the_edge(edge, iris):
    response = edge.https("POST", "/v1/models/iris:predict", json.dumps({"instances": ROWS}).encode(),
                          {"Content-Type": "application/json"})
    assert response.status == 200
    assert response.json() == {"predictions": in_process(iris, np.array(ROWS))[0]}
    # The edge retries it like the other prediction routes and logs it with the request id.
    assert response.headers["X-Request-ID"]


def test_gzip_body_through_the_edge(edge, iris):
    body = gzip.compress(json.dumps({"inputs": [_tensor(ROWS)]}).encode())
    response = edge.https("POST", "/v2/models/iris/infer", body, {"Content-Encoding": "gzip"})
    assert response.status == 200, response.body
    assert response.json()["outputs"][0]["data"] == in_process(iris, np.array(ROWS))[0]


# A client generated from the live OpenAPI schema ---------------------------------------------------

GENERATED_CALLS = """
import json, sys
from mlapi_client import Client
from mlapi_client.api.predict import predict_predict, kserve_v1_predict_models_iris_predict
from mlapi_client.api.open_inference_protocol_v2 import v2_model_infer, v2_model_infer_versioned, v2_model_config
from mlapi_client.models import InferenceRequest, IrisPredictRequest, IrisBatchRequest

client = Client(base_url=sys.argv[1], raise_on_unexpected_status=True)
row = json.loads(sys.argv[2])
names = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
out = {}

def record(key, answer):
    parsed = answer.parsed
    out[key] = {"status": int(answer.status_code), "type": type(parsed).__name__,
                "body": parsed.to_dict() if hasattr(parsed, "to_dict") else None}

record("v1", predict_predict.sync_detailed(client=client, body=IrisPredictRequest.from_dict(
    {"features": dict(zip(names, row))})))
record("v1_error", predict_predict.sync_detailed(client=client, body=IrisPredictRequest.from_dict(
    {"features": dict(zip(names, [1e12] * 4))})))
record("kserve", kserve_v1_predict_models_iris_predict.sync_detailed(client=client, body=IrisBatchRequest.from_dict(
    {"instances": [dict(zip(names, row))]})))
tensor = {"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": row}
record("v2", v2_model_infer.sync_detailed("iris", client=client, body=InferenceRequest.from_dict({"inputs": [tensor]})))
record("v2_versioned", v2_model_infer_versioned.sync_detailed("iris", "1", client=client,
       body=InferenceRequest.from_dict({"inputs": [tensor], "outputs": [{"name": "predict_proba"}]})))
record("v2_error", v2_model_infer.sync_detailed("iris", client=client, body=InferenceRequest.from_dict(
    {"inputs": [dict(tensor, shape=[1, 3], data=row[:3])]})))
record("v2_unknown", v2_model_config.sync_detailed("nope", client=client))
print(json.dumps(out))
"""


def test_a_client_generated_from_the_live_schema_round_trips(server, iris, tmp_path):
    from scripts.harness.servers import VENV_BIN

    schema = tmp_path / "openapi.json"
    schema.write_bytes(httpx.get(server.url + "/openapi.json", timeout=30).content)
    generated = subprocess.run(
        [str(VENV_BIN / "openapi-python-client"), "generate", "--path", str(schema), "--meta", "none",
         "--output-path", str(tmp_path / "mlapi_client")],
        check=False, capture_output=True, text=True, timeout=300, cwd=tmp_path,
        # It formats what it writes with ruff, which the venv holds.
        env={**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"},
    )
    assert generated.returncode == 0, generated.stdout + generated.stderr
    assert "warning" not in (generated.stdout + generated.stderr).lower(), generated.stdout + generated.stderr
    row = ROWS[2]
    ran = subprocess.run([str(VENV_BIN / "python"), "-c", GENERATED_CALLS, server.url, json.dumps(row)],
                         check=False, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert ran.returncode == 0, ran.stderr[-3000:]
    out = json.loads(ran.stdout)
    labels, probabilities = in_process(iris, np.array([row]))
    assert out["v1"]["status"] == 200 and out["v1"]["body"]["prediction"] == labels[0]
    assert out["v1_error"]["status"] == 422 and out["v1_error"]["type"] == "ErrorResponse"
    assert out["v1_error"]["body"]["error"]["code"] == "invalid_request"
    assert out["kserve"] == {"status": 200, "type": "KServePrediction", "body": {"predictions": labels}}
    assert out["v2"]["type"] == "InferenceResponse" and out["v2"]["body"]["outputs"][0]["data"] == labels
    assert out["v2_versioned"]["body"]["outputs"][0]["data"] == probabilities.reshape(-1).tolist()
    assert out["v2_error"]["status"] == 400 and out["v2_error"]["type"] == "ProtocolError"
    assert "expected shape [n, 4]" in out["v2_error"]["body"]["error"]
    assert out["v2_unknown"]["status"] == 404 and out["v2_unknown"]["type"] == "ProtocolError"
