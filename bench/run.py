#!/usr/bin/env python3
"""Benchmarks of the service against the tutorial app and the machine's ceiling, measured in one run.

    .venv/bin/python -m bench.run            # the full run (about 15 minutes on 2 cores)
    .venv/bin/python -m bench.run --quick    # every figure, short and small: the CI smoke run

Everything runs on loopback and every process started here is stopped by its PID.
Contenders: kit-https (NGINX rendered by the nginx role, TLS, in front of the
service's gunicorn), kit-direct (that gunicorn), the peers on the same model.joblib files
(bench/peers.py: mlserver, MLServer's scikit-learn runtime with as many parallel workers as the
kit has workers; mlserver-default, the same with MLServer's default of one parallel worker; bentoml, a BentoML
service with as many workers), tutorial (bench/tutorial_app.py under one uvicorn process) and ceiling
(bench/ceiling_app.py under the service's gunicorn settings). They run interleaved, one after the other, in every round;
figures are medians over the rounds. The service keeps its JSON access log on
(written to a file) and runs with MLAPI_RATE_LIMIT_ENABLED=false; the NGINX edge
limits are raised far above the offered load, so neither answers 429.

Writes bench/results/latest.json (every figure and ratio under stable keys),
bench/results/latest.md (the tables, also printed) and the PNG plots.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np

from bench.paced import paced
from bench.peers import BentoML, MLServer, Peer, check_same_answers
from scripts.harness import nginx
from scripts.harness.samples import IRIS_ROW
from scripts.harness.servers import ROOT, VENV_BIN, Gunicorn, Process, free_port, mlapi, wait_for

BENCH = ROOT / "bench"
CACHE = ROOT / ".cache" / "bench"
WRK_SCRIPT = BENCH / "wrk_post.lua"
NO_PRELOAD_CONF = BENCH / "gunicorn_no_preload.py"
SERVICE_CONF = ROOT / "app" / "gunicorn_conf.py"

# The two demo models on the same iris data: name in the figures -> package name.
MODELS = {"rf": "iris", "logreg": "iris-logreg"}
KIT_SINGLE_PATH = {"rf": "/v1/predict", "logreg": "/v1/models/iris-logreg/predict"}
PEERS = ("mlserver", "mlserver-default", "bentoml")
PEER_LABELS = {"mlserver": "MLServer", "mlserver-default": "MLServer (1 parallel worker, its default)",
               "bentoml": "BentoML"}
CONTENDERS = ("kit-https", "kit-direct", *PEERS, "tutorial", "ceiling")
PACED = (("kit-https", "rf"), ("kit-https", "logreg"), ("kit-direct", "rf"), ("tutorial", "rf"), ("ceiling", None))
FEATURES = tuple(IRIS_ROW)
EDGE_NAME = "localhost"
EDGE_LIMITS = {"nginx_rate_limit_rps": 1_000_000, "nginx_rate_limit_burst": 1_000_000, "nginx_limit_conn": 10_000}


@dataclass(frozen=True)
class Profile:
    rounds: int
    duration: int  # seconds per wrk run (wrk takes whole seconds)
    warmup: bool  # one unmeasured run per contender before round 1
    connections: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    batch_connections: int
    paced_duration: float
    paced_connections: int
    workers: int  # service and ceiling gunicorn workers
    memory_workers: tuple[int, ...]
    forest_mb: int  # size of the pickled forest of the memory figure
    memory_parallel: bool  # start the memory figure's servers all at once
    profile_seconds: float  # 0: no profile
    provisioning: bool  # figure 5: boot and provision a sandbox host of its own


FULL = Profile(rounds=3, duration=6, warmup=True, connections=(16, 64), batch_sizes=(1, 10, 100, 1000),
               batch_connections=4, paced_duration=10, paced_connections=16, workers=2, memory_workers=(1, 2, 4),
               forest_mb=300, memory_parallel=False, profile_seconds=8, provisioning=True)
QUICK = Profile(rounds=1, duration=1, warmup=False, connections=(16, 64), batch_sizes=(1, 10, 100, 1000),
                batch_connections=4, paced_duration=2, paced_connections=16, workers=2, memory_workers=(1, 2, 4),
                forest_mb=5, memory_parallel=True, profile_seconds=0, provisioning=False)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# Servers -------------------------------------------------------------------------------------------------------


class BenchGunicorn(Gunicorn):
    """scripts.harness.servers.Gunicorn with its own argument list (another config file or app) and log file."""

    def __init__(self, env: dict[str, str], workers: int, args: list[str], log_path: Path):
        self.port = free_port()
        self.metrics_dir = tempfile.mkdtemp(prefix="mlapi-bench-prom-")
        full_env = {
            **os.environ,
            "MLAPI_BIND": f"127.0.0.1:{self.port}",
            "MLAPI_WORKERS": str(workers),
            "PROMETHEUS_MULTIPROC_DIR": self.metrics_dir,
            **env,
        }
        argv = [str(VENV_BIN / "gunicorn"), *(a.replace("{port}", str(self.port)) for a in args)]
        Process.__init__(self, argv, env=full_env, log=log_path)
        self.url = f"http://127.0.0.1:{self.port}"


def service(models_dir: Path, workers: int, log_path: Path, *, preload: bool = True, **env: str) -> BenchGunicorn:
    settings = {
        "MLAPI_MODELS_DIR": str(models_dir),
        "MLAPI_RATE_LIMIT_ENABLED": "false",
        "MLAPI_ACCESS_LOG": "true",
        "MLAPI_LOG_LEVEL": "INFO",
        **env,
    }
    conf = SERVICE_CONF if preload else NO_PRELOAD_CONF
    return BenchGunicorn(settings, workers, ["-c", str(conf), "app.main:create_app()"], log_path)


def ceiling(workers: int, log_path: Path) -> BenchGunicorn:
    """The ceiling app under the service's gunicorn settings (those of app/gunicorn_conf.py that fit any app)."""
    from app.settings import load_settings

    settings = load_settings()
    args = ["-k", "uvicorn_worker.UvicornWorker", "-w", str(workers), "-b", "127.0.0.1:{port}",
            "--keep-alive", str(settings.keepalive), "--timeout", str(settings.timeout),
            "--graceful-timeout", str(settings.graceful_timeout), "--max-requests", str(settings.max_requests),
            "--max-requests-jitter", str(settings.max_requests_jitter), "bench.ceiling_app:app"]
    return BenchGunicorn({}, workers, args, log_path)


