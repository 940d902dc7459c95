"""The prediction path shared by /v1 and /v2: pick a version, run it once on the batch, record what happened."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.logs import get_logger
from app.metrics import SHADOW_AGREEMENT
from app.packages.gate import ModelVersion
from app.packages.validation import Batch
from app.serving.registry import ModelRegistry, ServedModel, VersionState

log = get_logger("inference")

# Drift gauges are refreshed every this many observed rows, not on every request.
DRIFT_REFRESH_ROWS = 200

# A single row may be scored on the event loop when the model's measured CPU cost for one row
# is below this: handing it to the threadpool and back costs more than that (two thread switches
# and the GIL changing hands), and a millisecond is short enough not to hold up other requests.
INLINE_MAX_SECONDS = 0.001
# Single-row calls timed per engine before the decision; the median of them decides.
COST_SAMPLES = 16

def runs_inline(registry: ModelRegistry, served: ServedModel) -> bool:
    """Whether a single row for this model is cheap enough to score on the event loop: true once every
    version it may route to has been measured (in the threadpool) below INLINE_MAX_SECONDS."""
    return all((state := registry.kept_state(model)) is not None and state.inline
               for model in served.versions.values())


def _infer_and_measure(state: VersionState, X: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """The first single-row calls of a version are timed in CPU time of the calling thread, so time spent
    waiting for the GIL or a core on a busy machine does not count as the model's cost."""
    model = state.model
    if len(X) != 1 or state.inline is not None:
        return model.infer(X)
    start = time.thread_time()
    result = model.infer(X)
    costs = state.row_costs
    costs.append(time.thread_time() - start)
    if len(costs) >= COST_SAMPLES and state.inline is None:
        state.inline = statistics.median(costs) <= INLINE_MAX_SECONDS
        log.info("measured single-row cost", extra={
            "model": model.name, "version": model.version, "engine": model.engine.name,
            "row_cost_ms": round(statistics.median(costs) * 1000, 3), "inline": state.inline})
    return result


@dataclass
class PredictionResult:
    model: ModelVersion
    batch: Batch  # the rows as the version that scored them decoded them
    labels: np.ndarray  # class labels, or values for regressors
    probabilities: np.ndarray | None

    def predictions(self) -> list[Any]:
        return self.labels.tolist()

    def probability_maps(self) -> list[dict[str, float]] | None:
        if self.probabilities is None:
            return None
        classes = [str(c) for c in self.model.classes or []]
        return [dict(zip(classes, row, strict=True)) for row in self.probabilities.tolist()]


def observe_drift(state: VersionState, X: np.ndarray) -> None:
    monitor = state.drift
    monitor.observe(X)
    rows = state.rows_since_refresh + len(X)
    if rows < DRIFT_REFRESH_ROWS:
        state.rows_since_refresh = rows
        return
    state.rows_since_refresh = 0  # a lost update between threads only delays the next refresh
    for feature, value in (monitor.scores() or {}).items():  # None below min_samples
        state.drift_psi(feature).set(value)


Decoder = Callable[[ModelVersion], Batch]


def predict(
    registry: ModelRegistry,
    served: ServedModel,
    decode: Decoder,
    *,
    user_id: str | None = None,
    version: str | None = None,
    state: Any = None,
) -> PredictionResult:
    """Score a request with the version the routing table picks, decoded by that version's own input schema
    (``decode(model)`` raises ValidationFailure); one call into the model for the whole batch."""
    model = served.choose(user_id=user_id, override=version, overrides=registry.settings.version_override)
    if state is not None:
        state.model = model.name
        state.version = model.version
        state.engine = model.engine.name
    batch = decode(model)
    version_state = registry.state(model)
    labels, probabilities = _infer_and_measure(version_state, batch.X)
    count_predictions(version_state, labels)
    observe_drift(version_state, batch.codes)
    return PredictionResult(model, batch, labels, probabilities)


def count_predictions(state: VersionState, labels: np.ndarray) -> None:
    if state.model.task != "classifier":
        state.predictions("").inc(len(labels))
    elif len(labels) == 1:
        state.predictions(str(labels[0])).inc()
    else:
        values, counts = np.unique(labels.astype(str), return_counts=True)
        for value, count in zip(values.tolist(), counts.tolist(), strict=True):
            state.predictions(value).inc(count)


def compare_shadow(served: ServedModel, primary: PredictionResult, request_id: str | None) -> None:
    """Score the same rows with the shadow version, after the response has gone; log and count agreement.

    A reload keeps every version of a model to one request contract, so the primary's input fits the shadow."""
    shadow = served.versions.get(served.shadow or "")
    if shadow is None or shadow is primary.model:
        return
    try:
        labels, _ = shadow.infer(primary.batch.X)
    except Exception:
        log.exception("shadow scoring failed", extra={"model": served.name, "shadow": shadow.version})
        return
    if primary.model.task == "classifier":
        agree = labels.astype(str) == primary.labels.astype(str)
    else:
        agree = np.isclose(labels.astype(float), primary.labels.astype(float), rtol=1e-3, atol=1e-6)
    n_agree = int(agree.sum())
    n = len(agree)
    SHADOW_AGREEMENT.labels(served.name, primary.model.version, shadow.version, "true").inc(n_agree)
    if n - n_agree:
        SHADOW_AGREEMENT.labels(served.name, primary.model.version, shadow.version, "false").inc(n - n_agree)
    log.info(
        "shadow prediction",
        extra={
            "request_id": request_id,
            "model": served.name,
            "version": primary.model.version,
            "shadow_version": shadow.version,
            "instances": n,
            "agreed": n_agree,
        },
    )
