"""The shared rate-limit store failing under real gunicorn instances and the NGINX edge the role renders.

A store that hangs (accepts, never answers) or stops must cost a request no more than the store's short
timeout, keep every instance ready, and show in /healthz/store and the store metric, never its password.
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack, contextmanager

import httpx
import pytest

from scripts.harness.metrics import metric
from scripts.harness.nginx import running_edge
from scripts.harness.samples import IRIS_ROW
from scripts.harness.servers import RedisServer, gunicorn, tarpit, wait_for

pytestmark = pytest.mark.integration

PASSWORD = "Sup3rS3cret-edge-store"
REQUESTS = 40


def _service_env(models, store_uri: str, **extra: str) -> dict[str, str]:
    return {
        "MLAPI_MODELS_DIR": str(models),
        "MLAPI_DEFAULT_MODEL": "iris",
        "MLAPI_RATE_LIMIT_STORAGE_URI": store_uri,
        **extra,
    }


def test_a_hung_store_behind_nginx_costs_no_prediction_and_no_retry(tmp_path, demo_models):
    with tarpit() as port, ExitStack() as stack:
        env = _service_env(demo_models, f"redis://:{PASSWORD}@127.0.0.1:{port}/0")
        instances = [stack.enter_context(gunicorn(env, workers=1)) for _ in range(2)]
        edge = stack.enter_context(contextmanager(running_edge)(tmp_path / "edge", [s.port for s in instances]))
        statuses, slowest = [], 0.0
        for _ in range(REQUESTS):
            started = time.monotonic()
            statuses.append(edge.predict().status)
            slowest = max(slowest, time.monotonic() - started)
        print(f"hung store: {REQUESTS} predictions through NGINX, slowest {slowest * 1000:.0f} ms")
        entries = [json.loads(line) for line in edge.log_lines()]
        texts = [s.output() for s in instances]
        metrics = [httpx.get(s.url + "/metrics").text for s in instances]
        ready = [httpx.get(s.url + "/readyz").status_code for s in instances]

    assert statuses == [200] * REQUESTS
    # Each request was answered by the first instance NGINX chose: no timeout, no retry elsewhere.
    predictions = [e for e in entries if e["uri"] == "/v1/predict"]
    assert [e["upstream_status"] for e in predictions] == ["200"] * REQUESTS
    assert ready == [200, 200]
    for text in metrics:
        assert metric(text, "mlapi_rate_limit_store_up") == 0
        assert metric(text, "mlapi_rate_limit_store_failures_total", error="TimeoutError") >= 1
    assert sum(metric(text, "mlapi_rate_limit_bypassed_total") for text in metrics) >= REQUESTS
    for text in texts:
        assert "rate-limit store does not answer" in text
        assert PASSWORD not in text


def test_a_stopped_store_keeps_the_instance_ready_and_limits_return_with_it(demo_models):
    store = RedisServer(password=PASSWORD)
    env = _service_env(demo_models, store.url, MLAPI_RATE_LIMIT_PREDICT="1000/hour",
                       MLAPI_RATE_LIMIT_STORE_RETRY_SECONDS="0.5")
    try:
        with gunicorn(env, workers=2) as server:
            predict = lambda: httpx.post(server.url + "/v1/predict", json={"features": IRIS_ROW}, timeout=10)  # noqa: E731
            assert predict().status_code == 200
            store.stop()
            while_down = [predict().status_code for _ in range(10)]
            ready = httpx.get(server.url + "/readyz")
            store_check = httpx.get(server.url + "/healthz/store")
            down_metrics = httpx.get(server.url + "/metrics").text

            store = RedisServer(port=store.port, password=PASSWORD)
            wait_for(lambda: httpx.get(server.url + "/healthz/store").status_code == 200, 30,
                     what="/healthz/store to say the store answers again")
            up_metrics = httpx.get(server.url + "/metrics").text
            # Limits apply again: the counter in the store moves.
            assert predict().status_code == 200
            import redis

            counted = sum(int(redis.Redis.from_url(store.url).get(k) or 0)
                          for k in redis.Redis.from_url(store.url).keys("*"))
    finally:
        store.stop()

    assert while_down == [200] * 10
    assert ready.status_code == 200
    assert store_check.status_code == 503
    assert PASSWORD not in store_check.text
    assert metric(down_metrics, "mlapi_rate_limit_store_up") == 0
    assert metric(up_metrics, "mlapi_rate_limit_store_up") == 1
    assert counted >= 1
