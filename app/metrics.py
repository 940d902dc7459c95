"""Prometheus metrics, summed across gunicorn workers.

prometheus-client's multiprocess mode is on when ``PROMETHEUS_MULTIPROC_DIR`` is
set before this module is imported (``app/gunicorn_conf.py`` sees to that): each
process writes its samples to files there and ``/metrics`` merges them.
"""

from __future__ import annotations

import os
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
OVERLOADED = Counter(
    "mlapi_overloaded_total",
    "Requests answered 503 at once because their worker was at MLAPI_LIMIT_CONCURRENCY.",
)
SHADOW_AGREEMENT = Counter(
    "mlapi_shadow_predictions_total",
    "Shadow-scored instances by whether the shadow version agreed with the primary.",
    ["model", "primary", "shadow", "agree"],
)


_children: dict[tuple[Any, tuple[str, ...]], Any] = {}


def labelled(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)``, remembered: prometheus_client takes a lock and checks every label value on
    each lookup, which the request path would pay several times per request. There are as many entries as
    exported series."""
    key = (metric, labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*labels)
    return child


def render() -> tuple[bytes, str]:
    """The exposition text for /metrics: merged over every worker when multiprocess."""
    if MULTIPROCESS:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def mark_process_dead(pid: int) -> None:
    if MULTIPROCESS:
        multiprocess.mark_process_dead(pid)
