"""Input drift: per-feature reference statistics and Population Stability Index.

A package records, for every numeric feature, the interior cut points of 10
quantile bins of the sample it was built with and the share of the sample in
each bin. The outer bins are open (``x <= first cut`` and ``x > last cut``) so
values outside the sample's range still land in a bin. For a string feature it
records the share of each known category instead; a category the sample never
had is one more bin, empty in the reference, and its share is reported as
``unseen``. The service keeps the most recent inputs per worker in a ring
buffer (categories by their index, app/validation.py's ``Batch.codes``) and
compares their bin shares with the reference:

    PSI = sum((observed - reference) * ln(observed / reference))

Common reading: below 0.1 stable, 0.1-0.2 moderate shift, 0.2 or more drifted.
"""

from __future__ import annotations

import threading
from itertools import pairwise
from typing import TYPE_CHECKING, Any, TypeGuard

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


def _categories(feature: Any) -> tuple[str, ...] | None:
    return feature.categories if getattr(feature, "type", "float") == "string" else None


def _name(feature: Any) -> str:
    return feature if isinstance(feature, str) else feature.name


def category_shares(codes: np.ndarray, n_categories: int) -> np.ndarray:
    """[unseen, category 0, category 1, ...] shares of codes (-1 for a category the reference never had)."""
    counts = np.bincount(codes.astype(np.int64) + 1, minlength=n_categories + 1)
    return counts / max(len(codes), 1)


def reference_statistics(X: np.ndarray, features: list[Any]) -> dict[str, dict[str, Any]]:
    """Per-feature reference for drift: quantile cut points, bin shares, mean, std, min, max of a number;
    the share of each known category of a string (X holds its codes). ``features`` are names or Features."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] == 0:
        raise ValueError("the reference sample must be a non-empty 2-D table")
    quantiles = np.linspace(0, 1, REFERENCE_BINS + 1)[1:-1]
    reference: dict[str, dict[str, Any]] = {}
    for j, feature in enumerate(features):
        name = _name(feature)
        column = X[:, j]
        categories = _categories(feature)
        if categories is not None:
            reference[name] = {
                "categories": list(categories),
                "proportions": category_shares(column, len(categories))[1:].tolist(),
                "count": int(column.shape[0]),
                "unseen": float(np.mean(column < 0)),
            }
            continue
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


def _finite_numbers(value: Any) -> TypeGuard[list[float]]:
    return isinstance(value, list) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in value
    )


def check_reference(reference: Any, features: list[Any]) -> None:
    """Raise ValueError naming the feature whose reference statistics DriftMonitor and the gate cannot use.

    Checked when a package is loaded: a broken reference found only at the first
    prediction would turn every prediction into a 500. ``features`` are names or Features.
    """
    if not isinstance(reference, dict):
        raise ValueError("reference must be an object with one entry per feature")
    for feature in features:
        name = _name(feature)
        stats = reference.get(name)
        if not isinstance(stats, dict):
            raise ValueError(f"reference has no statistics for feature {name!r}")
        categories = _categories(feature)
        if categories is not None:
            shares = stats.get("proportions")
            if stats.get("categories") != list(categories):
                raise ValueError(f"reference.{name}.categories must be the feature's categories, in order")
            if not _finite_numbers(shares) or len(shares) != len(categories):
                raise ValueError(f"reference.{name}.proportions must be one finite share per category")
            if any(s < 0 or s > 1 for s in shares) or sum(shares) > 1 + 1e-6:
                raise ValueError(f"reference.{name}.proportions must be shares between 0 and 1 that sum to 1 or less")
            continue
        edges, shares, mean = stats.get("bin_edges"), stats.get("proportions"), stats.get("mean")
        if not _finite_numbers(edges):
            raise ValueError(f"reference.{name}.bin_edges must be a list of finite numbers")
        if any(b <= a for a, b in pairwise(edges)):
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
        # A string feature has no cut points: its bins are [unseen, category 0, ...].
        self._n_categories = [len(_categories(f) or ()) if _categories(f) else None for f in manifest.features]
        self._cuts = [
            np.asarray(manifest.reference[f.name].get("bin_edges") or [], dtype=np.float64) for f in manifest.features
        ]
        self._expected = [
            np.asarray(
                ([manifest.reference[f.name].get("unseen", 0.0)] if k is not None else [])
                + list(manifest.reference[f.name]["proportions"]),
                dtype=np.float64,
            )
            for f, k in zip(manifest.features, self._n_categories, strict=True)
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

    def _shares(self, recent: np.ndarray, j: int) -> np.ndarray:
        k = self._n_categories[j]
        if k is None:
            return bin_shares(recent[:, j], self._cuts[j])
        return category_shares(recent[:, j], k)

    def scores(self) -> dict[str, float] | None:
        recent = self._snapshot()
        if recent.shape[0] < self.min_samples:
            return None
        return {name: psi(self._shares(recent, j), self._expected[j]) for j, name in enumerate(self.feature_names)}

    def unseen(self) -> dict[str, float] | None:
        """Share of the recent rows whose category the reference sample never had, per string feature."""
        recent = self._snapshot()
        if recent.shape[0] < self.min_samples or not any(k is not None for k in self._n_categories):
            return None
        return {
            name: float(np.mean(recent[:, j] < 0))
            for j, (name, k) in enumerate(zip(self.feature_names, self._n_categories, strict=True))
            if k is not None
        }

    def status(self) -> dict[str, Any]:
        scores = self.scores()
        drifted = [name for name, value in (scores or {}).items() if value >= self.alert_psi]
        status = {
            "samples": self._filled,
            "window": self.window,
            "scores": scores,
            "drifted": drifted,
            "method": "psi",
            "alert_psi": self.alert_psi,
        }
        if any(k is not None for k in self._n_categories):
            status["unseen_categories"] = self.unseen()
        return status
