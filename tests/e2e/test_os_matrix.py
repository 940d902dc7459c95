"""Every other supported OS, provisioned from scratch: Ubuntu 22.04, Debian 12 and Debian 13.

The rest of the suite runs on Ubuntu 24.04, the sandbox's default. Here each other OS gets a sandbox of its
own (its own namespaces, addresses, ACME CA and state), all booted and provisioned at once, each host reached
as its cloud image's login user with sudo. The model packages are built with the host's own Python feature
release (the service's check refuses another), in a venv of that Python (scripts/harness/client_envs.py). On each host:
site.yml from a fresh disk, a second run that changes nothing, an HTTPS prediction with a certificate Pebble
issued through HTTP-01, the redirect from http://, a renewal dry run, the unit's sandboxing with no option its
systemd does not know, the firewall, `--check --diff` with no change, and a power cycle that comes back serving
the same certificate.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from scripts.harness.client_envs import packager_python
from scripts.harness.deploy import ROOT, PlaybookRun, https, renewal_command, run_playbook
from scripts.harness.samples import IRIS
from scripts.harness.sandbox import Sandbox

pytestmark = pytest.mark.e2e

# OS -> the Python feature release its release venv runs (python3, or python3.11 on Ubuntu 22.04).
MATRIX = {"ubuntu-22.04": "3.11", "debian-12": "3.11", "debian-13": "3.13"}
WORK = ROOT / ".cache" / "e2e" / "matrix"


@dataclass
class MatrixHost:
    os_name: str
    sandbox: Sandbox | None = None
    first: PlaybookRun | None = None
    second: PlaybookRun | None = None
    check: PlaybookRun | None = None
    error: str = ""

    @property
    def host(self):
        return self.sandbox.hosts[0]

    def require_provisioned(self) -> None:
        assert not self.error, f"{self.os_name}: {self.error}"
        assert self.first is not None and self.first.returncode == 0, (
            f"site.yml failed on {self.os_name} (log: {self.first.log}):\n{self.first.tail()}")


def settings(index: int, os_name: str) -> dict[str, str]:
    """The MLAPI_SANDBOX_* variables of the os_name sandbox: a name, ranges and state of its own."""
    return {
        "MLAPI_SANDBOX_NAME": f"mx{index}",
        "MLAPI_SANDBOX_SUBNET": f"10.9{index}.0.0/24",
        "MLAPI_SANDBOX_LOOPBACK": f"127.9{index}.0.0/24",
        "MLAPI_SANDBOX_STATE": str(WORK / os_name / "sandbox"),
    }


def models_for(os_name: str) -> Path:
    """The iris demo package, built afresh (seconds) with the Python of os_name's hosts and the current pins."""
    models = WORK / os_name / "models"
    python = packager_python(MATRIX[os_name])
    built = subprocess.run(
        [str(python), "-m", "app.cli", "train-demo", "--force", "--models-dir", str(models), "--only", "iris"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
        stdin=subprocess.DEVNULL, timeout=600, check=False)
    if built.returncode != 0:
        raise RuntimeError(f"train-demo with Python {MATRIX[os_name]} failed:\n{built.stdout}{built.stderr}")
    return models


def bring_up(index: int, os_name: str) -> MatrixHost:
    matrix_host = MatrixHost(os_name)
    try:
        box = matrix_host.sandbox = Sandbox.up(hosts=1, os_name=os_name, settings=settings(index, os_name))
        extra = {"app_models_src": str(models_for(os_name))}
        matrix_host.first = run_playbook(box, "site.yml", extra, label=f"matrix-{os_name}-first")
        if matrix_host.first.returncode == 0:
            matrix_host.second = run_playbook(box, "site.yml", extra, label=f"matrix-{os_name}-second")
            # Here too, so that the three hosts' runs overlap.
            matrix_host.check = run_playbook(box, "site.yml", extra, label=f"matrix-{os_name}-check",
                                             options=("--check", "--diff"))
    except Exception as exc:
        matrix_host.error = f"{type(exc).__name__}: {exc}"
    return matrix_host


@pytest.fixture(scope="module")
def matrix() -> Iterator[dict[str, MatrixHost]]:
    keep = os.environ.get("MLAPI_KEEP_SANDBOX") == "1"
    names = list(MATRIX)
    try:
        # The packager venvs first, one at a time: two builds of one venv would clash.
        for minor in sorted(set(MATRIX.values())):
            packager_python(minor)
        with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
            hosts = dict(zip(names, pool.map(bring_up, range(1, len(names) + 1), names), strict=True))
        yield hosts
    finally:
        if not keep:
            for index, os_name in enumerate(names, 1):
                Sandbox.down(settings(index, os_name))


@pytest.fixture(params=list(MATRIX))
def on(request, matrix) -> MatrixHost:
    """The provisioned host of one OS of the matrix."""
    matrix_host = matrix[request.param]
    matrix_host.require_provisioned()
    return matrix_host


def served_serial(on: MatrixHost) -> str:
    box = on.sandbox
    context = ssl.create_default_context(cafile=str(box.ca))
    with socket.create_connection((box.ip, box.https_port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=box.domain) as tls:
        cert = tls.getpeercert()
    issuer = dict(pair[0] for pair in cert["issuer"])
    assert "Pebble" in issuer.get("commonName", ""), f"{on.os_name}: issuer {issuer}, expected Pebble's intermediate"
    assert [v for k, v in cert["subjectAltName"] if k == "DNS"] == [box.domain]
    return cert["serialNumber"]


def test_the_host_is_the_os_and_the_service_runs_the_python_the_packages_were_built_with(on):
    release = on.sandbox.ssh(on.host, ". /etc/os-release && echo $ID-$VERSION_ID", check=True).stdout.strip()
    assert release == on.os_name
    python = on.sandbox.ssh(on.host, "/opt/mlapi/current/venv/bin/python -c "
                            "'import platform; print(platform.python_version())'", check=True).stdout.strip()
    assert python.startswith(MATRIX[on.os_name] + "."), f"{on.os_name} runs Python {python}"


def test_a_second_site_run_changes_nothing(on):
    assert on.second is not None and on.second.returncode == 0, on.second.tail() if on.second else "no second run"
    assert on.second.changed == 0, f"{on.os_name}: {on.second.changed_tasks()} (log: {on.second.log})"


def test_an_https_prediction_is_served_with_a_certificate_pebble_issued(on):
    served_serial(on)
    with https(on.sandbox) as client:
        response = client.post("/v1/predict", json=IRIS)
    assert response.status_code == 200, response.text
    assert response.json()["prediction"] == "setosa"


def test_http_redirects_to_https_with_308(on):
    box = on.sandbox
    response = httpx.get(f"http://{box.ip}:{box.http_port}/v1/models?x=1", headers={"Host": box.domain}, timeout=10)
    assert response.status_code == 308
    assert response.headers["location"] == f"https://{box.domain}/v1/models?x=1"


def test_a_renewal_dry_run_succeeds_against_the_acme_ca(on):
    # --server: a dry run goes to Let's Encrypt's staging server unless told otherwise.
    command = renewal_command(on.sandbox.domain, "--dry-run", "--server", on.sandbox.env["SANDBOX_ACME_DIRECTORY"])
    result = on.sandbox.ssh(on.host, command, timeout=300)
    assert result.returncode == 0, f"{on.os_name}: certbot renew --dry-run failed:\n{result.stdout}\n{result.stderr}"


def test_the_units_systemd_knows_every_option_and_exposure_is_at_most_2(on):
    verify = on.sandbox.ssh(on.host, "systemd-analyze verify mlapi@1.service 2>&1")
    unknown = [line for line in verify.stdout.splitlines() if re.search(r"[Uu]nknown|ignoring", line)]
    assert not unknown, f"{on.os_name}'s systemd drops these settings of the unit:\n" + "\n".join(unknown)
    security = on.sandbox.ssh(on.host, "systemd-analyze security --no-pager mlapi@1.service", check=True).stdout
    exposure = float(re.search(r"Overall exposure level for \S+: (\d+\.\d+)", security).group(1))
    assert exposure <= 2.0, f"{on.os_name}: mlapi@1 exposure {exposure}"


def test_the_firewall_allows_only_ssh_http_https(on):
    status = on.sandbox.ssh(on.host, "ufw status verbose", check=True).stdout
    assert "Status: active" in status and "Default: deny (incoming)" in status
    ports = {m.group(1) for m in re.finditer(r"^(\S+(?: \(v6\))?)\s+ALLOW IN\s", status, re.MULTILINE)}
    assert ports == {"22/tcp", "80/tcp", "443/tcp", "22/tcp (v6)", "80/tcp (v6)", "443/tcp (v6)"}, status


def test_check_mode_with_diff_reports_no_change(on):
    run = on.check
    assert run is not None and run.returncode == 0, run.tail() if run else "no check run"
    assert run.changed == 0, f"{on.os_name}: {run.changed_tasks()} (log: {run.log})"


def test_a_power_cycle_comes_back_serving_the_same_certificate(on):
    before = served_serial(on)
    on.sandbox.power_off(on.host.name)
    on.sandbox.start(on.host.name)
    deadline_attempts = 60
    with https(on.sandbox) as client:
        for _ in range(deadline_attempts):
            try:
                response = client.post("/v1/predict", json=IRIS)
                if response.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            subprocess.run(["sleep", "1"], check=True)
        else:
            raise AssertionError(f"{on.os_name}: no prediction within {deadline_attempts} s of the boot")
    assert response.json()["prediction"] == "setosa"
    assert served_serial(on) == before
