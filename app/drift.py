"""Input drift: per-feature reference statistics and Population Stability Index.

A package records, for every feature, the interior cut points of 10 quantile
bins of the sample it was built with and the share of the sample in each bin.
The outer bins are open (``x <= first cut`` and ``x > last cut``) so values
outside the sample's range still land in a bin. The service keeps the most
recent inputs per worker in a ring buffer and compares their bin shares with
the reference:

    PSI = sum((observed - reference) * ln(observed / reference))

Common reading: below 0.1 stable, 0.1-0.2 moderate shift, 0.2 or more drifted.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from app.packaging import Manifest

REFERENCE_BINS = 10
# Floor for a bin share, so an empty bin on either side gives a large but finite term.
PSI_EPSILON = 1e-4


def bin_index(values: np.ndarray, cuts: np.ndarray) -> np.ndarray:
    """Bin of every value: 0 for x <= cuts[0], ..., len(cuts) for x > cuts[-1]."""
    return np.searchsorted(cuts, values, side="left")


def bin_shares(values: np.ndarray, cuts: np.ndarray) -> np.ndarray:
    counts = np.bincount(bin_index(values, cuts), minlength=len(cuts) + 1)
    return counts / max(len(values), 1)


def reference_statistics(X: np.ndarray, feature_names: list[str]) -> dict[str, dict[str, Any]]:
    """Per-feature reference for drift: quantile cut points, bin shares, mean, std, min, max."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] == 0:
        raise ValueError("the reference sample must be a non-empty 2-D table")
    quantiles = np.linspace(0, 1, REFERENCE_BINS + 1)[1:-1]
    reference: dict[str, dict[str, Any]] = {}
    for j, name in enumerate(feature_names):
        column = X[:, j]
        # Repeated cut points (few distinct values) would make empty bins; keep each once.
        cuts = np.unique(np.quantile(column, quantiles))
        reference[name] = {
            "bin_edges": cuts.tolist(),
            "proportions": bin_shares(column, cuts).tolist(),
            "count": int(column.shape[0]),
            "mean": float(column.mean()),
            "std": float(column.std()),
            "min": float(column.min()),
            "max": float(column.max()),
        }
    return reference


def _finite_numbers(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in value
    )


def check_reference(reference: Any, feature_names: list[str]) -> None:
    """Raise ValueError naming the feature whose reference statistics DriftMonitor and the gate cannot use.

    Checked when a package is loaded: a broken reference found only at the first
    prediction would turn every prediction into a 500.
    """
    if not isinstance(reference, dict):
        raise ValueError("reference must be an object with one entry per feature")
    for name in feature_names:
        stats = reference.get(name)
        if not isinstance(stats, dict):
            raise ValueError(f"reference has no statistics for feature {name!r}")
        edges, shares, mean = stats.get("bin_edges"), stats.get("proportions"), stats.get("mean")
        if not _finite_numbers(edges):
            raise ValueError(f"reference.{name}.bin_edges must be a list of finite numbers")
        if any(b <= a for a, b in zip(edges, edges[1:])):
            raise ValueError(f"reference.{name}.bin_edges must be strictly increasing")
        if not _finite_numbers(shares) or len(shares) != len(edges) + 1:
            raise ValueError(
                f"reference.{name}.proportions must be {len(edges) + 1} finite numbers "
                f"(one more than bin_edges), got {shares!r:.80}"
            )
        if any(s < 0 or s > 1 for s in shares) or abs(sum(shares) - 1) > 1e-6:
            raise ValueError(f"reference.{name}.proportions must be shares between 0 and 1 that sum to 1")
        if not _finite_numbers([mean]):
            raise ValueError(f"reference.{name}.mean must be a finite number")


def psi(observed: np.ndarray, expected: np.ndarray) -> float:
    observed = np.maximum(observed, PSI_EPSILON)
    expected = np.maximum(expected, PSI_EPSILON)
    return float(np.sum((observed - expected) * np.log(observed / expected)))


class DriftMonitor:
    """Recent inputs of one model version in one worker, scored against the package's reference.

    ``observe`` is called on every request from the threadpool, so it holds a
    lock for the copy only; ``scores`` works on a snapshot of the window.
    """

    def __init__(self, manifest: Manifest, window: int = 1000, min_samples: int = 100, alert_psi: float = 0.2):
        if window < 1 or min_samples < 1:
            raise ValueError("window and min_samples must be >= 1")
        self.feature_names = [f.name for f in manifest.features]
        missing = [name for name in self.feature_names if name not in manifest.reference]
        if missing:
            raise ValueError(f"the manifest has no reference statistics for {missing}")
        self.window = window
        self.min_samples = min(min_samples, window)
        self.alert_psi = alert_psi
        self._cuts = [np.asarray(manifest.reference[n]["bin_edges"], dtype=np.float64) for n in self.feature_names]
        self._expected = [
            np.asarray(manifest.reference[n]["proportions"], dtype=np.float64) for n in self.feature_names
        ]
        self._buffer = np.empty((window, len(self.feature_names)), dtype=np.float64)
        self._next = 0  # row written next
        self._filled = 0  # rows holding data, up to window
        self._lock = threading.Lock()

    def observe(self, X: np.ndarray) -> None:
        X = np.asarray(X, dtype=np.float64)
        if X.ndim == 1:
            X = X.reshape(1, -1)
        n = X.shape[0]
        if n == 0:
            return
        if n >= self.window:
            X, n = X[-self.window :], self.window
        with self._lock:
            end = self._next + n
            if end <= self.window:
                self._buffer[self._next : end] = X
            else:
                head = self.window - self._next
                self._buffer[self._next :] = X[:head]
                self._buffer[: n - head] = X[head:]
            self._next = end % self.window
            self._filled = min(self._filled + n, self.window)

    def _snapshot(self) -> np.ndarray:
        with self._lock:
            return self._buffer[: self._filled].copy()

    def scores(self) -> dict[str, float] | None:
        recent = self._snapshot()
        if recent.shape[0] < self.min_samples:
            return None
        return {
            name: psi(bin_shares(recent[:, j], self._cuts[j]), self._expected[j])
            for j, name in enumerate(self.feature_names)
        }

    def status(self) -> dict[str, Any]:
        scores = self.scores()
        drifted = [name for name, value in (scores or {}).items() if value >= self.alert_psi]
        return {
            "samples": self._filled,
            "window": self.window,
            "scores": scores,
            "drifted": drifted,
            "method": "psi",
            "alert_psi": self.alert_psi,
        }
