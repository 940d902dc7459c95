"""The mlapi command against a real gunicorn: `mlapi serve` serves, and `mlapi score` answers what the service does."""

from __future__ import annotations

import csv
import os
import signal
import tempfile
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc

from app.settings import Settings
from scripts.harness.samples import IRIS_ROW
from scripts.harness.servers import Process, free_port, gunicorn, mlapi, mlapi_command, wait_for
from tests.model_packages import rows_csv

pytestmark = pytest.mark.integration

ROWS = 100_000
MAX_BATCH = Settings().max_batch_size  # 1000 unless MLAPI_MAX_BATCH_SIZE says otherwise


def test_serve_runs_the_service_as_the_gunicorn_master(demo_models: Path):
    port = free_port()
    metrics_dir = tempfile.mkdtemp(prefix="mlapi-prom-")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir, "MLAPI_DEFAULT_MODEL": "iris"}
    grpc_port = free_port()
    server = Process([*mlapi_command(), "serve", "--bind", f"127.0.0.1:{port}", "--workers", "2",
                      "--grpc", f"127.0.0.1:{grpc_port}", "--models-dir", str(demo_models)], env=env)
    try:
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            assert server.proc.poll() is None, f"mlapi serve exited:\n{server.output()[-3000:]}"
            return httpx.get(url + "/readyz", timeout=2).status_code == 200

        wait_for(ready, 90, what="mlapi serve ready")
        answer = httpx.post(url + "/v1/predict", json={"features": IRIS_ROW}, timeout=10)
        assert answer.status_code == 200 and answer.json()["prediction"] == "setosa"
        with triton_grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}") as client:
            assert client.is_model_ready("iris")
        # The command became the master: its PID is gunicorn's, so SIGHUP and SIGTERM reach gunicorn itself.
        assert b"gunicorn" in Path(f"/proc/{server.pid}/cmdline").read_bytes()
        workers = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()
        assert len(workers) == 2
        server.signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0
    finally:
        server.stop()


@pytest.fixture(scope="module")
def scored(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, list[dict[str, str]]]:
    """100 000 random rows within the iris reference ranges and their `mlapi score` output."""
    folder = tmp_path_factory.mktemp("score")
    _, X = rows_csv(demo_models / "iris" / "1", folder / "rows.csv", ROWS, seed=20240611)
    result = mlapi("score", "--package", demo_models / "iris" / "1", "--input", folder / "rows.csv",
                   "--output", folder / "scored.csv", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "(onnx)" in result.stdout, "offline scoring used another engine than the service's"
    with open(folder / "scored.csv", newline="") as fh:
        return X, list(csv.DictReader(fh))


def test_score_answers_what_the_service_answers_row_by_row(demo_models: Path, scored):
    """Both sides run the package's model.onnx (engine auto, one ONNX thread), so labels and probabilities must
    be identical, not merely close: JSON and the CSV both carry float64 as its shortest exact repr."""
    X, offline = scored
    assert len(offline) == ROWS
    env = {"MLAPI_MODELS_DIR": str(demo_models), "MLAPI_DEFAULT_MODEL": "iris"}
    labels: list[str] = []
    probabilities: list[dict[str, float]] = []
    with gunicorn(env, workers=2) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        engines = {v["engine"] for v in client.get("/v1/models/iris").json()["versions"]}
        assert engines == {"onnx"}
        for start in range(0, ROWS, MAX_BATCH):
            answer = client.post("/v1/predict/batch", json={"instances": X[start:start + MAX_BATCH].tolist()})
            assert answer.status_code == 200, answer.text
            labels += answer.json()["predictions"]
            probabilities += answer.json()["probabilities"]
    assert len(labels) == ROWS and set(labels) == {"setosa", "versicolor", "virginica"}
    different = [i for i, row in enumerate(offline) if row["prediction"] != labels[i]]
    assert not different, f"{len(different)} rows get another label, the first: line {different[0] + 2}"
    for name in ("setosa", "versicolor", "virginica"):
        column = np.array([float(row[f"probability_{name}"]) for row in offline])
        served = np.array([p[name] for p in probabilities])
        np.testing.assert_array_equal(column, served, err_msg=f"probability_{name}")
    assert [row["id"] for row in offline[:3]] == ["row-0", "row-1", "row-2"]
