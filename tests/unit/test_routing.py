"""Versions side by side: weights, sticky users, explicit overrides, shadows and hot swaps."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from app.serving.registry import ModelRegistry, pick_weighted, stable_fraction
from app.settings import Settings
from scripts.harness.metrics import metric
from scripts.harness.samples import IRIS_ROW
from scripts.harness.servers import mlapi
from tests.app_client import TestClient
from tests.model_packages import (
    ODD_FEATURES,
    broken_tags_package,
    copy_as_version,
    drop_the_bin_edges,
    odd_names_package,
)

ROOT = Path(__file__).resolve().parents[2]


def add_version(models: Path, version: str, only: str = "iris") -> None:
    mlapi("train-demo", "--models-dir", models, "--version", version, "--only", only, check=True)


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory, demo_models) -> Path:
    models = tmp_path_factory.mktemp("two") / "models"
    shutil.copytree(demo_models, models)
    add_version(models, "2")
    return models


def test_stable_fraction_is_deterministic_and_independent_of_python_hash_seed():
    code = "from app.serving.registry import stable_fraction; print(stable_fraction('iris:user-7'))"
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code], env={"PYTHONHASHSEED": seed}, cwd=ROOT, capture_output=True, text=True,
            check=True,
        ).stdout
        for seed in ("1", "2", "3")
    }
    assert len(outputs) == 1
    assert float(outputs.pop()) == stable_fraction("iris:user-7")


@pytest.mark.parametrize(("point", "expected"), [(0.0, "1"), (0.899, "1"), (0.9, "2"), (0.999, "2")])
def test_pick_weighted_splits_by_cumulative_weight(point, expected):
    assert pick_weighted({"1": 90, "2": 10}, point) == expected


def test_weights_split_traffic_in_proportion(make_client, two_versions):
    routes = {"iris": {"versions": {"1": 70, "2": 30}}}
    with make_client(two_versions, models=routes) as c:
        seen = Counter(
            c.post("/v1/predict", json={"features": IRIS_ROW}, headers={"X-User-ID": f"u{i}"}).json()["version"]
            for i in range(400)
        )
    assert 0.6 < seen["1"] / 400 < 0.8
    assert seen["1"] + seen["2"] == 400


def test_same_user_always_gets_the_same_version(make_client, two_versions):
    routes = {"iris": {"versions": {"1": 50, "2": 50}}}
    with make_client(two_versions, models=routes) as c:
        for user in ("alice", "bob", "carol", "dave"):
            versions = {
                c.post("/v1/predict", json={"features": IRIS_ROW}, headers={"X-User-ID": user}).json()["version"]
                for _ in range(10)
            }
            assert len(versions) == 1


@pytest.mark.parametrize("via", ["path", "header"])
def test_explicit_version_overrides_the_weights(make_client, two_versions, via):
    routes = {"iris": {"versions": {"1": 99, "2": 1}, "shadow": None}}
    with make_client(two_versions, models=routes) as c:
        if via == "path":
            r = c.post("/v1/models/iris/versions/2/predict", json={"features": IRIS_ROW})
        else:
            r = c.post("/v1/predict", json={"features": IRIS_ROW}, headers={"X-Model-Version": "2"})
    assert r.status_code == 200
    assert r.json()["version"] == "2"


STAGED = {
    "weight-0": ({"iris": {"versions": {"1": 100, "2": 0}}}, "its weight is 0"),
    "shadow": ({"iris": {"versions": {"1": 100}, "shadow": "2"}}, "it is the shadow version"),
}
V2_BODY = {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": [5.1, 3.5, 1.4, 0.2]}]}
CHOICES = {
    "v1-path": ("POST", "/v1/models/iris/versions/2/predict", {"features": IRIS_ROW}, {}),
    "v1-batch-path": ("POST", "/v1/models/iris/versions/2/predict/batch", {"instances": [IRIS_ROW]}, {}),
    "v1-header": ("POST", "/v1/predict", {"features": IRIS_ROW}, {"X-Model-Version": "2"}),
    "v2-infer": ("POST", "/v2/models/iris/versions/2/infer", V2_BODY, {}),
    "v2-metadata": ("GET", "/v2/models/iris/versions/2", None, {}),
}


def _error_message(response) -> str:
    error = response.json()["error"]
    return error if isinstance(error, str) else error["message"]


@pytest.mark.parametrize("staged", sorted(STAGED))
@pytest.mark.parametrize("choice", sorted(CHOICES))
def test_a_version_that_takes_no_traffic_cannot_be_chosen_by_a_client(make_client, two_versions, staged, choice):
    routes, why = STAGED[staged]
    method, path, body, headers = CHOICES[choice]
    with make_client(two_versions, models=routes) as c:
        r = c.request(method, path, json=body, headers=headers)
    assert r.status_code == 403
    message = _error_message(r)
    assert "'2'" in message and why in message and "MLAPI_VERSION_OVERRIDE=loaded" in message


@pytest.mark.parametrize("staged", sorted(STAGED))
@pytest.mark.parametrize("choice", sorted(CHOICES))
def test_version_override_loaded_lets_clients_choose_any_loaded_version(make_client, two_versions, staged, choice):
    routes, _ = STAGED[staged]
    method, path, body, headers = CHOICES[choice]
    with make_client(two_versions, models=routes, version_override="loaded") as c:
        r = c.request(method, path, json=body, headers=headers)
    assert r.status_code == 200
    answered = r.json().get("version") or r.json().get("model_version") or r.json()["parameters"]["version"]
    assert answered == "2"


def test_without_routing_the_newest_version_serves(make_client, two_versions):
    with make_client(two_versions) as c:
        assert c.post("/v1/predict", json={"features": IRIS_ROW}).json()["version"] == "2"


def test_shadow_scores_off_the_response_path_and_counts_agreement(make_client, two_versions, capsys):
    routes = {"iris": {"versions": {"1": 100}, "shadow": "2"}}
    labels = {"agree": "true", "model": "iris", "primary": "1", "shadow": "2"}
    with make_client(two_versions, models=routes) as c:
        before = metric(c.get("/metrics").text, "mlapi_shadow_predictions_total", **labels)
        r = c.post("/v1/predict/batch", json={"instances": [IRIS_ROW] * 5})
        assert r.json()["version"] == "1"
        after = metric(c.get("/metrics").text, "mlapi_shadow_predictions_total", **labels)
    assert after - before == 5
    lines = [json.loads(ln) for ln in capsys.readouterr().err.splitlines() if "shadow prediction" in ln]
    assert lines and lines[0]["shadow_version"] == "2" and lines[0]["agreed"] == 5
    assert lines[0]["request_id"] == r.json()["request_id"]


def _tamper(package: Path) -> None:
    with open(package / "model.joblib", "ab") as f:
        f.write(b"tampered")


def test_reload_picks_up_a_new_version(models_copy):
    registry = ModelRegistry(Settings(models_dir=models_copy))
    registry.load()
    assert list(registry.get("iris").versions) == ["1"]
    add_version(models_copy, "2")
    registry.load()
    assert list(registry.get("iris").versions) == ["2"]


def test_a_bad_new_version_is_refused_and_the_old_keeps_serving(models_copy):
    registry = ModelRegistry(Settings(models_dir=models_copy))
    registry.load()
    old = registry.get("iris").versions["1"]
    add_version(models_copy, "2")
    _tamper(models_copy / "iris" / "2")
    registry.load()
    served = registry.get("iris")
    assert served.versions == {"1": old}
    assert served.failures[0]["version"] == "2"
    assert served.failures[0]["check"] == "sha256"


def test_a_loaded_version_whose_files_go_bad_keeps_serving_from_memory(models_copy):
    registry = ModelRegistry(Settings(models_dir=models_copy, models={"iris": {"versions": {"1": 1}}}))
    registry.load()
    old = registry.get("iris").versions["1"]
    manifest = models_copy / "iris" / "1" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["versions"]["sklearn"] = "0.0.1"
    manifest.write_text(json.dumps(data))
    registry.load()
    assert registry.get("iris").versions["1"] is old
    assert registry.get("iris").failures[0]["check"] == "versions"


def test_a_version_keeps_its_state_while_it_serves_and_loses_it_with_the_version(models_copy):
    """Drift window, refresh count and measured cost belong to the loaded version: a reload that keeps the
    version keeps them, a version rewritten on disk starts afresh, and a removed version's state is gone."""
    import numpy as np

    registry = ModelRegistry(Settings(models_dir=models_copy, models={"iris": {"versions": {"1": 1}}}))
    registry.load()
    model = registry.get("iris").versions["1"]
    state = registry.state(model)
    assert registry.state(model) is state and state.model is model
    state.drift.observe(np.zeros((3, len(model.manifest.features))))
    state.inline = True
    registry.load()  # nothing changed on disk
    assert registry.get("iris").versions["1"] is model and registry.state(model) is state
    assert state.drift.status()["samples"] == 3

    manifest = models_copy / "iris" / "1" / "manifest.json"
    manifest.write_text(manifest.read_text())  # the same package written again: loaded again
    registry.load()
    reloaded = registry.get("iris").versions["1"]
    assert reloaded is not model
    fresh = registry.state(reloaded)
    assert fresh is not state and fresh.inline is None and fresh.drift.status()["samples"] == 0
    # A request that chose the replaced object before the reload records into a state nobody keeps.
    assert registry.state(model) is not state and registry.state(model) is not fresh


