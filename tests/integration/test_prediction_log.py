"""The prediction log under the real process model: gunicorn with two workers writing one file."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from scripts.harness.metrics import metric
from scripts.harness.samples import IRIS_ROW
from scripts.harness.servers import gunicorn, wait_for

pytestmark = pytest.mark.integration

REQUESTS = 1000
SAMPLE = 0.1
DISTINCTIVE = 4.987654321  # sent as the redacted feature: it must appear in no record
ROW = {**IRIS_ROW, "sepal_width": DISTINCTIVE}
# Every scoring path in turn: the v1 fast path (single and batch) and /v2 infer.
BODIES = [
    ("/v1/predict", {"features": ROW}),
    ("/v1/predict/batch", {"instances": [ROW, list(ROW.values())]}),
    ("/v2/models/iris/infer",
     {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": list(ROW.values())}]}),
]


@dataclass
class Run:
    statuses: list[int]
    log: list[dict]  # the service's JSON lines (stdout and stderr)
    metrics: str
    records_text: str | None = None


def _post(client: httpx.Client, i: int) -> int:
    path, body = BODIES[i % len(BODIES)]
    return client.post(path, json=body).status_code


def _serve(env: dict[str, str], requests: int, until=None) -> Run:
    with gunicorn(env, workers=2) as server:
        # Eight connections at once, which the kernel spreads over both workers.
        with httpx.Client(base_url=server.url, timeout=30) as client, ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda i: _post(client, i), range(requests)))
        if until is not None:
            wait_for(lambda: until(httpx.get(server.url + "/metrics").text), 30, what="the records counted")
        metrics = httpx.get(server.url + "/metrics").text
        server.stop()  # graceful: each worker writes what it has queued before it exits
        lines = server.log_path.read_text(errors="replace").splitlines()
    return Run(statuses, [json.loads(line) for line in lines if line.startswith("{")], metrics)


@pytest.fixture(scope="module")
def sampled(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    path = tmp_path_factory.mktemp("predlog") / "predictions.jsonl"
    run = _serve({
        "MLAPI_MODELS_DIR": str(demo_models),
        "MLAPI_DEFAULT_MODEL": "iris",
        "MLAPI_RATE_LIMIT_ENABLED": "false",
        "MLAPI_PREDICTION_LOG_SAMPLE": str(SAMPLE),
        "MLAPI_PREDICTION_LOG_PATH": str(path),
        "MLAPI_PREDICTION_LOG_REDACT": "sepal_width",
    }, REQUESTS)
    run.records_text = path.read_text()
    return run


@pytest.fixture(scope="module")
def unwritable(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    # A path under a regular file: ENOTDIR, which not even root gets past.
    not_a_dir = tmp_path_factory.mktemp("predlog") / "file"
    not_a_dir.write_text("")
    requests = 200
    return _serve({
        "MLAPI_MODELS_DIR": str(demo_models),
        "MLAPI_DEFAULT_MODEL": "iris",
        "MLAPI_RATE_LIMIT_ENABLED": "false",
        "MLAPI_PREDICTION_LOG_SAMPLE": "1",
        "MLAPI_PREDICTION_LOG_PATH": str(not_a_dir / "predictions.jsonl"),
    }, requests, until=lambda text: _sink_errors(text) >= requests)


def _sink_errors(metrics: str) -> float:
    return metric(metrics, "mlapi_prediction_log_dropped_total", reason="sink_error")


def _records(run: Run) -> list[dict]:
    assert run.records_text is not None
    return [json.loads(line) for line in run.records_text.splitlines()]


def test_all_requests_are_answered_with_the_log_on(sampled):
    assert sampled.statuses == [200] * REQUESTS


def test_the_sample_fraction_of_requests_is_logged(sampled):
    assert abs(len(_records(sampled)) - SAMPLE * REQUESTS) <= 30


def test_both_workers_wrote_to_the_file(sampled):
    ids = {r["request_id"] for r in _records(sampled)}
    pids = {line["pid"] for line in sampled.log if line.get("logger") == "mlapi.access" and line["request_id"] in ids}
    assert len(pids) == 2


def test_every_record_carries_the_request_id_of_an_access_log_line(sampled):
    access = {line["request_id"] for line in sampled.log
              if line.get("logger") == "mlapi.access" and line.get("status") == 200}
    ids = [record["request_id"] for record in _records(sampled)]
    assert len(set(ids)) == len(ids)
    assert set(ids) <= access


def test_no_record_holds_the_redacted_value(sampled):
    assert str(DISTINCTIVE) not in sampled.records_text
    assert {i["inputs"]["sepal_width"] for r in _records(sampled) for i in r["instances"]} == {"[redacted]"}


def test_predictions_succeed_when_the_sink_is_unwritable(unwritable):
    assert unwritable.statuses == [200] * 200


def test_records_the_sink_refused_are_counted(unwritable):
    assert _sink_errors(unwritable.metrics) == 200


def test_an_unwritable_sink_is_logged_once_per_worker(unwritable):
    message = "cannot write the prediction log"
    warnings = [line for line in unwritable.log if line.get("message", "").startswith(message)]
    assert 1 <= len(warnings) <= 2
    assert all(w["error"].startswith("ENOTDIR") for w in warnings)
