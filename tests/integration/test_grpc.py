"""The gRPC Open Inference Protocol with Triton's real gRPC client, against the real service and through NGINX.

The service is gunicorn with two workers, each serving gRPC on the same port (app/rpc/). Requests are made
with tritonclient.grpc (raw tensor contents, as it sends them) and with its protocol messages sent directly
(typed contents, as MLServer's clients send them); every decoded answer is compared with scoring the same rows
in-process with the same package. Through NGINX the RPCs travel over TLS and HTTP/2 (grpc_pass), and the
edge's own refusals must arrive as gRPC statuses.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import grpc
import httpx
import joblib
import numpy as np
import pytest
import tritonclient.grpc as triton
from sklearn.datasets import load_iris
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from app.cli.train_demo import churn_data
from app.packages.gate import load_package
from app.packages.manifest import ONNX_TOLERANCE
from scripts.harness.client_envs import run_script
from scripts.harness.nginx import SERVER_NAME, running_edge
from scripts.harness.servers import VENV_BIN, free_port, gunicorn, wait_for

from edge_service import service_access_lines

pytestmark = pytest.mark.integration

ROWS = load_iris().data[[0, 50, 100, 70, 133, 25, 83]].tolist()
KEY = "grpc-test-key-7f3a"


def _service_env(models: Path, **extra: str) -> tuple[dict[str, str], int]:
    port = free_port()
    env = {"MLAPI_MODELS_DIR": str(models), "MLAPI_DEFAULT_MODEL": "iris",
           "MLAPI_RATE_LIMIT_STORAGE_URI": "memory://", "MLAPI_GRPC_BIND": f"127.0.0.1:{port}", **extra}
    return env, port


@pytest.fixture(scope="module")
def service(demo_models):
    env, port = _service_env(demo_models, MLAPI_MAX_BATCH_SIZE="50")
    with gunicorn(env, workers=2) as server:
        server.grpc_port = port
        yield server


@pytest.fixture(scope="module")
def client(service):
    c = triton.InferenceServerClient(f"127.0.0.1:{service.grpc_port}")
    yield c
    c.close()


@pytest.fixture(scope="module")
def stub(service):
    with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def iris(demo_models):
    return load_package(demo_models / "iris" / "1")


def in_process(iris, X) -> tuple[list[str], np.ndarray]:
    labels, probabilities = iris.infer(np.asarray(X, dtype=np.float64))
    return [str(v) for v in labels.tolist()], probabilities


def texts(values: np.ndarray) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values.reshape(-1).tolist()]


def tensor(X: np.ndarray, datatype: str, name: str = "input-0") -> triton.InferInput:
    t = triton.InferInput(name, list(X.shape), datatype)
    t.set_data_from_numpy(X)
    return t


def test_health_and_metadata_match_the_rest_answers(client, service):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("iris") and client.is_model_ready("iris", "1")
    server = client.get_server_metadata(as_json=True)
    rest = httpx.get(service.url + "/v2").json()
    assert server["name"] == rest["name"] == "mlapi" and server["version"] == rest["version"]
    assert server["extensions"] == ["classification"]
    metadata = client.get_model_metadata("iris", as_json=True)
    rest = httpx.get(service.url + "/v2/models/iris").json()
    assert metadata["name"] == "iris" and metadata["versions"] == rest["versions"] == ["1"]
    assert metadata["platform"] == rest["platform"]
    for kind in ("inputs", "outputs"):
        assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in metadata[kind]] == [
            (t["name"], t["datatype"], t["shape"]) for t in rest[kind]]


@pytest.mark.parametrize("datatype", ["FP32", "FP64"])
def test_infer_with_raw_tensors_equals_in_process_scoring(client, iris, datatype):
    X = np.array(ROWS, dtype=np.float32 if datatype == "FP32" else np.float64)
    result = client.infer("iris", [tensor(X, datatype)], outputs=[
        triton.InferRequestedOutput("predict"), triton.InferRequestedOutput("predict_proba")])
    labels, probabilities = in_process(iris, X)
    assert texts(result.as_numpy("predict")) == labels
    assert result.as_numpy("predict").shape == (len(ROWS), 1)
    np.testing.assert_array_equal(result.as_numpy("predict_proba"), probabilities)
    response = result.get_response()
    assert response.model_name == "iris" and response.model_version == "1"
    assert len(response.raw_output_contents) == 2  # raw in, raw out: what tritonclient reads fastest
    proba = next(o for o in response.outputs if o.name == "predict_proba")
    assert json.loads(proba.parameters["classes"].string_param) == iris.classes


def test_infer_without_outputs_gives_predict_alone_as_mlserver_does(client, iris):
    result = client.infer("iris", [tensor(np.array(ROWS), "FP64")])
    assert [o.name for o in result.get_response().outputs] == ["predict"]
    assert texts(result.as_numpy("predict")) == in_process(iris, ROWS)[0]


def test_typed_contents_in_give_typed_contents_out(stub, iris):
    request = service_pb2.ModelInferRequest(model_name="iris", id="typed-1")
    request.inputs.add(name="input-0", datatype="FP64", shape=[len(ROWS), 4]).contents.fp64_contents.extend(
        np.ravel(ROWS).tolist())
    request.outputs.add(name="predict")
    request.outputs.add(name="predict_proba")
    response = stub.ModelInfer(request)
    assert response.id == "typed-1" and not response.raw_output_contents
    predict, proba = response.outputs
    labels, probabilities = in_process(iris, ROWS)
    assert [v.decode() for v in predict.contents.bytes_contents] == labels
    assert list(predict.shape) == [len(ROWS), 1]
    np.testing.assert_array_equal(np.reshape(proba.contents.fp64_contents, list(proba.shape)), probabilities)


def test_a_regressor_and_string_features_per_tensor(client, demo_models):
    diabetes = load_package(demo_models / "diabetes" / "1")
    X = np.linspace(-0.05, 0.05, 30).reshape(3, 10)
    result = client.infer("diabetes", [tensor(X, "FP64")])
    np.testing.assert_allclose(result.as_numpy("predict").reshape(-1), diabetes.infer(X)[0], rtol=0, atol=1e-4)

    frame, _, _ = churn_data(rows=12, seed=7)
    inputs = []
    for column, datatype in (("plan", "BYTES"), ("region", "BYTES"), ("seats", "INT64"),
                             ("monthly_usage", "FP64"), ("annual", "BOOL")):
        values = frame[column].to_numpy()
        values = values.astype(object) if datatype == "BYTES" else values.astype(
            {"INT64": np.int64, "FP64": np.float64, "BOOL": np.bool_}[datatype])
        inputs.append(tensor(values.reshape(-1, 1), datatype, name=column))
    result = client.infer("churn", inputs, outputs=[triton.InferRequestedOutput("predict_proba")])
    expected = joblib.load(demo_models / "churn" / "1" / "model.joblib").predict_proba(frame)
    assert np.allclose(result.as_numpy("predict_proba"), expected, atol=ONNX_TOLERANCE)


def test_classification_versions_and_compression(client, iris):
    X = np.array(ROWS, dtype=np.float64)
    top = client.infer("iris", [tensor(X, "FP64")], model_version="1", compression_algorithm="gzip",
                       outputs=[triton.InferRequestedOutput("predict_proba", class_count=2)])
    _, probabilities = in_process(iris, X)
    best = [texts(row)[0].split(":") for row in top.as_numpy("predict_proba")]
    assert [int(index) for _, index, _ in best] == probabilities.argmax(axis=1).tolist()
    assert [label for _, _, label in best] == [iris.classes[i] for i in probabilities.argmax(axis=1)]
    with pytest.raises(InferenceServerException) as refused:
        client.infer("iris", [tensor(X, "FP64")], model_version="9")
    assert refused.value.status() == "StatusCode.NOT_FOUND" and "9" in refused.value.message()


def _refusal(make_call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as refused:
        make_call()
    return refused.value.code(), refused.value.details()


@pytest.mark.parametrize(("model", "X", "datatype", "code", "words"), [
    ("nope", np.ones((1, 4)), "FP64", grpc.StatusCode.NOT_FOUND, "no model named 'nope'"),
    ("iris", np.ones((2, 3)), "FP64", grpc.StatusCode.INVALID_ARGUMENT, "expected shape [n, 4]"),
    ("iris", np.array([["a", "b", "c", "d"]], dtype=object), "BYTES", grpc.StatusCode.INVALID_ARGUMENT,
     "must be numbers"),
    ("iris", np.ones((51, 4)), "FP64", grpc.StatusCode.RESOURCE_EXHAUSTED, "51 rows is more than the limit of 50"),
])
def test_refusals_carry_the_rest_status_and_message(client, model, X, datatype, code, words):
    with pytest.raises(InferenceServerException) as refused:
        client.infer(model, [tensor(X, datatype)])
    assert refused.value.status() == str(code)
    assert words in refused.value.message()


@pytest.mark.parametrize(("datatype", "field", "values", "words"), [
    ("INT8", "int_contents", [5, 3, 1, 0], None),
    ("INT8", "int_contents", [5, 300, 1, 0], "outside the range of INT8 (-128 to 127)"),
    ("UINT8", "uint_contents", [5, 256, 1, 0], "outside the range of UINT8 (0 to 255)"),
    ("INT16", "int_contents", [5, -40000, 1, 0], "outside the range of INT16"),
])
def test_narrow_integers_are_scored_as_sent_or_refused_never_wrapped(stub, iris, datatype, field, values, words):
    request = service_pb2.ModelInferRequest(model_name="iris")
    request.inputs.add(name="input-0", datatype=datatype, shape=[1, 4]).contents.MergeFrom(
        service_pb2.InferTensorContents(**{field: values}))
    if words is None:
        (predict,) = stub.ModelInfer(request).outputs
        assert [v.decode() for v in predict.contents.bytes_contents] == in_process(iris, [values])[0]
    else:
        code, details = _refusal(lambda: stub.ModelInfer(request))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and words in details


def test_a_host_check_does_not_refuse_rpcs(demo_models):
    """With MLAPI_TRUSTED_HOSTS set, an RPC's REST call carries a Host the check accepts."""
    env, port = _service_env(demo_models, MLAPI_TRUSTED_HOSTS="*.example.com,127.0.0.1")
    with gunicorn(env, workers=1) as server, triton.InferenceServerClient(f"127.0.0.1:{port}") as c:
        assert c.is_model_ready("iris")
        assert httpx.get(server.url + "/readyz", headers={"Host": "evil.test"}).status_code == 400


