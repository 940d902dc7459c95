"""Faulty model packages meet a real gunicorn master with 2 workers, run as an unprivileged service user.

Whatever is wrong with one package, the master refuses it by name and goes on; the version that served
before goes on serving. The server runs as `nobody` because the tests run as root, and root reads any file.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from scripts.harness.samples import IRIS_ROW
from scripts.harness.servers import Gunicorn, gunicorn, wait_for
from tests.model_packages import copy_as_version, drop_the_bin_edges

pytestmark = pytest.mark.integration

SERVICE_USER = "nobody"


def _unreadable(models: Path) -> Path:
    target = copy_as_version(models / "iris" / "1", models, "2")
    target.chmod(0)
    return target


def _without_bin_edges(models: Path) -> Path:
    target = copy_as_version(models / "iris" / "1", models, "2")
    drop_the_bin_edges(target)
    return target


# How to make a faulty version 2 of iris, and the check that refuses it when it arrives by SIGHUP.
FAULTS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "version folder unreadable by the service user": (_unreadable, "unreadable"),
    "reference without bin_edges": (_without_bin_edges, "manifest"),
}


def _env(models: Path) -> dict[str, str]:
    return {"MLAPI_MODELS_DIR": str(models), "MLAPI_DEFAULT_MODEL": "iris"}


def _refusals(server: Gunicorn) -> list[dict]:
    return [json.loads(line) for line in server.output().splitlines() if '"model package refused"' in line]


def _predict(server: Gunicorn, features: object = None) -> httpx.Response:
    return httpx.post(server.url + "/v1/predict", json={"features": features or IRIS_ROW}, timeout=30)


@pytest.mark.parametrize("fault", list(FAULTS))
def test_sighup_refuses_a_faulty_new_version_and_the_master_goes_on_serving_the_old(service_models, fault):
    make, check = FAULTS[fault]
    with gunicorn(_env(service_models), workers=2, user=SERVICE_USER) as server:
        assert _predict(server).json()["version"] == "1"
        workers_before = server.workers()
        make(service_models)
        server.signal(signal.SIGHUP)
        wait_for(lambda: any(r["version"] == "2" for r in _refusals(server)), 60, what="the refusal of iris 2")
        # The reload completes: new workers replace the old ones, forked by the same master.
        wait_for(lambda: len(server.workers() - workers_before) >= 2, 60, what="2 new workers")
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
        workers_before = server.workers()
        (service_models / "iris").chmod(0)
        server.signal(signal.SIGHUP)
        wait_for(lambda: any(r["model"] == "iris" for r in _refusals(server)), 60, what="the refusal of iris")
        wait_for(lambda: len(server.workers() - workers_before) >= 2, 60, what="2 new workers")
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


def test_a_models_folder_the_service_user_cannot_read_leaves_it_up_and_unready_until_a_reload(service_models):
    """Unready with the reason; once the folder is readable, a reload loads the models and gives them routes."""
    service_models.chmod(0)
    server = Gunicorn(_env(service_models), workers=2, user=SERVICE_USER)
    try:
        wait_for(lambda: httpx.get(server.url + "/healthz", timeout=2).status_code == 200, 90, what="liveness")
        ready = httpx.get(server.url + "/readyz", timeout=5)
        alive = server.proc.poll() is None
        os.chmod(service_models, 0o755)
        server.signal(signal.SIGHUP)
        wait_for(lambda: httpx.get(server.url + "/readyz", timeout=2).status_code == 200, 90, what="ready after reload")
        answered = _predict(server)
    finally:
        server.stop()
        os.chmod(service_models, 0o755)
    assert alive
    assert ready.status_code == 503
    message = ready.json()["error"]["message"]
    assert str(service_models) in message and "unreadable" in message and "reload or restart the service" in message
    assert (answered.status_code, answered.json()["prediction"]) == (200, "setosa")
