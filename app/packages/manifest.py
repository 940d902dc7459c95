"""The model package's manifest: what a package is, and how it is refused.

A package is a folder ``<models dir>/<name>/<version>/`` holding

- ``model.joblib``: the fitted scikit-learn estimator or pipeline (uncompressed),
- ``model.onnx``: the same model for ONNX Runtime, only when it passed the
  equivalence gate on the reference sample,
- ``manifest.json``: what the model is (task, ordered features, classes), what
  built it (Python, scikit-learn, numpy, onnxruntime versions), the sha256 of
  every file, metrics, and per-feature reference statistics for drift.

It imports nothing of the service but reference.py (a leaf itself), so every layer can read a manifest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from app.packages.reference import check_reference

MANIFEST = "manifest.json"
MODEL_JOBLIB = "model.joblib"
MODEL_ONNX = "model.onnx"
FORMAT_VERSION = 2
# ONNX is kept only when it reproduces scikit-learn on the sample within this bound:
# absolute for probabilities; for regression max(1, |value|) * tolerance (absolute
# below 1, relative above, because float32 carries ~7 significant digits).
ONNX_TOLERANCE = 1e-5
FEATURE_TYPES = ("float", "int", "bool", "string")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_REQUIRED_FIELDS = ("name", "version", "created", "task", "features", "versions", "files", "reference", "onnx")

Check = Literal["unreadable", "manifest", "sha256", "versions", "features", "estimator", "onnx"]


class PackageError(Exception):
    """A package failed a check; the message names the package, the check and the remedy."""

    def __init__(self, package: str | Path, check: Check, problem: str, remedy: str):
        self.package = str(package)
        self.check = check
        self.problem = problem
        self.remedy = remedy
        super().__init__(f"model package {self.package} failed the {check} check: {problem}; {remedy}.")


@dataclass(frozen=True)
class Feature:
    name: str
    type: str = "float"
    # string features: the categories the model knows, and whether it scores one it does not; an int
    # feature has categories only where an encoder refuses values it was not fitted on (allow_unknown false)
    categories: tuple[str, ...] | tuple[int, ...] | None = None
    allow_unknown: bool = False

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "type": self.type}
        if self.type == "string" or (self.type == "int" and self.categories is not None):
            out["categories"] = list(self.categories or ())
            out["allow_unknown"] = self.allow_unknown
        return out

    @classmethod
    def from_dict(cls, item: Any) -> Feature:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"].strip():
            raise ValueError(f"feature entry {item!r} needs a non-empty string 'name'")
        kind = item.get("type", "float")  # manifests before typed features held only numbers
        if kind not in FEATURE_TYPES:
            raise ValueError(f"feature {item['name']!r} has type {kind!r}, expected one of {', '.join(FEATURE_TYPES)}")
        if kind == "int" and item.get("categories") is not None:
            values = item["categories"]
            if not isinstance(values, list) or not values or not all(
                    isinstance(c, int) and not isinstance(c, bool) for c in values):
                raise ValueError(f"int feature {item['name']!r}: 'categories' must be a non-empty list of integers")
            if len(set(values)) != len(values):
                raise ValueError(f"int feature {item['name']!r} lists a category more than once")
            if item.get("allow_unknown", False) is not False:
                raise ValueError(f"int feature {item['name']!r}: categories are kept only with allow_unknown false")
            return cls(item["name"], kind, tuple(values), False)
        if kind != "string":
            return cls(item["name"], kind)
        categories = item.get("categories")
        if not isinstance(categories, list) or not categories or not all(isinstance(c, str) for c in categories):
            raise ValueError(f"string feature {item['name']!r} needs 'categories', a non-empty list of strings")
        if len(set(categories)) != len(categories):
            raise ValueError(f"string feature {item['name']!r} lists a category more than once")
        allow = item.get("allow_unknown", False)
        if not isinstance(allow, bool):
            raise ValueError(f"feature {item['name']!r}: allow_unknown must be true or false")
        return cls(item["name"], kind, tuple(categories), allow)


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    created: str
    task: Literal["classifier", "regressor"]
    features: list[Feature]
    classes: list[str | int | float] | None
    versions: dict[str, str]
    files: dict[str, str]
    metrics: dict[str, Any]
    reference: dict[str, dict[str, Any]]
    onnx: dict[str, Any]
    format: int = FORMAT_VERSION
    # "frame": fitted on a DataFrame, scored on one with the training columns and dtypes; "array": a plain array
    input: Literal["array", "frame"] = "array"
    # The row every gate scores (reference_row) and the answer the estimator gave it when packaged:
    # {"features": {name: value}, "prediction": label or value, "probabilities": {label: p}, "tolerance": t}.
    # Packages built before it was recorded have none; their gates check the shape of the answer only.
    smoke: dict[str, Any] | None = None

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "name": self.name,
            "version": self.version,
            "created": self.created,
            "task": self.task,
            "input": self.input,
            "features": [f.to_dict() for f in self.features],
            "classes": self.classes,
            "versions": self.versions,
            "files": self.files,
            "metrics": self.metrics,
            "reference": self.reference,
            "onnx": self.onnx,
            **({"smoke": self.smoke} if self.smoke is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        """Typed view of manifest.json; raises ValueError naming the bad field."""
        if not isinstance(data, dict):
            raise ValueError("the manifest is not a JSON object")
        missing = [key for key in _REQUIRED_FIELDS if key not in data]
        if missing:
            raise ValueError(f"fields missing: {', '.join(missing)}")
        if data["task"] not in ("classifier", "regressor"):
            raise ValueError(f"task is {data['task']!r}, expected 'classifier' or 'regressor'")
        features = data["features"]
        if not isinstance(features, list) or not features:
            raise ValueError("features must be a non-empty list")
        parsed = [Feature.from_dict(item) for item in features]
        kind = data.get("input", "array")
        if kind not in ("array", "frame"):
            raise ValueError(f"input is {kind!r}, expected 'array' or 'frame'")
        repeated = sorted({f.name for f in parsed if [g.name for g in parsed].count(f.name) > 1})
        if repeated:
            raise ValueError(f"feature names are not unique: {repeated} appear more than once")
        classes = data.get("classes")
        if data["task"] == "classifier" and (not isinstance(classes, list) or len(classes) < 2):
            raise ValueError("a classifier needs a list of at least two classes")
        for key in ("versions", "files", "reference", "onnx"):
            if not isinstance(data[key], dict):
                raise ValueError(f"{key} must be an object")
        for key in ("sklearn", "numpy"):
            if not isinstance(data["versions"].get(key), str):
                raise ValueError(f"versions.{key} is missing")
        check_reference(data["reference"], parsed)
        smoke = data.get("smoke")
        if smoke is not None:
            _check_smoke(smoke, data["task"], classes)
        return cls(
            name=str(data["name"]),
            version=str(data["version"]),
            created=str(data["created"]),
            task=data["task"],
            features=parsed,
            classes=classes if data["task"] == "classifier" else None,
            versions=dict(data["versions"]),
            files=dict(data["files"]),
            metrics=dict(data.get("metrics") or {}),
            reference=dict(data["reference"]),
            onnx=dict(data["onnx"]),
            format=int(data.get("format", 1)),
            input=kind,
            smoke=dict(smoke) if smoke is not None else None,
        )


def _check_smoke(smoke: Any, task: str, classes: Any) -> None:
    if not isinstance(smoke, dict) or not isinstance(smoke.get("features"), dict):
        raise ValueError("smoke must be an object with the features of one row")
    tolerance = smoke.get("tolerance")
    if not isinstance(tolerance, (int, float)) or isinstance(tolerance, bool) or not 0 <= tolerance < 1:
        raise ValueError("smoke.tolerance must be a number in [0, 1)")
    if task == "classifier":
        probabilities = smoke.get("probabilities")
        if smoke.get("prediction") not in classes or not isinstance(probabilities, dict) or sorted(
                probabilities) != sorted(str(c) for c in classes):
            raise ValueError("smoke.prediction must be one of the classes, with a probability for each class")
    elif not isinstance(smoke.get("prediction"), (int, float)) or isinstance(smoke.get("prediction"), bool):
        raise ValueError("smoke.prediction of a regressor must be a number")



UNREADABLE_REMEDY = "give the service user read access to it (e.g. chmod -R a+rX on the folder), then reload"

def as_refusal(path: str | Path, exc: BaseException, check: Check = "unreadable") -> PackageError:
    """Any exception met while loading a package, as that package's refusal."""
    if isinstance(exc, PackageError):
        return exc
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename else ""
        return PackageError(path, "unreadable", f"it cannot be read ({exc.strerror or exc}{where})", UNREADABLE_REMEDY)
    detail = str(exc).splitlines()[0][:300] if str(exc) else ""
    return PackageError(
        path,
        check,
        f"loading it failed unexpectedly ({type(exc).__name__}: {detail})",
        "rebuild the package with mlapi package; if that does not help, report this message",
    )