def test_malformed_messages_are_refused_by_name(stub):
    def request(**contents):
        r = service_pb2.ModelInferRequest(model_name="iris")
        r.inputs.add(name="input-0", datatype="FP64", shape=[1, 4]).contents.MergeFrom(
            service_pb2.InferTensorContents(**contents))
        return r

    code, details = _refusal(lambda: stub.ModelInfer(request(fp32_contents=[1, 2, 3, 4])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "contents.fp64_contents" in details
    raw = service_pb2.ModelInferRequest(model_name="iris", raw_input_contents=[b"\0" * 32, b"\0" * 32])
    raw.inputs.add(name="input-0", datatype="FP64", shape=[1, 4])
    code, details = _refusal(lambda: stub.ModelInfer(raw))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "2 entries for 1 inputs" in details
    both = request(fp64_contents=[1, 2, 3, 4])
    both.raw_input_contents.append(np.ones(4).tobytes())
    code, details = _refusal(lambda: stub.ModelInfer(both))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "send every input one way" in details
    unknown = request(fp64_contents=[1, 2, 3, 4])
    unknown.outputs.add(name="decision_function")
    code, details = _refusal(lambda: stub.ModelInfer(unknown))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "unknown output 'decision_function'" in details


def test_a_message_over_the_body_limit_is_refused_before_it_is_read(demo_models):
    env, port = _service_env(demo_models, MLAPI_MAX_BODY_BYTES="65536")
    with gunicorn(env, workers=1), triton.InferenceServerClient(f"127.0.0.1:{port}") as c:
        with pytest.raises(InferenceServerException) as refused:
            c.infer("iris", [tensor(np.ones((5000, 4)), "FP64")])
        assert refused.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert c.infer("iris", [tensor(np.ones((1, 4)), "FP64")]).as_numpy("predict").shape == (1, 1)


def test_rpcs_are_logged_counted_and_keyed_by_request_id_like_rest(stub, service):
    request = service_pb2.ModelInferRequest(model_name="iris")
    request.inputs.add(name="input-0", datatype="FP64", shape=[1, 4]).contents.fp64_contents.extend(ROWS[0])
    # Loopback is a trusted proxy (MLAPI_TRUSTED_PROXIES), so its x-request-id keys the logs, as NGINX's does.
    _, call = stub.ModelInfer.with_call(request, metadata=[("x-request-id", "rpc-trace-42")])
    assert dict(call.initial_metadata())["x-request-id"] == "rpc-trace-42"

    def logged():
        return [e for e in service_access_lines(service) if e.get("request_id") == "rpc-trace-42"]

    wait_for(logged, 10, what="the RPC's access log line")
    (line,) = logged()
    assert line["rpc"] == "inference.GRPCInferenceService/ModelInfer" and line["method"] == "GRPC"
    assert line["route"] == "/v2/models/{name}/infer" and line["status"] == 200 and line["model"] == "iris"
    metrics = httpx.get(service.url + "/metrics").text
    assert any(m.startswith('mlapi_http_requests_total{method="GRPC",model="iris",route="/v2/models/{name}/infer"')
               and 'status="200"' in m for m in metrics.splitlines())


def test_every_worker_serves_grpc(service):
    seen = len(service_access_lines(service))

    def pids() -> set[int]:
        return {e["pid"] for e in service_access_lines(service)[seen:] if e.get("rpc")}

    # A new connection each time (no shared subchannel): the kernel spreads them over the workers (SO_REUSEPORT).
    for _ in range(24):
        with triton.InferenceServerClient(f"127.0.0.1:{service.grpc_port}",
                                          channel_args=[("grpc.use_local_subchannel_pool", 1)]) as c:
            assert c.is_server_live()
    wait_for(lambda: len(pids()) == 2, 10, what="RPCs answered by both workers")
    assert pids() == service.workers()


def _reload_with_slow_new_workers(server) -> None:
    """SIGHUP, then every new worker is stopped as soon as it is forked, for longer than the old workers take
    to shut down when nothing holds them (MLAPI_RETIRE_GRACE is 1 s), then let go."""
    old = server.workers()
    server.signal(signal.SIGHUP)
    held: set[int] = set()
    until = time.monotonic() + 2.5
    while time.monotonic() < until:
        for pid in server.workers() - old - held:
            os.kill(pid, signal.SIGSTOP)
            held.add(pid)
        time.sleep(0.002)
    assert held, "no new worker was forked"
    for pid in held:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: not (server.workers() & old), 30, what="the old workers gone")


def _reloads_under_traffic(client, server, reloads: int) -> tuple[int, list[str]]:
    """Reload ``server`` (slow new workers) ``reloads`` times while another thread sends RPCs back to back through
    ``client``: (RPCs answered, refusals)."""
    X = tensor(np.array(ROWS[:1]), "FP64")
    answered, refused, done = [0], [], threading.Event()

    def traffic() -> None:
        while not done.is_set():
            try:
                client.infer("iris", [X])
                answered[0] += 1
            except InferenceServerException as exc:
                refused.append(f"{exc.status()} {exc.message()}")

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        for _ in range(reloads):
            _reload_with_slow_new_workers(server)
    finally:
        done.set()
        thread.join(30)
    return answered[0], refused


def test_a_reload_keeps_the_grpc_port_open_even_when_the_new_workers_are_slow_to_start(demo_models):
    """gunicorn stops the old workers as soon as it has forked the new ones; each worker's gRPC socket is its
    own, so an old worker hands over to a listening successor before it closes its socket. The new workers
    are held stopped (SIGSTOP) for a while after each reload to make the wait real: without the hand-over,
    every RPC of that while is refused (UNAVAILABLE, connection refused).

    What remains is gRPC's own shutdown race: an RPC that has reached an old worker's connection but not yet
    its handler when the server stops is cancelled by gRPC's core (CANCELLED), at most one per old worker."""
    env, port = _service_env(demo_models, MLAPI_RATE_LIMIT_ENABLED="false")
    with gunicorn(env, workers=2) as server, triton.InferenceServerClient(f"127.0.0.1:{port}") as c:
        answered, refused = _reloads_under_traffic(c, server, 2)
        unavailable = [r for r in refused if not r.startswith("StatusCode.CANCELLED")]
        assert unavailable == [], f"{len(unavailable)} RPCs refused during reloads, e.g. {unavailable[:3]}"
        assert len(refused) <= 2 * 2, refused  # the shutdown race: one per old worker and reload at most
        assert answered > 0
        # The markers of the workers that left are gone with them.
        marks = {int(p.stem) for p in Path(server.metrics_dir, "grpc").iterdir()}
        assert marks <= server.workers(), marks


def test_api_keys_and_rate_limits_are_the_same_as_for_rest(demo_models):
    digest = __import__("hashlib").sha256(KEY.encode()).hexdigest()
    env, port = _service_env(demo_models, MLAPI_API_KEY_HASHES=digest, MLAPI_RATE_LIMIT_PREDICT="4/minute")
    X = np.array(ROWS[:1])
    with gunicorn(env, workers=1) as server, triton.InferenceServerClient(f"127.0.0.1:{port}") as c:
        for headers, status in (({}, "UNAUTHENTICATED"), ({"x-api-key": "wrong"}, "PERMISSION_DENIED")):
            with pytest.raises(InferenceServerException) as refused:
                c.infer("iris", [tensor(X, "FP64")], headers=headers)
            assert refused.value.status() == f"StatusCode.{status}"
            assert "X-API-Key" in refused.value.message()
        key = {"x-api-key": KEY}
        assert c.infer("iris", [tensor(X, "FP64")], headers=key).as_numpy("predict").shape == (1, 1)
        # One limit per key, whichever protocol spends it: 1 RPC + 3 REST calls, then the 5th is refused.
        for _ in range(3):
            rest = httpx.post(server.url + "/v2/models/iris/infer", headers={"X-API-Key": KEY}, json={
                "inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": ROWS[0]}]})
            assert rest.status_code == 200, rest.text
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            request = service_pb2.ModelInferRequest(model_name="iris")
            request.inputs.add(name="input-0", datatype="FP64", shape=[1, 4]).contents.fp64_contents.extend(ROWS[0])
            with pytest.raises(grpc.RpcError) as refused:
                service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, metadata=[("x-api-key", KEY)])
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert int(dict(refused.value.trailing_metadata())["retry-after"]) >= 1


