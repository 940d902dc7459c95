"""The commands a person runs: train_model, package_model and batch_predict.

The main path of each runs in a subprocess, exactly as a person runs it; the
many ways to get the input wrong call the same ``main`` in-process, which saves
a few seconds of imports per case.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import joblib
import numpy as np
import pytest
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from app.packaging import load_package
from tests.model_packages import ODD_FEATURES, odd_names_package

ROOT = Path(__file__).resolve().parents[2]
IRIS_FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def _run(script: str, *args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


package_model = _script("package_model")
batch_predict = _script("batch_predict")


def _main(module, capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str]:
    """Exit code and stderr of the command's main() called in-process."""
    code = module.main([str(a) for a in args])
    return code, capsys.readouterr().err


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def iris_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    X = load_iris().data
    rows = [[f"id-{i}", *row] for i, row in enumerate(X)]
    return _write_csv(tmp_path_factory.mktemp("csv") / "iris.csv", ["id", *IRIS_FEATURES], rows)


# ---------------------------------------------------------------- train_model


def test_train_model_makes_every_demo_package(demo_models: Path):
    assert sorted(p.name for p in demo_models.iterdir()) == ["diabetes", "iris", "iris-logreg"]
    for name in ("iris", "iris-logreg", "diabetes"):
        load_package(demo_models / name / "1")


def test_train_model_leaves_an_existing_version_as_it_is(models_copy: Path):
    before = (models_copy / "iris" / "1" / "manifest.json").read_bytes()
    result = _run("train_model.py", "--models-dir", models_copy, "--only", "iris")
    assert result.returncode == 0, result.stderr
    assert "left as it is" in result.stdout
    assert (models_copy / "iris" / "1" / "manifest.json").read_bytes() == before


def test_train_model_writes_a_new_version_of_one_model(models_copy: Path):
    result = _run("train_model.py", "--models-dir", models_copy, "--only", "diabetes", "--version", "2")
    assert result.returncode == 0, result.stderr
    assert load_package(models_copy / "diabetes" / "2").version == "2"
    assert not (models_copy / "iris" / "2").exists()