def test_the_loaded_gauge_follows_the_versions_and_engines_that_serve(models_copy):
    """mlapi_model_loaded is 1 for each version and engine serving and 0 once it no longer does: a version reloaded
    with another engine, or replaced by a newer one, leaves no series saying it still serves."""
    from prometheus_client import generate_latest

    def loaded(version: str, engine: str) -> float:
        return metric(generate_latest().decode(), "mlapi_model_loaded", model="iris", version=version, engine=engine)

    registry = ModelRegistry(Settings(models_dir=models_copy, engine="onnx"))
    registry.load()
    assert loaded("1", "onnx") == 1
    registry.settings = Settings(models_dir=models_copy, engine="sklearn")
    manifest = models_copy / "iris" / "1" / "manifest.json"
    manifest.write_text(manifest.read_text())  # written again: loaded again, with the engine now configured
    registry.load()
    assert registry.get("iris").versions["1"].engine.name == "sklearn"
    assert (loaded("1", "sklearn"), loaded("1", "onnx")) == (1, 0)
    add_version(models_copy, "2")  # without routing the newest version serves alone
    registry.load()
    assert (loaded("2", "sklearn"), loaded("1", "sklearn")) == (1, 0)


def test_listing_the_models_records_nothing_about_their_versions(client):
    registry = client.app.state.registry
    states = {(name, version): registry.state(model)
              for name, served in registry.models.items() for version, model in served.versions.items()}
    before = {key: state.drift.status()["samples"] for key, state in states.items()}
    assert client.get("/v1/models").status_code == 200
    after = {(name, version): registry.state(model)
             for name, served in registry.models.items() for version, model in served.versions.items()}
    assert all(after[key] is states[key] for key in states)
    assert {key: state.drift.status()["samples"] for key, state in states.items()} == before


