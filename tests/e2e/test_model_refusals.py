"""deploy-model.yml refuses bad model packages before anything is switched (issue 6, check 5).

One playbook run carries one package of each bad kind and one good package: the role verifies every new package
on the host with the service's own gate and reports each refusal on its own, so each kind is proven refused by
its own check, and the good package shows that a refusal holds back the whole deploy.
"""

from __future__ import annotations

import os
import re

import joblib
import pytest

from scripts.harness.deploy import app_host, ensure_demo_models, https, require_provisioned, run_playbook
from scripts.harness.samples import IRIS
from tests.model_packages import MODEL_JOBLIB, REFUSED_KINDS, copy_as_version, refused_copy, resign

pytestmark = pytest.mark.e2e

MODEL = "iris"
GOOD_VERSION = "refusal-batch-good"
MODELS_DIR = "/var/lib/mlapi/models"


def served_model(sandbox) -> dict:
    """What GET /v1/models/iris says is served (without the drift figures, which move with every request)."""
    with https(sandbox) as client:
        response = client.get(f"/v1/models/{MODEL}")
    assert response.status_code == 200, response.text
    body = response.json()
    return {"default_version": body["default_version"], "refused": body["refused"],
            "versions": [(v["version"], v["created"]) for v in body["versions"]]}


def installed_packages(sandbox) -> list[str]:
    listing = sandbox.ssh(app_host(sandbox), f"cd {MODELS_DIR} && find . -mindepth 2 -maxdepth 2 | sort", check=True)
    return listing.stdout.split()


def task_output(run, task: str) -> list[str]:
    """The lines that a task whose name contains `task` printed."""
    lines, inside = [], False
    for line in run.output.splitlines():
        if line.startswith(("TASK [", "RUNNING HANDLER [")):
            inside = task in line
        elif inside:
            lines.append(line)
    return lines


@pytest.fixture(scope="module")
def refused_deploy(sandbox, tmp_path_factory):
    """deploy-model.yml with the five bad packages and a good one; the served state before and after."""
    require_provisioned(sandbox)
    good = ensure_demo_models() / MODEL / "1"
    source = tmp_path_factory.mktemp("refused-models")
    for check in REFUSED_KINDS:
        refused_copy(good, source, check)
    copy_as_version(good, source, GOOD_VERSION)
    before = served_model(sandbox), installed_packages(sandbox)
    run = run_playbook(sandbox, "deploy-model.yml", {"app_models_src": str(source)}, label="deploy-model-refused")
    after = served_model(sandbox), installed_packages(sandbox)
    return run, before, after


def test_the_playbook_fails(refused_deploy):
    run, _, _ = refused_deploy
    assert run.returncode != 0, (
        f"deploy-model.yml succeeded with packages that fail the gate (log: {run.log}); the role must run "
        "`python -m app.cli verify` on every new package and stop before moving any into service")


@pytest.mark.parametrize("check", list(REFUSED_KINDS))
def test_each_bad_package_is_refused_by_its_own_check(refused_deploy, check):
    run, _, _ = refused_deploy
    item = f"(item={MODEL}/refused-{check})"
    reports = [line for line in run.output.splitlines() if line.startswith("failed:") and item in line]
    assert reports, (
        f"the output of deploy-model.yml reports no failure for {MODEL}/refused-{check} (log: {run.log}); "
        f"the role must stop with one message per refused package:\n{run.tail()}")
    assert f"failed the {check} check" in reports[0], (
        f"the refusal of {MODEL}/refused-{check} does not name the {check} check; the role must pass on the "
        f"message of `python -m app.cli verify`: {reports[0]}")


def test_the_old_versions_keep_serving(sandbox, refused_deploy):
    _, (served_before, _), (served_after, _) = refused_deploy
    assert served_after == served_before, (
        f"GET /v1/models/{MODEL} changed after a refused deploy: {served_before} -> {served_after}; "
        "a refused package must leave the service as it was")
    with https(sandbox) as client:
        response = client.post("/v1/predict", json=IRIS)
    assert response.status_code == 200, response.text
    assert response.json()["version"] == served_before["default_version"]


def test_nothing_of_the_refused_deploy_is_installed(sandbox, refused_deploy):
    _, (_, installed_before), (_, installed_after) = refused_deploy
    assert installed_after == installed_before, (
        f"{MODELS_DIR} on the host changed after a refused deploy: "
        f"added {sorted(set(installed_after) - set(installed_before))}, "
        f"removed {sorted(set(installed_before) - set(installed_after))}; "
        "the role must move packages into service only after every new one passed the gate")
    assert not [path for path in installed_after if "/refused-" in path or path.endswith(GOOD_VERSION)]


def test_the_good_package_passed_the_gate_on_the_host(refused_deploy):
    """The bad packages are copies of it: had the gate refused it too, the refusals would prove nothing."""
    run, _, _ = refused_deploy
    verify = task_output(run, "Verify the new packages")
    item = f"(item={MODEL}/{GOOD_VERSION})"
    assert any(line.startswith("ok:") and item in line for line in verify), (
        f"the gate did not pass the unchanged demo package {MODEL}/{GOOD_VERSION} on the host "
        f"(log: {run.log}); check the release's venv on the host with `python -m app.cli verify`:\n"
        + "\n".join(verify))


class _Call:
    """Pickles as `func(*args)`, called when the pickle is loaded; an argument that is a _Call is called first."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


UID_MARKER = "model package unpickled as uid"


@pytest.fixture(scope="module")
def uid_recording_deploy(sandbox, tmp_path_factory):
    """deploy-model.yml with a correctly hashed package whose pickle prints the uid that loads it (to the check's
    stdout, which -v shows); the check then refuses it (it holds no estimator)."""
    require_provisioned(sandbox)
    source = tmp_path_factory.mktemp("uid-recording-models")
    package = copy_as_version(ensure_demo_models() / MODEL / "1", source, "records-uid")
    joblib.dump(_Call(print, UID_MARKER, _Call(os.getuid)), package / MODEL_JOBLIB)
    resign(package)
    return run_playbook(sandbox, "deploy-model.yml", {"app_models_src": str(source)}, options=("-v",),
                        label="deploy-model-records-uid")


def test_packages_are_unpickled_as_the_service_user(sandbox, uid_recording_deploy):
    run = uid_recording_deploy
    uids = set(re.findall(re.escape(UID_MARKER) + r" (\d+)", run.output))
    service_uid = sandbox.ssh(app_host(sandbox), "id -u mlapi", check=True).stdout.strip()
    assert uids == {service_uid}, (
        f"the package check unpickled the package as uid {sorted(uids) or '(it did not run)'}, not as the service "
        f"user mlapi ({service_uid}) (log: {run.log}); a pickle runs code: load it as the unit would")
