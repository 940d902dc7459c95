"""One load balancer and two app hosts, from the same playbooks with a bigger inventory (issue 4).

scripts/sandbox/sandbox up --hosts 3 boots mlapi-sb1 (groups lb and redis) and mlapi-sb2, mlapi-sb3 (group
app) on one bridge; site.yml provisions them exactly as `make demo-cluster` does. These tests run after
every single-host test (tests/e2e/conftest.py orders them last), because bringing up three hosts replaces
the single-host sandbox.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Iterator

import pytest

from scripts.harness.deploy import (
    IRIS,
    PlaybookRun,
    continuous_client,
    ensure_demo_models,
    grpc_client,
    https,
    release_copy,
    run_playbook,
    wait_until_every_instance_serves,
)
from scripts.harness.sandbox import Sandbox, SandboxHost
from scripts.harness.servers import mlapi

pytestmark = pytest.mark.e2e

ACCESS_LOG = "/var/log/nginx/mlapi-access.log"
INSTANCES = 4  # two app hosts with two instances each
RATE_LIMIT = 30


class Cluster:
    def __init__(self, sandbox: Sandbox, first: PlaybookRun, second: PlaybookRun | None) -> None:
        self.sandbox = sandbox
        self.first = first
        self.second = second
        self.lb = sandbox.host(sandbox.ip)
        self.apps = [sandbox.host(ip) for ip in sandbox.app_ips]

    def require_provisioned(self) -> None:
        assert self.first.returncode == 0, f"site.yml failed (log: {self.first.log}):\n{self.first.tail()}"

    def upstreams_of(self, marker: str) -> list[str]:
        """The upstream address of every request whose client request ID starts with marker, from the lb's log."""
        log = self.sandbox.ssh(self.lb, f"grep -F {marker} {ACCESS_LOG}", check=True).stdout
        return [json.loads(line)["upstream_addr"] for line in log.splitlines()]

    def served_versions(self, host: SandboxHost, model: str = "iris") -> set[str]:
        """The versions every instance on an app host serves, asked on the host itself."""
        versions = set()
        for port in (8001, 8002):
            out = self.sandbox.ssh(host, f"curl -sS --fail http://{host.private_ip}:{port}/v1/models/{model}",
                                   check=True).stdout
            versions.add(tuple(sorted(v["version"] for v in json.loads(out)["versions"])))
        assert len(versions) == 1, f"the instances of {host.name} disagree: {versions}"
        return set(versions.pop())

    def current_release(self, host: SandboxHost) -> str:
        return self.sandbox.ssh(host, "readlink /opt/mlapi/current", check=True).stdout.strip()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    try:
        box = Sandbox.up(hosts=3)
    except Exception:
        Sandbox.down()
        raise
    ensure_demo_models()
    first = run_playbook(box, "site.yml", label="cluster-site-first")
    second = run_playbook(box, "site.yml", label="cluster-site-second") if first.returncode == 0 else None
    yield Cluster(box, first, second)
    if os.environ.get("MLAPI_KEEP_SANDBOX") != "1":
        Sandbox.down()


def test_site_yml_provisions_the_three_hosts_and_a_second_run_changes_nothing(cluster):
    cluster.require_provisioned()
    assert set(cluster.first.recap) == {h.name for h in cluster.sandbox.hosts}
    assert cluster.second is not None and cluster.second.returncode == 0, cluster.second and cluster.second.tail()
    assert cluster.second.changed == 0, (
        f"the second site.yml run changed {cluster.second.changed_tasks()} (log: {cluster.second.log})")


def test_https_requests_are_served_by_both_app_hosts(cluster):
    cluster.require_provisioned()
    marker = uuid.uuid4().hex
    with https(cluster.sandbox) as client:
        for n in range(4 * INSTANCES):
            response = client.post("/v1/predict", json=IRIS, headers={"X-Request-ID": f"{marker}{n:03d}"})
            assert response.status_code == 200, response.text
    hosts = Counter(addr.rsplit(":", 1)[0] for addr in cluster.upstreams_of(marker))
    assert set(hosts) == {app.private_ip for app in cluster.apps}, (
        f"NGINX on the lb host sent requests to {dict(hosts)}; expected both app hosts "
        f"{[a.private_ip for a in cluster.apps]} (nginx_upstream_servers comes from the app group's private_ip)")


