"""The one input path: request values to the input the estimator was fitted on, or a list of what is wrong.

Every way a request reaches a model ends here: /v1 JSON (by name or as a list),
/v2 tensors, and the rows of ``mlapi score``'s CSV file. Each of them only
decodes its transport into rows or columns of values; ``InputSchema``, made
from the manifest of the version that scores the request, checks them and
builds the estimator's input, so a rule about inputs is written once and every
path refuses the same value with the same words.

A feature is ``float``, ``int`` (a whole number: 5.5 is refused, 5.0 is 5),
``bool`` (true or false) or ``string`` (a category: one the model knows, or any
when its encoder scores unknown ones). A model fitted on a DataFrame gets a
DataFrame with the training columns and dtypes; one fitted on an array gets an
array (float64 when every feature is a number).

The happy path is one numpy conversion per column plus vectorised checks; the
slower per-value search runs only to describe an error.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from operator import itemgetter
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from app.packages.manifest import Manifest

# Enough to show a pattern without turning a bad 10 000-row batch into a huge response.
MAX_DETAILS = 50
# Known categories named in one message at most; a long list is cut with a count.
MAX_NAMED_CATEGORIES = 20
NUMERIC_TYPES = ("float", "int", "bool")


class ValidationFailure(Exception):
    """Input that cannot be scored. ``details`` holds {"loc": [row, feature], "msg": ...} items."""

    def __init__(self, details: list[dict[str, Any]]):
        self.details = details[:MAX_DETAILS]
        if len(details) > MAX_DETAILS:
            self.details.append({"loc": [], "msg": f"and {len(details) - MAX_DETAILS} more problems"})
        first = details[0] if details else {"loc": [], "msg": "invalid input"}
        where = " ".join(str(part) for part in first["loc"])
        super().__init__(f"{where}: {first['msg']}" if where else first["msg"])


@dataclass(frozen=True)
class Batch:
    """Rows ready to score.

    ``X`` is what the estimator takes; ``values`` the same rows in manifest order
    (float64 when every feature is numeric, else objects) for the prediction log;
    ``codes`` a float64 view for drift: numbers as they are, booleans 0/1, a
    category by its index among the known ones (-1 for one the sample never had).
    """

    X: Any
    values: np.ndarray
    codes: np.ndarray

    def __len__(self) -> int:
        return int(self.values.shape[0])


def _is_number(value: Any) -> bool:
    # bool is an int subclass, but true/false is not a measurement.
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _closest(name: str, candidates: Sequence[str]) -> str:
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else ""


def _kind(value: Any) -> str:
    if isinstance(value, str):
        return f"the string {value!r}"
    return type(value).__name__


def _describe_number(value: Any) -> str | None:
    """Why one value is not acceptable as a number, or None if it is one."""
    if not _is_number(value):
        return f"must be a number, got {_kind(value)}"
    try:
        as_float = float(value)
    except OverflowError:
        return "is beyond the range of a 64-bit float"
    if math.isnan(as_float) or math.isinf(as_float):
        return f"must be a finite number, got {value!r}"
    return None


def known_values(categories: Sequence[object]) -> str:
    shown = list(categories[:MAX_NAMED_CATEGORIES])
    more = len(categories) - len(shown)
    return f"{shown}" + (f" and {more} more" if more else "")


@dataclass(frozen=True)
class FeatureSpec:
    name: str
    type: str = "float"
    # string features: the ones the model knows; int features: the values an encoder refusing others knows
    categories: tuple[str, ...] | tuple[int, ...] | None = None
    allow_unknown: bool = False  # whether the model scores a category it does not know


class InputSchema:
    """What one model version accepts, and how its input is built. Made once per loaded version."""

    def __init__(self, features: Sequence[FeatureSpec], frame: bool = False):
        self.features = list(features)
        self.names = [f.name for f in self.features]
        self.frame = frame
        self.numeric = all(f.type in NUMERIC_TYPES for f in self.features)
        self.all_float = all(f.type == "float" for f in self.features)
        self._int_columns = [j for j, f in enumerate(self.features) if f.type == "int"]
        self._bool_columns = [j for j, f in enumerate(self.features) if f.type == "bool"]
        self._index = {
            f.name: {c: i for i, c in enumerate(f.categories or ())} for f in self.features if f.type == "string"
        }
        self._int_known = {
            f.name: np.array(sorted(f.categories), dtype=np.int64)
            for f in self.features if f.type == "int" and f.categories is not None and not f.allow_unknown
        }
        n = len(self.names)
        self._by_name = itemgetter(*self.names) if n > 1 else (lambda row: (row[self.names[0]],))

    @classmethod
    def of(cls, manifest: Manifest) -> InputSchema:
        return cls(
            [FeatureSpec(f.name, f.type, f.categories, f.allow_unknown) for f in manifest.features],
            frame=manifest.input == "frame",
        )

    # ------------------------------------------------------------ rows (v1 JSON, CSV)

    def rows(self, rows: list[Any], max_abs: float) -> Batch:
        """Rows as dicts keyed by feature name or lists in feature order; problems have loc [row, feature]."""
        values = self._row_values(rows)
        if self.numeric and not self._bool_columns:  # a bool is true or false in JSON, never 0 or 1
            matrix = _fast_matrix(values, len(self.names))
            if matrix is not None:
                return self.matrix(matrix, max_abs)
        if not values:
            raise ValidationFailure([{"loc": [], "msg": "give at least one instance"}])
        return self.columns([list(column) for column in zip(*values, strict=True)], max_abs)

    def _row_values(self, rows: list[Any]) -> list[Sequence[Any]]:
        features = self.names
        n_features = len(features)
        if not isinstance(rows, list) or not rows:
            raise ValidationFailure([{"loc": [], "msg": "give at least one instance"}])
        row_types = set(map(type, rows))
        if row_types == {dict}:
            # A row with every feature and as many keys as features has no extra key either.
            try:
                values = list(map(self._by_name, rows))
            except KeyError:
                values = []
            if not values or set(map(len, rows)) != {n_features}:
                raise ValidationFailure(_key_problems(rows, features))
            return values
        if row_types <= {list, tuple} and set(map(len, rows)) == {n_features}:
            return rows
        details = _shape_problems(rows, features)
        if details:
            raise ValidationFailure(details)
        mapped = [row if isinstance(row, dict) else dict(zip(features, row, strict=True)) for row in rows]
        details = _key_problems(mapped, features)
        if details:
            raise ValidationFailure(details)
        return [[row[name] for name in features] for row in mapped]

    # ------------------------------------------------------------ a numeric matrix (v2 one tensor)

    def matrix(self, matrix: np.ndarray, max_abs: float) -> Batch:
        """A float64 (n, n_features) matrix of a model whose features are all numeric."""
        # One comparison catches NaN (never <=), infinities and magnitude; the error path tells them apart.
        details: list[dict[str, Any]] = []
        if not (np.abs(matrix) <= max_abs).all():
            details += _range_problems(matrix, self.names, max_abs)
        for j in self._int_columns:
            column = matrix[:, j]
            for i in np.nonzero(np.isfinite(column) & (column != np.floor(column)))[0]:
                details.append({"loc": [int(i), self.names[j]], "msg": _not_whole(float(column[i]))})
        for j in self._bool_columns:
            column = matrix[:, j]
            for i in np.nonzero((column != 0) & (column != 1))[0]:
                details.append({"loc": [int(i), self.names[j]], "msg": _not_bool(float(column[i]))})
        if details:
            raise ValidationFailure(_in_order(details, self.names))
        return self._batch_from_matrix(matrix)

    def _batch_from_matrix(self, matrix: np.ndarray) -> Batch:
        if not self.frame:
            return Batch(matrix, matrix, matrix)
        columns = {name: matrix[:, j] for j, name in enumerate(self.names)}
        for j in self._int_columns:
            columns[self.names[j]] = matrix[:, j].astype(np.int64)
        for j in self._bool_columns:
            columns[self.names[j]] = matrix[:, j] != 0
        return Batch(_frame(columns, self.names), matrix, matrix)

    # ------------------------------------------------------------ columns (v2 per feature, CSV, packaging)

    def columns(self, columns: list[Any], max_abs: float) -> Batch:
        """One sequence of values per feature, in feature order, all of one length."""
        n = len(columns[0]) if columns else 0
        if n == 0:
            raise ValidationFailure([{"loc": [], "msg": "give at least one instance"}])
        typed: dict[str, np.ndarray] = {}
        codes = np.empty((n, len(self.names)), dtype=np.float64)
        details: list[dict[str, Any]] = []
        for j, (spec, column) in enumerate(zip(self.features, columns, strict=True)):
            array, problems = _CHECKS[spec.type](self, spec, column, max_abs)
            details += problems
            if not problems:
                typed[spec.name] = array
                codes[:, j] = self._codes(spec, array)
        if details:
            raise ValidationFailure(_in_order(details, self.names))
        if self.numeric:
            values = codes
        else:
            values = np.empty((n, len(self.names)), dtype=object)
            for j, name in enumerate(self.names):
                values[:, j] = typed[name]
        if self.frame:
            X: Any = _frame(typed, self.names)
        else:
            X = values
        return Batch(X, values, codes)

    def _codes(self, spec: FeatureSpec, array: np.ndarray) -> np.ndarray:
        if spec.type != "string":
            return array
        index = self._index[spec.name]
        return np.fromiter((index.get(v, -1) for v in array), dtype=np.float64, count=len(array))

    def _numbers(self, spec: FeatureSpec, column: Any, max_abs: float) -> tuple[np.ndarray, list[dict[str, Any]]]:
        array = None
        if isinstance(column, np.ndarray) and column.dtype.kind in "fiu":
            array = column.astype(np.float64, copy=False)
        elif set(map(type, column)) <= {int, float}:
            try:
                array = np.fromiter(column, dtype=np.float64, count=len(column))
            except OverflowError:  # an int beyond float64
                array = None
        if array is None:
            problems = []
            for i, value in enumerate(column):
                problem = _describe_number(value)
                if problem:
                    problems.append({"loc": [i, spec.name], "msg": problem})
            if problems:
                return np.empty(0), problems
            array = np.array(column, dtype=np.float64)  # numpy scalars and other number subclasses
        problems = []
        if not (np.abs(array) <= max_abs).all():
            problems = _range_problems(array.reshape(-1, 1), [spec.name], max_abs)
        if spec.type == "int":
            finite = np.isfinite(array)
            for i in np.nonzero(finite & (array != np.floor(array)))[0].tolist():
                problems.append({"loc": [i, spec.name], "msg": _not_whole(float(array[i]))})
            if not problems:
                whole = array.astype(np.int64)
                known = self._int_known.get(spec.name)
                if known is not None:
                    for i in np.nonzero(~np.isin(whole, known))[0].tolist():
                        problems.append({"loc": [i, spec.name],
                                         "msg": unknown_value(int(whole[i]), spec.categories or ())})
                return (whole, []) if not problems else (np.empty(0), problems)
        return array, problems

    def _booleans(self, spec: FeatureSpec, column: Any, max_abs: float) -> tuple[np.ndarray, list[dict[str, Any]]]:
        if isinstance(column, np.ndarray) and column.dtype.kind == "b":
            return column, []
        problems = [
            {"loc": [i, spec.name], "msg": f"must be true or false, got {_kind(value)}"}
            for i, value in enumerate(column)
            if not isinstance(value, (bool, np.bool_))
        ]
        return np.array(column, dtype=np.bool_) if not problems else np.empty(0), problems

    def _strings(self, spec: FeatureSpec, column: Any, max_abs: float) -> tuple[np.ndarray, list[dict[str, Any]]]:
        problems = [
            {"loc": [i, spec.name], "msg": f"must be a string (a category), got {_kind(value)}"}
            for i, value in enumerate(column)
            if not isinstance(value, str)
        ]
        if problems:
            return np.empty(0), problems
        if not spec.allow_unknown and spec.categories is not None:
            index = self._index[spec.name]
            for i, value in enumerate(column):
                if value not in index:
                    problems.append({"loc": [i, spec.name], "msg": unknown_category(value, spec.categories)})
        array = np.empty(len(column), dtype=object)
        array[:] = column
        return array, problems

    # ------------------------------------------------------------ a row the gate can score

    def smoke_batch(self, reference: dict[str, dict[str, Any]]) -> Batch:
        """One row built from the drift reference (``reference_row``), as the estimator takes it."""
        return self.columns([[v] for v in reference_row(self.features, reference)], math.inf)


def reference_row(features: Sequence[Any], reference: dict[str, dict[str, Any]]) -> list[Any]:
    """A typical row of the reference sample: each number's mean (rounded for an int or a bool), each string
    feature's most common category. Run by the gate, shown as the example of a request."""
    row: list[Any] = []
    for f in features:
        stats = reference.get(f.name) or {}
        if f.type == "string":
            categories = list(f.categories or [""])
            shares = stats.get("proportions") or []
            row.append(categories[int(np.argmax(shares))] if len(shares) == len(categories) else categories[0])
        elif f.type == "bool":
            row.append(bool(round(stats.get("mean", 0.0))))
        elif f.type == "int":
            mean = stats.get("mean", 0.0)
            known = f.categories if f.categories is not None and not f.allow_unknown else None
            # A value the model knows: the nearest of its categories to the mean.
            row.append(int(min(known, key=lambda c: (abs(c - mean), c))) if known else round(mean))
        else:
            row.append(round(float(stats.get("mean", 0.0)), 3))
    return row