def test_load_failures_are_counted_in_metrics(models_copy, make_client):
    labels = {"check": "sha256", "model": "iris", "version": "1"}
    with make_client(models_copy) as c:
        before = metric(c.get("/metrics").text, "mlapi_model_load_failures_total", **labels)
    _tamper(models_copy / "iris" / "1")
    with make_client(models_copy) as c:
        after = metric(c.get("/metrics").text, "mlapi_model_load_failures_total", **labels)
        assert c.get("/v1/models/iris").status_code == 404
    assert after - before == 1


# ---------------------------------------------------------------- refusals never stop the loading


def _without_bin_edges(models: Path) -> None:
    drop_the_bin_edges(copy_as_version(models / "iris" / "1", models, "2"))


def _broken_tags(models: Path) -> None:
    broken_tags_package(models / "iris" / "1", models, "2")


# A faulty iris 2 arriving on a reload, and the check that refuses it.
RELOAD_FAULTS = {
    "reference without bin_edges": (_without_bin_edges, "manifest"),
    "an exception no check anticipates": (_broken_tags, "estimator"),
}


@pytest.mark.parametrize("fault", list(RELOAD_FAULTS))
def test_a_faulty_new_version_is_refused_on_reload_and_the_old_keeps_serving(models_copy, fault, caplog):
    make, check = RELOAD_FAULTS[fault]
    registry = ModelRegistry(Settings(models_dir=models_copy))
    registry.load()
    old = registry.get("iris").versions["1"]
    make(models_copy)
    registry.load()
    served = registry.get("iris")
    refused = [r for r in caplog.records if r.getMessage() == "model package refused"]
    assert served.versions == {"1": old}
    assert [(f["version"], f["check"]) for f in served.failures] == [("2", check)]
    assert [(r.model, r.version, r.check, r.kept_serving) for r in refused] == [("iris", "2", check, False)]


