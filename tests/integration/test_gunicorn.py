"""The real process model: gunicorn with several uvicorn workers, a real Redis, real sockets."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from scripts.harness.metrics import metric
from scripts.harness.samples import IRIS_ROW
from scripts.harness.servers import gunicorn, mlapi, redis_server, wait_for

pytestmark = pytest.mark.integration

WORKERS = 3


@pytest.fixture(scope="module")
def redis_url():
    with redis_server() as url:
        yield url


def _flush(redis_url: str) -> None:
    import redis

    redis.Redis.from_url(redis_url).flushdb()


def _predict(url: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(url + "/v1/predict", json={"features": IRIS_ROW}, headers=headers, timeout=30)


def test_limit_of_n_admits_exactly_n_across_workers(demo_models, redis_url):
    _flush(redis_url)
    n = 25
    env = {
        "MLAPI_MODELS_DIR": str(demo_models),
        "MLAPI_DEFAULT_MODEL": "iris",
        "MLAPI_RATE_LIMIT_STORAGE_URI": redis_url,
        "MLAPI_RATE_LIMIT_PREDICT": f"{n}/hour",
    }
    with gunicorn(env, workers=WORKERS) as server:
        # Fresh connections spread the requests over every worker.
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda _: _predict(server.url).status_code, range(3 * n)))
        pids = set()
        for line in server.output().splitlines():
            if line.startswith("{") and '"mlapi.access"' in line:
                pids.add(json.loads(line).get("pid"))
    assert statuses.count(200) == n
    assert statuses.count(429) == 2 * n
    assert len(pids - {None}) >= 2, "requests should have reached more than one worker"


def test_spoofed_forwarded_for_from_an_untrusted_peer_does_not_change_the_key(demo_models, redis_url):
    _flush(redis_url)
    env = {
        "MLAPI_MODELS_DIR": str(demo_models),
        "MLAPI_DEFAULT_MODEL": "iris",
        "MLAPI_RATE_LIMIT_STORAGE_URI": redis_url,
        "MLAPI_RATE_LIMIT_PREDICT": "5/hour",
        # Loopback is not a trusted proxy here, so X-Forwarded-For must be ignored.
        "MLAPI_TRUSTED_PROXIES": "10.255.255.1",
    }
    with gunicorn(env, workers=2) as server:
        statuses = [
            _predict(server.url, {"X-Forwarded-For": f"203.0.113.{i}"}).status_code for i in range(10)
        ]
        lines = [json.loads(ln) for ln in server.output().splitlines() if '"mlapi.access"' in ln]
    assert statuses == [200] * 5 + [429] * 5
    assert {ln["client_ip"] for ln in lines if ln["path"] == "/v1/predict"} == {"127.0.0.1"}


def test_forwarded_for_from_a_trusted_proxy_sets_the_client(demo_models, redis_url):
    _flush(redis_url)
    env = {
        "MLAPI_MODELS_DIR": str(demo_models),
        "MLAPI_DEFAULT_MODEL": "iris",
        "MLAPI_RATE_LIMIT_STORAGE_URI": redis_url,
        "MLAPI_RATE_LIMIT_PREDICT": "2/hour",
        "MLAPI_TRUSTED_PROXIES": "127.0.0.1",
    }
    with gunicorn(env, workers=2) as server:
        a = [_predict(server.url, {"X-Forwarded-For": "198.51.100.7"}).status_code for _ in range(3)]
        b = [_predict(server.url, {"X-Forwarded-For": "198.51.100.8"}).status_code for _ in range(2)]
        lines = [json.loads(ln) for ln in server.output().splitlines() if '"mlapi.access"' in ln]
    assert a == [200, 200, 429]
    assert b == [200, 200]
    assert {"198.51.100.7", "198.51.100.8"} <= {ln["client_ip"] for ln in lines}


def test_metrics_sum_counts_across_workers(demo_models, redis_url):
    _flush(redis_url)
    env = {
        "MLAPI_MODELS_DIR": str(demo_models),
        "MLAPI_DEFAULT_MODEL": "iris",
        "MLAPI_RATE_LIMIT_STORAGE_URI": redis_url,
    }
    total = 60
    with gunicorn(env, workers=WORKERS) as server:
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda _: _predict(server.url).status_code, range(total)))
        text = httpx.get(server.url + "/metrics").text
        pids = {json.loads(ln).get("pid") for ln in server.output().splitlines() if '"mlapi.access"' in ln}
    assert statuses == [200] * total
    assert len(pids - {None}) >= 2
    counted = metric(text, "mlapi_http_requests_total", route="/v1/predict", status="200", model="iris", version="1")
    assert counted == total
    assert metric(text, "mlapi_predictions_total", model="iris", version="1", label="setosa") == total
    assert metric(text, "mlapi_model_loaded", model="iris", version="1") == 1


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_workers_stop_and_free_the_port_when_their_master_is_killed(demo_models):
    # Else the master that systemd starts after a kill -9 cannot bind the port the orphans still hold.
    env = {"MLAPI_MODELS_DIR": str(demo_models), "MLAPI_DEFAULT_MODEL": "iris"}
    with gunicorn(env, workers=2) as server:
        children = Path(f"/proc/{server.pid}/task/{server.pid}/children")
        # Ready means one worker answers; the second may still be forking on a busy machine.
        wait_for(lambda: len(children.read_text().split()) == 2, 60, what="both workers")
        workers = [int(pid) for pid in children.read_text().split()]
        server.signal(signal.SIGKILL)
        server.proc.wait(10)
        try:
            wait_for(lambda: not any(_running(pid) for pid in workers), 30, what="the orphaned workers to exit")
        finally:
            for pid in filter(_running, workers):  # ours: started by this test's gunicorn
                os.kill(pid, signal.SIGKILL)
        with socket.socket() as listener:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn binds
            listener.bind(("127.0.0.1", server.port))
            listener.listen()


def test_sighup_loads_a_new_version_without_failing_requests(models_copy):
    env = {"MLAPI_MODELS_DIR": str(models_copy), "MLAPI_DEFAULT_MODEL": "iris"}
    with gunicorn(env, workers=2) as server:
        assert _predict(server.url).json()["version"] == "1"
        mlapi("train-demo", "--models-dir", models_copy, "--version", "2", "--only", "iris", check=True)
        failures, versions = _hup_under_load(server, until_version="2")
        assert failures == []
        assert versions[-1] == "2"


def test_sighup_with_a_bad_new_version_keeps_the_old_one_serving(models_copy):
    env = {"MLAPI_MODELS_DIR": str(models_copy), "MLAPI_DEFAULT_MODEL": "iris"}
    with gunicorn(env, workers=2) as server:
        bad = models_copy / "iris" / "2"
        shutil.copytree(models_copy / "iris" / "1", bad)
        with open(bad / "model.joblib", "ab") as f:
            f.write(b"corrupt")
        server.signal(signal.SIGHUP)
        wait_for(lambda: "model package refused" in server.output(), 60, what="reload with the bad package")
        time.sleep(2)
        r = _predict(server.url)
        log = server.output()
        text = httpx.get(server.url + "/metrics").text
    assert r.status_code == 200
    assert r.json()["version"] == "1"
    refused = [json.loads(ln) for ln in log.splitlines() if "model package refused" in ln]
    assert refused[-1]["check"] == "sha256" and refused[-1]["kept_serving"] is False
    assert metric(text, "mlapi_model_load_failures_total", model="iris", version="2", check="sha256") >= 1


def _hup_under_load(server, until_version: str, seconds: float = 30.0) -> tuple[list[str], list[str]]:
    failures: list[str] = []
    versions: list[str] = []
    deadline = time.monotonic() + seconds
    sent_hup = False
    # A retiring worker closes the connections that carry no request yet (idle kept-alive ones, and ones it
    # accepted whose request has not arrived); a request sent on one at that instant gets no answer. A proxy
    # retries such a request once on a new connection (NGINX does for predictions; the e2e chaos test reloads
    # an instance behind it under load), and so does this client: a failure is what fails twice.
    retried = 0
    with httpx.Client(timeout=30) as client:
        while time.monotonic() < deadline:
            try:
                try:
                    r = client.post(server.url + "/v1/predict", json={"features": IRIS_ROW})
                except httpx.RemoteProtocolError:
                    retried += 1
                    r = client.post(server.url + "/v1/predict", json={"features": IRIS_ROW})
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text[:200]}")
                else:
                    versions.append(r.json()["version"])
            except httpx.HTTPError as exc:
                failures.append(repr(exc))
            if not sent_hup and len(versions) >= 20:
                server.signal(signal.SIGHUP)
                sent_hup = True
            if sent_hup and versions and versions[-1] == until_version and versions.count(until_version) > 20:
                break
    print(f"requests retried once on a new connection: {retried}")
    return failures, versions


def test_every_log_line_is_json_with_the_access_fields(demo_models):
    env = {"MLAPI_MODELS_DIR": str(demo_models), "MLAPI_DEFAULT_MODEL": "iris"}
    with gunicorn(env, workers=2) as server:
        rid = "trace-me-42"
        _predict(server.url, {"X-Request-ID": rid})
        httpx.post(server.url + "/v1/predict", json={"features": {"x": 1}})
        time.sleep(0.5)
        out = server.output()
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert lines, "no log lines"
    access = next(ln for ln in lines if ln.get("request_id") == rid and ln.get("logger") == "mlapi.access")
    for field in ("timestamp", "level", "request_id", "client_ip", "method", "path", "status", "duration_ms",
                  "model", "version", "engine"):
        assert field in access, field
    assert access["status"] == 200 and access["model"] == "iris" and access["engine"] in {"onnx", "sklearn"}
    assert any(ln.get("logger") == "gunicorn.error" for ln in lines)
