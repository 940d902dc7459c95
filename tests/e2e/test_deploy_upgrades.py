"""Model and release deploys through the playbooks while a client keeps sending: zero failed requests; a broken
release fails its gate and the previous release serves again (issue 3, test 7)."""

from __future__ import annotations

from urllib.parse import quote

import pytest

from scripts.harness.deploy import (
    ROOT,
    app_host,
    continuous_client,
    https,
    release_copy,
    require_provisioned,
    run_playbook,
    wait_until_every_instance_serves,
)
from scripts.harness.load import record_load
from scripts.harness.samples import IRIS
from scripts.harness.servers import mlapi
from tests.model_packages import iris_package

pytestmark = pytest.mark.e2e


def current_release(sandbox) -> str:
    return sandbox.ssh(app_host(sandbox), "readlink /opt/mlapi/current", check=True).stdout.strip()


def served_versions(sandbox, model: str) -> list[str]:
    with https(sandbox) as client:
        response = client.get(f"/v1/models/{model}")
    assert response.status_code == 200, response.text
    return [v["version"] for v in response.json()["versions"]]


@pytest.fixture
def provisioned(sandbox):
    """A provisioned host whose instances are all in NGINX's rotation (an earlier test may have restarted one)."""
    require_provisioned(sandbox)
    wait_until_every_instance_serves(sandbox)


def test_model_version_deploy_under_load(sandbox, provisioned, tmp_path):
    packages = tmp_path / "models"
    mlapi("train-demo", "--models-dir", packages, "--version", "2", check=True)
    with continuous_client(sandbox) as load:
        run = run_playbook(sandbox, "deploy-model.yml", {"app_models_src": str(packages)}, label="deploy-model")
    record_load("model version switch (deploy-model.yml)", load.result)
    assert run.returncode == 0, f"deploy-model.yml failed (log: {run.log}):\n{run.tail()}"
    assert "2" in served_versions(sandbox, "iris")
    with https(sandbox) as client:
        assert client.post("/v1/predict", json={"features": {"sepal_length": 5.1, "sepal_width": 3.5,
                                                             "petal_length": 1.4, "petal_width": 0.2}}
                           ).json()["version"] == "2"
    assert load.result.failed == 0, load.result.summary()


def test_model_version_deploys_while_the_store_is_down(sandbox, provisioned, tmp_path):
    """The shared Redis stopped: every instance stays ready, so the reload gates pass and the version switches
    under load; predictions go on without rate limits meanwhile."""
    packages = tmp_path / "models"
    mlapi("train-demo", "--models-dir", packages, "--version", "3", "--only", "iris", check=True)
    redis_host = sandbox.host(sandbox.ip)
    sandbox.ssh(redis_host, "systemctl stop redis-server", check=True)
    try:
        with continuous_client(sandbox) as load:
            run = run_playbook(sandbox, "deploy-model.yml", {"app_models_src": str(packages)},
                               label="deploy-model-store-down")
        store = sandbox.ssh(app_host(sandbox),
                            "curl -sS -o /dev/null -w '%{http_code}' http://127.0.0.1:8001/healthz/store").stdout
    finally:
        sandbox.ssh(redis_host, "systemctl start redis-server", check=True)
    record_load("model version switch with Redis stopped (deploy-model.yml)", load.result)
    assert run.returncode == 0, f"deploy-model.yml failed with the store down (log: {run.log}):\n{run.tail()}"
    assert store == "503", "the instance did not notice that the store was down"
    assert "3" in served_versions(sandbox, "iris")
    assert load.result.failed == 0, load.result.summary()


