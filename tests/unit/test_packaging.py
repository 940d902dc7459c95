"""Model packages: the manifest, atomic building, every check of the gate, the ONNX equivalence gate, the verify CLI."""

from __future__ import annotations

import hashlib
import json
import pickle
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import joblib
import numpy as np
import pytest
import sklearn
from sklearn.datasets import load_iris
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier

from app.packages.build import build_package
from app.packages.gate import discover, load_package
from app.packages.manifest import Manifest, PackageError
from tests.model_packages import broken_tags_package

ROOT = Path(__file__).resolve().parents[2]
IRIS_FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def _manhattan(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).sum())


@pytest.fixture(scope="module")
def iris() -> tuple[np.ndarray, np.ndarray]:
    data = load_iris()
    return data.data, np.asarray(data.target_names)[data.target]


@pytest.fixture(scope="module")
def small_forest(iris) -> RandomForestClassifier:
    X, y = iris
    return RandomForestClassifier(n_estimators=10, random_state=0).fit(X, y)


@pytest.fixture
def package(models_copy: Path) -> Path:
    """A private copy of the demo iris package (RandomForest, ONNX kept)."""
    return models_copy / "iris" / "1"


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def _write_manifest(path: Path, data: dict) -> None:
    (path / "manifest.json").write_text(json.dumps(data))


def _resign(path: Path) -> None:
    """Record the current hashes, as someone who rewrote the files and the manifest would."""
    data = _manifest(path)
    data["files"] = {name: hashlib.sha256((path / name).read_bytes()).hexdigest() for name in data["files"]}
    _write_manifest(path, data)


def _refused(path: Path, check: str, **kwargs) -> PackageError:
    with pytest.raises(PackageError) as caught:
        load_package(path, **kwargs)
    assert caught.value.check == check, str(caught.value)
    assert str(path) in str(caught.value)
    return caught.value


# ---------------------------------------------------------------- manifest and building


def test_manifest_records_what_the_issue_lists(demo_models: Path):
    data = _manifest(demo_models / "iris" / "1")
    assert data["name"] == "iris" and data["version"] == "1" and data["task"] == "classifier"
    assert data["created"].endswith("Z")
    assert [f["name"] for f in data["features"]] == IRIS_FEATURES
    assert {f["type"] for f in data["features"]} == {"float"}
    assert data["classes"] == ["setosa", "versicolor", "virginica"]
    assert data["versions"]["sklearn"] == sklearn.__version__ and data["versions"]["numpy"] == np.__version__
    assert set(data["versions"]) == {"python", "sklearn", "numpy", "onnxruntime"}
    assert {"validation_accuracy", "train_accuracy"} <= set(data["metrics"])
    assert set(data["reference"]) == set(IRIS_FEATURES)
    for stats in data["reference"].values():
        assert len(stats["proportions"]) == len(stats["bin_edges"]) + 1
        assert sum(stats["proportions"]) == pytest.approx(1.0)
        assert stats["min"] <= stats["mean"] <= stats["max"]


def test_manifest_hashes_every_file(demo_models: Path):
    path = demo_models / "iris" / "1"
    files = _manifest(path)["files"]
    assert set(files) == {"model.joblib", "model.onnx"}
    for name, digest in files.items():
        assert hashlib.sha256((path / name).read_bytes()).hexdigest() == digest


def test_manifest_round_trips_through_the_typed_view(demo_models: Path):
    data = _manifest(demo_models / "diabetes" / "1")
    manifest = Manifest.from_dict(data)
    assert manifest.task == "regressor" and manifest.classes is None
    assert manifest.to_dict() == data


def test_build_refuses_an_existing_version(tmp_path: Path, small_forest, iris):
    build_package(
        small_forest,
        name="m",
        version="1",
        models_dir=tmp_path,
        sample=iris[0],
        feature_names=IRIS_FEATURES,
        onnx=False,
    )
    with pytest.raises(FileExistsError, match="already exists"):
        build_package(
            small_forest, name="m", version="1", models_dir=tmp_path, sample=iris[0], feature_names=IRIS_FEATURES
        )