# The KServe SDK's and MLServer's gRPC clients, each from its own venv ----------------------------


SCRIPTS = Path(__file__).parent / "client_scripts"
FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def test_kserve_sdk_grpc_client(service, iris):
    out = run_script("kserve", SCRIPTS / "kserve_grpc_calls.py", f"127.0.0.1:{service.grpc_port}", "iris",
                     json.dumps(ROWS))
    assert out["live"] is True and out["ready"] is True and out["model_ready"] is True
    labels = in_process(iris, np.array(ROWS, dtype=np.float32))[0]
    assert out["infer"] == {"id": "kserve-grpc", "model": "iris", "name": "predict", "shape": [len(ROWS), 1],
                            "datatype": "BYTES", "data": labels}
    assert out["error"]["code"] == "INVALID_ARGUMENT" and "expected shape [n, 4]" in out["error"]["message"]


def test_mlserver_codecs_round_trip_over_grpc(service, iris, demo_models):
    diabetes = load_package(demo_models / "diabetes" / "1")
    X = np.linspace(-0.05, 0.05, 30).reshape(3, 10)
    out = run_script("mlserver", SCRIPTS / "mlserver_grpc_codecs.py", f"127.0.0.1:{service.grpc_port}",
                     json.dumps(ROWS), json.dumps(diabetes.feature_names), json.dumps(X.tolist()))
    probabilities = in_process(iris, ROWS)[1]
    predicted = diabetes.infer(X)[0]
    for kind in ("typed", "raw"):
        answer = out[kind]
        assert answer["iris_proba"]["shape"] == list(probabilities.shape), kind
        np.testing.assert_array_equal(answer["iris_proba"]["values"], probabilities.reshape(-1))
        assert answer["diabetes_numpy"]["shape"] == [3, 1], kind
        np.testing.assert_array_equal(answer["diabetes_numpy"]["values"], predicted)
        assert answer["diabetes_pandas"]["columns"] == ["predict"], kind
        np.testing.assert_array_equal(answer["diabetes_pandas"]["values"], predicted)


