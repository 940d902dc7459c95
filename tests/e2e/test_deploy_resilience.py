"""kill -9 of one service instance under load: systemd restarts it, the other instance serves meanwhile
(issue 3, test 8)."""

from __future__ import annotations

import time

import pytest

from scripts.harness.deploy import app_host, continuous_client, require_provisioned, wait_until_every_instance_serves

pytestmark = pytest.mark.e2e


def main_pid(sandbox, host, unit: str) -> int:
    return int(sandbox.ssh(host, f"systemctl show -p MainPID --value {unit}", check=True).stdout.strip())


def test_killed_instance_is_restarted_and_requests_keep_succeeding(sandbox):
    require_provisioned(sandbox)
    host = app_host(sandbox)
    unit = "mlapi@1.service"
    wait_until_every_instance_serves(sandbox)
    killed = main_pid(sandbox, host, unit)
    assert killed > 0, f"{unit} has no main process"
    with continuous_client(sandbox) as load:
        sandbox.ssh(host, f"kill -9 {killed}", check=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            state = sandbox.ssh(host, f"systemctl is-active {unit}").stdout.strip()
            pid = main_pid(sandbox, host, unit)
            ready = sandbox.ssh(host, "curl -fsS -o /dev/null -w '%{http_code}' http://127.0.0.1:8001/readyz").stdout
            if state == "active" and pid not in (0, killed) and ready == "200":
                break
            time.sleep(1)
        else:
            pytest.fail(f"{unit} did not come back within 120 s (state {state}, pid {pid})")
    restarts = sandbox.ssh(host, f"systemctl show -p NRestarts --value {unit}", check=True).stdout.strip()
    assert int(restarts) >= 1
    assert load.result.failed == 0, load.result.summary()
