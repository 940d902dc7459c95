"""Chaos under load (issue 6, check 6): while a client sends predictions continuously, each fault or maintenance
action below loses no request (no 5xx, no connection error). The figures of each action (requests, statuses,
longest stall) are printed and kept in .cache/e2e/chaos.json.

Model and release deploys under load are tested in test_deploy_upgrades.py, which records their figures too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack

import pytest
from test_deploy_resilience import main_pid
from test_deploy_tls_renewal import serial_after_renewal, served_serial

from scripts.harness.deploy import (
    app_host,
    continuous_client,
    forced_renewal_command,
    require_provisioned,
    run_playbook,
    wait_until_every_instance_serves,
)
from scripts.harness.load import LoadResult, record_load

pytestmark = pytest.mark.e2e

UNIT = "mlapi@1.service"
# Below the edge limit of 20 requests/s per address and the service's 1200/minute, so every 429 is a failure.
INTERVAL = 0.07
REQUESTS_BEFORE_THE_ACTION = 50
REQUESTS_PER_ACTION = 400
RECOVERY_TIMEOUT = 120


def processes(sandbox, host, unit: str) -> tuple[int, set[int]]:
    """The main PID of a unit on a sandbox host and its children's PIDs (gunicorn's or NGINX's workers)."""
    master = main_pid(sandbox, host, unit)
    return master, {int(p) for p in sandbox.ssh(host, f"pgrep -P {master}").stdout.split()}


