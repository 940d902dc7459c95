"""Prometheus metrics, summed across gunicorn workers.

prometheus-client's multiprocess mode is on when ``PROMETHEUS_MULTIPROC_DIR`` is
set before this module is imported (``app/gunicorn_conf.py`` sees to that): each
process writes its samples to files there and ``/metrics`` merges them.

Every worker writes its own files (``counter_<pid>.db``, ...), and a recycled worker's
files would stay for the life of the master. When a worker dies, the master folds its
counters, histograms and summaries into one archive file per type (``counter_archive.db``,
...), which the merge still sums, and deletes its files; gauges follow their
multiprocess_mode. An flock on a lock file in the folder keeps a /metrics render
(shared) and a fold (exclusive) apart, so a render never counts a dead worker's samples
twice or not at all.
"""

from __future__ import annotations

import fcntl
import os
import re
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.mmap_dict import MmapedDict

from app.logs import get_logger

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

# Buckets sized for in-memory inference: most answers take well under 10 ms.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

REQUESTS = Counter(
    "mlapi_http_requests_total",
    "HTTP requests by route, method, status and model version.",
    ["route", "method", "status", "model", "version"],
)
LATENCY = Histogram(
    "mlapi_http_request_duration_seconds",
    "Time from request start to the end of the response, by route, status and model version.",
    ["route", "method", "status", "model", "version"],
    buckets=LATENCY_BUCKETS,
)
PREDICTIONS = Counter(
    "mlapi_predictions_total",
    "Predicted instances by model, version and predicted label (empty for regressors).",
    ["model", "version", "label"],
)
MODEL_LOAD_FAILURES = Counter(
    "mlapi_model_load_failures_total",
    "Model packages refused by the compatibility gate, by model and check.",
    ["model", "version", "check"],
)
MODEL_INFO = Gauge(
    "mlapi_model_loaded",
    "1 for each model version being served, with the engine in use.",
    ["model", "version", "engine"],
    multiprocess_mode="livemax",
)
DRIFT = Gauge(
    "mlapi_feature_drift_psi",
    "Population stability index of recent inputs against the package's reference, per feature (max over workers).",
    ["model", "version", "feature"],
    multiprocess_mode="livemax",
)
RATE_LIMITED = Counter(
    "mlapi_rate_limited_total",
    "Requests rejected by the service's rate limits, by route.",
    ["route"],
)
RATE_LIMIT_STORE_UP = Gauge(
    "mlapi_rate_limit_store_up",
    "1 when the shared rate-limit store answered the last call, 0 when it did not (limits are then skipped).",
    multiprocess_mode="livemostrecent",
)
RATE_LIMIT_STORE_FAILURES = Counter(
    "mlapi_rate_limit_store_failures_total",
    "Calls to the shared rate-limit store that failed or timed out, by error class.",
    ["error"],
)
RATE_LIMIT_BYPASSED = Counter(
    "mlapi_rate_limit_bypassed_total",
    "Rate-limit checks skipped because the shared store did not answer (the request went on unlimited).",
)
OVERLOADED = Counter(
    "mlapi_overloaded_total",
    "Requests answered 503 at once because their worker was at MLAPI_LIMIT_CONCURRENCY.",
)
SHADOW_AGREEMENT = Counter(
    "mlapi_shadow_predictions_total",
    "Shadow-scored instances by whether the shadow version agreed with the primary.",
    ["model", "primary", "shadow", "agree"],
)

PREDICTION_LOG_WRITTEN = Counter(
    "mlapi_prediction_log_written_total",
    "Prediction-log records written to the sink.",
)
PREDICTION_LOG_DROPPED = Counter(
    "mlapi_prediction_log_dropped_total",
    "Sampled prediction-log records not written: queue_full (the writer was behind) or sink_error.",
    ["reason"],
)


def _child(metric: Any, labels: tuple[str, ...]) -> Any | None:
    """``metric.labels(*labels)``, or None when the series cannot be created.

    A new series opens a file in the metrics folder; a folder that is gone or full (a worker outliving its
    instance's restart) costs the sample, never the request."""
    try:
        return metric.labels(*labels)
    except OSError as exc:
        _warn_once(exc)
        return None


