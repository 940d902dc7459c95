"""Scoring engines: ONNX Runtime and scikit-learn agree, one model call per batch, labels from probabilities."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_diabetes, load_iris
from sklearn.ensemble import RandomForestClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from app.packages.engines import OnnxEngine, SklearnEngine
from app.packages.gate import ModelVersion, load_package


@pytest.fixture(scope="module")
def iris_X() -> np.ndarray:
    return load_iris().data


@pytest.fixture(scope="module")
def diabetes_X() -> np.ndarray:
    return load_diabetes().data


class CountingForest(RandomForestClassifier):
    """A real forest that counts how often it is asked to score."""

    calls: dict[str, int]

    def predict(self, X):
        self.calls["predict"] += 1
        return super().predict(X)

    def predict_proba(self, X):
        self.calls["predict_proba"] += 1
        return super().predict_proba(X)


@pytest.mark.parametrize("name", ["iris", "iris-logreg"])
def test_onnx_and_sklearn_give_the_same_labels_and_probabilities(demo_models: Path, iris_X: np.ndarray, name: str):
    onnx = load_package(demo_models / name / "1", engine="onnx")
    sk = load_package(demo_models / name / "1", engine="sklearn")
    onnx_labels, onnx_proba = onnx.infer(iris_X)
    sk_labels, sk_proba = sk.infer(iris_X)
    assert onnx_labels.tolist() == sk_labels.tolist()
    np.testing.assert_allclose(onnx_proba, sk_proba, atol=1e-5, rtol=0)


def test_onnx_and_sklearn_give_the_same_regression_values(demo_models: Path, diabetes_X: np.ndarray):
    onnx_values, onnx_none = load_package(demo_models / "diabetes" / "1", engine="onnx").infer(diabetes_X)
    sk_values, sk_none = load_package(demo_models / "diabetes" / "1", engine="sklearn").infer(diabetes_X)
    assert onnx_none is None and sk_none is None
    assert onnx_values.dtype == np.float64 and onnx_values.shape == (len(diabetes_X),)
    np.testing.assert_allclose(onnx_values, sk_values, rtol=1e-5)


@pytest.mark.parametrize("engine", ["onnx", "sklearn"])
def test_labels_are_the_most_probable_class(demo_models: Path, iris_X: np.ndarray, engine: str):
    model = load_package(demo_models / "iris" / "1", engine=engine)
    labels, proba = model.infer(iris_X)
    assert proba.dtype == np.float64 and proba.shape == (len(iris_X), 3)
    assert labels.tolist() == [model.classes[i] for i in np.argmax(proba, axis=1)]


def test_sklearn_engine_scores_a_batch_with_one_predict_proba_call(demo_models: Path, iris_X: np.ndarray):
    packaged = load_package(demo_models / "iris" / "1", engine="sklearn")
    y = np.asarray(packaged.classes)[load_iris().target]
    forest = CountingForest(n_estimators=10, random_state=0).fit(iris_X, y)
    forest.calls = {"predict": 0, "predict_proba": 0}
    model = ModelVersion(packaged.manifest, packaged.path, SklearnEngine(forest, "classifier"))
    labels, _ = model.infer(iris_X)
    assert forest.calls == {"predict": 0, "predict_proba": 1}
    assert labels.tolist() == RandomForestClassifier.predict(forest, iris_X).tolist()


def test_sklearn_engine_keeps_models_to_one_thread(iris_X: np.ndarray):
    y = load_iris().target
    pipeline = Pipeline(
        [("scale", StandardScaler()), ("forest", RandomForestClassifier(n_estimators=5, n_jobs=-1, random_state=0))]
    ).fit(iris_X, y)
    SklearnEngine(pipeline, "classifier")
    assert pipeline.named_steps["forest"].n_jobs == 1


def test_onnx_engine_uses_the_configured_threads_and_the_models_input_type(demo_models: Path):
    engine = OnnxEngine((demo_models / "iris" / "1" / "model.onnx").read_bytes(), "classifier", threads=1)
    options = engine.session.get_session_options()
    assert options.intra_op_num_threads == 1 and options.inter_op_num_threads == 1
    assert engine.input_dtype is np.float32 and engine.output_names == ["probabilities"]


@pytest.mark.parametrize("rows", [1, 7, 1000])
def test_onnx_engine_scores_any_batch_size(demo_models: Path, rows: int):
    model = load_package(demo_models / "iris" / "1", engine="onnx")
    X = np.tile([[5.1, 3.5, 1.4, 0.2]], (rows, 1))
    labels, proba = model.infer(X)
    assert labels.shape == (rows,) and set(labels.tolist()) == {"setosa"}
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)


def test_importing_the_engines_leaves_the_warning_filters_alone():
    import subprocess
    import sys

    # numpy adds filters of its own when imported: it is imported first.
    code = ("import warnings, numpy; before = list(warnings.filters); import app.packages.engines; "
            "assert warnings.filters == before, 'importing app.packages.engines changed the warning filters'")
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_an_estimator_fitted_on_a_dataframe_scores_arrays_without_its_feature_name_warning():
    import warnings

    import pandas as pd

    X, y = load_iris(return_X_y=True, as_frame=True)
    estimator = RandomForestClassifier(n_estimators=5, random_state=0).fit(X, y)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        estimator.predict_proba(X.to_numpy()[:2])  # the warning scikit-learn gives, before any engine exists
        assert any("valid feature names" in str(w.message) for w in seen)
        seen.clear()
        engine = SklearnEngine(estimator, "classifier")
        probabilities = engine.run(X.to_numpy()[:2])
        warnings.warn("a warning of the service's own", UserWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["a warning of the service's own"]
    assert np.allclose(probabilities, estimator.predict_proba(pd.DataFrame(X.to_numpy()[:2], columns=X.columns)))