def test_build_with_overwrite_replaces_the_version_and_leaves_no_temporary_folders(tmp_path: Path, small_forest, iris):
    X, y = iris
    build_package(
        small_forest, name="m", version="1", models_dir=tmp_path, sample=X, feature_names=IRIS_FEATURES, onnx=False
    )
    other = LogisticRegression(max_iter=500).fit(X, y)
    path = build_package(
        other, name="m", version="1", models_dir=tmp_path, sample=X, feature_names=IRIS_FEATURES, overwrite=True
    )
    assert isinstance(joblib.load(path / "model.joblib"), LogisticRegression)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1"]
    load_package(path)


def test_build_without_feature_names_says_how_to_give_them(tmp_path: Path, small_forest, iris):
    with pytest.raises(ValueError, match="feature names"):
        build_package(small_forest, name="m", version="1", models_dir=tmp_path, sample=iris[0])
    assert not (tmp_path / "m" / "1").exists()


def test_build_takes_feature_names_from_a_dataframe_fit(tmp_path: Path):
    data = load_iris(as_frame=True)
    frame = data.data.set_axis(IRIS_FEATURES, axis=1)
    model = RandomForestClassifier(n_estimators=5, random_state=0).fit(frame, data.target)
    path = build_package(model, name="m", version="1", models_dir=tmp_path, sample=frame)
    assert [f["name"] for f in _manifest(path)["features"]] == IRIS_FEATURES
    assert load_package(path).infer(frame.to_numpy()[:3])[0].tolist() == [0, 0, 0]


def test_build_refuses_a_name_that_is_not_a_plain_folder_name(tmp_path: Path, small_forest, iris):
    with pytest.raises(ValueError, match="model name"):
        build_package(
            small_forest, name="../up", version="1", models_dir=tmp_path, sample=iris[0], feature_names=IRIS_FEATURES
        )


def test_build_refuses_an_unfitted_estimator(tmp_path: Path, iris):
    with pytest.raises(ValueError, match="not fitted"):
        build_package(
            RandomForestClassifier(),
            name="m",
            version="1",
            models_dir=tmp_path,
            sample=iris[0],
            feature_names=IRIS_FEATURES,
        )


def test_discover_sorts_versions_naturally_and_ignores_unfinished_folders(tmp_path: Path, small_forest, iris):
    for version in ("10", "2", "1"):
        build_package(
            small_forest,
            name="m",
            version=version,
            models_dir=tmp_path,
            sample=iris[0],
            feature_names=IRIS_FEATURES,
            onnx=False,
        )
    (tmp_path / "m" / ".3.tmp").mkdir()
    (tmp_path / "m" / "4").mkdir()  # no manifest yet
    assert discover(tmp_path) == {"m": ["1", "2", "10"]}


@pytest.mark.parametrize("name", ["iris", "iris-logreg", "diabetes", "churn"])
def test_the_manifest_records_a_smoke_row_with_the_answer_of_the_estimator(demo_models: Path, name: str):
    import pandas as pd

    from app.packages.validation import reference_row

    manifest = Manifest.from_dict(_manifest(demo_models / name / "1"))
    smoke = manifest.smoke
    assert smoke is not None
    assert smoke["features"] == dict(zip(manifest.feature_names, reference_row(manifest.features, manifest.reference),
                                         strict=True))
    estimator = joblib.load(demo_models / name / "1" / "model.joblib")
    values = list(smoke["features"].values())
    row = pd.DataFrame([smoke["features"]]) if manifest.input == "frame" else np.array([values])
    if manifest.task == "classifier":
        assert smoke["prediction"] == estimator.predict(row)[0]
        assert list(smoke["probabilities"].values()) == pytest.approx(
            estimator.predict_proba(row)[0].tolist(), abs=1e-12
        )
    else:
        assert smoke["prediction"] == pytest.approx(float(estimator.predict(row)[0]), rel=1e-12)
    assert smoke["tolerance"] == 1e-5


