"""The prediction log: sampling, redaction, the record's shape, its sinks, and that it never holds up a prediction."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest

from app.metrics import render
from app.serving.predictionlog import REDACTED, FileSink, PredictionLog
from app.settings import Settings
from scripts.harness.metrics import metric
from scripts.harness.samples import IRIS_ROW

IRIS_LIST = list(IRIS_ROW.values())
V2_BODY = {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": IRIS_LIST}]}
DIABETES_ROW = [0.01, -0.04, 0.06, 0.02, -0.04, -0.03, -0.04, 0.0, 0.02, -0.02]


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _logged(make_client, models: Path, path: Path, requests: list[tuple[str, dict]], **settings) -> list[dict]:
    """The records written for these requests (all of them sampled), with each response's request id."""
    with make_client(models, prediction_log_sample=1.0, prediction_log_path=str(path), **settings) as c:
        ids = []
        for url, body in requests:
            r = c.post(url, json=body)
            assert r.status_code == 200, r.text
            ids.append(r.headers["x-request-id"])
        assert c.app.state.prediction_log.flush()
    records = _records(path)
    assert [r["request_id"] for r in records] == ids
    return records


def _dropped(reason: str) -> float:
    return metric(render()[0].decode(), "mlapi_prediction_log_dropped_total", reason=reason)