def test_app_hosts_listen_on_their_private_address_and_only_the_lb_may_connect(cluster):
    cluster.require_provisioned()
    app, other = cluster.apps
    listening = cluster.sandbox.ssh(app, "ss -Hltn 'sport = :8001'", check=True).stdout.split()
    assert f"{app.private_ip}:8001" in listening, f"mlapi@1 on {app.name} listens on {listening}"
    probe = f"curl -sS -o /dev/null -w '%{{http_code}}' --max-time 3 http://{app.private_ip}:8001/healthz"
    from_lb = cluster.sandbox.ssh(cluster.lb, probe)
    assert from_lb.stdout == "200", f"the lb host cannot reach {app.name}: {from_lb.stdout}{from_lb.stderr}"
    from_other_app = cluster.sandbox.ssh(other, probe)
    assert from_other_app.stdout != "200", (
        f"{other.name} reached the service port of {app.name}; the firewall must open it to the lb hosts only")
    # gRPC (850N) is open to the lb host alone too (Prometheus scrapes HTTP only), and NGINX reaches it.
    with grpc_client(cluster.sandbox) as client:
        assert client.is_model_ready("iris")
    grpc_probe = f"timeout 3 bash -c 'exec 3<>/dev/tcp/{app.private_ip}/8501' && echo open"
    assert cluster.sandbox.ssh(cluster.lb, grpc_probe).stdout.strip() == "open"
    assert cluster.sandbox.ssh(other, grpc_probe).stdout.strip() != "open"
    # The shared Redis answers the app hosts, and only with the password.
    no_password = cluster.sandbox.ssh(
        app,
        f"exec 3<>/dev/tcp/{cluster.lb.private_ip}/6379 && printf 'PING\\r\\n' >&3 "
        "&& read -t 5 -r line <&3; echo $line",
        timeout=30,
    )
    assert "NOAUTH" in no_password.stdout, f"Redis answered an unauthenticated PING with {no_password.stdout!r}"


def test_prometheus_on_the_lb_host_scrapes_every_instance_and_node_exporter(cluster):
    cluster.require_provisioned()
    expected = {f"{app.private_ip}:{port}" for app in cluster.apps for port in (8001, 8002)}
    expected_nodes = {"127.0.0.1:9100"} | {f"{app.private_ip}:9100" for app in cluster.apps}

    def up(job: str) -> set[str]:
        # The targets Prometheus scrapes now, not `up` series: those of the package's default
        # configuration (localhost:9100), scraped before the role's replaced it, stay queryable
        # for the 5-minute lookback after the restart.
        out = cluster.sandbox.ssh(
            cluster.lb, "curl -sS --fail 'http://127.0.0.1:9090/api/v1/targets?state=active'", check=True
        ).stdout
        return {
            target["labels"]["instance"]
            for target in json.loads(out)["data"]["activeTargets"]
            if target["labels"].get("job") == job and target["health"] == "up"
        }

    deadline = time.monotonic() + 120
    while (up("mlapi"), up("node")) != (expected, expected_nodes) and time.monotonic() < deadline:
        time.sleep(3)
    assert (up("mlapi"), up("node")) == (expected, expected_nodes)
    # The node exporter answers the monitoring host only.
    app, other = cluster.apps
    probe = f"curl -sS -o /dev/null -w '%{{http_code}}' --max-time 3 http://{app.private_ip}:9100/metrics"
    assert cluster.sandbox.ssh(other, probe).stdout != "200", f"{other.name} reached the node exporter of {app.name}"


