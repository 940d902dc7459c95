"""The metrics folder of a gunicorn whose workers are recycled again and again.

Two workers recycled after about 20 requests each, at least 50 times, while /metrics is scraped
all along: the folder stays small, and the counters count every request once.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from itertools import pairwise

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from scripts.harness.samples import IRIS_ROW
from scripts.harness.servers import gunicorn

pytestmark = pytest.mark.integration

WORKERS = 2
RECYCLES = 50
CLIENTS = 4
MAX_PREDICTIONS = 6000  # bounds the run if workers recycle less often than they should
MAX_SECONDS = 120
RECYCLED = "Maximum request limit"
PATH = "/v1/models/iris-logreg/predict"  # also its route label


@dataclass
class Run:
    predictions: int = 0  # answered, whatever the status
    transport_errors: list[str] = field(default_factory=list)
    scrapes: list[tuple[int, float]] = field(default_factory=list)  # (status, predictions counted)
    failed_scrapes: list[str] = field(default_factory=list)  # what a scrape that was not a 200 answered
    server_log: str = ""
    recycles: int = 0
    final: str = ""
    files: list[str] = field(default_factory=list)
    file_counts: tuple[int, int] = (0, 0)  # the folder's smallest and largest size during the final render


def _counted(text: str, route: str) -> float:
    """mlapi_http_requests_total summed over every label but the route."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "mlapi_http_requests_total" and sample.labels.get("route") == route
    )


def _errors(log: str) -> str:
    """The server log's error records and tracebacks, for a failure message."""
    lines = log.splitlines()
    keep = [i for i, line in enumerate(lines) if "Traceback" in line or '"ERROR"' in line]
    return "\n".join("\n".join(lines[i:i + 40]) for i in keep[:3])


def _gauge(text: str, name: str) -> float:
    return next(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


@pytest.fixture(scope="module")
def recycled(demo_models) -> Run:
    env = {
        "MLAPI_MODELS_DIR": str(demo_models),
        "MLAPI_DEFAULT_MODEL": "iris",
        "MLAPI_RATE_LIMIT_ENABLED": "false",
        "MLAPI_ACCESS_LOG": "false",
        "MLAPI_MAX_REQUESTS": "20",
        "MLAPI_MAX_REQUESTS_JITTER": "5",
    }
    run = Run()
    lock = threading.Lock()
    done = threading.Event()
    with gunicorn(env, workers=WORKERS) as server:
        deadline = time.monotonic() + MAX_SECONDS

        def predict() -> None:
            with httpx.Client(base_url=server.url, timeout=30) as client:
                while not done.is_set():
                    try:
                        client.post(PATH, json={"features": IRIS_ROW})
                    except httpx.TransportError as exc:
                        with lock:
                            run.transport_errors.append(repr(exc))
                        continue
                    with lock:
                        run.predictions += 1
                        if run.predictions >= MAX_PREDICTIONS:
                            done.set()

        def scrape() -> None:
            with httpx.Client(base_url=server.url, timeout=30) as client:
                while not done.is_set():
                    r = client.get("/metrics")
                    run.scrapes.append((r.status_code, _counted(r.text, PATH) if r.status_code == 200 else -1))
                    if r.status_code != 200:
                        run.failed_scrapes.append(f"{r.status_code} {r.text[:300]}")

        threads = [threading.Thread(target=predict) for _ in range(CLIENTS)] + [threading.Thread(target=scrape)]
        for thread in threads:
            thread.start()
        try:
            while not done.is_set() and time.monotonic() < deadline:
                run.recycles = server.output().count(RECYCLED)
                if run.recycles >= RECYCLES:
                    break
                time.sleep(0.2)
        finally:
            done.set()
            for thread in threads:
                thread.join(60)
        run.recycles = server.output().count(RECYCLED)
        # The final render is a request too, and may land on a fresh worker whose files do not exist yet while the
        # master folds the files of the one it replaced: the folder's size moves during the render. It is listed
        # without pause while the render runs, and the smallest and largest sizes seen bound the gauge.
        seen: list[int] = [len(os.listdir(server.metrics_dir))]
        rendering = threading.Event()
        rendering.set()

        def watch() -> None:
            while rendering.is_set():
                seen.append(len(os.listdir(server.metrics_dir)))

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            run.final = httpx.get(server.url + "/metrics", timeout=30).text
        finally:
            rendering.clear()
            watcher.join(10)
        run.files = sorted(os.listdir(server.metrics_dir))
        run.server_log = server.output()
        seen.append(len(run.files))
        run.file_counts = (min(seen), max(seen))
    assert run.recycles >= RECYCLES, f"only {run.recycles} recycles in {run.predictions} predictions"
    assert run.transport_errors == [], run.transport_errors[:5]
    return run


def test_the_folder_stays_bounded_by_the_workers(recycled):
    # Per live process a counter, a histogram and a gauge file; the master's; two archives and the lock.
    assert len(recycled.files) <= 4 * (WORKERS + 1) + 4, recycled.files


def test_every_prediction_is_counted_once_across_recycled_workers(recycled):
    assert _counted(recycled.final, PATH) == recycled.predictions


def test_scrapes_during_recycling_never_see_a_counter_go_back(recycled):
    statuses = {status for status, _ in recycled.scrapes}
    counts = [count for _, count in recycled.scrapes]
    assert statuses == {200}, (recycled.failed_scrapes[:3], _errors(recycled.server_log))
    assert len(counts) > 10, "too few scrapes to show anything"
    assert all(a <= b for a, b in pairwise(counts)), counts


def test_the_folder_reports_its_own_size_and_free_space(recycled):
    low, high = sorted(recycled.file_counts)
    assert low <= _gauge(recycled.final, "mlapi_metrics_dir_files") <= high, recycled.file_counts
    assert _gauge(recycled.final, "mlapi_metrics_dir_free_bytes") > 0
