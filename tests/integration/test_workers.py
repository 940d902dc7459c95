"""The service's gunicorn worker (app/server/workers.py): graceful retirement and its concurrency limit.

Workers that retire (recycled after max_requests, replaced on SIGHUP) drop no request: wrk keeps
64 connections alive straight to gunicorn and sends the next request the moment an answer arrives,
so every retirement meets connections with a request on the wire.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import time

import httpx
import pytest

from app.server.workers import OVERLOADED_MESSAGE
from scripts.harness.samples import IRIS_ROW
from scripts.harness.servers import ROOT, gunicorn, wait_for

pytestmark = pytest.mark.integration

WRK_SCRIPT = ROOT / "bench" / "wrk_post.lua"
CONNECTIONS = 64
SECONDS = 12
PATH = "/v1/models/iris-logreg/predict"  # the cheap model: more requests, more recycles per second
RECYCLED = "Maximum request limit"
BOOTED = "Booting worker"


def _service_env(models, max_requests: int) -> dict[str, str]:
    return {
        "MLAPI_MODELS_DIR": str(models),
        "MLAPI_DEFAULT_MODEL": "iris",
        "MLAPI_RATE_LIMIT_ENABLED": "false",
        "MLAPI_ACCESS_LOG": "false",
        "MLAPI_MAX_REQUESTS": str(max_requests),
        "MLAPI_MAX_REQUESTS_JITTER": str(max_requests // 3),
    }


def _start_wrk(url: str, body_file) -> subprocess.Popen:
    argv = ["wrk", "-t2", f"-c{CONNECTIONS}", f"-d{SECONDS}s", "--timeout", "10s", "-s", str(WRK_SCRIPT), url + PATH]
    return subprocess.Popen(argv, env={**os.environ, "BENCH_BODY_FILE": str(body_file)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wrk_figures(wrk: subprocess.Popen) -> dict:
    out, _ = wrk.communicate(timeout=SECONDS + 60)
    line = next((ln for ln in out.splitlines() if ln.startswith("wrk-json ")), None)
    assert wrk.returncode == 0 and line is not None, f"wrk failed ({wrk.returncode}):\n{out}"
    return json.loads(line.removeprefix("wrk-json "))


def _reload_three_times(server, wrk: subprocess.Popen) -> None:
    """SIGHUP while wrk runs; each time, wait until the master has booted the replacement workers."""
    for _ in range(3):
        booted = server.output().count(BOOTED)
        server.signal(signal.SIGHUP)
        wait_for(lambda booted=booted: server.output().count(BOOTED) >= booted + 2 or wrk.poll() is not None,
                 SECONDS + 30,
                 what="replacement workers after SIGHUP")
        time.sleep(1)  # let the new workers take load before the next reload


@pytest.mark.parametrize("retirement", ["max_requests", "sighup"])
def test_retiring_workers_answer_every_kept_alive_request(demo_models, tmp_path, retirement):
    body_file = tmp_path / "body.json"
    body_file.write_text(json.dumps({"features": IRIS_ROW}))
    max_requests = 300 if retirement == "max_requests" else 0
    with gunicorn(_service_env(demo_models, max_requests), workers=2) as server:
        wrk = _start_wrk(server.url, body_file)
        if retirement == "sighup":
            _reload_three_times(server, wrk)
        figures = _wrk_figures(wrk)
        log = server.output()
    retired = log.count(RECYCLED) if retirement == "max_requests" else log.count(BOOTED) - 2
    assert retired >= 3, f"only {retired} workers retired during the run; the test proves nothing"
    print(f"{figures['requests']} requests, {retired} workers retired")
    errors = {k: figures[k] for k in ("connect_errors", "read_errors", "write_errors", "timeouts")}
    assert errors == dict.fromkeys(errors, 0), f"{errors} in {figures['requests']} requests, {retired} retirements"
    assert figures["status_errors"] == 0, f"{figures['status_errors']} non-2xx answers in {figures['requests']}"


def test_a_worker_at_its_concurrency_limit_answers_503_in_the_error_shape(demo_models):
    env = {**_service_env(demo_models, 0), "MLAPI_LIMIT_CONCURRENCY": "2"}
    with gunicorn(env, workers=1) as server:
        held = [http.client.HTTPConnection("127.0.0.1", server.port, timeout=10) for _ in range(2)]
        try:
            for conn in held:  # two kept-alive connections: the worker's limit
                conn.request("GET", "/healthz")
                assert conn.getresponse().read() and conn.sock is not None
            refused = httpx.get(server.url + "/healthz", timeout=10)
            # The answer is written before the app sees the request, yet in the shape of the route it would reach.
            refused_v2 = httpx.post(server.url + "/v2/models/iris/infer", json={"inputs": []}, timeout=10)
            refused_kserve = httpx.post(server.url + "/v1/models/iris:predict", json={"instances": []}, timeout=10)
        finally:
            for conn in held:
                conn.close()
        wait_for(lambda: httpx.get(server.url + "/healthz", timeout=10).status_code == 200, 10,
                 what="the worker below its limit again")
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "overloaded"
    for protocol in (refused_v2, refused_kserve):
        assert protocol.status_code == 503 and protocol.headers["retry-after"] == "1"
        assert protocol.json() == {"error": OVERLOADED_MESSAGE}


@pytest.mark.parametrize("retirement", ["max_requests", "sighup"])
def test_a_retiring_worker_closes_each_descriptor_once(demo_models, tmp_path, retirement):
    """Every close(2) of the workers succeeds (strace follows the master's children as they are forked).

    A second close of a descriptor number that was already closed fails with EBADF when nothing took the number
    meanwhile, and otherwise closes what another thread of the worker has just opened: under load, a /metrics
    render's lock file (a 500) or a prediction log."""
    with gunicorn(_service_env(demo_models, 4 if retirement == "max_requests" else 0), workers=2) as server:
        first_workers = server.workers()  # forked before strace attaches: not traced
        trace = tmp_path / "close.trace"
        strace = subprocess.Popen(["strace", "-f", "--seccomp-bpf", "-qq", "-e", "trace=close", "-o", str(trace),
                                   "-p", str(server.pid)], stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: trace.exists() and strace.poll() is None, 10, what="strace attached")
            time.sleep(0.5)
            assert strace.poll() is None, f"strace could not attach: {strace.communicate()[1]}"
            with httpx.Client(base_url=server.url, timeout=10, headers={"connection": "close"}) as client:
                for _ in range(3):
                    booted = server.output().count(BOOTED)
                    if retirement == "sighup":
                        server.signal(signal.SIGHUP)

                    def replaced(booted=booted) -> bool:
                        if retirement == "max_requests":  # a new connection each: the workers meet their limit
                            client.post(PATH, json={"features": IRIS_ROW})
                        return server.output().count(BOOTED) >= booted + 2

                    wait_for(replaced, 60, what="replacement workers")
            time.sleep(1)  # the last retired workers finish exiting
        finally:
            strace.terminate()
            _, err = strace.communicate(timeout=30)
        log = server.output()
    closes = [line for line in trace.read_text().splitlines() if "close(" in line or "close resumed" in line]
    traced = {int(line.split()[0]) for line in closes} - {server.pid} - first_workers
    retired = log.count(RECYCLED) if retirement == "max_requests" else log.count(BOOTED) - 2
    assert retired >= 3, f"only {retired} workers retired; the test proves nothing"
    assert len(traced) >= 4, f"strace saw the closes of {len(traced)} processes besides the master (stderr: {err})"
    failed = [line for line in closes if "= -1 E" in line]
    assert failed == [], f"{len(failed)} failed close(2) calls in {retired} retirements, e.g. {failed[:3]}"