# Through NGINX -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def edge(tmp_path_factory, demo_models):
    """NGINX in front of a service of its own, which the last test stops."""
    env, port = _service_env(demo_models)
    with gunicorn(env, workers=2) as server:
        server.grpc_port = port
        for running in running_edge(
                tmp_path_factory.mktemp("grpc-edge"), [server.port],
                nginx_grpc_upstream_servers=[f"127.0.0.1:{port}"],
                nginx_client_max_body_size="64k", nginx_rate_limit_rps=5, nginx_rate_limit_burst=10):
            running.service = server
            yield running


def tls_client(edge) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(
        f"127.0.0.1:{edge.https_port}", ssl=True, root_certificates=str(edge.certificate),
        channel_args=[("grpc.ssl_target_name_override", SERVER_NAME), ("grpc.default_authority", SERVER_NAME)])


def test_triton_grpc_through_nginx_over_tls(edge, iris):
    service = edge.service

    def infer_lines() -> list[str]:
        return [line for line in edge.log_lines() if "ModelInfer" in line]

    before = len(infer_lines())
    with tls_client(edge) as c:
        assert c.is_server_ready() and c.is_model_ready("iris")
        X = np.array(ROWS, dtype=np.float32)
        result = c.infer("iris", [tensor(X, "FP32")], outputs=[triton.InferRequestedOutput("predict_proba")])
        np.testing.assert_array_equal(result.as_numpy("predict_proba"), in_process(iris, X)[1])
    # NGINX writes its access line after the response has gone, so the client may read the answer first.
    wait_for(lambda: len(infer_lines()) > before, 10, what="the edge's line of this ModelInfer")
    edge_line = json.loads(infer_lines()[before])
    assert edge_line["protocol"] == "HTTP/2.0" and edge_line["status"] == 200
    # The edge's request id keys the service's line, and the client's address is the one NGINX saw.
    wait_for(lambda: any(e.get("request_id") == edge_line["request_id"] for e in service_access_lines(service)), 10,
             what="the service's line for the edge's request id")
    line = next(e for e in service_access_lines(service) if e.get("request_id") == edge_line["request_id"])
    assert line["rpc"] == "inference.GRPCInferenceService/ModelInfer" and line["client_ip"] == "127.0.0.1"