class Series:
    """The children of one metric whose first label values are fixed: the series one owner writes (a loaded
    version owns its predictions and drift gauges, app/serving/registry.py), each made once.

    prometheus_client takes a lock and checks every label value on each ``labels()`` call, which the request path
    would pay several times per request. A child that could not be made is not remembered: the next call retries.
    """

    def __init__(self, metric: Any, *fixed: str) -> None:
        self.metric = metric
        self.fixed = fixed
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *rest: str) -> Any:
        child = self._children.get(rest)
        if child is None:
            child = _child(self.metric, self.fixed + rest)
            if child is None:
                return _DISCARD
            self._children[rest] = child
        return child


_labelled: dict[Any, Series] = {}


def labelled(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)``, remembered for the life of the process, for series that no one object owns
    (a route's requests, the prediction log's drops). There are as many entries as exported series."""
    series = _labelled.get(metric)
    if series is None:
        series = _labelled[metric] = Series(metric)
    return series(*labels)


class _Discard:
    """Stands in for a series that could not be created: takes every update and keeps none."""

    def inc(self, amount: float = 1) -> None: ...

    def set(self, value: float) -> None: ...

    def observe(self, amount: float) -> None: ...


_DISCARD = _Discard()
_warned: set[str] = set()


def _warn_once(exc: OSError) -> None:
    kind = type(exc).__name__
    if kind not in _warned:
        _warned.add(kind)
        log.warning(
            "a metric sample was dropped: the metrics folder cannot take a new series",
            extra={"error": kind, "errno": exc.errno},
        )


LOCK_FILE = "fold.lock"  # not *.db: the merge reads only *.db files
ARCHIVE = "archive"  # in place of a pid: what dead workers counted
# How long the master waits for renders in progress before it leaves a fold for the next worker exit.
FOLD_LOCK_WAIT_SECONDS = 5.0
# <type>_<pid>.db, gauge_<mode>_<pid>.db: the names prometheus_client gives its files.
_DB_FILE = re.compile(r"^(?P<kind>counter|histogram|summary|gauge_[a-z]+)_(?P<pid>\d+)\.db$")
# How a dead process's sample joins the archived one, by file kind; sum for the others.
_COMBINE: dict[str, Any] = {"gauge_min": min, "gauge_max": max, "gauge_mostrecent": None}

log = get_logger("metrics")


def _folder() -> Path:
    return Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])


@contextmanager
def _folder_lock(folder: Path, operation: int, wait: float | None = None) -> Iterator[bool]:
    """flock on the folder's lock file; yields False when ``wait`` seconds passed without it.

    Opened anew each time: a descriptor inherited across fork would share its lock with the master."""
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if wait is None:
            fcntl.flock(fd, operation)
        else:
            deadline = time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(fd, operation | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        yield False
                        return
                    time.sleep(0.01)
        yield True
    finally:
        os.close(fd)  # releases the lock


class FolderHealth:
    """The folder's own gauges, read at render time: an alert can fire before its filesystem fills."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def collect(self) -> Iterable[GaugeMetricFamily]:
        files = sum(1 for _ in os.scandir(self.folder))
        stat = os.statvfs(self.folder)
        yield GaugeMetricFamily("mlapi_metrics_dir_files", "Files in PROMETHEUS_MULTIPROC_DIR.", value=files)
        yield GaugeMetricFamily(
            "mlapi_metrics_dir_free_bytes",
            "Bytes free on the filesystem of PROMETHEUS_MULTIPROC_DIR (workers die of SIGBUS when it is full).",
            value=stat.f_bavail * stat.f_frsize,
        )


class FolderCollector(multiprocess.MultiProcessCollector):
    """prometheus_client's merge of the folder, minus the files of workers that are just starting.

    A new worker's file is empty between its creation and its first write; prometheus_client's reader
    fails on an empty file, and with workers recycled often a scrape would meet one."""

    def collect(self) -> Iterable[Any]:
        files = []
        for entry in os.scandir(self._path):
            try:
                if entry.name.endswith(".db") and entry.stat().st_size > 0:
                    files.append(entry.path)
            except FileNotFoundError:  # a live gauge of a worker that just died
                continue
        return self.merge(files, accumulate=True)