# ---------------------------------------------------------------- the gate


def test_a_good_package_loads_with_onnx(package: Path):
    model = load_package(package)
    assert (model.name, model.version, model.task, model.engine.name) == ("iris", "1", "classifier", "onnx")
    assert model.feature_names == IRIS_FEATURES


def test_a_missing_folder_is_refused(tmp_path: Path):
    _refused(tmp_path / "nope" / "1", "manifest")


def test_invalid_json_is_refused(package: Path):
    (package / "manifest.json").write_text("{not json")
    _refused(package, "manifest")


def test_a_manifest_missing_fields_names_them(package: Path):
    data = _manifest(package)
    del data["features"]
    _write_manifest(package, data)
    assert "features" in str(_refused(package, "manifest"))


def _set(field: str, value):
    def spoil(stats: dict) -> None:
        stats[field] = value

    return spoil


# What drift scoring and the gate's smoke score need of each feature's reference, spoiled one way at a time.
REFERENCE_FAULTS = {
    "no bin_edges": (lambda stats: stats.pop("bin_edges"), "reference.sepal_length.bin_edges must be a list"),
    "bin_edges not numbers": (_set("bin_edges", ["4.8", "5.4"]), "reference.sepal_length.bin_edges must be a list"),
    "NaN in bin_edges": (_set("bin_edges", [float("nan"), 5.0]), "reference.sepal_length.bin_edges must be a list"),
    "bin_edges decreasing": (_set("bin_edges", [6.0, 5.0]), "bin_edges must be strictly increasing"),
    "proportions one short": (lambda stats: stats["proportions"].pop(), "proportions must be 10 finite numbers"),
    "proportions missing": (lambda stats: stats.pop("proportions"), "proportions must be 10 finite numbers"),
    "proportions not summing to 1": (
        lambda stats: stats.update(proportions=[0.5] * len(stats["proportions"])),
        "sum to 1",
    ),
    "no mean": (lambda stats: stats.pop("mean"), "reference.sepal_length.mean must be a finite number"),
    "mean a string": (_set("mean", "5.8"), "reference.sepal_length.mean must be a finite number"),
    "statistics not an object": (lambda stats: stats.clear(), "reference.sepal_length.bin_edges"),
}


@pytest.mark.parametrize("fault", list(REFERENCE_FAULTS))
def test_a_reference_drift_scoring_cannot_use_is_refused_naming_the_feature(package: Path, fault: str):
    spoil, problem = REFERENCE_FAULTS[fault]
    data = _manifest(package)
    spoil(data["reference"]["sepal_length"])
    _write_manifest(package, data)
    message = str(_refused(package, "manifest"))
    assert problem in message
    assert "rebuild it with mlapi package" in message


def test_an_empty_reference_is_refused_naming_the_first_feature(package: Path):
    data = _manifest(package)
    data["reference"] = {}
    _write_manifest(package, data)
    assert "reference has no statistics for feature 'sepal_length'" in str(_refused(package, "manifest"))


@pytest.mark.parametrize(
    ("names", "problem"),
    [
        (["sepal_length", "", "petal_length", "petal_width"], "needs a non-empty string 'name'"),
        (["sepal_length", "   ", "petal_length", "petal_width"], "needs a non-empty string 'name'"),
        (["sepal_length", "sepal_length", "petal_length", "petal_width"], "['sepal_length'] appear more than once"),
    ],
    ids=["empty", "blank", "repeated"],
)
def test_feature_names_must_be_unique_non_empty_strings(package: Path, names: list[str], problem: str):
    data = _manifest(package)
    data["features"] = [{"name": n, "type": "float"} for n in names]
    data["reference"] = dict.fromkeys(names, data["reference"][IRIS_FEATURES[0]])
    _write_manifest(package, data)
    assert problem in str(_refused(package, "manifest"))