def test_lint_gixy_accepts_the_configuration_with_grpc(edge):
    assert "grpc_pass grpc://mlapi_grpc;" in (edge.prefix / "sites-available" / "mlapi.conf").read_text()
    result = subprocess.run([str(VENV_BIN / "gixy"), str(edge.prefix / "nginx.conf")], capture_output=True, text=True)
    assert result.returncode == 0, f"gixy reports issues; change the templates in deploy/nginx/:\n{result.stdout}"
    assert "No issues found" in result.stdout


def test_the_edges_own_refusals_are_grpc_statuses(edge):
    with tls_client(edge) as c:
        with pytest.raises(InferenceServerException) as refused:
            c.infer("iris", [tensor(np.ones((3000, 4)), "FP64")])
        assert refused.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert "larger than 64k" in refused.value.message()
        statuses = []
        for _ in range(40):
            try:
                c.is_model_ready("iris")
                statuses.append("OK")
            except InferenceServerException as exc:
                statuses.append(exc.status())
                assert "Too many requests" in exc.message()
                break
        assert statuses[-1] == "StatusCode.RESOURCE_EXHAUSTED"
        # Health checks are not rate limited, as /healthz and /readyz are not.
        assert c.is_server_live() and c.is_server_ready()
    # The refusals went out as gRPC asks (HTTP 200, the code in grpc-status), and the log keeps the code.
    lines = [json.loads(line) for line in edge.log_lines() if "/inference.GRPCInferenceService/" in line]
    refusals = [line for line in lines if line["grpc_status"] not in ("", "0")]
    assert {(line["uri"].rsplit("/", 1)[1], line["status"], line["grpc_status"]) for line in refusals} == {
        ("ModelInfer", 200, "8"), ("ModelReady", 200, "8")}
    assert any(line["grpc_status"] == "0" and line["upstream_status"] == "200" for line in lines)


