"""Faulty model packages meet a real gunicorn master with 2 workers, run as an unprivileged service user.

Whatever is wrong with one package, the master refuses it by name and goes on; the version that served
before goes on serving. The server runs as `nobody` because the tests run as root, and root reads any file.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.model_packages import ODD_FEATURES, copy_as_version, drop_the_bin_edges, odd_names_package
from tests.servers import Gunicorn, gunicorn, wait_for
from tests.unit.conftest import IRIS_ROW

pytestmark = pytest.mark.integration

SERVICE_USER = "nobody"
ODD_ROW = dict(zip(ODD_FEATURES, IRIS_ROW.values(), strict=True))


@pytest.fixture
def service_models(demo_models: Path) -> Iterator[Path]:
    """A copy of the demo packages the service user can read (pytest's own temporary folders are root's only)."""
    base = Path(tempfile.mkdtemp(prefix="mlapi-models-"))
    base.chmod(0o755)
    models = base / "models"
    shutil.copytree(demo_models, models)
    models.chmod(0o755)  # copied from a folder only root may enter
    try:
        yield models
    finally:
        shutil.rmtree(base)


def _unreadable(models: Path) -> Path:
    target = copy_as_version(models / "iris" / "1", models, "2")
    target.chmod(0)
    return target


def _without_bin_edges(models: Path) -> Path:
    target = copy_as_version(models / "iris" / "1", models, "2")
    drop_the_bin_edges(target)
    return target


def _odd_names(models: Path) -> Path:
    return odd_names_package(models, "iris", "2")


# How to make a faulty version 2 of iris, and the check that refuses it when it arrives by SIGHUP.
FAULTS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "version folder unreadable by the service user": (_unreadable, "unreadable"),
    "reference without bin_edges": (_without_bin_edges, "manifest"),
    # A reload keeps the request schema the master started with, so other features wait for a restart.
    "a feature named model_config": (_odd_names, "features"),
}


def _env(models: Path) -> dict[str, str]:
    return {"MLAPI_MODELS_DIR": str(models), "MLAPI_DEFAULT_MODEL": "iris"}


def _refusals(server: Gunicorn) -> list[dict]:
    return [json.loads(line) for line in server.output().splitlines() if '"model package refused"' in line]


def _predict(server: Gunicorn, features: object = None) -> httpx.Response:
    return httpx.post(server.url + "/v1/predict", json={"features": features or IRIS_ROW}, timeout=30)


def _workers(server: Gunicorn) -> list[int]:
    return [int(pid) for pid in Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()]


@pytest.mark.parametrize("fault", list(FAULTS))
def test_sighup_refuses_a_faulty_new_version_and_the_master_goes_on_serving_the_old(service_models, fault):
    make, check = FAULTS[fault]
    with gunicorn(_env(service_models), workers=2, user=SERVICE_USER) as server:
        assert _predict(server).json()["version"] == "1"
        workers_before = set(_workers(server))
        make(service_models)
        server.signal(signal.SIGHUP)
        wait_for(lambda: any(r["version"] == "2" for r in _refusals(server)), 60, what="the refusal of iris 2")
        # The reload completes: new workers replace the old ones, forked by the same master.
        wait_for(lambda: len(set(_workers(server)) - workers_before) >= 2, 60, what="2 new workers")
        responses = [_predict(server) for _ in range(4)]
        alive = server.proc.poll() is None
        refusal = next(r for r in _refusals(server) if r["version"] == "2")
    assert alive
    assert [(r.status_code, r.json()["version"], r.json()["prediction"]) for r in responses] == [
        (200, "1", "setosa")
    ] * 4
    assert refusal["model"] == "iris" and refusal["check"] == check
    assert "iris/2" in refusal["detail"]


def test_sighup_with_a_model_folder_the_service_user_cannot_list_keeps_its_version_serving(service_models):
    with gunicorn(_env(service_models), workers=2, user=SERVICE_USER) as server:
        workers_before = set(_workers(server))
        (service_models / "iris").chmod(0)
        server.signal(signal.SIGHUP)
        wait_for(lambda: any(r["model"] == "iris" for r in _refusals(server)), 60, what="the refusal of iris")
        wait_for(lambda: len(set(_workers(server)) - workers_before) >= 2, 60, what="2 new workers")
        response = _predict(server)
        alive = server.proc.poll() is None
        refusal = next(r for r in _refusals(server) if r["model"] == "iris")
    assert alive
    assert (response.status_code, response.json()["version"], response.json()["prediction"]) == (200, "1", "setosa")
    assert (refusal["version"], refusal["check"], refusal["kept_serving"]) == (None, "unreadable", True)


# A fresh master with the same faulty folder present: it comes up; what it serves, with its expected label.
RESTART_SERVES = {
    "version folder unreadable by the service user": ("1", IRIS_ROW),
    "reference without bin_edges": ("1", IRIS_ROW),
    # At start the routes are made from the newest manifest: the odd names are the request's field names.
    "a feature named model_config": ("2", ODD_ROW),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_fresh_master_with_a_faulty_version_present_comes_up_and_serves(service_models, fault):
    make, _ = FAULTS[fault]
    make(service_models)
    version, row = RESTART_SERVES[fault]
    with gunicorn(_env(service_models), workers=2, user=SERVICE_USER) as server:
        responses = [_predict(server, row), _predict(server, list(row.values()))]
    assert [(r.status_code, r.json()["version"], r.json()["prediction"]) for r in responses] == [
        (200, version, "setosa")
    ] * 2


def test_a_models_folder_the_service_user_cannot_read_leaves_it_up_and_unready_with_the_reason(service_models):
    service_models.chmod(0)
    server = Gunicorn(_env(service_models), workers=2, user=SERVICE_USER)
    try:
        wait_for(lambda: httpx.get(server.url + "/healthz", timeout=2).status_code == 200, 90, what="liveness")
        ready = httpx.get(server.url + "/readyz", timeout=5)
        alive = server.proc.poll() is None
    finally:
        server.stop()
        os.chmod(service_models, 0o755)
    assert alive
    assert ready.status_code == 503
    message = ready.json()["error"]["message"]
    assert str(service_models) in message and "unreadable" in message and "restart the service" in message