def test_an_exception_no_check_anticipates_is_the_refusal_of_the_stage_it_came_from(package: Path, models_copy: Path):
    broken = broken_tags_package(package, models_copy, "2")
    error = _refused(broken, "estimator")
    assert "RuntimeError: tags unavailable" in str(error)
    assert "rebuild the package with mlapi package" in str(error)


def test_a_tampered_model_file_is_refused_before_unpickling(package: Path):
    with open(package / "model.joblib", "ab") as fh:
        fh.write(b"\0")
    message = str(_refused(package, "sha256"))
    assert "model.joblib" in message and "copy the package again or rebuild it" in message


def test_a_file_listed_but_missing_is_refused(package: Path):
    (package / "model.onnx").unlink()
    assert "model.onnx" in str(_refused(package, "sha256"))


def test_a_manifest_without_model_joblib_is_refused(package: Path):
    data = _manifest(package)
    del data["files"]["model.joblib"]
    _write_manifest(package, data)
    _refused(package, "sha256")


@pytest.mark.parametrize(("key", "label"), [("sklearn", "scikit-learn"), ("numpy", "numpy")])
def test_another_library_version_is_refused_with_both_versions_named(package: Path, key: str, label: str):
    data = _manifest(package)
    data["versions"][key] = "1.0.0"
    _write_manifest(package, data)
    running = sklearn.__version__ if key == "sklearn" else np.__version__
    message = str(_refused(package, "versions"))
    assert f"{label} 1.0.0" in message and f"{label} {running}" in message
    assert f"rebuild the package with {label} {running} or install {label} 1.0.0" in message


def test_a_package_from_another_python_feature_release_is_refused_with_both_versions_named(package: Path):
    major, minor, _ = platform.python_version_tuple()
    other = f"{major}.{int(minor) + 1}.0"
    data = _manifest(package)
    data["versions"]["python"] = other
    _write_manifest(package, data)
    message = str(_refused(package, "versions"))
    assert f"built with Python {other} but this runtime has Python {platform.python_version()}" in message
    assert f"rebuild the package with Python {major}.{minor}" in message


def test_a_package_from_another_python_patch_release_loads(package: Path):
    major, minor, patch = platform.python_version_tuple()
    data = _manifest(package)
    data["versions"]["python"] = f"{major}.{minor}.{int(patch) + 1}"
    _write_manifest(package, data)
    assert load_package(package).manifest.versions["python"] == f"{major}.{minor}.{int(patch) + 1}"


def test_a_pickle_from_another_scikit_learn_is_refused_not_just_warned(package: Path):
    # The estimator state records the scikit-learn that pickled it; scikit-learn only warns on load.
    current = sklearn.__version__.encode()
    old = b"1.0.2"[: len(current)].ljust(len(current), b"0")
    raw = (package / "model.joblib").read_bytes()
    assert current in raw
    (package / "model.joblib").write_bytes(raw.replace(current, old))
    _resign(package)
    message = str(_refused(package, "versions"))
    assert old.decode() in message and sklearn.__version__ in message


