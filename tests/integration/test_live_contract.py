"""The request contract follows the versions serving, live: a real gunicorn master with 2 workers, run as an
unprivileged service user, is sent SIGHUP after each change of its models folder.

After every reload each /v1 and /v2 route answers 200 with the label that in-process scoring of the same named
row gives, and /openapi.json shows the features of the version that serves. The steps build on each other, in
the order of this module, on one server: a new model, a version with one more feature, a version with its
features reordered (where a positional mix-up would answer a wrong label with a 200), then a newest version
that the gate refuses, which must shape nothing.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import joblib
import numpy as np
import pytest

from app.api.schemas import _class_name
from scripts.harness.samples import IRIS_ROW
from scripts.harness.servers import Gunicorn, gunicorn, wait_for
from tests.model_packages import drop_the_bin_edges, iris_package, read_manifest

pytestmark = pytest.mark.integration

SERVICE_USER = "nobody"
ROW = {**IRIS_ROW, "petal_ratio": IRIS_ROW["petal_length"] / IRIS_ROW["petal_width"]}
REPEATS = 4  # per route: requests spread over both workers


@dataclass(frozen=True)
class Live:
    server: Gunicorn
    models: Path


@pytest.fixture(scope="module")
def live(demo_models: Path) -> Iterator[Live]:
    """gunicorn serving a copy of the iris package that the service user can read."""
    base = Path(tempfile.mkdtemp(prefix="mlapi-live-"))
    base.chmod(0o755)
    models = base / "models"
    shutil.copytree(demo_models / "iris", models / "iris")
    models.chmod(0o755)
    env = {"MLAPI_MODELS_DIR": str(models), "MLAPI_DEFAULT_MODEL": "iris"}
    try:
        with gunicorn(env, workers=2, user=SERVICE_USER) as server:
            yield Live(server, models)
    finally:
        shutil.rmtree(base)


def _reload(server: Gunicorn) -> None:
    """SIGHUP, then wait until both workers are replaced by ones forked after the reload."""
    before = server.workers()
    server.signal(signal.SIGHUP)
    wait_for(lambda: len(server.workers() - before) >= 2 and not (server.workers() & before), 90,
             what="2 new workers after SIGHUP")
    assert server.proc.poll() is None, server.output()[-3000:]


def _expected(package: Path) -> tuple[list[str], str]:
    """The features of a package and the label its estimator gives the named row ROW, in process."""
    features = [f["name"] for f in read_manifest(package)["features"]]
    estimator = joblib.load(package / "model.joblib")
    return features, str(estimator.predict(np.array([[ROW[f] for f in features]]))[0])


def _answers(server: Gunicorn, name: str, version: str, features: list[str], default: bool) -> dict[str, list]:
    """(status, version, label) of each /v1 and /v2 route of one model, for the row by name and in order."""
    named = {f: ROW[f] for f in features}
    ordered = [ROW[f] for f in features]
    v1 = f"/v1/models/{name}"
    single = [(f"{v1}/predict", {"features": named}), (f"{v1}/predict", {"features": ordered}),
              (f"{v1}/versions/{version}/predict", {"features": named})]
    if default:
        single.append(("/v1/predict", {"features": named}))
    v2_body = {"inputs": [{"name": f, "shape": [1], "datatype": "FP64", "data": [ROW[f]]} for f in features]}
    answers: dict[str, list] = {}
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for _ in range(REPEATS):
            for path, body in single:
                r = client.post(path, json=body)
                answers.setdefault(f"{path} {type(body['features']).__name__}", []).append(
                    (r.status_code, r.json().get("version"), r.json().get("prediction")))
            r = client.post(f"{v1}/predict/batch", json={"instances": [named, ordered]})
            answers.setdefault("batch", []).append(
                (r.status_code, r.json().get("version"), tuple(r.json().get("predictions") or ())))
            r = client.post(f"{v1}:predict", json={"instances": [named]})
            answers.setdefault("kserve v1", []).append(
                (r.status_code, version, (r.json().get("predictions") or [None])[0])
            )
            r = client.post(f"/v2/models/{name}/infer", json=v2_body)
            outputs = r.json().get("outputs") or [{}]
            answers.setdefault("v2 per column", []).append(
                (r.status_code, r.json().get("model_version"), (outputs[0].get("data") or [None])[0])
            )
    return answers


def _assert_serves(server: Gunicorn, name: str, package: Path, default: bool = False) -> None:
    version = read_manifest(package)["version"]
    features, label = _expected(package)
    answers = _answers(server, name, version, features, default)
    wanted = {route: [(200, version, (label, label) if route == "batch" else label)] * REPEATS for route in answers}
    assert answers == wanted, f"{name}/{version} with features {features} (log: {server.log_path})"
    schema = httpx.get(server.url + "/openapi.json", timeout=30).json()["components"]["schemas"]
    shown = schema[_class_name(name, "Features")]["properties"]
    assert [p["title"] for p in shown.values()] == features


def test_a_new_model_gets_its_routes(live):
    package = iris_package(live.models, "blossom", "1", list(reversed(IRIS_ROW)))
    before = httpx.post(live.server.url + "/v1/models/blossom/predict", json={"features": IRIS_ROW}, timeout=30)
    assert before.status_code == 404
    _reload(live.server)
    _assert_serves(live.server, "blossom", package)
    _assert_serves(live.server, "iris", live.models / "iris" / "1", default=True)


def test_a_version_with_one_more_feature_is_scored_with_it(live):
    package = iris_package(live.models, "iris", "2", [*IRIS_ROW, "petal_ratio"])
    _reload(live.server)
    _assert_serves(live.server, "iris", package, default=True)
    # A request of the old contract is told what is missing; it is not scored.
    r = httpx.post(live.server.url + "/v1/predict", json={"features": IRIS_ROW}, timeout=30)
    assert r.status_code == 422 and "petal_ratio" in r.text


def test_a_version_with_its_features_reordered_never_answers_the_old_order(live):
    package = iris_package(live.models, "iris", "3", ["petal_ratio", *reversed(IRIS_ROW)])
    _reload(live.server)
    _assert_serves(live.server, "iris", package, default=True)


def test_a_newest_version_the_gate_refuses_shapes_nothing(live):
    # Version 4 takes the four iris features; the schema must go on showing the five of version 3.
    drop_the_bin_edges(iris_package(live.models, "iris", "4", list(IRIS_ROW)))
    _reload(live.server)
    _assert_serves(live.server, "iris", live.models / "iris" / "3", default=True)
    refusals = httpx.get(live.server.url + "/v1/models/iris", timeout=30).json()["refused"]
    assert [(f["version"], f["check"]) for f in refusals] == [("4", "manifest")]