def tutorial(model_file: Path, log_path: Path) -> Process:
    port = free_port()
    server = Process(
        [str(VENV_BIN / "uvicorn"), "bench.tutorial_app:app", "--host", "127.0.0.1", "--port", str(port)],
        env={**os.environ, "MODEL_PATH": str(model_file)}, log=log_path,
    )
    server.port = port  # type: ignore[attr-defined]
    return server


def wait_answering(proc: Process, url: str, body: bytes, host: str | None = None, verify: str | bool = False,
                   timeout: float = 60) -> None:
    headers = {"Content-Type": "application/json", **({"Host": host} if host else {})}

    def answers() -> bool:
        if proc.proc.poll() is not None:
            raise RuntimeError(f"{proc.proc.args[:3]} exited with {proc.proc.returncode}:\n{proc.output()[-3000:]}")
        response = httpx.post(url, content=body, headers=headers, timeout=5, verify=verify)
        if response.status_code != 200:
            raise RuntimeError(f"{url} answered {response.status_code}: {response.text[:300]}")
        return "prediction" in response.json()

    wait_for(answers, timeout, interval=0.2, what=f"{url} answering predictions")


@dataclass
class Endpoint:
    contender: str
    port: int
    path: str
    https: bool = False
    host: str = "127.0.0.1"
    cafile: str | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.https else 'http'}://{self.host}:{self.port}{self.path}"


def edge(prefix: Path, upstream_port: int) -> nginx.Edge:
    """The nginx role's configuration in front of one service instance, for the name ``localhost``.

    wrk sends the URL's host as TLS SNI and the site refuses handshakes for other names,
    so the site is named after a name that resolves to loopback without touching /etc/hosts.
    """
    nginx.make_self_signed(prefix / "tls", EDGE_NAME)
    return nginx.render(prefix, [upstream_port], with_certificate=False, nginx_server_name=EDGE_NAME,
                                **EDGE_LIMITS)


class Stack:
    """Every contender running at once (an idle one costs nothing), stopped by PID at exit."""

    def __init__(self, models_dir: Path, workdir: Path, profile: Profile):
        self.processes: list[Process] = []
        self.edge: nginx.Edge | None = None
        self.tutorials: dict[str, Process] = {}
        try:
            self._start(models_dir, workdir, profile)
        except BaseException:
            self.stop()
            raise

    def _start(self, models_dir: Path, workdir: Path, profile: Profile) -> None:
        # The slowest to start, so first.
        files = {package: models_dir / package / "1" / "model.joblib" for package in MODELS.values()}
        self.peers: dict[str, Peer] = {}
        for peer in (MLServer("mlserver", files, profile.workers, workdir, workdir / "mlserver.log"),
                     MLServer("mlserver-default", files, None, workdir, workdir / "mlserver-default.log"),
                     BentoML(files, profile.workers, workdir, workdir / "bentoml.log")):
            self.processes.append(peer)
            self.peers[peer.name] = peer
        self.kit = service(models_dir, profile.workers, workdir / "kit.log", MLAPI_DEFAULT_MODEL="iris")
        self.processes.append(self.kit)
        self.ceiling = ceiling(profile.workers, workdir / "ceiling.log")
        self.processes.append(self.ceiling)
        for model, package in MODELS.items():
            server = tutorial(models_dir / package / "1" / "model.joblib", workdir / f"tutorial-{model}.log")
            self.processes.append(server)
            self.tutorials[model] = server
        # Rendered while the servers boot: the role only needs the upstream's port.
        self.edge = edge(workdir / "edge", self.kit.port)
        self.cafile = str(self.edge.certificate)
        self.kit.wait_ready()
        self.edge.start()
        body = single_body()
        for model in MODELS:
            wait_answering(self.kit, self.endpoint("kit-direct", model).url, body)
            wait_answering(self.tutorials[model], self.endpoint("tutorial", model).url, body)
            https = self.endpoint("kit-https", model)
            wait_answering(self.kit, https.url, body, host=https.host, verify=self.cafile)
        wait_answering(self.ceiling, self.endpoint("ceiling", None).url, body)
        for peer in self.peers.values():
            peer.wait_ready()
            for package in MODELS.values():  # the same answer as the kit's, or no figure at all
                check_same_answers(self.kit.url, peer, package, batch_values(150)[::15], list(FEATURES))

    def body(self, contender: str, model: str, size: int | None = None) -> bytes:
        """What a contender is sent for a model: one row, or a batch of ``size`` rows, in the form it takes."""
        if contender in self.peers:
            return self.peers[contender].body(MODELS[model], batch_values(size or 1))
        return batch_body(size) if size else single_body()

    def endpoint(self, contender: str, model: str | None, batch: bool = False) -> Endpoint:
        if contender == "ceiling":
            return Endpoint(contender, self.ceiling.port, "/v1/predict")
        if contender == "tutorial":
            return Endpoint(contender, self.tutorials[model].port, "/v1/predict")  # type: ignore[attr-defined]
        if contender in self.peers:
            peer = self.peers[contender]
            return Endpoint(contender, peer.port, peer.path(MODELS[model]))  # type: ignore[index]
        path = KIT_SINGLE_PATH[model] + ("/batch" if batch else "")  # type: ignore[index]
        if contender == "kit-direct":
            return Endpoint(contender, self.kit.port, path)
        assert self.edge is not None
        return Endpoint(contender, self.edge.https_port, path, https=True, host=EDGE_NAME, cafile=self.cafile)

    def server_pids(self, contender: str, model: str | None) -> list[int]:
        """The processes that serve a contender (their descendants are found from them)."""
        if contender == "ceiling":
            return [self.ceiling.pid]
        if contender == "tutorial":
            return [self.tutorials[model].pid]  # type: ignore[index]
        if contender in self.peers:
            return [self.peers[contender].pid]
        if contender == "kit-direct":
            return [self.kit.pid]
        assert self.edge is not None and self.edge.process is not None
        return [self.kit.pid, self.edge.process.pid]

    def stop(self) -> None:
        if self.edge is not None:
            self.edge.stop()
        for proc in reversed(self.processes):
            proc.stop()
            if isinstance(proc, Gunicorn):
                shutil.rmtree(proc.metrics_dir, ignore_errors=True)


# Load generation ----------------------------------------------------------------------------------------------


def single_body() -> bytes:
    return json.dumps({"features": IRIS_ROW}).encode()


def batch_rows(size: int) -> list[dict[str, float]]:
    from sklearn.datasets import load_iris

    data = load_iris().data
    return [dict(zip(FEATURES, map(float, data[i % len(data)]), strict=True)) for i in range(size)]


def batch_body(size: int) -> bytes:
    return json.dumps({"instances": batch_rows(size)}).encode()


