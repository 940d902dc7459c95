"""Failover through the NGINX upstream: two real gunicorn instances, one or both stopped."""

from __future__ import annotations

import json

import pytest
from nginx_helpers import free_port, make_models, running_edge, start_gunicorn

pytestmark = pytest.mark.integration

REQUESTS = 60


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("failover")
    models = make_models(root / "models")
    ports = [free_port(), free_port()]
    instances = {port: start_gunicorn(root / f"gunicorn-{port}", models, port) for port in ports}

    def restart(port):
        instances[port].stop()
        instances[port] = start_gunicorn(root / f"gunicorn-{port}", models, port)

    try:
        # Failover, not the edge limit, is under test: a fast machine sends these predictions faster than
        # the default 20/s with a burst of 40.
        for edge in running_edge(root / "nginx", ports, nginx_rate_limit_rps=1000, nginx_rate_limit_burst=1000):
            yield edge, instances, restart
    finally:
        for instance in instances.values():
            instance.stop()


@pytest.fixture
def stop(cluster):
    """Stop instances by upstream port; they are started again after the test."""
    _, instances, restart = cluster
    stopped = []

    def _stop(port):
        instances[port].stop()
        stopped.append(port)

    yield _stop
    for port in stopped:
        restart(port)


def test_predictions_survive_a_dead_instance(cluster, stop):
    edge, instances, _ = cluster
    warm = [edge.predict().status for _ in range(10)]  # kept-alive connections to both instances
    dead = edge.upstream_ports[1]
    stop(dead)
    log_start = len(edge.log_lines())
    statuses = [edge.predict().status for _ in range(REQUESTS)]
    assert warm == [200] * 10
    assert statuses == [200] * REQUESTS, f"failed requests: {[s for s in statuses if s != 200]}"
    # The dead instance was really tried and the request retried on the live one.
    retried = [json.loads(line) for line in edge.log_lines()[log_start:]]
    assert any(f"127.0.0.1:{dead}" in entry["upstream_addr"] and ", " in entry["upstream_addr"] for entry in retried)


def test_no_live_instance_gets_502_json_with_security_headers(cluster, stop):
    edge, _, _ = cluster
    for port in edge.upstream_ports:
        stop(port)
    response = edge.predict(headers={"X-Request-ID": "all-down-1"})
    assert response.status == 502
    assert response.headers["Content-Type"] == "application/json"
    assert response.json()["error"] == {
        "code": "bad_gateway",
        "message": response.json()["error"]["message"],
        "request_id": response.headers["X-Request-ID"],
        "details": [],
    }
    assert response.headers["X-Client-Request-ID"] == "all-down-1"
    assert response.headers.get_all("Strict-Transport-Security") == ["max-age=63072000"]