class Untouchable:
    """Fails on any attribute read: an argument the sampler must not look at."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"read {name!r} of an unsampled request")


def test_sample_zero_writes_nothing(make_client, demo_models, tmp_path):
    path = tmp_path / "predictions.jsonl"
    with make_client(demo_models, prediction_log_path=str(path)) as c:
        assert all(c.post("/v1/predict", json={"features": IRIS_ROW}).status_code == 200 for _ in range(20))
        assert c.app.state.prediction_log.flush()
    assert not path.exists()


def test_sample_zero_returns_before_reading_the_request(tmp_path):
    prediction_log = PredictionLog(Settings(prediction_log_path=str(tmp_path / "p.jsonl")))
    prediction_log.write(Untouchable(), Untouchable())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("url", "body"),
    [
        ("/v1/predict", {"features": IRIS_ROW}),
        ("/v1/predict/batch", {"instances": [IRIS_LIST]}),
        ("/v1/models/iris/predict", {"features": IRIS_LIST}),
        ("/v1/models/iris/versions/1/predict/batch", {"instances": [IRIS_ROW]}),
        ("/v2/models/iris/infer", V2_BODY),
        ("/v2/models/iris/versions/1/infer", V2_BODY),
    ],
)
def test_every_scoring_route_writes_a_record_with_the_request_id(make_client, demo_models, tmp_path, url, body):
    records = _logged(make_client, demo_models, tmp_path / "p.jsonl", [(url, body)])
    assert records[0]["instances"][0]["inputs"] == IRIS_ROW


def test_a_request_fastapi_parses_writes_a_record_too(make_client, demo_models, tmp_path):
    # A JSON media type other than application/json: the shortcut leaves the request to FastAPI.
    path = tmp_path / "p.jsonl"
    with make_client(demo_models, prediction_log_sample=1.0, prediction_log_path=str(path)) as c:
        r = c.post("/v1/predict", content=json.dumps({"features": IRIS_ROW}),
                   headers={"Content-Type": "application/vnd.mlapi+json"})
        assert c.app.state.prediction_log.flush()
    assert r.status_code == 200
    assert [record["request_id"] for record in _records(path)] == [r.headers["x-request-id"]]


def test_the_record_holds_what_was_predicted(make_client, demo_models, tmp_path):
    path = tmp_path / "p.jsonl"
    with make_client(demo_models, prediction_log_sample=1.0, prediction_log_path=str(path)) as c:
        answer = c.post("/v1/predict", json={"features": IRIS_ROW}).json()
        assert c.app.state.prediction_log.flush()
    (record,) = _records(path)
    assert set(record) == {"time", "request_id", "model", "version", "engine", "latency_ms", "instances"}
    assert (record["request_id"], record["model"], record["version"]) == (
        answer["request_id"], answer["model"], answer["version"])
    assert record["instances"] == [
        {"inputs": IRIS_ROW, "prediction": answer["prediction"], "probabilities": answer["probabilities"]}
    ]
    assert record["latency_ms"] > 0
    assert record["time"].endswith("+00:00")


def test_a_batch_is_one_record_holding_its_rows_in_order(make_client, demo_models, tmp_path):
    rows = [IRIS_LIST, [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5]]
    (record,) = _logged(make_client, demo_models, tmp_path / "p.jsonl", [("/v1/predict/batch", {"instances": rows})])
    assert [list(i["inputs"].values()) for i in record["instances"]] == rows


def test_a_regressor_record_has_its_value_and_no_probabilities(make_client, demo_models, tmp_path):
    path = tmp_path / "p.jsonl"
    with make_client(demo_models, prediction_log_sample=1.0, prediction_log_path=str(path)) as c:
        answer = c.post("/v1/models/diabetes/predict", json={"features": DIABETES_ROW}).json()
        assert c.app.state.prediction_log.flush()
    (instance,) = _records(path)[0]["instances"]
    assert (instance["prediction"], instance["probabilities"]) == (answer["prediction"], None)


def test_redacted_features_never_reach_the_file(make_client, demo_models, tmp_path):
    path = tmp_path / "p.jsonl"
    distinctive = 4.987654321
    body = {"features": {**IRIS_ROW, "sepal_width": distinctive}}
    (record,) = _logged(make_client, demo_models, path, [("/v1/predict", body)], prediction_log_redact=["sepal_width"])
    assert record["instances"][0]["inputs"]["sepal_width"] == REDACTED
    assert str(distinctive) not in path.read_text()


def test_the_journal_sink_writes_json_lines_under_its_own_logger(make_client, demo_models, capsys):
    with make_client(demo_models, prediction_log_sample=1.0, prediction_log_path="journal") as c:
        r = c.post("/v1/predict", json={"features": IRIS_ROW})
        assert c.app.state.prediction_log.flush()
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    (record,) = [line for line in lines if line["logger"] == "mlapi.predictions"]
    assert record["request_id"] == r.headers["x-request-id"]
    assert record["instances"][0]["inputs"] == IRIS_ROW


def test_an_unwritable_path_drops_and_counts_instead_of_failing(make_client, demo_models, tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    before = _dropped("sink_error")
    with make_client(demo_models, prediction_log_sample=1.0, prediction_log_path=str(not_a_dir / "p.jsonl")) as c:
        statuses = [c.post("/v1/predict", json={"features": IRIS_ROW}).status_code for _ in range(5)]
        assert c.app.state.prediction_log.flush()
    assert statuses == [200] * 5
    assert _dropped("sink_error") - before == 5


def test_a_sink_that_hangs_fills_the_queue_and_the_rest_is_dropped(make_client, demo_models, tmp_path):
    # A FIFO with no reader: the writer blocks opening it, as on a hung network filesystem.
    fifo = tmp_path / "hung"
    os.mkfifo(fifo)
    before = _dropped("queue_full")
    reader = None
    with make_client(demo_models, prediction_log_sample=1.0, prediction_log_path=str(fifo),
                     prediction_log_queue_rows=1) as c:
        try:
            statuses = [c.post("/v1/predict", json={"features": IRIS_ROW}).status_code for _ in range(5)]
        finally:
            reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # lets the writer go, so the app can stop
            assert c.app.state.prediction_log.flush()
    os.close(reader)
    assert statuses == [200] * 5
    # At most one record in the writer's hands and one queued; the other three or more are dropped.
    assert _dropped("queue_full") - before >= 3


def _write_lines(path: str, writer: int, count: int) -> None:
    sink = FileSink(Path(path), max_bytes=4096, backups=200)
    for i in range(count):
        sink.write([json.dumps({"writer": writer, "n": i, "pad": "x" * 60}).encode() + b"\n"])
    sink.close()


def test_a_full_file_is_rotated_keeping_at_most_the_backups(tmp_path):
    path = tmp_path / "p.jsonl"
    sink = FileSink(path, max_bytes=4096, backups=3)
    for i in range(500):
        sink.write([json.dumps({"n": i, "pad": "x" * 60}).encode() + b"\n"])
    sink.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl", "p.jsonl.1", "p.jsonl.2", "p.jsonl.3",
                                                          "p.jsonl.lock"]


def test_writers_in_several_processes_share_the_file_without_losing_or_tearing_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    fork = multiprocessing.get_context("fork")
    writers = [fork.Process(target=_write_lines, args=(str(path), w, 400)) for w in range(3)]
    for p in writers:
        p.start()
    for p in writers:
        p.join(60)
    assert [p.exitcode for p in writers] == [0, 0, 0]
    lines = [line for f in tmp_path.glob("p.jsonl*") if not f.name.endswith(".lock")
             for line in f.read_text().splitlines()]
    seen = sorted((r["writer"], r["n"]) for r in map(json.loads, lines))
    assert seen == [(w, n) for w in range(3) for n in range(400)]
