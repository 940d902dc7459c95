"""Model packages that the service's gate must refuse, one per check, each made from a copy of a good package.

    path = refused_copy(good_package, models_dir, "sha256")  # models_dir/<name>/refused-sha256

Shared by the tests of the gate itself and by the deploy tests that prove a playbook refuses such a package.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import joblib
import numpy as np
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from app.packages.build import build_package

MODEL_JOBLIB = "model.joblib"
MANIFEST = "manifest.json"


def read_manifest(package: Path) -> dict:
    return json.loads((package / MANIFEST).read_text())


def write_manifest(package: Path, data: dict) -> None:
    (package / MANIFEST).write_text(json.dumps(data, indent=2) + "\n")


def resign(package: Path) -> None:
    """Record the files' current hashes, as someone who rewrote the files and the manifest would."""
    data = read_manifest(package)
    data["files"] = {name: hashlib.sha256((package / name).read_bytes()).hexdigest() for name in data["files"]}
    write_manifest(package, data)


def truncate_the_model(package: Path) -> None:
    """A model file cut in half before it was hashed (a disk that filled up while building): it does not load."""
    raw = (package / MODEL_JOBLIB).read_bytes()
    (package / MODEL_JOBLIB).write_bytes(raw[: len(raw) // 2])
    resign(package)


def change_the_model_after_hashing(package: Path) -> None:
    """A model file changed after the manifest recorded its hash (tampering, or a copy that went wrong)."""
    with open(package / MODEL_JOBLIB, "ab") as fh:
        fh.write(b"\0")


def claim_another_scikit_learn(package: Path) -> None:
    """A manifest that says the model was built with another scikit-learn than the runtime's."""
    data = read_manifest(package)
    data["versions"]["sklearn"] = "1.0.0"
    write_manifest(package, data)


def drop_a_feature(package: Path) -> None:
    """A manifest that lists one feature fewer than the estimator takes."""
    data = read_manifest(package)
    dropped = data["features"].pop()
    data["reference"].pop(dropped["name"])
    write_manifest(package, data)


def replace_the_model_with_a_dict(package: Path) -> None:
    """A valid, correctly hashed pickle that holds no model."""
    joblib.dump({"weights": [1, 2, 3]}, package / MODEL_JOBLIB)
    resign(package)


# The check of the load gate (app/packages/gate.py) that refuses each kind, and how to make one.
REFUSED_KINDS: dict[str, Callable[[Path], None]] = {
    "unreadable": truncate_the_model,
    "sha256": change_the_model_after_hashing,
    "versions": claim_another_scikit_learn,
    "features": drop_a_feature,
    "estimator": replace_the_model_with_a_dict,
}


def copy_as_version(good: Path, models_dir: Path, version: str) -> Path:
    """A copy of the package `good` at <models_dir>/<name>/<version>, its manifest saying that version."""
    data = read_manifest(good)
    target = models_dir / data["name"] / version
    shutil.copytree(good, target)
    write_manifest(target, {**data, "version": version})
    return target


def refused_copy(good: Path, models_dir: Path, check: str) -> Path:
    """A copy of the package `good` at <models_dir>/<name>/refused-<check>, spoiled so that `check` refuses it."""
    target = copy_as_version(good, models_dir, f"refused-{check}")
    REFUSED_KINDS[check](target)
    return target


def drop_the_bin_edges(package: Path) -> None:
    """A manifest whose reference statistics lack the cut points drift scoring needs (a hand-edited manifest)."""
    data = read_manifest(package)
    first = data["features"][0]["name"]
    data["reference"][first].pop("bin_edges")
    write_manifest(package, data)


# Column names a request schema cannot use as attribute names: pydantic's own, and ones that are no identifier.
ODD_FEATURES = ["model_config", "model_fields", "sepal width", "1st"]


def odd_names_package(models_dir: Path, name: str, version: str) -> Path:
    """An iris classifier whose features carry ODD_FEATURES as names, in the iris order."""
    iris = load_iris()
    X, y = iris.data, iris.target_names[iris.target]
    model = LogisticRegression(max_iter=1000).fit(X, y)
    return build_package(model, name=name, version=version, models_dir=models_dir, sample=X,
                         feature_names=ODD_FEATURES)


IRIS_COLUMNS = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def iris_package(models_dir: Path, name: str, version: str, features: list[str]) -> Path:
    """An iris classifier fitted on the named columns in that order: any order of IRIS_COLUMNS, and
    petal_ratio (petal length / petal width) as a fifth."""
    iris = load_iris()
    columns = dict(zip(IRIS_COLUMNS, iris.data.T, strict=True))
    columns["petal_ratio"] = columns["petal_length"] / columns["petal_width"]
    X = np.column_stack([columns[f] for f in features])
    model = LogisticRegression(max_iter=2000).fit(X, iris.target_names[iris.target])
    return build_package(model, name=name, version=version, models_dir=models_dir, sample=X, feature_names=features)


class BrokenTagsClassifier(LogisticRegression):
    """An estimator whose loading raises what no check of the gate anticipates: its scikit-learn tags fail."""

    tags_broken = False  # set once fitted: fitting reads the tags too

    def __sklearn_tags__(self):  # type: ignore[no-untyped-def]
        if self.tags_broken:
            raise RuntimeError("tags unavailable")
        return super().__sklearn_tags__()


def broken_tags_package(good: Path, models_dir: Path, version: str) -> Path:
    """A copy of the package `good` at <models_dir>/<name>/<version> holding a fitted BrokenTagsClassifier."""
    X, y = load_iris(return_X_y=True)
    target = copy_as_version(good, models_dir, version)
    estimator = BrokenTagsClassifier(max_iter=1000).fit(X, np.asarray(read_manifest(good)["classes"])[y])
    estimator.tags_broken = True
    joblib.dump(estimator, target / MODEL_JOBLIB)
    resign(target)
    return target


def rows_csv(package: Path, path: Path, rows: int, seed: int = 7) -> tuple[list[str], np.ndarray]:
    """A CSV of random rows within each feature's reference range (min..max) of the package, with an ``id`` column
    first; returns the feature names and the matrix. Values are written as repr, so they read back exactly."""
    reference = read_manifest(package)["reference"]
    features = [f["name"] for f in read_manifest(package)["features"]]
    low = np.array([reference[name]["min"] for name in features])
    high = np.array([reference[name]["max"] for name in features])
    X = np.random.default_rng(seed).uniform(low, high, size=(rows, len(features)))
    with open(path, "w") as fh:
        fh.write(",".join(["id", *features]) + "\n")
        fh.writelines(f"row-{i}," + ",".join(map(repr, row)) + "\n" for i, row in enumerate(X.tolist()))
    return features, X
