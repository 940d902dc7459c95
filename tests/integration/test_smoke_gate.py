"""The app role's smoke gate (deploy/ansible/roles/app/tasks/smoke.yml), run by ansible-playbook against a real
gunicorn with 2 workers: every version that takes traffic is sent the row its manifest records and must give the
answer recorded when it was built. The recorded answer is overridden with extra vars (which outrank the task's own
vars) to prove that a different answer fails the gate, and that a tie within the tolerance does not.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.harness.servers import ROOT, VENV_BIN, Gunicorn, gunicorn
from tests.model_packages import copy_as_version, read_manifest, write_manifest

pytestmark = pytest.mark.integration

SMOKE_TASKS = ROOT / "deploy" / "ansible" / "roles" / "app" / "tasks" / "smoke.yml"
SMOKE_TASK = "Send the smoke row of every model version to mlapi@"


@pytest.fixture(scope="module")
def served(demo_models: Path, tmp_path_factory) -> Iterator[tuple[Gunicorn, Path]]:
    """The four demo models, and iris version 2 as a package from before answers were recorded."""
    models = tmp_path_factory.mktemp("smoke-models")
    for name in ("iris", "iris-logreg", "diabetes", "churn"):
        copy_as_version(demo_models / name / "1", models, "1")
    older = copy_as_version(demo_models / "iris" / "1", models, "2")
    write_manifest(older, {k: v for k, v in read_manifest(older).items() if k != "smoke"})
    env = {"MLAPI_MODELS_DIR": str(models), "MLAPI_DEFAULT_MODEL": "iris",
           "MLAPI_MODELS": json.dumps({"iris": {"versions": {"1": 50, "2": 50}}})}
    with gunicorn(env, workers=2) as server:
        yield server, models


def _gate(server: Gunicorn, tmp_path: Path, **extra_vars) -> tuple[int, list[dict]]:
    """Run the smoke tasks against the server; (return code, one result per version sent its row)."""
    playbook = tmp_path / "smoke.yml"
    playbook.write_text(f"""---
- name: Smoke gate against a running service
  hosts: localhost
  connection: local
  gather_facts: false
  vars:
    __app_instance_url: "http://127.0.0.1:"
    __app_instance: "{server.port}"
    __app_gate_headers: {{}}
    ansible_python_interpreter: {VENV_BIN / "python"}
  tasks:
    - name: The role's smoke gate
      ansible.builtin.import_tasks: {SMOKE_TASKS}
    - name: Fail when the gate failed
      ansible.builtin.assert:
        that: [__app_served is succeeded, __app_smoke is succeeded]
""")
    env = {**os.environ, "ANSIBLE_STDOUT_CALLBACK": "ansible.posix.json", "ANSIBLE_LOCALHOST_WARNING": "false",
           "ANSIBLE_INVENTORY_UNPARSED_WARNING": "false"}
    env.pop("ANSIBLE_CONFIG", None)
    command = [str(VENV_BIN / "ansible-playbook"), "-i", "localhost,", str(playbook)]
    if extra_vars:
        command += ["-e", json.dumps(extra_vars)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"ansible-playbook printed no JSON report:\n{done.stdout}\n{done.stderr}") from None
    tasks = [t for play in report["plays"] for t in play["tasks"] if t["task"]["name"].startswith(SMOKE_TASK)]
    assert len(tasks) == 1, f"the smoke task did not run: {done.stdout[-3000:]}"
    return done.returncode, tasks[0]["hosts"]["localhost"]["results"]


def _versions(results: list[dict]) -> dict[str, tuple[bool, object]]:
    return {r["item"][0]["name"] + "/" + r["item"][1]["version"]: (r.get("failed", False), r["json"]["prediction"])
            for r in results}


def test_every_version_answers_its_recorded_row_with_the_recorded_answer(served, tmp_path):
    server, models = served
    returncode, results = _gate(server, tmp_path)
    recorded = {f"{name}/1": read_manifest(models / name / "1")["smoke"]["prediction"]
                for name in ("iris", "iris-logreg", "diabetes", "churn")}
    assert returncode == 0
    answered = _versions(results)
    # The labels as recorded; the regressor's value within the recorded tolerance (ONNX serves it in float32).
    assert {k: v for k, v in answered.items() if k != "iris/2"} == {
        k: (False, pytest.approx(v, rel=1e-5) if k == "diabetes/1" else v) for k, v in recorded.items()}
    # The package from before answers were recorded is sent a row of zeros and must answer 200.
    assert answered["iris/2"][0] is False
    sent = {r["item"][0]["name"] + "/" + r["item"][1]["version"]: r["invocation"]["module_args"]["body"]["features"]
            for r in results}
    assert sent["churn/1"] == read_manifest(models / "churn" / "1")["smoke"]["features"]
    assert sent["iris/2"] == dict.fromkeys(("sepal_length", "sepal_width", "petal_length", "petal_width"), 0)


def _recorded(models: Path, name: str, **changes) -> dict:
    return {**read_manifest(models / name / "1")["smoke"], **changes}


def test_another_label_fails_the_gate(served, tmp_path):
    server, models = served
    wrong = _recorded(models, "iris-logreg", prediction="setosa")  # it answers versicolor (p 0.84 against 0.14)
    returncode, results = _gate(server, tmp_path, __recorded=wrong)
    assert returncode != 0
    assert _versions(results)["iris-logreg/1"][0] is True


def test_another_label_within_a_tie_of_the_tolerance_passes_it(served, tmp_path):
    server, models = served
    recorded = _recorded(models, "iris-logreg")
    p = recorded["probabilities"]
    gap = abs(p["versicolor"] - p["setosa"])
    tie = {**recorded, "prediction": "setosa", "tolerance": gap + 0.01}
    assert _versions(_gate(server, tmp_path, __recorded=tie)[1])["iris-logreg/1"][0] is False
    no_tie = {**recorded, "prediction": "setosa", "tolerance": gap - 0.01}
    assert _versions(_gate(server, tmp_path, __recorded=no_tie)[1])["iris-logreg/1"][0] is True


def test_a_regressor_value_beyond_the_relative_tolerance_fails_the_gate(served, tmp_path):
    server, models = served
    recorded = _recorded(models, "diabetes")
    near = {**recorded, "prediction": recorded["prediction"] * (1 + 1e-7)}
    far = {**recorded, "prediction": recorded["prediction"] * 1.01}
    assert _versions(_gate(server, tmp_path, __recorded=near)[1])["diabetes/1"][0] is False
    assert _versions(_gate(server, tmp_path, __recorded=far)[1])["diabetes/1"][0] is True
