"""Input rows to the float64 matrix a model scores, or a list of what is wrong.

Shared by the HTTP routes and scripts/batch_predict.py so both accept and refuse
exactly the same input. The happy path is one numpy conversion plus vectorised
checks; the slower per-value search runs only to describe an error.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Sequence
from itertools import chain
from typing import Any

import numpy as np

# Enough to show a pattern without turning a bad 10 000-row batch into a huge response.
MAX_DETAILS = 50


class ValidationFailure(Exception):
    """Input that cannot be scored. ``details`` holds {"loc": [row, feature], "msg": ...} items."""

    def __init__(self, details: list[dict[str, Any]]):
        self.details = details[:MAX_DETAILS]
        if len(details) > MAX_DETAILS:
            self.details.append({"loc": [], "msg": f"and {len(details) - MAX_DETAILS} more problems"})
        first = details[0] if details else {"loc": [], "msg": "invalid input"}
        where = " ".join(str(part) for part in first["loc"])
        super().__init__(f"{where}: {first['msg']}" if where else first["msg"])


def _is_number(value: Any) -> bool:
    # bool is an int subclass, but true/false is not a measurement.
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _closest(name: str, candidates: Sequence[str]) -> str:
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else ""


def _describe_value(value: Any) -> str | None:
    """Why one value is not acceptable as a number, or None if it is one."""
    if not _is_number(value):
        if isinstance(value, str):
            return f"must be a number, got the string {value!r}"
        return f"must be a number, got {type(value).__name__}"
    try:
        as_float = float(value)
    except OverflowError:
        return "is beyond the range of a 64-bit float"
    if math.isnan(as_float) or math.isinf(as_float):
        return f"must be a finite number, got {value!r}"
    return None


def _dict_rows(rows: list[Any], features: list[str]) -> tuple[list[list[Any]], list[dict[str, Any]]]:
    expected = set(features)
    details: list[dict[str, Any]] = []
    for i, row in enumerate(rows):
        keys = row.keys()
        if keys == expected:
            continue
        extra = [k for k in keys if k not in expected]
        for name in features:
            if name not in keys:
                details.append({"loc": [i, name], "msg": "feature is missing"})
        for name in extra:
            hint = _closest(str(name), features)
            details.append({"loc": [i, name], "msg": f"is not a feature of this model{hint}"})
    if details:
        return [], details
    return [[row[name] for name in features] for row in rows], details


def to_matrix(rows: list[dict | list], features: list[str], max_abs: float) -> np.ndarray:
    """float64 array (len(rows), len(features)) in feature order; raises ValidationFailure.

    A row is a dict keyed by feature name or a list in feature order. Every value
    must be a JSON number (not a bool or a string), finite, and at most max_abs in
    absolute value. Each problem is reported with loc [row index, feature name].
    """
    if not isinstance(rows, list) or not rows:
        raise ValidationFailure([{"loc": [], "msg": "give at least one instance"}])
    n_features = len(features)
    values: list[list[Any]] = []
    details: list[dict[str, Any]] = []
    for i, row in enumerate(rows):
        if isinstance(row, dict):
            continue
        if not isinstance(row, (list, tuple)):
            details.append({"loc": [i], "msg": f"an instance must be an object of features or a list, got {type(row).__name__}"})
        elif len(row) != n_features:
            details.append(
                {"loc": [i], "msg": f"expected {n_features} values in the order {features}, got {len(row)}"}
            )
    if details:
        raise ValidationFailure(details)
    if any(isinstance(row, dict) for row in rows):
        mapped = [row if isinstance(row, dict) else dict(zip(features, row, strict=True)) for row in rows]
        values, details = _dict_rows(mapped, features)
        if details:
            raise ValidationFailure(details)
    else:
        values = rows  # type: ignore[assignment]

    matrix = None
    if set(map(type, chain.from_iterable(values))) <= {int, float}:
        try:
            # Every row has len(features) values (checked above); fromiter is the fastest conversion.
            flat = np.fromiter(chain.from_iterable(values), dtype=np.float64, count=len(values) * n_features)
            matrix = flat.reshape(len(values), n_features)
        except OverflowError:  # an int beyond float64
            matrix = None
    if matrix is None:
        for i, row in enumerate(values):
            for name, value in zip(features, row, strict=True):
                problem = _describe_value(value)
                if problem:
                    details.append({"loc": [i, name], "msg": problem})
        if details:
            raise ValidationFailure(details)
        matrix = np.array(values, dtype=np.float64)  # numpy scalars and other number subclasses

    finite = np.isfinite(matrix)
    if not finite.all():
        for i, j in zip(*np.nonzero(~finite), strict=True):
            details.append({"loc": [int(i), features[j]], "msg": f"must be a finite number, got {float(matrix[i, j])}"})
    too_large = np.abs(np.where(finite, matrix, 0.0)) > max_abs
    if too_large.any():
        for i, j in zip(*np.nonzero(too_large), strict=True):
            details.append(
                {"loc": [int(i), features[j]], "msg": f"{float(matrix[i, j])} is beyond the accepted magnitude {max_abs:g}"}
            )
    if details:
        raise ValidationFailure(details)
    return matrix
