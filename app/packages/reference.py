"""Reference statistics: what a package records of its sample's features, for drift.

For every numeric feature, the interior cut points of 10 quantile bins of the
sample the package was built with and the share of the sample in each bin. The
outer bins are open (``x <= first cut`` and ``x > last cut``) so values outside
the sample's range still land in a bin. For a string feature, the share of each
known category instead; a category the sample never had is one more bin, empty
in the reference. ``reference_statistics`` writes them when a package is built,
``check_reference`` checks them when a manifest is read; app/serving/drift.py
compares what a model version is sent with them.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any, TypeGuard

import numpy as np

REFERENCE_BINS = 10


def bin_index(values: np.ndarray, cuts: np.ndarray) -> np.ndarray:
    """Bin of every value: 0 for x <= cuts[0], ..., len(cuts) for x > cuts[-1]."""
    return np.searchsorted(cuts, values, side="left")


def bin_shares(values: np.ndarray, cuts: np.ndarray) -> np.ndarray:
    counts = np.bincount(bin_index(values, cuts), minlength=len(cuts) + 1)
    return counts / max(len(values), 1)


def feature_categories(feature: Any) -> tuple[str, ...] | None:
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
        categories = feature_categories(feature)
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
        categories = feature_categories(feature)
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