def wait_for(what: str, condition: Callable[[], bool], timeout: float = RECOVERY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    pytest.fail(f"{what} did not happen within {timeout:.0f}s")


def instance_ready(sandbox, host) -> bool:
    status = sandbox.ssh(host, "curl -sS -o /dev/null -w '%{http_code}' http://127.0.0.1:8001/readyz").stdout
    return status == "200"


def kill_one_worker(sandbox) -> None:
    host = app_host(sandbox)
    master, workers = processes(sandbox, host, UNIT)
    assert workers, f"{UNIT} (master {master}) has no workers"
    victim = min(workers)
    sandbox.ssh(host, f"kill -9 {victim}", check=True)

    def replaced() -> bool:  # the master noticed the dead worker and forked another
        now_master, now = processes(sandbox, host, UNIT)
        assert now_master == master, f"killing one worker of {UNIT} took down its master"
        return victim not in now and len(now) == len(workers)

    wait_for(f"a replacement for worker {victim} of {UNIT}", replaced)


def kill_the_master(sandbox) -> None:
    host = app_host(sandbox)
    master, workers = processes(sandbox, host, UNIT)
    sandbox.ssh(host, f"kill -9 {master}", check=True)

    def restarted() -> bool:  # by systemd (Restart=on-failure); the new master forks its workers, then is ready
        now_master, now = processes(sandbox, host, UNIT)
        return now_master not in (0, master) and len(now) == len(workers) and instance_ready(sandbox, host)

    wait_for(f"{UNIT} restarted by systemd after kill -9 of its master", restarted)


def reload_gracefully(sandbox, host, unit: str) -> None:
    """`systemctl reload`, then wait until every old worker has exited (each finishes its requests first)."""
    master, workers = processes(sandbox, host, unit)
    sandbox.ssh(host, f"systemctl reload {unit}", check=True)

    def replaced() -> bool:
        now_master, now = processes(sandbox, host, unit)
        assert now_master == master, f"systemctl reload {unit} restarted its main process"
        return len(now) == len(workers) and not now & workers

    wait_for(f"new workers of {unit} after a reload", replaced)


def reload_the_service(sandbox) -> None:
    # HUP: the master reloads the models, forks new workers, then stops the old ones gracefully.
    reload_gracefully(sandbox, app_host(sandbox), UNIT)


def reload_nginx(sandbox) -> None:
    reload_gracefully(sandbox, sandbox.host(sandbox.ip), "nginx.service")


def renew_the_certificate(sandbox) -> None:
    host = sandbox.host(sandbox.ip)
    before = served_serial(sandbox)
    result = sandbox.ssh(host, forced_renewal_command(sandbox.domain), timeout=300)
    assert result.returncode == 0, f"certbot renew failed:\n{result.stdout}\n{result.stderr}"
    assert serial_after_renewal(sandbox, before) != before, (
        "HTTPS still serves the old certificate: the deploy hook did not reload NGINX"
    )


STORE_UNIT = "redis-server.service"
# Long enough for hundreds of predictions to meet the store's fault, and for the breaker to try it again.
STORE_FAULT_SECONDS = 12


def store_status(sandbox, host) -> str:
    return sandbox.ssh(host, "curl -sS -o /dev/null -w '%{http_code}' http://127.0.0.1:8001/healthz/store").stdout


def _store_fault(sandbox, begin: str, end: str) -> None:
    """Begin a fault of the shared Redis, check the instance stays ready while it lasts, then end it."""
    host = sandbox.host(sandbox.ip)  # the redis group's host
    pid = main_pid(sandbox, host, STORE_UNIT)
    sandbox.ssh(host, begin.format(pid=pid), check=True)
    try:
        wait_for(
            "/healthz/store to say the store does not answer", lambda: store_status(sandbox, host) == "503", timeout=30
        )
        deadline = time.monotonic() + STORE_FAULT_SECONDS
        while time.monotonic() < deadline:
            assert instance_ready(sandbox, app_host(sandbox)), "an instance turned unready over the store's fault"
            time.sleep(1)
    finally:
        sandbox.ssh(host, end.format(pid=pid), check=True)
    wait_for("/healthz/store to say the store answers again", lambda: store_status(sandbox, host) == "200")


def stop_and_start_the_store(sandbox) -> None:
    _store_fault(sandbox, f"systemctl stop {STORE_UNIT}", f"systemctl start {STORE_UNIT}")


def hang_the_store(sandbox) -> None:
    # SIGSTOP: Redis keeps its socket, the kernel accepts connections, nothing answers.
    _store_fault(sandbox, "kill -STOP {pid}", "kill -CONT {pid}")


def save_the_renewed_lineage(sandbox) -> None:
    """A renewal by hand, like one by certbot.timer, leaves the controller's copy of the lineage behind the host's;
    the next run of the certbot role saves it. Run it, so that later tests meet a host and a copy that agree."""
    run = run_playbook(sandbox, "site.yml", options=("--tags", "certbot"), label="chaos-certbot-save")
    assert run.returncode == 0, f"site.yml --tags certbot failed (log: {run.log}):\n{run.tail()}"
    assert any(task.startswith("certbot : Save the certificate") for task in run.changed_tasks()), (
        f"the renewed lineage was not saved to the controller (log: {run.log}): {run.changed_tasks()}"
    )


ACTIONS: dict[str, Callable] = {
    "kill -9 of one gunicorn worker of mlapi@1": kill_one_worker,
    "kill -9 of the gunicorn master of mlapi@1": kill_the_master,
    "systemctl reload mlapi@1": reload_the_service,
    "systemctl reload nginx": reload_nginx,
    "certificate renewal with its deploy hook": renew_the_certificate,
    "Redis stopped, then started": stop_and_start_the_store,
    "Redis hung (SIGSTOP), then resumed": hang_the_store,
}
# The actions that reload NGINX once: a request that meets an old worker closing its idle keep-alive connection at
# that instant is lost unread (LoadResult.failures_beyond_reloads), at most one per reload for the one client.
NGINX_RELOADS = {"systemctl reload nginx": 1, "certificate renewal with its deploy hook": 1}
# What brings the host and the controller back in step after an action, once the load has ended.
AFTERWARDS: dict[str, Callable] = {"certificate renewal with its deploy hook": save_the_renewed_lineage}


@pytest.mark.parametrize("action", list(ACTIONS))
def test_no_request_fails_during(sandbox, action):
    require_provisioned(sandbox)
    # An earlier action may have left an instance out of NGINX's rotation for its fail_timeout.
    wait_until_every_instance_serves(sandbox)
    with continuous_client(sandbox, interval=INTERVAL, min_requests=REQUESTS_PER_ACTION) as load:
        wait_for(
            f"{REQUESTS_BEFORE_THE_ACTION} requests before the action",
            lambda: load.result.sent >= REQUESTS_BEFORE_THE_ACTION,
            timeout=60,
        )
        ACTIONS[action](sandbox)
    record_load(action, load.result)
    if action in AFTERWARDS:
        AFTERWARDS[action](sandbox)
    assert load.result.sent >= REQUESTS_PER_ACTION, load.result.summary()
    assert load.result.failures_beyond_reloads(NGINX_RELOADS.get(action, 0)) == [], (
        f"{action} lost requests: {load.result.summary()}. Find where they were lost (NGINX's error log on the lb "
        "host, `journalctl -u mlapi@1` on the app host) and fix the kit: the unit (deploy/systemd), gunicorn "
        "(app/gunicorn_conf.py) or NGINX's retries (deploy/nginx/snippets/location/retry-predictions.conf.j2)"
    )


# A reload storm: many keep-alive clients that never retry, NGINX reloaded again and again. Their pace stays under
# the edge limit (20 requests/s per address, and every client shares the relay's address).
STORM_CLIENTS = 64
STORM_CLIENT_INTERVAL = 4.0
STORM_SECONDS = 60
STORM_RELOAD_PERIOD = 2.0


def test_a_reload_storm_of_nginx_answers_every_request_it_reads(sandbox):
    """Every request that NGINX reads is answered with 200 while it reloads every 2 s for 60 s under 64 keep-alive
    clients. A request that meets an old worker closing its idle connection gets no answer at all: NGINX closes
    idle keep-alive connections when a worker retires (nginx/nginx#437), which no setting changes; those are
    counted and kept in .cache/e2e/chaos.json, not hidden."""
    require_provisioned(sandbox)
    wait_until_every_instance_serves(sandbox)
    host = sandbox.host(sandbox.ip)
    clients = [
        continuous_client(sandbox, interval=STORM_CLIENT_INTERVAL, min_requests=1, max_seconds=STORM_SECONDS + 120)
        for _ in range(STORM_CLIENTS)
    ]
    reloads = 0
    with ExitStack() as running:
        for client in clients:  # spread over one interval, so the edge sees a steady rate
            running.enter_context(client)
            time.sleep(STORM_CLIENT_INTERVAL / STORM_CLIENTS)
        deadline = time.monotonic() + STORM_SECONDS
        while time.monotonic() < deadline:
            sandbox.ssh(host, "systemctl reload nginx", check=True)
            reloads += 1
            time.sleep(STORM_RELOAD_PERIOD)
    result = LoadResult.merged([client.result for client in clients])
    action = f"NGINX reloaded {reloads} times in {STORM_SECONDS} s under {STORM_CLIENTS} keep-alive clients"
    record_load(action, result)
    unanswered = result.connection_failures
    print(f"{action}: {len(unanswered)} of {result.sent} requests met a closing idle connection")
    answered_badly = [f for f in result.failures if f not in unanswered]
    assert result.sent >= STORM_CLIENTS * STORM_SECONDS / STORM_CLIENT_INTERVAL / 2, result.summary()
    assert answered_badly == [], f"NGINX answered requests with errors during its reloads: {result.summary()}"
