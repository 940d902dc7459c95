"""The demo model with string features (`churn`) under a real gunicorn with two workers, on every route.

Each worker decodes requests by itself: the answers of many requests, spread over both workers, must all be the
estimator's own predict_proba on the same DataFrame (within the ONNX gate's tolerance: the package kept
model.onnx), and a refusal must read the same in each worker.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import joblib
import numpy as np
import pytest

from app.cli.train_demo import churn_data
from app.packages.manifest import ONNX_TOLERANCE
from scripts.harness.servers import gunicorn
from tests.mlserver_codec import pandas_codec_request

pytestmark = pytest.mark.integration

ROWS = 40
REQUESTS = 30  # per route: enough that both workers answer some


@pytest.fixture(scope="module")
def served(demo_models: Path):
    env = {"MLAPI_MODELS_DIR": str(demo_models), "MLAPI_DEFAULT_MODEL": "churn"}
    with gunicorn(env, workers=2) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def frame():
    rows, _, _ = churn_data(rows=ROWS, seed=99)
    return rows


@pytest.fixture(scope="module")
def expected(demo_models: Path, frame) -> np.ndarray:
    return joblib.load(demo_models / "churn" / "1" / "model.joblib").predict_proba(frame)


def _records(frame) -> list[dict]:
    return [{"plan": r.plan, "region": r.region, "seats": int(r.seats), "monthly_usage": float(r.monthly_usage),
             "annual": bool(r.annual)} for r in frame.itertuples()]


CLASSES = ["churns", "stays"]


def test_v1_single_rows_by_name_and_as_lists_across_both_workers(served, frame, expected):
    records = _records(frame)
    for i in range(REQUESTS):
        row = records[i % ROWS]
        body = {"features": row if i % 2 else list(row.values())}
        r = served.post("/v1/models/churn/predict", json=body)
        assert r.status_code == 200, r.text
        got = [r.json()["probabilities"][c] for c in CLASSES]
        assert np.allclose(got, expected[i % ROWS], atol=ONNX_TOLERANCE)


def test_v1_batches_across_both_workers(served, frame, expected):
    for _ in range(REQUESTS // 3):
        r = served.post("/v1/predict/batch", json={"instances": _records(frame)})
        assert r.status_code == 200, r.text
        got = [[p[c] for c in CLASSES] for p in r.json()["probabilities"]]
        assert np.allclose(got, expected, atol=ONNX_TOLERANCE)


def test_v2_bodies_of_mlservers_pandas_codec_across_both_workers(served, frame, expected):
    # predict_proba is named: /v2 answers predict alone otherwise, as MLServer's scikit-learn runtime does.
    body = {**pandas_codec_request(frame), "outputs": [{"name": "predict"}, {"name": "predict_proba"}]}
    for _ in range(REQUESTS // 3):
        r = served.post("/v2/models/churn/infer", json=body)
        assert r.status_code == 200, r.text
        proba = next(o for o in r.json()["outputs"] if o["name"] == "predict_proba")
        assert np.allclose(np.reshape(proba["data"], proba["shape"]), expected, atol=ONNX_TOLERANCE)


def test_every_worker_refuses_an_unknown_plan_and_scores_an_unknown_region(served, frame):
    row = _records(frame)[0]
    for _ in range(10):
        refused = served.post("/v1/predict", json={"features": {**row, "plan": "platinum"}})
        assert refused.status_code == 422
        assert refused.json()["error"]["details"][0]["msg"] == (
            "'platinum' is not a known category; known: ['basic', 'pro', 'team']")
        assert served.post("/v1/predict", json={"features": {**row, "region": "mars"}}).status_code == 200


def test_the_schema_served_shows_the_categories(served):
    schema = served.get("/openapi.json").json()["components"]["schemas"]["ChurnFeatures"]
    assert schema["properties"]["plan"]["enum"] == ["basic", "pro", "team"]