def test_no_instance_answering_is_unavailable_at_the_edge(edge):
    edge.service.stop()  # the module's last test
    with tls_client(edge) as c, pytest.raises(InferenceServerException) as refused:
        c.is_server_live()
    assert refused.value.status() == "StatusCode.UNAVAILABLE"
    assert "No instance of the service answered" in refused.value.message()


def test_rpcs_through_nginx_survive_reloads_of_an_instance(tmp_path, demo_models):
    """Two instances behind NGINX, as on a host; one is reloaded under a steady stream of RPCs, its new
    workers slow to start. No RPC finds the port closed; gRPC's shutdown race (an RPC cancelled as an old
    worker's server stops, see above) reaches the client through NGINX as CANCELLED, at most once per old
    worker."""
    (env_a, port_a), (env_b, port_b) = (_service_env(demo_models, MLAPI_RATE_LIMIT_ENABLED="false")
                                        for _ in range(2))
    with gunicorn(env_a, workers=2) as a, gunicorn(env_b, workers=2) as b:
        for running in running_edge(tmp_path / "edge", [a.port, b.port],
                                    nginx_grpc_upstream_servers=[f"127.0.0.1:{port_a}", f"127.0.0.1:{port_b}"],
                                    nginx_rate_limit_rps=10000, nginx_rate_limit_burst=10000):
            with tls_client(running) as c:
                answered, refused = _reloads_under_traffic(c, a, 1)
            failed = [r for r in refused if not r.startswith("StatusCode.CANCELLED")]
            assert failed == [], f"{len(failed)} of {len(refused) + answered} RPCs failed: {failed[:3]}"
            assert len(refused) <= 2, refused
            assert answered > 0
