#!/usr/bin/env python3
"""The single-row hot path alone: the service against the ceiling app, over HTTP or in one process.

    .venv/bin/python -m bench.hotpath                  # gunicorn + wrk: kit-direct rf and logreg vs ceiling
    .venv/bin/python -m bench.hotpath --profile 8      # and a py-spy profile of the kit's workers (rf)
    .venv/bin/python -m bench.hotpath --in-process     # no server: the ASGI apps called on one event loop

Over HTTP it is figure 1 of bench/run.py for kit-direct and the ceiling only, at 16
connections, interleaved, with the same servers and settings: requests/s and server CPU
per request, each as a ratio to the ceiling measured in the same round. In process, the
figure is the app's own CPU per request (routing, validation, inference, response, access
log, metrics; threadpool threads included), without the HTTP server's share. Either is
the quick way to judge a change to the hot path on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from scripts.harness.samples import IRIS_ROW
from scripts.harness.servers import ROOT

SINGLE_PATH = {"rf": "/v1/predict", "logreg": "/v1/models/iris-logreg/predict"}


def scope_for(path: str, body: bytes) -> dict:
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8000),
        "headers": [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"wrk"), (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())],
    }


async def call(app, path: str, body: bytes) -> int:  # type: ignore[no-untyped-def]
    sent = False
    status = 0

    async def receive() -> dict:
        nonlocal sent
        if sent:
            await asyncio.sleep(3600)  # a disconnect never comes while the response is pending
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope_for(path, body), receive, send)
    return status


async def cpu_per_request(app, path: str, body: bytes, requests: int, concurrency: int) -> float:  # type: ignore[no-untyped-def]
    """Microseconds of process CPU per request, `concurrency` requests in flight at a time."""

    async def one_client(n: int) -> None:
        for _ in range(n):
            status = await call(app, path, body)
            if status != 200:
                raise RuntimeError(f"{path} answered {status}")

    start = time.process_time()
    await asyncio.gather(*(one_client(requests // concurrency) for _ in range(concurrency)))
    return (time.process_time() - start) * 1e6 / (requests // concurrency * concurrency)


def build_service(models_dir: Path):  # type: ignore[no-untyped-def]
    from app.main import create_app
    from app.settings import Settings

    settings = Settings(models_dir=models_dir, default_model="iris", rate_limit_enabled=False, access_log=True)
    app = create_app(settings)
    app.state.registry.load()
    # The access log goes where gunicorn would send it, but not to this terminal.
    sink = open(os.devnull, "w")  # noqa: SIM115  lives as long as the process
    for handler in logging.getLogger("mlapi.access").handlers:
        handler.setStream(sink)  # type: ignore[attr-defined]
    return app


def over_http(args: argparse.Namespace) -> dict:
    from bench import run

    body = run.single_body()
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="mlapi-hotpath-") as scratch:
        workdir = Path(scratch)
        kit = run.service(args.models_dir, args.workers, workdir / "kit.log", MLAPI_DEFAULT_MODEL="iris")
        ceiling = run.ceiling(args.workers, workdir / "ceiling.log")
        try:
            kit.wait_ready()
            contenders = [(m, kit, SINGLE_PATH[m]) for m in args.model] + [("ceiling", ceiling, "/v1/predict")]
            for _, server, path in contenders:
                run.wait_answering(server, server.url + path, body)
                run.wrk(run.Endpoint("warm-up", server.port, path), body, args.connections, 1, workdir)
            for round_index in range(args.rounds):
                for name, server, path in run.rotated(contenders, round_index):
                    before = run.cpu_seconds([server.pid])
                    result = run.wrk(run.Endpoint(name, server.port, path), body, args.connections, args.seconds,
                                     workdir)
                    result["cpu_ms_per_request"] = (run.cpu_seconds([server.pid]) - before) * 1000 / max(
                        1, result["requests"])
                    runs.setdefault(name, []).append(result)
                    run.log(f"r{round_index + 1} {name:8s} {result['rps']:8.0f} req/s "
                            f"CPU {result['cpu_ms_per_request']:.3f} ms/request")
            profile = (run.profile_workers(kit.url + SINGLE_PATH[args.model[0]], kit.pid, args.profile, workdir)
                       if args.profile else None)
        finally:
            kit.stop()
            ceiling.stop()
    # Ratios per round (each against the ceiling of the same round), then the median.
    figures: dict = {}
    for name in runs:
        pairs = list(zip(runs[name], runs["ceiling"], strict=True))  # one run of each per round
        figures[name] = {
            "rps": statistics.median(r["rps"] for r in runs[name]),
            "cpu_ms_per_request": statistics.median(r["cpu_ms_per_request"] for r in runs[name]),
            "rps_over_ceiling": round(statistics.median(a["rps"] / c["rps"] for a, c in pairs), 3),
            "cpu_per_request_over_ceiling": round(statistics.median(
                a["cpu_ms_per_request"] / c["cpu_ms_per_request"] for a, c in pairs), 2),
            "rps_rounds": [round(r["rps"]) for r in runs[name]],
        }
    return {"mode": "http", "connections": args.connections, "seconds": args.seconds, "workers": args.workers,
            "results": figures, "profile": profile}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(SINGLE_PATH), action="append",
                        help="model to measure (repeatable; default: all)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--in-process", action="store_true", help="call the ASGI apps directly, no server")
    parser.add_argument("--seconds", type=int, default=5, help="HTTP: seconds per wrk run")
    parser.add_argument("--connections", type=int, default=16, help="HTTP: wrk connections")
    parser.add_argument("--workers", type=int, default=2, help="HTTP: gunicorn workers of both servers")
    parser.add_argument("--profile", type=float, default=0, help="HTTP: seconds of py-spy on the kit's workers")
    parser.add_argument("--requests", type=int, default=4000, help="in process: requests per measurement")
    parser.add_argument("--concurrency", type=int, default=16, help="in process: requests in flight")
    parser.add_argument("--output", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    args.model = args.model or sorted(SINGLE_PATH, reverse=True)
    load_before = [round(x, 2) for x in os.getloadavg()]
    result = in_process(args) if args.in_process else over_http(args)
    result = {"load_average_before": load_before, "load_average_after": [round(x, 2) for x in os.getloadavg()],
              **result}
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    return 0


def in_process(args: argparse.Namespace) -> dict:
    # Before app.metrics is imported: under gunicorn the service always keeps multiprocess metrics.
    with tempfile.TemporaryDirectory(prefix="mlapi-hotpath-prom-") as metrics_dir:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        return _in_process(args)


def _in_process(args: argparse.Namespace) -> dict:
    import uvloop

    from bench.ceiling_app import app as ceiling_app

    service = build_service(args.models_dir)
    body = json.dumps({"features": IRIS_ROW}).encode()
    contenders = [(m, service, SINGLE_PATH[m]) for m in args.model] + [("ceiling", ceiling_app, "/v1/predict")]
    runs: dict[str, list[float]] = {name: [] for name, _, _ in contenders}

    async def measure() -> None:
        for _name, app, path in contenders:  # warm-up: first-request costs (route compilation, caches)
            await cpu_per_request(app, path, body, 200, args.concurrency)
        for round_index in range(args.rounds):
            order = contenders[round_index % len(contenders):] + contenders[:round_index % len(contenders)]
            for name, app, path in order:
                runs[name].append(await cpu_per_request(app, path, body, args.requests, args.concurrency))

    uvloop.run(measure())
    return {"mode": "in-process", "concurrency": args.concurrency, "requests": args.requests,
            "results": {name: {"cpu_us_per_request": round(statistics.median(v), 1),
                               "rounds": [round(x, 1) for x in v]} for name, v in runs.items()}}


if __name__ == "__main__":
    sys.exit(main())