def unknown_category(value: str, categories: Sequence[object]) -> str:
    return f"{value!r} is not a known category; known: {known_values(categories)}"


def unknown_value(value: int, categories: Sequence[object]) -> str:
    return f"{value} is not a value the model knows (its encoder refuses others); known: {known_values(categories)}"


_CHECKS = {
    "float": InputSchema._numbers,
    "int": InputSchema._numbers,
    "bool": InputSchema._booleans,
    "string": InputSchema._strings,
}


def _frame(columns: dict[str, np.ndarray], names: list[str]) -> Any:
    import pandas as pd

    return pd.DataFrame({name: columns[name] for name in names}, copy=False)


def _not_whole(value: float) -> str:
    return f"must be a whole number (the feature is an int), got {value!r}"


def _not_bool(value: float) -> str:
    return f"must be true or false (the feature is a bool), got {value!r}"


def _fast_matrix(values: list[Sequence[Any]], n_features: int) -> np.ndarray | None:
    """Plain JSON numbers in rows of n_features, as float64 in one conversion; None for anything else."""
    if not values or not set(map(type, chain.from_iterable(values))) <= {int, float}:
        return None
    try:
        # Every row has n_features values (checked before); fromiter is the fastest conversion.
        flat = np.fromiter(chain.from_iterable(values), dtype=np.float64, count=len(values) * n_features)
    except OverflowError:  # an int beyond float64
        return None
    return flat.reshape(len(values), n_features)


def _range_problems(matrix: np.ndarray, names: list[str], max_abs: float) -> list[dict[str, Any]]:
    details: list[dict[str, Any]] = []
    finite = np.isfinite(matrix)
    for i, j in zip(*np.nonzero(~finite), strict=True):
        details.append({"loc": [int(i), names[j]], "msg": f"must be a finite number, got {float(matrix[i, j])}"})
    for i, j in zip(*np.nonzero(finite & (np.abs(matrix) > max_abs)), strict=True):
        details.append(
            {"loc": [int(i), names[j]], "msg": f"{float(matrix[i, j])} is beyond the accepted magnitude {max_abs:g}"}
        )
    return details


def _in_order(details: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    order = {name: j for j, name in enumerate(names)}
    return sorted(details, key=lambda d: (d["loc"][0], order.get(d["loc"][1], len(order))) if d["loc"] else (-1, 0))


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
    """float64 array (len(rows), len(features)) of float features in feature order; raises ValidationFailure."""
    return InputSchema([FeatureSpec(name) for name in features]).rows(rows, max_abs).values