def test_rolling_model_deploy_under_load_reaches_both_hosts_without_a_failed_request(cluster, tmp_path):
    cluster.require_provisioned()
    wait_until_every_instance_serves(cluster.sandbox, instances=INSTANCES)
    packages = tmp_path / "models"
    mlapi("train-demo", "--models-dir", packages, "--version", "2", "--only", "iris", check=True)
    with continuous_client(cluster.sandbox) as load:
        run = run_playbook(
            cluster.sandbox, "deploy-model.yml", {"app_models_src": str(packages)}, label="cluster-deploy-model"
        )
    assert run.returncode == 0, f"deploy-model.yml failed (log: {run.log}):\n{run.tail()}"
    for app in cluster.apps:
        assert "2" in cluster.served_versions(app), f"{app.name} does not serve iris version 2"
    assert load.result.failed == 0, load.result.summary()
    assert load.result.versions["2"] > 0, load.result.summary()


def test_a_broken_release_stops_at_the_first_host_which_is_rolled_back(cluster, tmp_path):
    cluster.require_provisioned()
    wait_until_every_instance_serves(cluster.sandbox, instances=INSTANCES)
    first, second = cluster.apps
    before = {app.name: cluster.current_release(app) for app in cluster.apps}
    release = release_copy(tmp_path / "release", broken=True)
    with continuous_client(cluster.sandbox) as load:
        run = run_playbook(
            cluster.sandbox,
            "deploy-release.yml",
            {"app_src_dir": str(release), "app_release_id": "cluster-broken", "app_gate_retries": 5},
            label="cluster-deploy-broken-release",
        )
    assert run.returncode != 0, f"a broken release deployed without an error (log: {run.log})"
    assert cluster.current_release(first) == before[first.name], "the first host was not rolled back"
    assert "failed its gate" in run.output, run.tail()
    never = cluster.sandbox.ssh(second, "test -e /opt/mlapi/releases/cluster-broken && echo present").stdout
    assert never.strip() == "", f"{second.name} received the broken release; the roll must stop at the first host"
    assert cluster.current_release(second) == before[second.name]
    assert load.result.failed == 0, load.result.summary()


def test_powering_off_an_app_host_under_load_fails_no_request(cluster):
    cluster.require_provisioned()
    wait_until_every_instance_serves(cluster.sandbox, instances=INSTANCES)
    victim = cluster.apps[1]
    with continuous_client(cluster.sandbox, min_requests=300) as load:
        cluster.sandbox.power_off(victim.name)
    print(f"power-off of {victim.name}: {load.result.summary()}")
    assert load.result.failed == 0, f"while {victim.name} was powered off: {load.result.summary()}"
    cluster.sandbox.start(victim.name)


def test_a_rate_limit_admits_exactly_n_across_both_app_hosts(cluster):
    cluster.require_provisioned()
    run = run_playbook(
        cluster.sandbox,
        "site.yml",
        {"app_env": {"MLAPI_RATE_LIMIT_PREDICT": f"{RATE_LIMIT}/hour"}},
        label="cluster-rate-limit",
        options=("--tags", "app"),
    )
    assert run.returncode == 0, f"site.yml --tags app failed (log: {run.log}):\n{run.tail()}"
    # No warm-up requests here: each would count. The play's settle time after each restart already put
    # every instance back into NGINX's rotation.
    marker = uuid.uuid4().hex
    statuses = Counter()
    with https(cluster.sandbox) as client:
        for n in range(RATE_LIMIT + 10):
            response = client.post("/v1/predict", json=IRIS, headers={"X-Request-ID": f"{marker}{n:03d}"})
            statuses[response.status_code] += 1
    hosts = Counter(addr.rsplit(":", 1)[0] for addr in cluster.upstreams_of(marker))
    assert set(hosts) == {app.private_ip for app in cluster.apps}, f"requests reached only {dict(hosts)}"
    assert statuses == {200: RATE_LIMIT, 429: 10}, (
        f"statuses {dict(statuses)} for {RATE_LIMIT + 10} predictions under a limit of {RATE_LIMIT}/hour: the limit "
        "must hold across both app hosts together (they share the Redis on the lb host)"
    )
