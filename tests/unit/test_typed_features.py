"""A ColumnTransformer pipeline with string, int, float and bool columns, served on every path.

The demo model `churn` (app/cli/train_demo.py) is fitted on a DataFrame: OneHotEncoder on `plan` (unknown
plans fail in the estimator) and `region` (unknown regions are scored), StandardScaler on `seats` (int) and
`monthly_usage`, `annual` (bool) passed through. Every answer is compared with the estimator's own
predict_proba on the same DataFrame.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
import pytest

from app.cli import main as mlapi_main
from app.cli.train_demo import churn_data
from app.packages.build import build_package
from app.packages.gate import load_package
from app.packages.manifest import ONNX_TOLERANCE
from tests.app_client import TestClient, app_client
from tests.mlserver_codec import pandas_codec_request
from tests.model_packages import read_manifest, resign, write_manifest

FEATURES = ["plan", "region", "seats", "monthly_usage", "annual"]
KNOWN_PLANS = ["basic", "pro", "team"]


@pytest.fixture(scope="module")
def churn_package(demo_models: Path) -> Path:
    return demo_models / "churn" / "1"


@pytest.fixture(scope="module")
def estimator(churn_package: Path) -> Any:
    return joblib.load(churn_package / "model.joblib")


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    rows, _, _ = churn_data(rows=6, seed=7)
    return rows


@pytest.fixture(scope="module")
def churn_client(demo_models: Path):
    with app_client(demo_models, default_model="churn") as c:
        yield c


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [
        {"plan": r.plan, "region": r.region, "seats": int(r.seats), "monthly_usage": float(r.monthly_usage),
         "annual": bool(r.annual)}
        for r in frame.itertuples()
    ]


def _expected(estimator: Any, frame: pd.DataFrame) -> np.ndarray:
    return estimator.predict_proba(frame[FEATURES])


# /v2 answers `predict` alone unless outputs are named, as MLServer's scikit-learn runtime does.
BOTH_OUTPUTS = [{"name": "predict"}, {"name": "predict_proba"}]


def _v2_probabilities(body: dict[str, Any]) -> np.ndarray:
    proba = next(o for o in body["outputs"] if o["name"] == "predict_proba")
    return np.asarray(proba["data"]).reshape(proba["shape"])


def _column_inputs(frame: pd.DataFrame) -> list[dict[str, Any]]:
    n = len(frame)
    return [
        {"name": "plan", "shape": [n, 1], "datatype": "BYTES", "data": frame["plan"].tolist()},
        {"name": "region", "shape": [n, 1], "datatype": "BYTES", "data": frame["region"].tolist()},
        {"name": "seats", "shape": [n, 1], "datatype": "INT64", "data": [int(v) for v in frame["seats"]]},
        {"name": "monthly_usage", "shape": [n, 1], "datatype": "FP64", "data": frame["monthly_usage"].tolist()},
        {"name": "annual", "shape": [n, 1], "datatype": "BOOL", "data": [bool(v) for v in frame["annual"]]},
    ]


# ---------------------------------------------------------------- the package


def test_packaging_records_each_feature_type_and_the_encoders_categories(churn_package: Path):
    manifest = read_manifest(churn_package)
    assert manifest["input"] == "frame"
    assert manifest["features"] == [
        {"name": "plan", "type": "string", "categories": KNOWN_PLANS, "allow_unknown": False},
        {"name": "region", "type": "string", "categories": ["apac", "eu", "us"], "allow_unknown": True},
        {"name": "seats", "type": "int"},
        {"name": "monthly_usage", "type": "float"},
        {"name": "annual", "type": "bool"},
    ]


def test_onnx_with_string_inputs_passed_the_equivalence_gate_and_serves(churn_package: Path):
    model = load_package(churn_package)
    assert model.manifest.onnx["kept"] and model.manifest.onnx["max_abs_diff"] <= ONNX_TOLERANCE
    assert model.engine.name == "onnx"
    assert [name for name, _ in model.engine._feeds] == FEATURES


def test_scikit_learn_serves_when_the_conversion_fails_and_the_manifest_says_why(tmp_path: Path):
    """A FunctionTransformer of a Python function has no ONNX conversion."""
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer, OneHotEncoder

    frame, y, _ = churn_data(rows=300, seed=3)
    columns = ColumnTransformer([("plan", OneHotEncoder(), ["plan"]),
                                 ("usage", FunctionTransformer(np.log1p), ["monthly_usage"])])
    model = Pipeline([("columns", columns), ("classify", LogisticRegression())]).fit(frame, y)
    path = build_package(model, name="m", version="1", models_dir=tmp_path, sample=frame)
    loaded = load_package(path)
    assert loaded.engine.name == "sklearn"
    assert loaded.manifest.onnx["reason"].startswith("with string features ['plan', 'region']: skl2onnx cannot")


def test_the_estimator_gets_a_dataframe_of_the_training_columns_and_dtypes(churn_package: Path, frame):
    model = load_package(churn_package)
    batch = model.inputs.rows(_records(frame), 1e9)
    assert isinstance(batch.X, pd.DataFrame)
    assert list(batch.X.columns) == FEATURES
    assert [batch.X[c].dtype.kind for c in ("seats", "monthly_usage", "annual")] == ["i", "f", "b"]


# ---------------------------------------------------------------- every path gives the estimator's answer


def test_v1_by_name_answers_what_the_estimator_answers(churn_client, estimator, frame):
    expected = _expected(estimator, frame.iloc[:1])[0]
    r = churn_client.post("/v1/predict", json={"features": _records(frame)[0]})
    assert r.status_code == 200, r.text
    got = r.json()["probabilities"]
    assert np.allclose([got[c] for c in estimator.classes_], expected, atol=ONNX_TOLERANCE)


def test_v1_as_a_list_answers_what_the_estimator_answers(churn_client, estimator, frame):
    expected = _expected(estimator, frame.iloc[1:2])[0]
    row = list(_records(frame)[1].values())
    r = churn_client.post("/v1/models/churn/predict", json={"features": row})
    assert r.status_code == 200, r.text
    got = r.json()["probabilities"]
    assert np.allclose([got[c] for c in estimator.classes_], expected, atol=ONNX_TOLERANCE)


def test_v1_batch_answers_what_the_estimator_answers(churn_client, estimator, frame):
    records = _records(frame)
    instances = [records[0], list(records[1].values()), *records[2:]]
    r = churn_client.post("/v1/models/churn/predict/batch", json={"instances": instances})
    assert r.status_code == 200, r.text
    got = [[p[c] for c in estimator.classes_] for p in r.json()["probabilities"]]
    assert np.allclose(got, _expected(estimator, frame), atol=ONNX_TOLERANCE)
    assert r.json()["predictions"] == estimator.predict(frame).tolist()


def test_scikit_learn_serving_answers_exactly_what_the_estimator_answers(make_client, demo_models, estimator, frame):
    with make_client(demo_models, default_model="churn", engine="sklearn") as c:
        r = c.post("/v1/predict/batch", json={"instances": _records(frame)})
    assert r.status_code == 200, r.text
    got = [[p[c] for c in estimator.classes_] for p in r.json()["probabilities"]]
    assert np.array_equal(got, _expected(estimator, frame))


def test_v2_one_input_per_column_answers_what_the_estimator_answers(churn_client, estimator, frame):
    r = churn_client.post("/v2/models/churn/infer", json={"inputs": _column_inputs(frame), "outputs": BOTH_OUTPUTS})
    assert r.status_code == 200, r.text
    assert np.allclose(_v2_probabilities(r.json()), _expected(estimator, frame), atol=ONNX_TOLERANCE)


def test_v2_takes_the_body_mlservers_pandas_codec_sends(churn_client, estimator, frame):
    body = pandas_codec_request(frame)
    assert {i["name"]: i["datatype"] for i in body["inputs"]}["plan"] == "BYTES"
    r = churn_client.post("/v2/models/churn/infer", json={**body, "outputs": BOTH_OUTPUTS})
    assert r.status_code == 200, r.text
    assert np.allclose(_v2_probabilities(r.json()), _expected(estimator, frame), atol=ONNX_TOLERANCE)


def test_v2_metadata_lists_one_input_per_column_with_its_datatype(churn_client):
    inputs = churn_client.get("/v2/models/churn").json()["inputs"]
    assert [(i["name"], i["datatype"]) for i in inputs] == [
        ("plan", "BYTES"), ("region", "BYTES"), ("seats", "INT64"), ("monthly_usage", "FP64"), ("annual", "BOOL")]


def _write_csv(path: Path, frame: pd.DataFrame) -> Path:
    frame.to_csv(path, index=False)
    return path


def _score_csv(churn_package: Path, source: Path, target: Path, capsys) -> tuple[int, str]:
    code = mlapi_main(["score", "--package", str(churn_package), "--input", str(source), "--output", str(target),
                       "--no-progress"])
    return code, capsys.readouterr().err


def test_batch_scoring_answers_what_the_estimator_answers(churn_package, estimator, frame, tmp_path, capsys):
    code, err = _score_csv(churn_package, _write_csv(tmp_path / "in.csv", frame), tmp_path / "out.csv", capsys)
    assert code == 0, err
    with open(tmp_path / "out.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    got = [[float(row[f"probability_{c}"]) for c in estimator.classes_] for row in rows]
    assert np.allclose(got, _expected(estimator, frame), atol=ONNX_TOLERANCE)


# ---------------------------------------------------------------- unknown categories follow handle_unknown


def test_an_unknown_region_is_scored_as_the_encoder_ignores_it(churn_client, estimator, frame):
    record = {**_records(frame)[0], "region": "antarctica"}
    r = churn_client.post("/v1/predict", json={"features": record})
    assert r.status_code == 200, r.text
    expected = estimator.predict_proba(pd.DataFrame([record]))[0]
    assert np.allclose([r.json()["probabilities"][c] for c in estimator.classes_], expected, atol=ONNX_TOLERANCE)


UNKNOWN_PLAN = "'platinum' is not a known category; known: ['basic', 'pro', 'team']"


def test_an_unknown_plan_is_a_422_naming_the_feature_and_the_known_plans_on_v1(churn_client, frame):
    r = churn_client.post("/v1/predict", json={"features": {**_records(frame)[0], "plan": "platinum"}})
    assert r.status_code == 422
    assert r.json()["error"]["details"] == [{"loc": ["body", "features", "plan"], "msg": UNKNOWN_PLAN}]


def test_an_unknown_plan_is_refused_with_the_same_words_on_v2(churn_client, frame):
    inputs = _column_inputs(frame.iloc[:1])
    inputs[0]["data"] = ["platinum"]
    r = churn_client.post("/v2/models/churn/infer", json={"inputs": inputs})
    assert r.status_code == 400
    assert r.json()["error"] == f"input 'plan' row 0: {UNKNOWN_PLAN}"


def test_an_unknown_plan_is_refused_with_the_same_words_in_batch_scoring(churn_package, frame, tmp_path, capsys):
    bad = frame.copy()
    bad.loc[2, "plan"] = "platinum"
    code, err = _score_csv(churn_package, _write_csv(tmp_path / "in.csv", bad), tmp_path / "out.csv", capsys)
    assert code == 1
    assert f"line 4, column 'plan': {UNKNOWN_PLAN}" in err
    assert not (tmp_path / "out.csv").exists()


# ---------------------------------------------------------------- an int feature refuses 5.5 everywhere

NOT_WHOLE = "must be a whole number (the feature is an int), got 5.5"


@pytest.mark.parametrize("path", ["/v1/predict", "/v1/predict/batch"])
def test_an_int_feature_refuses_5_5_on_v1(churn_client, frame, path):
    record = {**_records(frame)[0], "seats": 5.5}
    body = {"instances": [record]} if path.endswith("batch") else {"features": record}
    r = churn_client.post(path, json=body)
    assert r.status_code == 422
    (detail,) = r.json()["error"]["details"]
    assert detail["msg"] == NOT_WHOLE and detail["loc"][-1] == "seats"


def test_an_int_feature_refuses_5_5_on_v2(churn_client, frame):
    inputs = _column_inputs(frame.iloc[:1])
    inputs[2] = {"name": "seats", "shape": [1, 1], "datatype": "FP64", "data": [5.5]}
    r = churn_client.post("/v2/models/churn/infer", json={"inputs": inputs})
    assert r.status_code == 400
    assert r.json()["error"] == f"input 'seats' row 0: {NOT_WHOLE}"


def test_an_int_feature_refuses_5_5_in_batch_scoring(churn_package, frame, tmp_path, capsys):
    bad = frame.astype({"seats": float})
    bad.loc[0, "seats"] = 5.5
    code, err = _score_csv(churn_package, _write_csv(tmp_path / "in.csv", bad), tmp_path / "out.csv", capsys)
    assert code == 1
    assert f"line 2, column 'seats': {NOT_WHOLE}" in err


def test_a_whole_number_written_as_a_float_is_an_int(churn_client, frame):
    record = {**_records(frame)[0], "seats": 5.0}
    assert churn_client.post("/v1/predict", json={"features": record}).status_code == 200


@pytest.mark.parametrize(
    ("feature", "value", "words"),
    [("annual", 1, "must be true or false, got int"), ("plan", 3, "must be a string (a category), got int"),
     ("monthly_usage", "12", "must be a number, got the string '12'")],
    ids=["a number for a bool", "a number for a string", "a string for a number"],
)
def test_a_value_of_the_wrong_type_is_named(churn_client, frame, feature, value, words):
    r = churn_client.post("/v1/predict", json={"features": {**_records(frame)[0], feature: value}})
    assert r.status_code == 422
    assert r.json()["error"]["details"] == [{"loc": ["body", "features", feature], "msg": words}]


# ---------------------------------------------------------------- the schema shows the types and categories


def test_the_openapi_schema_shows_types_and_the_closed_categories_as_an_enum(churn_client):
    schema = churn_client.get("/openapi.json").json()["components"]["schemas"]["ChurnFeatures"]
    properties = schema["properties"]
    assert list(properties) == FEATURES
    assert properties["plan"]["enum"] == KNOWN_PLANS
    assert properties["region"]["type"] == "string" and "enum" not in properties["region"]
    assert properties["seats"]["type"] == "integer"
    assert properties["annual"]["type"] == "boolean"


# ---------------------------------------------------------------- drift over categories


def test_drift_scores_category_frequencies_and_the_share_of_unseen_categories(make_client, demo_models, frame):
    record = _records(frame)[0]
    unseen = [{**record, "region": "antarctica", "plan": "team"} for _ in range(100)]
    with make_client(demo_models, default_model="churn", drift_min_samples=100) as c:
        assert c.post("/v1/predict/batch", json={"instances": unseen}).status_code == 200
        drift = c.get("/v1/models/churn").json()["versions"][0]["drift"]
    assert drift["unseen_categories"] == {"plan": 0.0, "region": 1.0}
    assert drift["scores"]["region"] > 0.2 and drift["scores"]["plan"] > 0.2
    assert {"region", "plan"} <= set(drift["drifted"])


# ---------------------------------------------------------------- packaging from the command line


def test_mlapi_package_infers_the_types_from_the_encoders_and_a_csv_sample(estimator, tmp_path, capsys):
    joblib.dump(estimator, tmp_path / "model.joblib")
    sample, _, _ = churn_data(rows=300, seed=11)
    _write_csv(tmp_path / "sample.csv", sample)
    code = mlapi_main(["package", str(tmp_path / "model.joblib"), "--name", "churn", "--version", "9",
                       "--models-dir", str(tmp_path / "models"), "--sample", str(tmp_path / "sample.csv")])
    assert code == 0, capsys.readouterr().err
    manifest = read_manifest(tmp_path / "models" / "churn" / "9")
    assert [(f["name"], f["type"]) for f in manifest["features"]] == [
        ("plan", "string"), ("region", "string"), ("seats", "int"), ("monthly_usage", "float"), ("annual", "bool")]
    assert load_package(tmp_path / "models" / "churn" / "9").inputs.frame


def test_mlapi_package_takes_a_feature_type_from_the_command_line(estimator, tmp_path, capsys):
    joblib.dump(estimator, tmp_path / "model.joblib")
    sample, _, _ = churn_data(rows=300, seed=11)
    _write_csv(tmp_path / "sample.csv", sample)
    code = mlapi_main(["package", str(tmp_path / "model.joblib"), "--name", "churn", "--version", "9",
                       "--models-dir", str(tmp_path / "models"), "--sample", str(tmp_path / "sample.csv"),
                       "--feature-type", "seats=float"])
    assert code == 0, capsys.readouterr().err
    assert read_manifest(tmp_path / "models" / "churn" / "9")["features"][2] == {"name": "seats", "type": "float"}


def test_mlapi_package_names_a_feature_type_for_no_feature(estimator, tmp_path, capsys):
    joblib.dump(estimator, tmp_path / "model.joblib")
    code = mlapi_main(["package", str(tmp_path / "model.joblib"), "--name", "churn", "--version", "9",
                       "--models-dir", str(tmp_path / "models"), "--sample", str(tmp_path / "missing.csv"),
                       "--feature-type", "seat=float"])
    assert code == 1
    assert "'seat' is not a feature of the model (did you mean 'seats'?)" in capsys.readouterr().err


# ---------------------------------------------------------------- packages made before typed features


def test_a_manifest_without_types_or_input_still_loads_and_serves_numbers(models_copy: Path):
    package = models_copy / "iris" / "1"
    manifest = read_manifest(package)
    for feature in manifest["features"]:
        del feature["type"]
    del manifest["input"]
    manifest["format"] = 1
    write_manifest(package, manifest)
    resign(package)
    model = load_package(package)
    assert [f.type for f in model.manifest.features] == ["float"] * 4 and not model.inputs.frame
    with app_client(models_copy) as c:
        r = c.post("/v1/predict", json={"features": [5.1, 3.5, 1.4, 0.2]})
    assert r.status_code == 200 and r.json()["prediction"] == "setosa"


def test_the_app_built_after_a_reload_takes_the_features_of_the_version_that_loaded(models_copy: Path):
    """What gunicorn's master does on SIGHUP (app/gunicorn_conf.py): load, then build the app from the registry.
    A version with its features in another order serves a named row by name and a list in its own order."""
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    from app.main import create_app
    from app.serving.registry import ModelRegistry
    from app.settings import Settings

    settings = Settings(models_dir=models_copy, default_model="iris")
    registry = ModelRegistry(settings)
    registry.load()
    iris = load_iris()
    names = [f["name"] for f in read_manifest(models_copy / "iris" / "1")["features"]][::-1]
    X, y = iris.data[:, ::-1], iris.target_names[iris.target]
    build_package(LogisticRegression(max_iter=1000).fit(X, y), name="iris", version="2", models_dir=models_copy,
                  sample=X, feature_names=names)
    registry.load()
    assert sorted(registry.get("iris").versions) == ["2"] and not registry.get("iris").failures
    row = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}
    with TestClient(create_app(settings, registry)) as c:
        by_name = c.post("/v1/predict", json={"features": row})
        as_list = c.post("/v1/predict", json={"features": [row[n] for n in names]})
        old_order = c.post("/v1/predict", json={"features": list(row.values())})
        schema = c.get("/openapi.json").json()["components"]["schemas"]["IrisFeatures"]
    assert [(r.status_code, r.json()["version"], r.json()["prediction"]) for r in (by_name, as_list)] == [
        (200, "2", "setosa")] * 2
    # A list in the old order is the new version's columns, values in the wrong place: not setosa.
    assert old_order.status_code == 200 and old_order.json()["prediction"] != "setosa"
    assert [schema["properties"][k]["title"] for k in schema["properties"]] == names


def test_v2_one_tensor_of_all_features_is_refused_for_a_model_with_string_features(churn_client):
    body = {"inputs": [{"name": "input-0", "shape": [1, 5], "datatype": "FP64", "data": [1, 2, 3, 4, 5]}]}
    r = churn_client.post("/v2/models/churn/infer", json=body)
    assert r.status_code == 400
    assert "send one input per feature, named after it" in r.json()["error"]
    assert "plan (string)" in r.json()["error"]


@pytest.fixture(scope="module")
def strict_seats(tmp_path_factory) -> tuple[Path, Any, pd.DataFrame]:
    """A pipeline whose OneHotEncoder (unknown values an error, its default) encodes the int column seats."""
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    frame, y, _ = churn_data(rows=300, seed=3)
    columns = ColumnTransformer([("categories", OneHotEncoder(), ["plan", "seats"]),
                                 ("numbers", StandardScaler(), ["monthly_usage"])])
    model = Pipeline([("columns", columns), ("classify", LogisticRegression(max_iter=500))]).fit(frame, y)
    models = tmp_path_factory.mktemp("strict-seats")
    build_package(model, name="seats", version="1", models_dir=models, sample=frame)
    return models, model, frame


def _seats_record(frame: pd.DataFrame, seats: int) -> dict[str, Any]:
    return {**_records(frame)[0], "seats": seats}


def test_an_int_column_behind_a_strict_encoder_records_the_values_it_knows(strict_seats):
    models, model, _frame = strict_seats
    features = {f["name"]: f for f in read_manifest(models / "seats" / "1")["features"]}
    known = sorted(int(v) for v in model.named_steps["columns"].named_transformers_["categories"].categories_[1])
    assert features["seats"] == {"name": "seats", "type": "int", "categories": known, "allow_unknown": False}
    assert "categories" not in features["monthly_usage"]


def test_an_int_value_the_encoder_never_saw_is_a_422_naming_it_not_a_500(strict_seats, make_client):
    models, model, frame = strict_seats
    known = read_manifest(models / "seats" / "1")["features"][2]["categories"]
    unseen = max(known) + 1000
    with make_client(models, default_model="seats") as client:
        refused = client.post("/v1/predict", json={"features": _seats_record(frame, unseen)})
        v2 = client.post("/v2/models/seats/infer", json={"inputs": [
            {**column, "data": [unseen]} if column["name"] == "seats" else column
            for column in _column_inputs(frame.iloc[:1])]})
        served = client.post("/v1/predict", json={"features": _seats_record(frame, known[0])})
    assert refused.status_code == 422, refused.text
    message = refused.json()["error"]["details"][0]["msg"]
    assert message.startswith(f"{unseen} is not a value the model knows") and str(known[0]) in message
    assert v2.status_code == 400 and f"{unseen} is not a value the model knows" in v2.json()["error"]
    assert served.status_code == 200, served.text
    expected = model.predict(pd.DataFrame([_seats_record(frame, known[0])]).astype(frame.dtypes.to_dict()))[0]
    assert served.json()["prediction"] == expected


def test_a_strict_int_columns_known_values_are_an_enum_in_the_schema(strict_seats, make_client):
    models, _, _ = strict_seats
    known = read_manifest(models / "seats" / "1")["features"][2]["categories"]
    with make_client(models, default_model="seats") as client:
        schema = client.get("/openapi.json").json()
    seats = [s["properties"]["seats"] for s in schema["components"]["schemas"].values()
             if "seats" in s.get("properties", {})]
    assert seats and all(s.get("enum") == known for s in seats), seats