def batch_values(size: int) -> list[list[float]]:
    """The rows of batch_rows(size) as lists of values in feature order (a tensor's rows)."""
    return [[row[f] for f in FEATURES] for row in batch_rows(size)]


def wrk(endpoint: Endpoint, body: bytes, connections: int, duration: float, workdir: Path) -> dict:
    """One bounded wrk run; requests/s and latency percentiles in ms."""
    body_file = workdir / f"body-{hashlib.sha256(body).hexdigest()[:16]}.json"
    if not body_file.exists():
        body_file.write_bytes(body)
    argv = ["wrk", f"-t{min(2, connections)}", f"-c{connections}", f"-d{duration}s", "--timeout", "10s",
            "-s", str(WRK_SCRIPT), "-H", f"Host: {endpoint.host}", endpoint.url]
    result = subprocess.run(argv, env={**os.environ, "BENCH_BODY_FILE": str(body_file)}, capture_output=True,
                            text=True, timeout=duration + 60)
    line = next((ln for ln in result.stdout.splitlines() if ln.startswith("wrk-json ")), None)
    if result.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({result.returncode}): {result.stdout}\n{result.stderr}")
    raw = json.loads(line.removeprefix("wrk-json "))
    errors = sum(raw[k] for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts"))
    return {
        "rps": raw["requests"] / (raw["duration_us"] / 1e6),
        "p50_ms": raw["p50_us"] / 1000,
        "p90_ms": raw["p90_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "p999_ms": raw["p999_us"] / 1000,
        "requests": raw["requests"],
        "errors": errors,
        # Read errors on a healthy server are keep-alive connections closed by a worker recycled after
        # max_requests (the service's setting, shared by the ceiling); wrk reconnects.
        "error_kinds": {k: raw[k] for k in ("connect_errors", "read_errors", "write_errors", "status_errors",
                                            "timeouts") if raw[k]},
    }


def rotated(items: list, k: int) -> list:
    k %= len(items)
    return items[k:] + items[:k]


def median_of(runs: list[dict], key: str) -> float:
    return float(statistics.median(run[key] for run in runs))


# Figures -------------------------------------------------------------------------------------------------------


def figure_single(stack: Stack, profile: Profile, workdir: Path, warnings: list[str]) -> dict:
    """Figure 1: single-row requests/s, p50 and p99 at fixed connection counts, contenders interleaved."""
    runs: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    order = [(c, m) for m in MODELS for c in ("kit-https", "kit-direct", *PEERS, "tutorial")] + [("ceiling", None)]
    for round_index in range(profile.rounds):
        for connections in profile.connections:
            for contender, model in rotated(order, round_index):
                endpoint = stack.endpoint(contender, model)
                roots = stack.server_pids(contender, model)
                cpu_before = cpu_seconds(roots)
                result = wrk(endpoint, stack.body(contender, model or "rf"), connections, profile.duration, workdir)
                result["cpu_ms_per_request"] = (cpu_seconds(roots) - cpu_before) * 1000 / max(1, result["requests"])
                key = model or "any"
                if result["errors"]:
                    warnings.append(f"single {contender} {key} c{connections}: {result['error_kinds']}")
                runs[key][str(connections)][contender].append(result)
                log(f"single r{round_index + 1} c{connections} {contender:10s} {key:6s} "
                    f"{result['rps']:8.0f} req/s p50 {result['p50_ms']:.2f} ms p99 {result['p99_ms']:.2f} ms "
                    f"CPU {result['cpu_ms_per_request']:.3f} ms/request")
    figures: dict = {}
    for model in MODELS:
        figures[model] = {}
        for connections in profile.connections:
            c = str(connections)
            row = {}
            for contender in CONTENDERS:
                series = runs["any" if contender == "ceiling" else model][c][contender]
                row[contender] = {
                    "rps": median_of(series, "rps"),
                    "p50_ms": median_of(series, "p50_ms"),
                    "p99_ms": median_of(series, "p99_ms"),
                    "cpu_ms_per_request": median_of(series, "cpu_ms_per_request"),
                    "rps_rounds": [round(r["rps"], 1) for r in series],
                }
            figures[model][c] = row
    return figures


def rows_per_second(call, X, size: int, seconds: float) -> float:
    """Rows/s of call(X) on a batch of size rows, called over and over for seconds after one warm-up call."""
    call(X)
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        call(X)
        calls += 1
    return calls * size / elapsed


def sklearn_inprocess(model_file: Path, size: int, seconds: float) -> float:
    """Rows/s of predict_proba called directly on the unpickled model, batch by batch."""
    import joblib

    model = joblib.load(model_file)
    return rows_per_second(model.predict_proba, np.array(batch_values(size)), size, seconds)


def engine_inprocess(package: Path, size: int, seconds: float) -> float:
    """Rows/s of the kit's own engine for the package (ONNX Runtime for the demo packages, one thread as a worker
    runs it), called in this process on the decoded batch: what the service adds is everything else."""
    from app.packages.gate import load_package
    from app.settings import load_settings

    settings = load_settings()
    model = load_package(package, engine=settings.engine, onnx_threads=settings.onnx_threads)
    X = model.inputs.matrix(np.array(batch_values(size), dtype=float), settings.max_abs_value).X
    return rows_per_second(model.infer, X, size, seconds)


def figure_batch(stack: Stack, models_dir: Path, profile: Profile, workdir: Path, warnings: list[str]) -> dict:
    """Figure 2: rows/s and server CPU per batch, RandomForest, next to in-process predict_proba and the kit's
    own engine in process (rows/s)."""
    runs: dict = defaultdict(lambda: defaultdict(list))
    cpu: dict = defaultdict(lambda: defaultdict(list))
    model_file = models_dir / MODELS["rf"] / "1" / "model.joblib"
    order = ["kit-https", "kit-direct", *PEERS, "sklearn-inprocess", "engine-inprocess"]
    for round_index in range(profile.rounds):
        for size in profile.batch_sizes:
            for contender in rotated(order, round_index):
                if contender == "sklearn-inprocess":
                    rows = sklearn_inprocess(model_file, size, profile.duration / 2)
                elif contender == "engine-inprocess":
                    rows = engine_inprocess(models_dir / MODELS["rf"] / "1", size, profile.duration / 2)
                else:
                    endpoint = stack.endpoint(contender, "rf", batch=True)
                    roots = stack.server_pids(contender, "rf")
                    cpu_before = cpu_seconds(roots)
                    result = wrk(endpoint, stack.body(contender, "rf", size), profile.batch_connections,
                                 profile.duration, workdir)
                    cpu[str(size)][contender].append(
                        (cpu_seconds(roots) - cpu_before) * 1000 / max(1, result["requests"]))
                    if result["errors"]:
                        warnings.append(f"batch {contender} {size} rows: {result['error_kinds']}")
                    rows = result["rps"] * size
                runs[str(size)][contender].append(rows)
                log(f"batch r{round_index + 1} {size:5d} rows {contender:17s} {rows:10.0f} rows/s")
    figures: dict = {}
    for size, by_contender in runs.items():
        figures[size] = {}
        for contender, series in by_contender.items():
            row = {"rows_per_s": float(statistics.median(series)), "rows_per_s_rounds": [round(x) for x in series]}
            if contender in cpu[size]:
                row["cpu_ms_per_batch"] = float(statistics.median(cpu[size][contender]))
            figures[size][contender] = row
    return figures


def figure_peer_memory(stack: Stack) -> dict:
    """PSS in MB of each serving stack as it stands after the load figures, every process of it summed: the
    kit's gunicorn (master and workers), MLServer's (front process and its workers), BentoML's (its serve
    process, the arbiter and the workers), same models."""
    def tree_pss_mb(root: int) -> float:
        total, pending = 0, [root]
        while pending:
            pid = pending.pop()
            try:
                pending.extend(children(pid))
                total += pss_kib(pid)
            except (FileNotFoundError, ProcessLookupError):  # a worker recycled meanwhile: its successor counts
                continue
        return total / 1024

    return {"kit-direct": tree_pss_mb(stack.kit.pid), **{name: tree_pss_mb(p.pid) for name, p in stack.peers.items()}}


def figure_paced(stack: Stack, single: dict, profile: Profile, warnings: list[str]) -> dict:
    """Figure 3: latency at a constant offered load of half each contender's own peak (16 connections)."""
    body = single_body()
    peak_connections = str(min(profile.connections))
    runs: dict = defaultdict(list)
    for round_index in range(profile.rounds):
        for contender, model in rotated(list(PACED), round_index):
            peak = single[model or "rf"][peak_connections][contender]["rps"]
            endpoint = stack.endpoint(contender, model)
            result = paced(endpoint.port, endpoint.path, body, rate=peak / 2, duration=profile.paced_duration,
                           connections=profile.paced_connections, host=endpoint.host, cafile=endpoint.cafile)
            if result.errors:
                warnings.append(f"paced {contender} {model}: {result.errors} non-200 answers")
            key = f"{contender}/{model or 'any'}"
            runs[key].append(asdict(result))
            log(f"paced r{round_index + 1} {key:17s} offered {result.offered_rps:7.0f} achieved "
                f"{result.achieved_rps:7.0f} p50 {result.p50_ms:.2f} p99 {result.p99_ms:.2f} "
                f"p99.9 {result.p999_ms:.2f} ms")
    return {
        key: {field: median_of(series, field) for field in
              ("offered_rps", "achieved_rps", "p50_ms", "p99_ms", "p999_ms", "max_ms")}
        for key, series in runs.items()
    }


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(roots: list[int]) -> float:
    """CPU time used so far by each root process and its live descendants; workers that exited and were
    reaped are in their parent's cutime/cstime, so a worker recycled during a run still counts."""
    total = 0.0
    for root in roots:
        stack, first = [root], True
        while stack:
            pid = stack.pop()
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                stack.extend(children(pid))
            except (FileNotFoundError, ProcessLookupError):
                continue
            # Fields 14-17 of stat (utime stime cutime cstime) are 11-14 after the command name.
            ticks = int(fields[11]) + int(fields[12]) + ((int(fields[13]) + int(fields[14])) if first else 0)
            total += ticks / CLOCK_TICKS
            first = False
    return total


def children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise RuntimeError(f"no Pss line in /proc/{pid}/smaps_rollup")


def build_forest(target_mb: int) -> tuple[Path, float]:
    """A RandomForest of about target_mb pickled, packaged without ONNX, cached under .cache/bench/."""
    models_dir = CACHE / f"forest-{target_mb}mb"
    package = models_dir / "forest" / "1"
    size_file = models_dir / "pickled_mb"
    if (package / "manifest.json").exists() and size_file.exists():
        return models_dir, float(size_file.read_text())
    from sklearn.datasets import make_classification
    from sklearn.ensemble import RandomForestClassifier

    from app.packages.build import build_package

    log(f"building a ~{target_mb} MB RandomForest for the memory figure (cached afterwards)")
    # Label noise keeps the trees growing: fully grown trees on noisy data are large.
    X, y = make_classification(n_samples=max(4000, target_mb * 150), n_features=20, n_informative=12,
                               flip_y=0.25, random_state=0)
    forest = RandomForestClassifier(n_estimators=4, n_jobs=2, random_state=0, warm_start=True).fit(X, y)
    per_tree = len(pickle.dumps(forest, protocol=5)) / 4
    forest.n_estimators = max(4, int(target_mb * 1e6 / per_tree))
    forest.fit(X, y)
    forest.n_jobs = None
    pickled_mb = len(pickle.dumps(forest, protocol=5)) / 1e6
    shutil.rmtree(models_dir, ignore_errors=True)
    build_package(forest, name="forest", version="1", models_dir=models_dir, sample=X[:500],
                  feature_names=[f"f{i}" for i in range(X.shape[1])], onnx=False)
    size_file.write_text(f"{pickled_mb:.1f}")
    return models_dir, pickled_mb


def figure_memory(profile: Profile, workdir: Path) -> dict:
    """Figure 4: summed PSS of the workers (and with the master) for 1, 2, 4 workers, with and without preload.

    The full run starts one server at a time; the quick run starts them all at once to save time
    (shared libraries' pages are then split over more processes, a few MB per process).
    """
    models_dir, pickled_mb = build_forest(profile.forest_mb)
    row = json.dumps({"features": {f"f{i}": 0.1 * i for i in range(20)}}).encode()
    result: dict = {"model": {"kind": "RandomForestClassifier", "pickled_mb": pickled_mb},
                    "servers_at_once": "all" if profile.memory_parallel else 1, "preload": {}, "no-preload": {}}
    setups = [(preload, workers) for preload in (True, False) for workers in profile.memory_workers]
    groups = [setups] if profile.memory_parallel else [[setup] for setup in setups]
    for group in groups:
        servers = []
        try:
            for preload, workers in group:
                mode = "preload" if preload else "no-preload"
                servers.append((mode, workers, service(
                    models_dir, workers, workdir / f"memory-{mode}-{workers}.log", preload=preload,
                    MLAPI_DEFAULT_MODEL="forest", MLAPI_ENGINE="sklearn", MLAPI_TIMEOUT="600",
                    MLAPI_ACCESS_LOG="false")))
            for mode, workers, server in servers:
                server.wait_ready(timeout=600)
                settled = _settle(server, workers)
                # Touch every worker: fresh connections are spread over the workers by the kernel.
                for _ in range(8 * workers):
                    httpx.post(server.url + "/v1/predict", content=row,
                               headers={"Content-Type": "application/json"}, timeout=60).raise_for_status()
                worker_kib = [pss_kib(p) for p in children(server.pid)]
                master_kib = pss_kib(server.pid)
                result[mode][str(workers)] = {
                    "workers_pss_mb": sum(worker_kib) / 1024,
                    "master_pss_mb": master_kib / 1024,
                    "total_pss_mb": (sum(worker_kib) + master_kib) / 1024,
                    "per_worker_pss_mb": [round(k / 1024, 1) for k in worker_kib],
                    "seconds_to_settle": round(settled, 1),
                }
                log(f"memory {mode:10s} {workers} workers: workers {sum(worker_kib) / 1024:7.1f} MB, "
                    f"with master {(sum(worker_kib) + master_kib) / 1024:7.1f} MB")
        finally:
            for _, _, server in servers:
                server.stop()
    for mode in ("preload", "no-preload"):
        result[mode] = {str(w): result[mode][str(w)] for w in profile.memory_workers}
    return result


def _settle(server: Gunicorn, workers: int, timeout: float = 600) -> float:
    """Wait until every worker exists and the summed PSS stops growing (each worker loads on its own
    when there is no preload; /readyz answers as soon as the first one has)."""
    start = time.monotonic()
    history: list[int] = []
    while time.monotonic() - start < timeout:
        pids = children(server.pid)
        if len(pids) == workers:
            try:
                history.append(sum(pss_kib(p) for p in pids))
            except FileNotFoundError:
                history.clear()
            if len(history) >= 4 and max(history[-4:]) - min(history[-4:]) <= 0.01 * history[-1]:
                return time.monotonic() - start
        time.sleep(0.5)
    raise TimeoutError(f"{workers} workers did not settle within {timeout}s:\n{server.output()[-2000:]}")


def figure_provisioning(profile: Profile) -> dict:
    """Figure 5 (bench/provision.py): a sandbox host of its own, provisioned by site.yml while timed."""
    from bench import provision

    if not profile.provisioning:
        return provision.not_measured("not run by --quick (it boots and provisions a sandbox host, minutes); "
                                      "make bench measures it")
    return provision.figure(log)


def profile_kit(stack: Stack, profile: Profile, workdir: Path) -> dict:
    """Where a kit worker spends its time under single-row RandomForest load."""
    return profile_workers(stack.endpoint("kit-direct", "rf").url, stack.kit.pid, profile.profile_seconds, workdir)


def profile_workers(url: str, master_pid: int, duration: float, workdir: Path) -> dict:
    """py-spy on a gunicorn master's workers while wrk sends single rows to url (16 connections).

    py-spy follows the master's children (--subprocesses): a worker recycled after max_requests
    during the profile is replaced by one it then samples too. It samples only the thread holding
    the GIL: on a shared machine a descheduled thread would otherwise be sampled wherever it
    stopped, usually in a system call.
    """
    body_file = workdir / "profile-body.json"
    body_file.write_bytes(single_body())
    out = workdir / "py-spy.txt"
    load = subprocess.Popen(
        ["wrk", "-t2", "-c16", f"-d{int(duration) + 2}s", "-s", str(WRK_SCRIPT), url],
        env={**os.environ, "BENCH_BODY_FILE": str(body_file)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(1)
        subprocess.run(
            [str(VENV_BIN / "py-spy"), "record", "--pid", str(master_pid), "--subprocesses", "--duration",
             str(int(duration)), "--rate", "250", "--format", "raw", "--output", str(out), "--nonblocking", "--gil"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=duration + 60)
    finally:
        load.wait(timeout=duration + 60)
    self_samples: dict[str, int] = defaultdict(int)
    inclusive: dict[str, int] = defaultdict(int)
    total = 0
    for line in out.read_text().splitlines() if out.exists() else []:
        stack_text, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack_text.split(";") if f]
        # Each stack starts with its process chain: "process <master>", then "process <worker>" for a worker.
        processes = [f for f in frames if f.startswith("process ")]
        frames = [f for f in frames if not f.startswith("process ")]
        if len(processes) < 2 or not frames or _frame(frames[-1]) in IDLE_FRAMES:
            continue
        total += count
        self_samples[_frame(frames[-1])] += count
        for name in {_frame(f) for f in frames}:
            inclusive[name] += count

    def top(table: dict[str, int], n: int) -> list[dict]:
        return [{"frame": k, "share": round(v / total, 4)} for k, v in
                sorted(table.items(), key=lambda kv: -kv[1])[:n]] if total else []
    return {"samples": total, "seconds": duration, "self": top(self_samples, 20),
            "inclusive": [e for e in top(inclusive, 400) if e["share"] >= 0.005]}


# The service's own modules, and the library frames on its request path worth naming in the report.
PROFILE_FILES = ("(app/",)
PROFILE_FRAMES = {"solve_dependencies", "run_sync_in_worker_thread", "notify", "emit", "sync_wrapper",
                  "serialize_response", "send", "uuid4", "request_body_to_args", "observe", "inc", "_match",
                  "model_validate_json", "format"}

# Threadpool threads waiting for work: asleep, though py-spy samples them as Python frames.
IDLE_FRAMES = {"Condition.wait (threading.py)"}


def _frame(frame: str) -> str:
    """"function (/abs/path/site-packages/pkg/mod.py:123)" -> "function (pkg/mod.py)": one entry per function."""
    name, _, where = frame.partition(" (")
    if not where:
        return name
    path = where.rsplit(":", 1)[0]
    for marker in ("site-packages/", f"{ROOT}/", "/lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{name} ({path})"


# Report --------------------------------------------------------------------------------------------------------


def _key(contender: str) -> str:
    """A contender's name as part of a ratio's key: mlserver-default -> mlserver_default."""
    return contender.replace("-", "_")


def ratios_and_targets(results: dict, profile: Profile) -> tuple[dict, list[dict]]:
    single, batch, paced_fig, memory = results["single"], results["batch"], results["paced"], results["memory"]
    ratios: dict[str, float] = {}
    targets: list[dict] = []

    def target(key: str, value: float, op: str, bound: float, what: str) -> None:
        met = value >= bound if op == ">=" else value <= bound
        targets.append({"key": key, "what": what, "value": round(value, 3), "target": f"{op} {bound}",
                        "met": met, "by": round(value / bound, 3)})

    for model in MODELS:
        for c in map(str, profile.connections):
            row = single[model][c]
            for a, b in (("kit-https", "tutorial"), ("kit-direct", "tutorial"), ("kit-direct", "ceiling"),
                         ("kit-https", "kit-direct"), ("kit-https", "ceiling"),
                         *((kit, peer) for peer in PEERS for kit in ("kit-direct", "kit-https"))):
                key = f"{model}_c{c}_{a.replace('-', '_')}_over_{b.replace('-', '_')}"
                ratios[key] = row[a]["rps"] / row[b]["rps"]
                ratios[f"{model}_c{c}_cpu_per_request_{a.replace('-', '_')}_over_{b.replace('-', '_')}"] = (
                    row[a]["cpu_ms_per_request"] / row[b]["cpu_ms_per_request"])
            bound = 20.0 if model == "rf" else 1.0
            target(f"{model}_c{c}_kit_https_over_tutorial", ratios[f"{model}_c{c}_kit_https_over_tutorial"], ">=",
                   bound, f"{model} single row c{c}: kit-https / tutorial req/s")
            target(f"{model}_c{c}_kit_direct_over_ceiling", ratios[f"{model}_c{c}_kit_direct_over_ceiling"], ">=",
                   0.5, f"{model} single row c{c}: kit-direct / ceiling req/s")
            target(f"{model}_c{c}_kit_https_over_kit_direct", ratios[f"{model}_c{c}_kit_https_over_kit_direct"],
                   ">=", 0.8, f"{model} single row c{c}: kit-https / kit-direct req/s")
            for peer in PEERS:
                k = f"{model}_c{c}_kit_direct_over_{_key(peer)}"
                target(k, ratios[k], ">=", 10.0 if model == "rf" else 3.0,
                       f"{model} single row c{c}: kit-direct / {PEER_LABELS[peer]} req/s")
    for size in map(str, profile.batch_sizes):
        reference = batch[size]["sklearn-inprocess"]["rows_per_s"]
        for contender in ("kit-https", "kit-direct"):
            ratios[f"rf_batch{size}_{contender.replace('-', '_')}_over_sklearn"] = (
                batch[size][contender]["rows_per_s"] / reference)
            ratios[f"rf_batch{size}_{_key(contender)}_over_engine"] = (
                batch[size][contender]["rows_per_s"] / batch[size]["engine-inprocess"]["rows_per_s"])
            for peer in PEERS:
                ratios[f"rf_batch{size}_{_key(contender)}_over_{_key(peer)}"] = (
                    batch[size][contender]["rows_per_s"] / batch[size][peer]["rows_per_s"])
                ratios[f"rf_batch{size}_cpu_per_batch_{_key(contender)}_over_{_key(peer)}"] = (
                    batch[size][contender]["cpu_ms_per_batch"] / batch[size][peer]["cpu_ms_per_batch"])
    largest = str(max(profile.batch_sizes))
    target(f"rf_batch{largest}_kit_https_over_sklearn", ratios[f"rf_batch{largest}_kit_https_over_sklearn"], ">=",
           1.0, f"rf batch of {largest} rows: kit-https rows/s / in-process predict_proba rows/s")
    target(f"rf_batch{largest}_kit_https_over_engine", ratios[f"rf_batch{largest}_kit_https_over_engine"], ">=",
           0.5, f"rf batch of {largest} rows: kit-https rows/s / the kit's engine in process, rows/s")
    peers = results["peer_memory"]
    for peer in PEERS:
        k = f"rf_batch{largest}_kit_https_over_{_key(peer)}"
        target(k, ratios[k], ">=", 2.0, f"rf batch of {largest} rows: kit-https rows/s / {PEER_LABELS[peer]} rows/s")
        k = f"rf_batch{largest}_cpu_per_batch_kit_https_over_{_key(peer)}"
        target(k, ratios[k], "<=", 0.5, f"rf batch of {largest} rows: kit-https server CPU per batch / "
               f"{PEER_LABELS[peer]}'s")
        ratios[f"memory_kit_over_{_key(peer)}"] = peers["kit-direct"] / peers[peer]
        target(f"memory_kit_over_{_key(peer)}", ratios[f"memory_kit_over_{_key(peer)}"], "<=", 0.8,
               f"PSS of the kit ({profile.workers} workers) / {PEER_LABELS[peer]}'s, same models")
    for key in ("kit-https/rf", "kit-https/logreg"):
        ratios[f"{key.replace('-', '_').replace('/', '_')}_half_peak_p99_ms"] = paced_fig[key]["p99_ms"]
        target(f"{key.replace('-', '_').replace('/', '_')}_half_peak_p99_ms", paced_fig[key]["p99_ms"], "<=", 5.0,
               f"{key} p99 ms at half its peak offered load")
    top, one = str(max(profile.memory_workers)), str(min(profile.memory_workers))
    for mode in ("preload", "no-preload"):
        m = mode.replace("-", "_")
        ratios[f"memory_{m}_w{top}_over_w{one}_total"] = (
            memory[mode][top]["total_pss_mb"] / memory[mode][one]["total_pss_mb"])
        ratios[f"memory_{m}_w{top}_over_w{one}_workers"] = (
            memory[mode][top]["workers_pss_mb"] / memory[mode][one]["workers_pss_mb"])
    target(f"memory_preload_w{top}_over_w{one}_total", ratios[f"memory_preload_w{top}_over_w{one}_total"], "<=", 1.5,
           f"PSS of master + {top} workers / master + {one} worker, preloaded")
    target(f"memory_preload_w{top}_over_w{one}_workers", ratios[f"memory_preload_w{top}_over_w{one}_workers"], "<=",
           1.5, f"summed PSS of {top} workers / {one} worker, preloaded")
    return {k: round(v, 4) for k, v in ratios.items()}, targets


def markdown(results: dict) -> str:
    meta = results["meta"]
    out = [
        f"# Benchmark results ({'quick' if meta['quick'] else 'full'} run)",
        "",
        f"`{meta['command']}` on {meta['host']['cpu']} ({meta['host']['cores']} cores), "
        f"{meta['host']['os']}, Python {meta['host']['python']}, commit {meta['commit'][:10]}, {meta['date']}. "
        f"Load average before: {meta['load_before']}, after: {meta['load_after']}. "
        f"{meta['rounds']} interleaved round(s), {meta['duration_s']} s per run, medians. "
        f"Service: {meta['workers']} workers, access log on, rate limits off; ceiling: the same gunicorn settings.",
        "",
        "## 1. Single row: requests/s (p50 / p99 ms)",
        "",
        "| model | connections | " + " | ".join(CONTENDERS)
        + " | https/tutorial | direct/ceiling | https/direct | " + " | ".join(f"direct/{p}" for p in PEERS) + " |",
        "|---|---|" + "---|" * (len(CONTENDERS) + 3 + len(PEERS)),
    ]
    ratios = results["ratios"]
    for model, by_c in results["single"].items():
        for c, row in by_c.items():
            cells = [f"{row[x]['rps']:.0f} ({row[x]['p50_ms']:.2f} / {row[x]['p99_ms']:.2f})" for x in CONTENDERS]
            out.append(f"| {model} | {c} | " + " | ".join(cells) + " | "
                       f"{ratios[f'{model}_c{c}_kit_https_over_tutorial']:.1f}× | "
                       f"{ratios[f'{model}_c{c}_kit_direct_over_ceiling']:.2f}× | "
                       f"{ratios[f'{model}_c{c}_kit_https_over_kit_direct']:.2f}× | "
                       + " | ".join(f"{ratios[f'{model}_c{c}_kit_direct_over_{_key(p)}']:.1f}×" for p in PEERS)
                       + " |")
    out += ["", "Server CPU per request, ms (all processes of the contender, NGINX included for kit-https; "
            "independent of what else the machine runs):", "",
            "| model | connections | " + " | ".join(CONTENDERS) + " | direct/ceiling |",
            "|---|---|" + "---|" * (len(CONTENDERS) + 1)]
    for model, by_c in results["single"].items():
        for c, row in by_c.items():
            out.append(f"| {model} | {c} | " + " | ".join(f"{row[x]['cpu_ms_per_request']:.3f}" for x in CONTENDERS)
                       + f" | {ratios[f'{model}_c{c}_cpu_per_request_kit_direct_over_ceiling']:.1f}× |")
    out += ["", f"## 2. Batches, RandomForest: rows/s ({meta['batch_connections']} connections)", "",
            "| rows per request | kit-https | kit-direct | " + " | ".join(PEERS) + " | in-process predict_proba | "
            "the kit's engine in process | https/in-process | https/engine | " + " | ".join(f"https/{p}" for p in PEERS)
            + " | CPU ms per batch: " + " / ".join(("kit-https", "kit-direct", *PEERS)) + " |",
            "|---|" + "---|" * (7 + 2 * len(PEERS))]
    for size, row in results["batch"].items():
        out.append(f"| {size} | " + " | ".join(f"{row[c]['rows_per_s']:.0f}" for c in (
                       "kit-https", "kit-direct", *PEERS, "sklearn-inprocess", "engine-inprocess"))
                   + f" | {ratios[f'rf_batch{size}_kit_https_over_sklearn']:.2f}× | "
                   + f"{ratios[f'rf_batch{size}_kit_https_over_engine']:.2f}× | "
                   + " | ".join(f"{ratios[f'rf_batch{size}_kit_https_over_{_key(p)}']:.2f}×" for p in PEERS) + " | "
                   + " / ".join(f"{row[c]['cpu_ms_per_batch']:.2f}" for c in ("kit-https", "kit-direct", *PEERS))
                   + " |")
    out += ["", "## 3. Latency at half of each contender's peak (open loop, 16 connections)", "",
            "| contender/model | offered req/s | achieved req/s | p50 ms | p99 ms | p99.9 ms |",
            "|---|---|---|---|---|---|"]
    for key, row in results["paced"].items():
        out.append(f"| {key} | {row['offered_rps']:.0f} | {row['achieved_rps']:.0f} | {row['p50_ms']:.2f} | "
                   f"{row['p99_ms']:.2f} | {row['p999_ms']:.2f} |")
    memory = results["memory"]
    out += ["", f"## 4. Memory: PSS in MB, RandomForest of {memory['model']['pickled_mb']:.0f} MB pickled", "",
            "| workers | preload: workers | preload: + master | no preload: workers | no preload: + master |",
            "|---|---|---|---|---|"]
    for workers in memory["preload"]:
        p, n = memory["preload"][workers], memory["no-preload"][workers]
        out.append(f"| {workers} | {p['workers_pss_mb']:.0f} | {p['total_pss_mb']:.0f} | {n['workers_pss_mb']:.0f} | "
                   f"{n['total_pss_mb']:.0f} |")
    peers = results["peer_memory"]
    out += ["", f"PSS of the serving stacks after the load figures, same demo models, {meta['workers']} workers each "
            "(MLServer's default: 1): "
            f"kit {peers['kit-direct']:.0f} MB, "
            + ", ".join(f"{PEER_LABELS[p]} {peers[p]:.0f} MB (kit/peer {ratios[f'memory_kit_over_{_key(p)}']:.2f}×)"
                        for p in PEERS) + "."]
    prov = results["provisioning"]
    out += ["", "## 5. Provisioning", ""]
    if prov["status"] == "measured":
        out += ["| fresh host to the first HTTPS prediction | site.yml, first run | site.yml, second run | "
                "changed in the second run | booting the host (not included) |", "|---|---|---|---|---|",
                f"| {prov['first_prediction_s']:.0f} s | {prov['first_run_s']:.0f} s | {prov['second_run_s']:.0f} s | "
                f"{prov['second_run_changed']} | {prov['sandbox_up_s']:.0f} s |"]
    else:
        out.append(f"Not measured: {prov['reason']}.")
    out += ["", "## Targets", "", "| target | measured | wanted | met | measured / wanted |", "|---|---|---|---|---|"]
    for t in results["targets"]:
        out.append(f"| {t['what']} | {t['value']} | {t['target']} | {'yes' if t['met'] else '**no**'} | {t['by']} |")
    if results.get("profile", {}).get("samples"):
        prof = results["profile"]
        out += ["", f"## Profile: kit workers under single-row RandomForest load, 16 connections "
                f"({prof['samples']} samples holding the GIL)", "",
                "| frame (self) | share |", "|---|---|"]
        out += [f"| `{e['frame']}` | {e['share'] * 100:.1f}% |" for e in prof["self"][:15]]
        out += ["", "| frame of the service or on its request path (inclusive) | share |", "|---|---|"]
        out += [f"| `{e['frame']}` | {e['share'] * 100:.1f}% |" for e in prof["inclusive"]
                if any(f in e["frame"] for f in PROFILE_FILES)
                or e["frame"].split(" (")[0].rsplit(".", 1)[-1] in PROFILE_FRAMES]
    if results["warnings"]:
        out += ["", "## Warnings", ""] + [f"- {w}" for w in results["warnings"]]
    return "\n".join(out) + "\n"


def plots(results: dict, directory: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    single = results["single"]
    fig, axes = plt.subplots(1, len(single), figsize=(11, 4), sharey=True)
    for ax, (model, by_c) in zip(np.atleast_1d(axes), single.items(), strict=True):
        width = 0.8 / len(by_c)
        for i, (c, row) in enumerate(by_c.items()):
            ax.bar(np.arange(len(CONTENDERS)) + i * width, [row[x]["rps"] for x in CONTENDERS], width,
                   label=f"{c} connections")
        ax.set_xticks(np.arange(len(CONTENDERS)) + width * (len(by_c) - 1) / 2, CONTENDERS)
        ax.set_title(f"single row, {model}")
        ax.set_yscale("log")
    np.atleast_1d(axes)[0].set_ylabel("requests/s (log)")
    np.atleast_1d(axes)[0].legend()
    written.append(_save(fig, directory / "throughput.png"))

    fig, ax = plt.subplots(figsize=(9, 4))
    keys = list(results["paced"])
    for i, (q, label) in enumerate((("p50_ms", "p50"), ("p99_ms", "p99"), ("p999_ms", "p99.9"))):
        ax.bar(np.arange(len(keys)) + i * 0.27, [results["paced"][k][q] for k in keys], 0.27, label=label)
    ax.set_xticks(np.arange(len(keys)) + 0.27, keys, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms (log)")
    ax.set_title("latency at half of each contender's peak")
    ax.legend()
    written.append(_save(fig, directory / "latency.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    sizes = list(results["batch"])
    for contender in ("kit-https", "kit-direct", *PEERS, "sklearn-inprocess", "engine-inprocess"):
        ax.plot([int(s) for s in sizes], [results["batch"][s][contender]["rows_per_s"] for s in sizes], "o-",
                label=contender)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("rows per request")
    ax.set_ylabel("rows/s")
    ax.set_title("RandomForest batches")
    ax.legend()
    written.append(_save(fig, directory / "batch.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    memory = results["memory"]
    for mode in ("preload", "no-preload"):
        workers = list(memory[mode])
        ax.plot([int(w) for w in workers], [memory[mode][w]["total_pss_mb"] for w in workers], "o-",
                label=f"{mode}: master + workers")
        ax.plot([int(w) for w in workers], [memory[mode][w]["workers_pss_mb"] for w in workers], "o--",
                label=f"{mode}: workers")
    ax.set_xlabel("workers")
    ax.set_ylabel("summed PSS, MB")
    ax.set_title(f"RandomForest of {memory['model']['pickled_mb']:.0f} MB")
    ax.legend()
    written.append(_save(fig, directory / "memory.png"))
    return written


def _save(fig, path: Path) -> str:  # type: ignore[no-untyped-def]
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name


# Main ----------------------------------------------------------------------------------------------------------


def host_info() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    os_name = next((ln.split("=", 1)[1].strip('"') for ln in Path("/etc/os-release").read_text().splitlines()
                    if ln.startswith("PRETTY_NAME=")), platform.system())
    return {"cpu": cpu, "cores": os.cpu_count(), "os": os_name, "kernel": platform.release(),
            "python": platform.python_version(), "memory_gb": round(os.sysconf("SC_PAGE_SIZE")
                                                                     * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def demo_models() -> Path:
    models_dir = CACHE / "models"
    if not all((models_dir / package / "1" / "manifest.json").exists() for package in MODELS.values()):
        log("training the demo models (cached under .cache/bench/models)")
        mlapi("train-demo", "--models-dir", models_dir, check=True)
    return models_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short round and a small forest (CI smoke run)")
    parser.add_argument("--output", type=Path, help="folder for latest.json, latest.md and the PNGs "
                        "(default: bench/results; with --quick .cache/bench/quick, so a smoke run never replaces "
                        "the committed figures)")
    args = parser.parse_args(argv)
    profile = QUICK if args.quick else FULL
    args.output = args.output or (CACHE / "quick" if args.quick else BENCH / "results")
    if shutil.which("wrk") is None:
        print("wrk is not installed: run scripts/setup-host.sh (apt-get install wrk) and start again", file=sys.stderr)
        return 2
    args.output.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results: dict = {
        "meta": {
            "command": "python -m bench.run" + (" --quick" if args.quick else ""),
            "quick": args.quick,
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                     text=True).stdout.strip(),
            "host": host_info(),
            "load_before": [round(x, 2) for x in os.getloadavg()],
            "rounds": profile.rounds,
            "duration_s": profile.duration,
            "connections": list(profile.connections),
            "batch_connections": profile.batch_connections,
            "workers": profile.workers,
            "service_settings": {"MLAPI_RATE_LIMIT_ENABLED": "false", "MLAPI_ACCESS_LOG": "true",
                                 "engine": "auto (ONNX Runtime for the demo packages)", "edge_limits": EDGE_LIMITS},
        },
        "warnings": [],
    }
    models_dir = demo_models()
    with tempfile.TemporaryDirectory(prefix="mlapi-bench-") as scratch:
        workdir = Path(scratch)
        log(f"starting the contenders (models from {models_dir})")
        stack = Stack(models_dir, workdir, profile)
        log("contenders answer")
        try:
            # Warm every contender once so first-request costs do not land in round 1.
            for contender in CONTENDERS if profile.warmup else ():
                for model in MODELS:
                    wrk(stack.endpoint(contender, model), stack.body(contender, model), 16, 1, workdir)
            results["single"] = figure_single(stack, profile, workdir, results["warnings"])
            results["batch"] = figure_batch(stack, models_dir, profile, workdir, results["warnings"])
            results["paced"] = figure_paced(stack, results["single"], profile, results["warnings"])
            results["peer_memory"] = figure_peer_memory(stack)
            results["profile"] = (profile_kit(stack, profile, workdir) if profile.profile_seconds
                                  else {"samples": 0, "reason": "not run in --quick"})
        finally:
            stack.stop()
        results["memory"] = figure_memory(profile, workdir)
    results["provisioning"] = figure_provisioning(profile)
    results["ratios"], results["targets"] = ratios_and_targets(results, profile)
    results["meta"]["load_after"] = [round(x, 2) for x in os.getloadavg()]
    results["meta"]["seconds"] = round(time.monotonic() - started, 1)
    (args.output / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    report = markdown(results)
    (args.output / "latest.md").write_text(report)
    results["meta"]["plots"] = plots(results, args.output)
    (args.output / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    print(report)
    log(f"done in {results['meta']['seconds']} s: {args.output / 'latest.json'}, latest.md, "
        + ", ".join(results["meta"]["plots"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
