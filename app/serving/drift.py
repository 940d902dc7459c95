"""Input drift: recent inputs against the package's reference statistics (Population Stability Index).

The reference (app/packages/reference.py) holds, per feature, the shares of the package's sample in
quantile bins, or in known categories. The service keeps the most recent inputs per worker in a ring
buffer (categories by their index, app/packages/validation.py's ``Batch.codes``) and compares their
shares with the reference; a category the sample never had is reported as ``unseen``:

    PSI = sum((observed - reference) * ln(observed / reference))

Common reading: below 0.1 stable, 0.1-0.2 moderate shift, 0.2 or more drifted.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from app.packages.reference import bin_shares, category_shares, feature_categories

if TYPE_CHECKING:
    from app.packages.manifest import Manifest

# Floor for a bin share, so an empty bin on either side gives a large but finite term.
PSI_EPSILON = 1e-4


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
        self._n_categories = [len(categories) if (categories := feature_categories(f)) else None
                              for f in manifest.features]
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