def test_a_truncated_joblib_is_unreadable(package: Path):
    raw = (package / "model.joblib").read_bytes()
    (package / "model.joblib").write_bytes(raw[: len(raw) // 2])
    _resign(package)
    _refused(package, "unreadable")


def test_a_pickle_that_is_not_a_model_is_refused(package: Path):
    joblib.dump({"weights": [1, 2, 3]}, package / "model.joblib")
    _resign(package)
    assert "dict" in str(_refused(package, "estimator"))


def test_a_regressor_in_a_classifier_package_is_refused(package: Path, iris):
    from sklearn.linear_model import LinearRegression

    joblib.dump(LinearRegression().fit(iris[0], np.arange(len(iris[0]))), package / "model.joblib")
    _resign(package)
    _refused(package, "estimator")


def test_a_feature_list_shorter_than_the_estimator_is_refused(package: Path):
    data = _manifest(package)
    data["features"] = data["features"][:3]
    data["reference"].pop("petal_width")
    _write_manifest(package, data)
    assert "takes 4 features, the manifest lists 3" in str(_refused(package, "features"))


def test_feature_names_that_differ_from_the_fitted_ones_are_refused(tmp_path: Path):
    data = load_iris(as_frame=True)
    frame = data.data.set_axis(IRIS_FEATURES, axis=1)
    model = LogisticRegression(max_iter=500).fit(frame, data.target)
    path = build_package(model, name="m", version="1", models_dir=tmp_path, sample=frame, onnx=False)
    manifest = _manifest(path)
    manifest["features"][0]["name"] = "sepal_len"
    manifest["reference"]["sepal_len"] = manifest["reference"].pop("sepal_length")
    _write_manifest(path, manifest)
    assert "sepal_len" in str(_refused(path, "features"))


def test_a_kept_onnx_file_that_does_not_load_is_refused_without_fallback(package: Path):
    (package / "model.onnx").write_bytes(b"not an onnx model")
    _resign(package)
    _refused(package, "onnx")
    _refused(package, "onnx", engine="sklearn")  # the package is inconsistent whatever engine is asked for


def test_a_model_onnx_from_another_package_is_refused(package: Path, demo_models: Path):
    shutil.copyfile(demo_models / "diabetes" / "1" / "model.onnx", package / "model.onnx")
    _resign(package)
    _refused(package, "onnx")


def test_asking_for_onnx_without_a_kept_model_says_to_use_auto_or_sklearn(tmp_path: Path, small_forest, iris):
    path = build_package(
        small_forest,
        name="m",
        version="1",
        models_dir=tmp_path,
        sample=iris[0],
        feature_names=IRIS_FEATURES,
        onnx=False,
    )
    assert "engine auto or sklearn" in str(_refused(path, "onnx", engine="onnx"))
    assert load_package(path).engine.name == "sklearn"


def test_engine_sklearn_is_honoured_when_onnx_is_kept(package: Path):
    assert load_package(package, engine="sklearn").engine.name == "sklearn"


# ---------------------------------------------------------------- ONNX equivalence gate


@pytest.mark.parametrize("name", ["iris", "iris-logreg", "diabetes"])
def test_demo_models_keep_a_verified_onnx_file(demo_models: Path, name: str):
    onnx = _manifest(demo_models / name / "1")["onnx"]
    assert onnx["kept"] is True and onnx["reason"] is None
    assert (demo_models / name / "1" / "model.onnx").is_file()


def test_random_forest_probabilities_are_within_the_tolerance(demo_models: Path):
    onnx = _manifest(demo_models / "iris" / "1")["onnx"]
    assert onnx["precision"] == "float32" and onnx["max_abs_diff"] <= 1e-5


def test_an_estimator_skl2onnx_cannot_convert_is_recorded_and_served_by_sklearn(tmp_path: Path, iris):
    X, y = iris
    model = KNeighborsClassifier(n_neighbors=3, metric=_manhattan).fit(X, y)
    path = build_package(model, name="knn", version="1", models_dir=tmp_path, sample=X, feature_names=IRIS_FEATURES)
    onnx = _manifest(path)["onnx"]
    assert onnx["kept"] is False and "skl2onnx cannot convert" in onnx["reason"]
    assert not (path / "model.onnx").exists() and "model.onnx" not in _manifest(path)["files"]


def test_a_conversion_outside_the_tolerance_is_not_kept_and_the_difference_recorded(tmp_path: Path, small_forest, iris):
    path = build_package(
        small_forest,
        name="m",
        version="1",
        models_dir=tmp_path,
        sample=iris[0],
        feature_names=IRIS_FEATURES,
        onnx_tolerance=0.0,
    )
    onnx = _manifest(path)["onnx"]
    assert onnx["kept"] is False and "float32" in onnx["reason"] and "float64" in onnx["reason"]
    assert onnx["max_abs_diff"] > 0
    assert not (path / "model.onnx").exists()
    assert load_package(path).engine.name == "sklearn"


def test_double_precision_is_kept_when_float32_misses_the_gate(tmp_path: Path, iris):
    # Values near 1e5 lose their decimals in float32, so the logits move; float64 reproduces them.
    X, y = iris
    shifted = X * 10 + 1e5
    model = LogisticRegression(max_iter=2000).fit(shifted, y)
    path = build_package(model, name="m", version="1", models_dir=tmp_path, sample=shifted, feature_names=IRIS_FEATURES)
    onnx = _manifest(path)["onnx"]
    assert onnx["kept"] is True and onnx["precision"] == "float64"
    assert onnx["max_abs_diff"] <= 1e-5


# ---------------------------------------------------------------- verify CLI


def _verify(path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "verify", str(path), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_verify_prints_a_json_summary_on_success(demo_models: Path):
    result = _verify(demo_models / "iris" / "1")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["ok"] is True and summary["engine"] == "onnx"
    assert summary["smoke_prediction"] in ("setosa", "versicolor", "virginica")


def test_verify_exits_1_and_names_the_check(package: Path):
    with open(package / "model.joblib", "ab") as fh:
        fh.write(b"\0")
    result = _verify(package)
    assert result.returncode == 1 and result.stdout == ""
    assert "failed the sha256 check" in result.stderr


def test_the_gate_reads_pickles_only_after_the_hash_check(package: Path):
    # A pickle that would run code when loaded: the hash check must stop it first.
    marker = package.parent / "ran"
    payload = pickle.dumps(_Exploit(str(marker)))
    (package / "model.joblib").write_bytes(payload)
    _refused(package, "sha256")
    assert not marker.exists()


class _Exploit:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (shutil.copyfile, ("/dev/null", self.marker))


@pytest.mark.parametrize("check", ["onnx", "estimator"])
def test_a_package_whose_engine_answers_its_smoke_row_otherwise_is_refused(package: Path, check: str):
    data = _manifest(package)
    if check == "estimator":  # no model.onnx: scikit-learn serves
        (package / "model.onnx").unlink()
        del data["files"]["model.onnx"]
        data["onnx"] = {**data["onnx"], "kept": False, "reason": "removed"}
    answered = data["smoke"]["prediction"]
    other = next(c for c in data["classes"] if c != answered)
    data["smoke"]["probabilities"] = {
        answered: 0.0,
        other: 1.0,
        **{c: 0.0 for c in data["classes"] if c not in (answered, other)},
    }
    data["smoke"]["prediction"] = other
    _write_manifest(package, data)
    refusal = _refused(package, check)
    assert "smoke row" in str(refusal) and repr(other) in str(refusal) and repr(answered) in str(refusal)


def test_a_package_from_before_the_smoke_row_loads_and_checks_the_shape_only(package: Path):
    data = _manifest(package)
    del data["smoke"]
    _write_manifest(package, data)
    model = load_package(package)
    assert model.manifest.smoke is None and model.engine.name == "onnx"


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda s: s["features"].pop("petal_width"), "is not the row of the reference statistics"),
        (lambda s: s["features"].update(petal_width=9.9), "is not the row of the reference statistics"),
        (lambda s: s.update(tolerance="tight"), "smoke.tolerance must be a number"),
        (lambda s: s.update(prediction="lily"), "smoke.prediction must be one of the classes"),
    ],
)
def test_a_malformed_smoke_row_is_refused_naming_what_is_wrong(package: Path, change, problem: str):
    data = _manifest(package)
    change(data["smoke"])
    _write_manifest(package, data)
    assert problem in str(_refused(package, "manifest"))