def test_a_version_with_its_features_reordered_deploys_under_load(sandbox, provisioned, tmp_path):
    """The request contract follows the version a reload brings in: requests by name never fail during the
    switch, a list in the new version's order is scored by it, and /openapi.json shows its order. Version 4:
    newer than the versions the tests above deploy, so it is the one that serves."""
    packages = tmp_path / "models"
    order = ["petal_width", "petal_length", "sepal_width", "sepal_length"]
    iris_package(packages, "iris", "4", order)
    with continuous_client(sandbox) as load:
        run = run_playbook(sandbox, "deploy-model.yml", {"app_models_src": str(packages)},
                           label="deploy-model-reordered")
    record_load("model version with its features reordered (deploy-model.yml)", load.result)
    assert run.returncode == 0, f"deploy-model.yml failed (log: {run.log}):\n{run.tail()}"
    with https(sandbox) as client:
        by_name = client.post("/v1/predict", json=IRIS)
        as_list = client.post("/v1/predict", json={"features": [IRIS["features"][f] for f in order]})
        shown = client.get("/openapi.json").json()["components"]["schemas"]["IrisFeatures"]["properties"]
    assert [(r.status_code, r.json()["version"], r.json()["prediction"]) for r in (by_name, as_list)] == [
        (200, "4", "setosa")] * 2
    assert [p["title"] for p in shown.values()] == order
    assert load.result.failed == 0, load.result.summary()


def test_release_deploy_and_rollback_under_load(sandbox, provisioned, tmp_path):
    original = current_release(sandbox)
    release = release_copy(tmp_path / "release")
    with continuous_client(sandbox) as load:
        deployed = run_playbook(sandbox, "deploy-release.yml",
                                {"app_src_dir": str(release), "app_release_id": "e2e-second"}, label="deploy-release")
    record_load("release deploy (deploy-release.yml)", load.result)
    assert deployed.returncode == 0, f"deploy-release.yml failed (log: {deployed.log}):\n{deployed.tail()}"
    assert current_release(sandbox) == "/opt/mlapi/releases/e2e-second"
    assert load.result.failed == 0, "during the release deploy: " + load.result.summary()

    with continuous_client(sandbox) as load:
        rolled_back = run_playbook(sandbox, "rollback.yml", label="rollback")
    record_load("rollback (rollback.yml)", load.result)
    assert rolled_back.returncode == 0, f"rollback.yml failed (log: {rolled_back.log}):\n{rolled_back.tail()}"
    assert current_release(sandbox) == original
    assert load.result.failed == 0, "during the rollback: " + load.result.summary()


def test_broken_release_fails_its_gate_and_the_previous_release_serves_again(sandbox, provisioned, tmp_path):
    before = current_release(sandbox)
    release = release_copy(tmp_path / "release", broken=True)
    with continuous_client(sandbox) as load:
        run = run_playbook(sandbox, "deploy-release.yml",
                           {"app_src_dir": str(release), "app_release_id": "e2e-broken", "app_gate_retries": 5},
                           label="deploy-broken-release")
    record_load("broken release refused (deploy-release.yml)", load.result)
    assert run.returncode != 0, "a release whose app cannot start was deployed without error"
    assert "failed its gate" in run.output and "on release e2e-broken" in run.output, run.tail()
    assert current_release(sandbox) == before
    host = app_host(sandbox)
    states = sandbox.ssh(host, "systemctl is-active mlapi@1.service mlapi@2.service").stdout.split()
    assert states == ["active", "active"]
    # The broken instance refused connections; NGINX retried those requests on the other instance.
    assert load.result.failed == 0, load.result.summary()


def test_a_failed_gate_does_not_show_the_redis_password(sandbox, provisioned, tmp_path):
    """A broken release fails its gates with Redis stopped (the store unhealthy, so any answer that named it
    would carry its password): the playbook's output of the failed gates and of the switch back holds no
    secret."""
    host = app_host(sandbox)
    password = (ROOT / ".sandbox" / "redis-password").read_text().strip()
    release = release_copy(tmp_path / "release", broken=True)
    sandbox.ssh(host, "systemctl stop redis-server", check=True)
    try:
        run = run_playbook(sandbox, "deploy-release.yml",
                           {"app_src_dir": str(release), "app_release_id": "e2e-store-down", "app_gate_retries": 2},
                           label="deploy-release-store-down")
    finally:
        sandbox.ssh(host, "systemctl start redis-server", check=True)
    assert run.returncode != 0 and "[app : Point current back at the previous release]" in run.output, (
        f"the broken release passed its gates, so the test proves nothing (log: {run.log}):\n{run.tail()}")
    shown = [n for n, line in enumerate(run.output.splitlines(), 1) if password in line or quote(password) in line]
    assert not shown, (
        f"the Redis password is in the output of a failed gate, lines {shown[:5]} of {run.log}; the gates must "
        "report a failed gate by its status, not its body")