def render() -> tuple[bytes, str]:
    """The exposition text for /metrics: merged over every worker when multiprocess."""
    if MULTIPROCESS:
        folder = _folder()
        registry = CollectorRegistry()
        FolderCollector(registry, path=str(folder))
        registry.register(FolderHealth(folder))
        with _folder_lock(folder, fcntl.LOCK_SH):
            return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fold(archive: Path, dead: list[Path], combine: Any) -> None:
    """Write archive + dead files, combined per sample, to the archive (replaced whole)."""
    values: dict[str, tuple[float, float]] = {}
    for path in ([archive] if archive.exists() else []) + dead:
        for key, value, timestamp, _ in MmapedDict.read_all_values_from_file(str(path)):
            if key in values:
                old_value, old_timestamp = values[key]
                if combine is None:  # mostrecent: the value written last
                    value, timestamp = (value, timestamp) if timestamp >= old_timestamp else values[key]
                else:
                    value, timestamp = combine((old_value, value)), max(old_timestamp, timestamp)
            values[key] = (value, timestamp)
    staging = archive.with_name(archive.name + ".new")  # not *.db until it is complete
    staging.unlink(missing_ok=True)
    merged = MmapedDict(str(staging))
    try:
        for key, (value, timestamp) in values.items():
            merged.write_value(key, value, timestamp)
    finally:
        merged.close()
    os.replace(staging, archive)


def archive_dead_processes(folder: Path | None = None) -> None:
    """Fold the files of every dead process into the archive files and delete them.

    Run by the gunicorn master when a worker exits. Files of processes still alive (the master,
    the other workers) stay. Live gauges (live* modes) of the dead are dropped, as
    prometheus_client's mark_process_dead does; gauges of mode "all" are per process by
    definition and stay.
    """
    if not MULTIPROCESS:
        return
    folder = folder or _folder()
    dead: dict[str, list[Path]] = {}
    for entry in os.scandir(folder):
        match = _DB_FILE.match(entry.name)
        if match and not _alive(int(match["pid"])):
            dead.setdefault(match["kind"], []).append(Path(entry.path))
    if not dead:
        return
    with _folder_lock(folder, fcntl.LOCK_EX, wait=FOLD_LOCK_WAIT_SECONDS) as locked:
        if not locked:
            log.warning("metrics of dead workers not archived yet: /metrics renders held the lock; "
                        "they are archived when the next worker exits", extra={"folder": str(folder)})
            return
        for kind, files in dead.items():
            if kind == "gauge_all":
                continue  # one series per process, dead or alive, by definition of the mode
            if not kind.startswith("gauge_live"):  # live gauges of the dead are dropped
                _fold(folder / f"{kind}_{ARCHIVE}.db", files, _COMBINE.get(kind, sum))
            for path in files:
                path.unlink(missing_ok=True)


# Files one process writes at most: counter, histogram, summary and one gauge mode (the service's gauges
# share one mode); a few more for the archives and the lock.
FILES_PER_PROCESS = 4
FILES_MARGIN = 8


def check_folder(processes: int, min_free_bytes: int, folder: Path | None = None) -> None:
    """Log a warning when the folder holds more files than ``processes`` explain, or its filesystem fills."""
    if not MULTIPROCESS:
        return
    folder = folder or _folder()
    files = sum(1 for _ in os.scandir(folder))
    stat = os.statvfs(folder)
    free = stat.f_bavail * stat.f_frsize
    if files > FILES_PER_PROCESS * processes + FILES_MARGIN:
        log.warning("the metrics folder holds more files than its processes explain; look for archiving "
                    "warnings above and for other writers of the folder",
                    extra={"folder": str(folder), "files": files, "processes": processes})
    if free < min_free_bytes:
        log.warning("the filesystem of the metrics folder is nearly full; workers die of SIGBUS when it is "
                    "full: free space on it or set PROMETHEUS_MULTIPROC_DIR elsewhere",
                    extra={"folder": str(folder), "free_bytes": free, "min_free_bytes": min_free_bytes})
