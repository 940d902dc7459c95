"""Failover through the NGINX upstream: two real gunicorn instances, one or both stopped."""

from __future__ import annotations

import json

import pytest

from scripts.harness.nginx import make_models, running_edge, start_gunicorn
from scripts.harness.servers import free_port, wait_for

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


ROW = [5.1, 3.5, 1.4, 0.2]
PREDICTIONS = {
    "v1": ("/v1/predict", {"features": ROW}),
    "kserve-v1": ("/v1/models/iris:predict", {"instances": [ROW]}),
    "v2-infer": (
        "/v2/models/iris/infer",
        {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64", "data": ROW}]},
    ),
}


def predict(edge, route: str = "v1", headers: dict | None = None):
    path, body = PREDICTIONS[route]
    return edge.https("POST", path, json.dumps(body).encode(), {"Content-Type": "application/json", **(headers or {})})


@pytest.mark.parametrize("route", list(PREDICTIONS))
def test_predictions_survive_a_dead_instance(cluster, stop, route):
    edge, _instances, _ = cluster
    dead = edge.upstream_ports[1]
    # Kept-alive connections to both instances; an instance restarted after the previous case is back in
    # the upstream once its fail_timeout has passed, which this waits for (bounded).
    warm_start = len(edge.log_lines())
    warm: list[int] = []

    def both_serve() -> bool:
        warm.append(predict(edge, route).status)
        return any(f"127.0.0.1:{dead}" in json.loads(line)["upstream_addr"] for line in edge.log_lines()[warm_start:])

    wait_for(both_serve, 30, what=f"the upstream to send a request to 127.0.0.1:{dead} again")
    warm = warm[:10]
    stop(dead)
    log_start = len(edge.log_lines())
    statuses = [predict(edge, route).status for _ in range(REQUESTS)]
    assert set(warm) == {200}
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


@pytest.mark.parametrize("route", ["kserve-v1", "v2-infer"])
def test_no_live_instance_gets_502_in_the_protocols_shape(cluster, stop, route):
    edge, _, _ = cluster
    for port in edge.upstream_ports:
        stop(port)
    response = predict(edge, route)
    assert response.status == 502
    assert response.headers["Content-Type"] == "application/json"
    assert set(response.json()) == {"error"}
    assert response.headers["X-Request-ID"] in response.json()["error"]
