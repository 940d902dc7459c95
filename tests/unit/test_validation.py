"""Input rows to a matrix: what is accepted, and how each kind of bad input is named."""

from __future__ import annotations

import numpy as np
import pytest

from app.packages.validation import MAX_DETAILS, ValidationFailure, to_matrix

FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
ROW = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}


def _details(rows, max_abs: float = 1e9) -> list[dict]:
    with pytest.raises(ValidationFailure) as caught:
        to_matrix(rows, FEATURES, max_abs)
    return caught.value.details


def test_dict_rows_are_put_in_feature_order():
    shuffled = dict(reversed(list(ROW.items())))
    matrix = to_matrix([shuffled, ROW], FEATURES, 1e9)
    assert matrix.dtype == np.float64 and matrix.shape == (2, 4)
    assert matrix[0].tolist() == [5.1, 3.5, 1.4, 0.2]


def test_list_rows_and_integers_are_accepted():
    assert to_matrix([[5, 3, 1, 0], [5.1, 3.5, 1.4, 0.2]], FEATURES, 1e9).tolist() == [
        [5, 3, 1, 0],
        [5.1, 3.5, 1.4, 0.2],
    ]


def test_numpy_scalars_are_numbers():
    assert to_matrix([[np.float64(1), np.int64(2), 3, 4]], FEATURES, 1e9).tolist() == [[1, 2, 3, 4]]


def test_a_missing_feature_is_named_with_its_row():
    row = dict(ROW)
    del row["petal_width"]
    assert _details([ROW, row]) == [{"loc": [1, "petal_width"], "msg": "feature is missing"}]


def test_a_misspelled_feature_suggests_the_closest_name():
    row = dict(ROW)
    row["petal_widht"] = row.pop("petal_width")
    details = _details([row])
    assert {"loc": [0, "petal_widht"], "msg": "is not a feature of this model; did you mean 'petal_width'?"} in details
    assert {"loc": [0, "petal_width"], "msg": "feature is missing"} in details


def test_an_extra_feature_is_refused():
    assert _details([{**ROW, "colour": 1}]) == [{"loc": [0, "colour"], "msg": "is not a feature of this model"}]


def test_a_list_of_the_wrong_length_states_the_expected_order():
    (detail,) = _details([[1, 2, 3]])
    assert detail["loc"] == [0] and "expected 4 values" in detail["msg"] and "petal_width" in detail["msg"]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("5.1", "must be a number, got the string '5.1'"),
        (True, "must be a number, got bool"),
        (None, "must be a number, got NoneType"),
        ([1], "must be a number, got list"),
        (float("nan"), "must be a finite number, got nan"),
        (float("inf"), "must be a finite number, got inf"),
        (10**400, "is beyond the range of a 64-bit float"),
        (2e9, "2000000000.0 is beyond the accepted magnitude 1e+09"),
        (-2e9, "-2000000000.0 is beyond the accepted magnitude 1e+09"),
    ],
)
def test_a_bad_value_is_named_by_row_and_feature(value, message):
    assert _details([ROW, {**ROW, "sepal_width": value}]) == [{"loc": [1, "sepal_width"], "msg": message}]


def test_no_rows_is_an_error():
    assert _details([]) == [{"loc": [], "msg": "give at least one instance"}]


def test_a_row_that_is_neither_object_nor_list_is_an_error():
    assert _details([ROW, 5])[0]["loc"] == [1]


def test_many_problems_are_capped_with_a_count():
    details = _details([[float("nan")] * 4] * 100)
    assert len(details) == MAX_DETAILS + 1
    assert details[-1]["msg"] == f"and {400 - MAX_DETAILS} more problems"


def test_the_message_of_the_failure_names_the_first_problem():
    with pytest.raises(ValidationFailure, match=r"^0 petal_width: feature is missing$"):
        to_matrix([{k: v for k, v in ROW.items() if k != "petal_width"}], FEATURES, 1e9)


def test_dict_and_list_rows_can_be_mixed():
    assert to_matrix([ROW, [5.1, 3.5, 1.4, 0.2]], FEATURES, 1e9).tolist() == [[5.1, 3.5, 1.4, 0.2]] * 2


def test_a_single_feature_model_takes_dict_rows():
    assert to_matrix([{"x": 1}, {"x": 2.5}], ["x"], 1e9).tolist() == [[1.0], [2.5]]