def test_an_exception_while_loading_is_counted_as_a_load_failure(models_copy, make_client):
    labels = {"check": "estimator", "model": "iris", "version": "2"}
    _broken_tags(models_copy)
    with make_client(models_copy) as c:
        text = c.get("/metrics").text
        served = c.post("/v1/predict", json={"features": IRIS_ROW}).json()["version"]
    assert metric(text, "mlapi_model_load_failures_total", **labels) >= 1
    assert served == "1"


def test_a_models_folder_that_cannot_be_listed_leaves_the_registry_unready_with_the_reason(tmp_path):
    models_dir = tmp_path / ("x" * 300)  # longer than a file name may be: listing it fails (ENAMETOOLONG)
    registry = ModelRegistry(Settings(models_dir=models_dir))
    assert registry.load() == {}
    assert registry.loaded is False
    assert f"model package {models_dir} failed the unreadable check" in registry.last_error
    assert "then reload or restart the service" in registry.last_error


def test_the_service_with_an_unlistable_models_folder_starts_and_says_why_it_is_not_ready(tmp_path, make_client):
    models_dir = tmp_path / ("x" * 300)
    with make_client(models_dir) as c:
        live, ready = c.get("/healthz"), c.get("/readyz")
    assert live.status_code == 200
    assert ready.status_code == 503
    assert "unreadable" in ready.json()["error"]["message"]


def test_the_app_built_after_a_reload_serves_a_version_whose_feature_names_differ(models_copy, make_client):
    """The app gunicorn's master builds after SIGHUP (app/gunicorn_conf.py) takes the new names; the old ones
    are refused with a 422 that names what the serving version takes, never scored."""

    from app.main import create_app

    with make_client(models_copy) as c:
        odd_names_package(models_copy, "iris", "2")
        registry, settings = c.app.state.registry, c.app.state.settings
        registry.load()  # what SIGHUP does in the master, before it builds the app again
    with TestClient(create_app(settings, registry)) as c:
        odd = c.post("/v1/predict", json={"features": dict(zip(ODD_FEATURES, IRIS_ROW.values(), strict=True))})
        old = c.post("/v1/predict", json={"features": IRIS_ROW})
        listed = c.get("/v1/models/iris").json()
    assert (odd.status_code, odd.json()["version"], odd.json()["prediction"]) == (200, "2", "setosa")
    assert old.status_code == 422 and "model_config" in json.dumps(old.json())
    assert [v["version"] for v in listed["versions"]] == ["2"] and listed["refused"] == []