# ---------------------------------------------------------------- package_model


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LogisticRegression fitted on a plain array: it knows no feature names."""
    data = load_iris()
    path = tmp_path_factory.mktemp("joblib") / "model.joblib"
    joblib.dump(LogisticRegression(max_iter=500).fit(data.data, data.target), path)
    return path


def test_package_model_builds_a_package_that_loads(tmp_path: Path, plain_model: Path, iris_csv: Path):
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"validation_accuracy": 0.97}))
    result = _run(
        "package_model.py", plain_model, "--name", "flowers", "--version", "3", "--models-dir", tmp_path / "models",
        "--sample", iris_csv, "--features", ",".join(IRIS_FEATURES), "--metrics", metrics,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "trusted" in result.stderr
    summary = json.loads(result.stdout)
    assert summary["features"] == IRIS_FEATURES and summary["classes"] == [0, 1, 2]
    assert "model.onnx kept" in summary["onnx"]
    model = load_package(tmp_path / "models" / "flowers" / "3")
    assert model.manifest.metrics == {"validation_accuracy": 0.97}
    assert model.engine.name == "onnx"


def test_package_model_without_onnx_says_scikit_learn_will_serve(tmp_path: Path, plain_model: Path, iris_csv: Path):
    result = _run(
        "package_model.py", plain_model, "--name", "m", "--version", "1", "--models-dir", tmp_path,
        "--sample", iris_csv, "--features", ",".join(IRIS_FEATURES), "--no-onnx",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "scikit-learn" in json.loads(result.stdout)["onnx"]


def test_package_model_needs_feature_names_for_a_model_without_them(tmp_path, plain_model, iris_csv, capsys):
    code, stderr = _main(
        package_model,
        capsys,
        plain_model,
        "--name",
        "m",
        "--version",
        "1",
        "--models-dir",
        tmp_path,
        "--sample",
        iris_csv,
    )
    assert code == 1
    assert "--features" in stderr
    assert not (tmp_path / "m").exists()


def test_package_model_names_a_missing_sample_column_and_the_close_one(tmp_path, plain_model, capsys):
    sample = _write_csv(
        tmp_path / "s.csv", ["sepal_length", "sepal_width", "petal_length", "petal_widht"], [[1, 2, 3, 4]]
    )
    code, stderr = _main(
        package_model, capsys, plain_model, "--name", "m", "--version", "1", "--models-dir", tmp_path / "models",
        "--sample", sample, "--features", ",".join(IRIS_FEATURES),
    )  # fmt: skip
    assert code == 1
    assert "no column 'petal_width'" in stderr and "did you mean 'petal_widht'" in stderr
    assert not (tmp_path / "models" / "m").exists()


def test_package_model_names_a_non_numeric_sample_cell(tmp_path, plain_model, capsys):
    sample = _write_csv(tmp_path / "s.csv", IRIS_FEATURES, [[1, 2, 3, 4], [1, "two", 3, 4]])
    code, stderr = _main(
        package_model, capsys, plain_model, "--name", "m", "--version", "1", "--models-dir", tmp_path / "models",
        "--sample", sample, "--features", ",".join(IRIS_FEATURES),
    )  # fmt: skip
    assert code == 1
    assert "line 3, column 'sepal_width'" in stderr


def test_package_model_refuses_to_overwrite_without_force(tmp_path, plain_model, iris_csv, capsys):
    args = [plain_model, "--name", "m", "--version", "1", "--models-dir", tmp_path, "--sample", iris_csv,
            "--features", ",".join(IRIS_FEATURES), "--no-onnx"]  # fmt: skip
    assert _main(package_model, capsys, *args)[0] == 0
    code, stderr = _main(package_model, capsys, *args)
    assert code == 1 and "--force" in stderr
    assert _main(package_model, capsys, *args, "--force")[0] == 0


# ---------------------------------------------------------------- batch_predict


def test_batch_predict_adds_predictions_and_probabilities(demo_models: Path, iris_csv: Path, tmp_path: Path):
    output = tmp_path / "out.csv"
    result = _run(
        "batch_predict.py",
        "--package",
        demo_models / "iris" / "1",
        "--input",
        iris_csv,
        "--output",
        output,
        "--chunk",
        40,
    )
    assert result.returncode == 0, result.stderr
    rows = _read_csv(output)
    assert list(rows[0]) == [
        "id",
        *IRIS_FEATURES,
        "prediction",
        "probability_setosa",
        "probability_versicolor",
        "probability_virginica",
    ]
    assert len(rows) == 150 and rows[0]["id"] == "id-0"
    model = load_package(demo_models / "iris" / "1")
    labels, proba = model.score(load_iris().data)
    assert [r["prediction"] for r in rows] == labels.tolist()
    np.testing.assert_allclose([float(r["probability_virginica"]) for r in rows], proba[:, 2])


def test_batch_predict_scores_a_regressor(demo_models: Path, tmp_path: Path):
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    source = _write_csv(tmp_path / "in.csv", list(data.feature_names), data.data[:25].tolist())
    output = tmp_path / "out.csv"
    result = _run(
        "batch_predict.py",
        "--package",
        demo_models / "diabetes" / "1",
        "--input",
        source,
        "--output",
        output,
        "--engine",
        "sklearn",
    )
    assert result.returncode == 0, result.stderr
    rows = _read_csv(output)
    assert list(rows[0])[-1] == "prediction" and len(rows) == 25
    expected, _ = load_package(demo_models / "diabetes" / "1", engine="sklearn").score(data.data[:25])
    np.testing.assert_allclose([float(r["prediction"]) for r in rows], expected)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([[1, 2, 3, 4], [1, 2, "x", 4]], "line 3, column 'petal_length': must be a number"),
        ([[1, 2, 3, 4], [1, 2, 3, "nan"]], "line 3, column 'petal_width': must be a finite number"),
        ([[1, 2, 3, 4]] * 5 + [[1e12, 2, 3, 4]], "line 7, column 'sepal_length'"),
        ([[1, 2, 3, 4], [1, 2, "", 4]], "line 3, column 'petal_length'"),
    ],
)
def test_batch_predict_refuses_a_bad_row_and_writes_nothing(demo_models, tmp_path, capsys, rows, message):
    source = _write_csv(tmp_path / "in.csv", IRIS_FEATURES, rows)
    output = tmp_path / "out.csv"
    code, stderr = _main(
        batch_predict,
        capsys,
        "--package",
        demo_models / "iris" / "1",
        "--input",
        source,
        "--output",
        output,
        "--chunk",
        2,
    )
    assert code == 1
    assert message in stderr and "nothing was written" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv"]


def test_batch_predict_refuses_a_bad_row_as_a_command(demo_models: Path, tmp_path: Path):
    source = _write_csv(tmp_path / "in.csv", IRIS_FEATURES, [[1, 2, 3, 4], [1, 2, 3, "-inf"]])
    output = tmp_path / "out.csv"
    result = _run("batch_predict.py", "--package", demo_models / "iris" / "1", "--input", source, "--output", output)
    assert result.returncode == 1
    assert "line 3, column 'petal_width'" in result.stderr and "nothing was written" in result.stderr
    assert not output.exists()


def test_batch_predict_names_a_misspelled_column(demo_models, tmp_path, capsys):
    source = _write_csv(
        tmp_path / "in.csv", ["sepal_length", "sepal_width", "petal_length", "petal_widht"], [[1, 2, 3, 4]]
    )
    code, stderr = _main(
        batch_predict,
        capsys,
        "--package",
        demo_models / "iris" / "1",
        "--input",
        source,
        "--output",
        tmp_path / "o.csv",
    )
    assert code == 1
    assert "'petal_width' (did you mean 'petal_widht'?)" in stderr


def test_batch_predict_keeps_an_existing_output_when_it_fails(demo_models, tmp_path, capsys):
    source = _write_csv(tmp_path / "in.csv", IRIS_FEATURES, [[1, 2, 3, "inf"]])
    output = tmp_path / "out.csv"
    output.write_text("previous results\n")
    code, _ = _main(
        batch_predict, capsys, "--package", demo_models / "iris" / "1", "--input", source, "--output", output
    )
    assert code == 1
    assert output.read_text() == "previous results\n"


def test_batch_predict_refuses_a_package_that_fails_the_gate(models_copy, iris_csv, tmp_path, capsys):
    package = models_copy / "iris" / "1"
    with open(package / "model.joblib", "ab") as fh:
        fh.write(b"\0")
    output = tmp_path / "out.csv"
    code, stderr = _main(batch_predict, capsys, "--package", package, "--input", iris_csv, "--output", output)
    assert code == 1 and "failed the sha256 check" in stderr
    assert not output.exists()


def test_batch_predict_scores_features_named_like_pydantic_attributes(tmp_path: Path):
    package = odd_names_package(tmp_path / "models", "odd", "1")
    X = load_iris().data
    source = _write_csv(tmp_path / "in.csv", ODD_FEATURES, X.tolist())
    output = tmp_path / "out.csv"
    result = _run("batch_predict.py", "--package", package, "--input", source, "--output", output)
    assert result.returncode == 0, result.stderr
    labels, _ = load_package(package).score(X)
    assert [r["prediction"] for r in _read_csv(output)] == labels.tolist()
