"""Input rows to the float64 matrix a model scores, or a list of what is wrong.

Shared by the HTTP routes and ``mlapi score`` so both accept and refuse
exactly the same input. The happy path is one numpy conversion plus vectorised
checks; the slower per-value search runs only to describe an error.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Sequence
from itertools import chain
from operator import itemgetter
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


def _key_problems(rows: list[dict], features: list[str]) -> list[dict[str, Any]]:
    expected = set(features)
    details: list[dict[str, Any]] = []
    for i, row in enumerate(rows):
        keys = row.keys()
        if keys == expected:
            continue
        for name in features:
            if name not in keys:
                details.append({"loc": [i, name], "msg": "feature is missing"})
        for name in keys - expected:
            hint = _closest(str(name), features)
            details.append({"loc": [i, name], "msg": f"is not a feature of this model{hint}"})
    return details


def _shape_problems(rows: list[Any], features: list[str]) -> list[dict[str, Any]]:
    n_features = len(features)
    details: list[dict[str, Any]] = []
    for i, row in enumerate(rows):
        if isinstance(row, dict):
            continue
        if not isinstance(row, (list, tuple)):
            kind = type(row).__name__
            details.append({"loc": [i], "msg": f"an instance must be an object of features or a list, got {kind}"})
        elif len(row) != n_features:
            details.append({"loc": [i], "msg": f"expected {n_features} values in the order {features}, got {len(row)}"})
    return details


def to_matrix(rows: list[dict | list], features: list[str], max_abs: float) -> np.ndarray:
    """float64 array (len(rows), len(features)) in feature order; raises ValidationFailure.

    A row is a dict keyed by feature name or a list in feature order. Every value
    must be a JSON number (not a bool or a string), finite, and at most max_abs in
    absolute value. Each problem is reported with loc [row index, feature name].
    """
    if not isinstance(rows, list) or not rows:
        raise ValidationFailure([{"loc": [], "msg": "give at least one instance"}])
    n_features = len(features)
    row_types = set(map(type, rows))
    values: list[Any]
    if row_types == {dict}:
        # A row with every feature and as many keys as features has no extra key either.
        by_name = itemgetter(*features) if n_features > 1 else (lambda row: (row[features[0]],))
        try:
            values = list(map(by_name, rows))
        except KeyError:
            values = []
        if not values or set(map(len, rows)) != {n_features}:
            raise ValidationFailure(_key_problems(rows, features))
    elif row_types <= {list, tuple} and set(map(len, rows)) == {n_features}:
        values = rows
    else:
        details = _shape_problems(rows, features)
        if details:
            raise ValidationFailure(details)
        mapped = [row if isinstance(row, dict) else dict(zip(features, row, strict=True)) for row in rows]
        details = _key_problems(mapped, features)
        if details:
            raise ValidationFailure(details)
        values = [[row[name] for name in features] for row in mapped]

    details = []
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

    # One comparison catches NaN (never <=), infinities and magnitude; the error path tells them apart.
    if not (np.abs(matrix) <= max_abs).all():
        finite = np.isfinite(matrix)
        for i, j in zip(*np.nonzero(~finite), strict=True):
            details.append({"loc": [int(i), features[j]], "msg": f"must be a finite number, got {float(matrix[i, j])}"})
        for i, j in zip(*np.nonzero(finite & (np.abs(matrix) > max_abs)), strict=True):
            details.append(
                {
                    "loc": [int(i), features[j]],
                    "msg": f"{float(matrix[i, j])} is beyond the accepted magnitude {max_abs:g}",
                }
            )
        raise ValidationFailure(sorted(details, key=lambda d: (d["loc"][0], features.index(d["loc"][1]))))
    return matrix
