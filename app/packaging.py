"""Model packages: building them, and the compatibility gate that loads them.

A package is a folder ``<models dir>/<name>/<version>/`` holding

- ``model.joblib``: the fitted scikit-learn estimator or pipeline (uncompressed),
- ``model.onnx``: the same model for ONNX Runtime, only when it passed the
  equivalence gate on the reference sample,
- ``manifest.json``: what the model is (task, ordered features, classes), what
  built it (Python, scikit-learn, numpy, onnxruntime versions), the sha256 of
  every file, metrics, and per-feature reference statistics for drift.

Loading a pickle runs code from it. ``load_package`` therefore checks every
file's sha256 against the manifest before anything is unpickled, and refuses a
package built with another scikit-learn or numpy than the one running.

``python -m app.packaging verify DIR`` runs the same gate plus one smoke score;
deployment runs it before switching a package in.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import hashlib
import io
import json
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np

from app.drift import check_reference, reference_statistics
from app.engines import Engine, OnnxEngine, SklearnEngine
from app.validation import FeatureSpec, InputSchema, ValidationFailure, reference_row

MANIFEST = "manifest.json"
MODEL_JOBLIB = "model.joblib"
MODEL_ONNX = "model.onnx"
FORMAT_VERSION = 2
# ONNX is kept only when it reproduces scikit-learn on the sample within this bound:
# absolute for probabilities; for regression max(1, |value|) * tolerance (absolute
# below 1, relative above, because float32 carries ~7 significant digits).
ONNX_TOLERANCE = 1e-5
FEATURE_TYPES = ("float", "int", "bool", "string")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
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


@dataclass
class LoadedModel:
    manifest: Manifest
    path: Path
    engine: Engine
    _classes: np.ndarray | None = field(default=None, repr=False)
    inputs: InputSchema = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.manifest.classes is not None:
            self._classes = np.asarray(self.manifest.classes, dtype=object)
        self.inputs = InputSchema.of(self.manifest)

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def task(self) -> str:
        return self.manifest.task

    @property
    def feature_names(self) -> list[str]:
        return self.manifest.feature_names

    @property
    def classes(self) -> list[str | int | float] | None:
        return self.manifest.classes

    def score(self, X: Any) -> tuple[np.ndarray, np.ndarray | None]:
        """One call into the model for the batch: (labels, probabilities) or (values, None).

        X is a Batch's estimator input, built by ``self.inputs`` (app/validation.py).
        """
        out = self.engine.run(X)
        if self._classes is None:
            return out, None
        return self._classes[np.argmax(out, axis=1)], out


# ---------------------------------------------------------------- runtime facts


def runtime_versions() -> dict[str, str]:
    import sklearn

    versions = {"python": platform.python_version(), "sklearn": sklearn.__version__, "numpy": np.__version__}
    try:
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    except ImportError:  # pragma: no cover - onnxruntime is a runtime requirement
        versions["onnxruntime"] = ""
    return versions


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _natural_key(text: str) -> list[tuple[int, int | str]]:
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", text) if part]


UNREADABLE_REMEDY = "give the service user read access to it (e.g. chmod -R a+rX on the folder), then reload"


def discover(models_dir: Path, unlisted: dict[str, PackageError] | None = None) -> dict[str, list[str]]:
    """{name: [versions oldest..newest]} of every folder holding a manifest (natural sort: 2 < 10).

    A version folder that cannot be looked into is listed, so that loading it
    refuses it by name (unreadable). A model folder that cannot be listed is
    left out and reported in ``unlisted``; a models folder that cannot be
    listed raises PackageError (unreadable).
    """
    models_dir = Path(models_dir)
    found: dict[str, list[str]] = {}
    try:
        if not models_dir.is_dir():
            return found
        models = sorted(models_dir.iterdir())
    except OSError as exc:
        remedy = ("give the service user read access to it (e.g. chmod a+rX on the folder), then reload or "
                  "restart the service")
        raise PackageError(models_dir, "unreadable", as_refusal(models_dir, exc).problem, remedy) from None
    for model in models:
        try:
            if model.name.startswith(".") or not model.is_dir():
                continue
            versions = [v.name for v in model.iterdir() if not v.name.startswith(".") and _holds_manifest(v)]
        except OSError as exc:
            if unlisted is not None:
                unlisted[model.name] = as_refusal(model, exc)
            continue
        if versions:
            found[model.name] = sorted(versions, key=_natural_key)
    return found


def _holds_manifest(folder: Path) -> bool:
    try:
        return (folder / MANIFEST).is_file()
    except PermissionError:
        return folder.is_dir()  # a package the service user may not read: the gate refuses it by name


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


# ---------------------------------------------------------------- the gate


def _read_manifest(path: Path) -> Manifest:
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise PackageError(path, "manifest", "the folder does not exist", "give the path of a <name>/<version> folder")
    try:
        raw = manifest_path.read_bytes()
    except PermissionError as exc:
        raise as_refusal(path, exc) from None
    except OSError as exc:
        raise PackageError(
            path, "manifest", f"{MANIFEST} cannot be read ({exc.strerror})", "rebuild it with mlapi package"
        ) from None
    try:
        return Manifest.from_dict(json.loads(raw))
    except json.JSONDecodeError as exc:
        raise PackageError(
            path, "manifest", f"{MANIFEST} is not valid JSON ({exc})", "rebuild it with mlapi package"
        ) from None
    except (ValueError, TypeError) as exc:
        raise PackageError(
            path, "manifest", f"{MANIFEST} is invalid ({exc})", "rebuild it with mlapi package"
        ) from None


def _verified_files(path: Path, manifest: Manifest) -> dict[str, bytes]:
    """Contents of every file the manifest lists, each checked against its sha256."""
    remedy = "the files were changed or copied incompletely; copy the package again or rebuild it"
    if MODEL_JOBLIB not in manifest.files:
        raise PackageError(path, "sha256", f"the manifest lists no {MODEL_JOBLIB}", "rebuild the package")
    contents = {}
    for filename, expected in manifest.files.items():
        if Path(filename).name != filename:
            raise PackageError(path, "manifest", f"file name {filename!r} is not a plain name", "rebuild the package")
        try:
            data = (path / filename).read_bytes()
        except FileNotFoundError:
            raise PackageError(path, "sha256", f"{filename} listed in the manifest is missing", remedy) from None
        except PermissionError as exc:
            raise as_refusal(path, exc) from None
        except OSError as exc:
            raise PackageError(path, "unreadable", f"{filename} cannot be read ({exc.strerror})", remedy) from None
        actual = _sha256(data)
        if actual != expected:
            raise PackageError(path, "sha256", f"{filename} has sha256 {actual}, the manifest says {expected}", remedy)
        contents[filename] = data
    return contents


def _minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def _check_versions(path: Path, manifest: Manifest) -> None:
    runtime = runtime_versions()
    # Pickles are only as portable as the interpreter that wrote them: the same feature release (3.12.x)
    # is required, as the scikit-learn and numpy releases are.
    built_python = manifest.versions.get("python", "")
    if built_python and _minor(built_python) != _minor(runtime["python"]):
        raise PackageError(
            path,
            "versions",
            f"it was built with Python {built_python} but this runtime has Python {runtime['python']}",
            f"rebuild the package with Python {_minor(runtime['python'])} (the host's interpreter), "
            f"or run the service with Python {_minor(built_python)} (app_python)",
        )
    for key, label in (("sklearn", "scikit-learn"), ("numpy", "numpy")):
        built, running = manifest.versions[key], runtime[key]
        if built != running:
            raise PackageError(
                path,
                "versions",
                f"it was built with {label} {built} but this runtime has {label} {running}",
                f"rebuild the package with {label} {running} or install {label} {built}",
            )


def _unpickle(path: Path, manifest: Manifest, data: bytes) -> Any:
    import joblib
    from sklearn.exceptions import InconsistentVersionWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", InconsistentVersionWarning)
        try:
            estimator = joblib.load(io.BytesIO(data))
        except Exception as exc:  # a broken pickle can raise nearly anything
            raise PackageError(
                path,
                "unreadable",
                f"{MODEL_JOBLIB} cannot be loaded ({type(exc).__name__}: {exc})",
                "rebuild the package from the trained model",
            ) from None
    for warning in caught:
        w = warning.message
        if isinstance(w, InconsistentVersionWarning):
            raise PackageError(
                path,
                "versions",
                f"{MODEL_JOBLIB} holds an estimator pickled with scikit-learn {w.original_sklearn_version} "
                f"but this runtime has scikit-learn {w.current_sklearn_version}",
                f"rebuild the package with scikit-learn {w.current_sklearn_version} "
                f"or install scikit-learn {w.original_sklearn_version}",
            )
    return estimator


def _estimator_task(estimator: Any) -> str | None:
    from sklearn.base import is_classifier, is_regressor

    if is_classifier(estimator) and hasattr(estimator, "predict_proba"):
        return "classifier"
    if is_regressor(estimator):
        return "regressor"
    return None


def _check_estimator(path: Path, manifest: Manifest, estimator: Any) -> None:
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted

    remedy = "package a fitted scikit-learn estimator or pipeline"
    if not hasattr(estimator, "predict") or not hasattr(estimator, "get_params"):
        raise PackageError(
            path, "estimator", f"{MODEL_JOBLIB} holds a {type(estimator).__name__}, not a scikit-learn model", remedy
        )
    try:
        check_is_fitted(estimator)
    except NotFittedError:
        raise PackageError(path, "estimator", f"the {type(estimator).__name__} is not fitted", remedy) from None
    except TypeError as exc:
        raise PackageError(path, "estimator", str(exc), remedy) from None
    task = _estimator_task(estimator)
    if task != manifest.task:
        found = task or "neither a classifier with predict_proba nor a regressor"
        raise PackageError(path, "estimator", f"the manifest says {manifest.task} but the estimator is {found}", remedy)
    if task == "classifier":
        classes = [_plain(c) for c in estimator.classes_]
        if classes != manifest.classes:
            raise PackageError(
                path,
                "estimator",
                f"the estimator's classes {classes} differ from the manifest's {manifest.classes}",
                "rebuild the package",
            )


def _check_features(path: Path, manifest: Manifest, estimator: Any) -> None:
    names = manifest.feature_names
    remedy = "rebuild the package with the feature list the model was trained on"
    n_in = getattr(estimator, "n_features_in_", None)
    if n_in is not None and n_in != len(names):
        raise PackageError(
            path, "features", f"the estimator takes {n_in} features, the manifest lists {len(names)}", remedy
        )
    fitted = getattr(estimator, "feature_names_in_", None)
    if fitted is not None and list(fitted) != names:
        raise PackageError(
            path,
            "features",
            f"the estimator was fitted on features {list(fitted)}, the manifest lists {names}",
            remedy,
        )
    if manifest.reference and set(manifest.reference) != set(names):
        raise PackageError(
            path, "features", "the reference statistics do not cover exactly the manifest's features", remedy
        )


def load_package(path: Path, *, engine: str = "auto", onnx_threads: int = 1) -> LoadedModel:
    """Load one package folder through every check; raises PackageError naming the failed one."""
    path = Path(path)
    if engine not in ("auto", "onnx", "sklearn"):
        raise ValueError(f"engine must be auto, onnx or sklearn, not {engine!r}")
    # Whatever a stage raises beyond its own checks is a refusal of that stage, never a crash of the caller.
    stage: Check = "manifest"
    try:
        manifest = _read_manifest(path)
        stage = "sha256"
        contents = _verified_files(path, manifest)  # before anything is unpickled
        stage = "versions"
        _check_versions(path, manifest)
        stage = "unreadable"
        estimator = _unpickle(path, manifest, contents[MODEL_JOBLIB])
        stage = "estimator"
        _check_estimator(path, manifest, estimator)
        stage = "features"
        _check_features(path, manifest, estimator)
        stage = "onnx"
        return _engine(path, manifest, contents, estimator, engine, onnx_threads)
    except Exception as exc:
        raise as_refusal(path, exc, stage) from None


def _engine(
    path: Path, manifest: Manifest, contents: dict[str, bytes], estimator: Any, engine: str, onnx_threads: int
) -> LoadedModel:
    """The package served by the engine asked for, each engine checked on one row."""
    onnx_kept = bool(manifest.onnx.get("kept"))
    if onnx_kept and MODEL_ONNX not in contents:
        raise PackageError(
            path, "onnx", f"the manifest keeps ONNX but does not list {MODEL_ONNX}", "rebuild the package"
        )
    if engine == "onnx" and not onnx_kept:
        raise PackageError(
            path,
            "onnx",
            f"the package has no verified {MODEL_ONNX} ({manifest.onnx.get('reason') or 'not converted'})",
            "serve it with engine auto or sklearn",
        )
    onnx_engine = None
    if onnx_kept:
        # A kept model.onnx that does not load means the package is inconsistent: refuse, no fallback.
        try:
            onnx_engine = OnnxEngine(
                contents[MODEL_ONNX], manifest.task, output=manifest.onnx.get("output"), threads=onnx_threads
            )
        except Exception as exc:
            raise PackageError(
                path,
                "onnx",
                f"{MODEL_ONNX} does not load in ONNX Runtime ({type(exc).__name__}: {exc})",
                "rebuild the package (or with --no-onnx)",
            ) from None
        _check_output(path, manifest, onnx_engine, "onnx")
    if engine == "sklearn" or onnx_engine is None:
        sklearn_engine = SklearnEngine(estimator, manifest.task)
        _check_output(path, manifest, sklearn_engine, "estimator")
        return LoadedModel(manifest, path, sklearn_engine)
    return LoadedModel(manifest, path, onnx_engine)


def _check_output(path: Path, manifest: Manifest, engine: Engine, check: Check) -> None:
    """Score one row of reference means (and most common categories): the output must have the manifest's shape."""
    try:
        row = InputSchema.of(manifest).smoke_batch(manifest.reference).X
        out = engine.run(row)
    except Exception as exc:
        raise PackageError(
            path,
            check,
            f"the {engine.name} engine cannot score one row ({type(exc).__name__}: {exc})",
            "rebuild the package",
        ) from None
    expected = (1, len(manifest.classes)) if manifest.classes is not None else (1,)
    if out.shape != expected:
        raise PackageError(
            path,
            check,
            f"the {engine.name} engine returns shape {out.shape} for one row, the manifest implies {expected}",
            "rebuild the package",
        )
    if manifest.smoke is not None:
        row = dict(zip(manifest.feature_names, reference_row(manifest.features, manifest.reference), strict=True))
        if manifest.smoke["features"] != row:
            raise PackageError(
                path,
                "manifest",
                f"smoke.features {manifest.smoke['features']} is not the row of the reference statistics {row}",
                "rebuild it with mlapi package",
            )
        answer = smoke_answer(manifest.task, manifest.classes, out[0], manifest.smoke["tolerance"])
        differs = smoke_differs(manifest.smoke, answer)
        if differs:
            raise PackageError(
                path,
                check,
                f"the {engine.name} engine answers the smoke row {manifest.smoke['features']} with {differs}",
                "find what changed since the package was built (a library or the files), or rebuild it",
            )


def smoke_answer(task: str, classes: list[Any] | None, output: np.ndarray, tolerance: float) -> dict[str, Any]:
    """One row's answer as the manifest records it: the label and each class's probability, or the value."""
    if task == "classifier":
        assert classes is not None
        return {"prediction": _plain(classes[int(np.argmax(output))]),
                "probabilities": {str(c): float(p) for c, p in zip(classes, output, strict=True)},
                "tolerance": tolerance}
    return {"prediction": float(output), "tolerance": tolerance}


def smoke_differs(recorded: dict[str, Any], answer: dict[str, Any]) -> str | None:
    """How an answer to the smoke row differs from the recorded one, beyond the tolerance; None when it agrees.

    A classifier's label may differ only where the recorded probabilities of both labels tie within it."""
    tolerance = recorded["tolerance"]
    if "probabilities" in recorded:
        p, q = recorded["probabilities"], answer["probabilities"]
        worst = max(abs(p[c] - q[c]) for c in p)
        tie = abs(p[str(answer["prediction"])] - p[str(recorded["prediction"])]) <= tolerance
        if worst > tolerance or (answer["prediction"] != recorded["prediction"] and not tie):
            return (f"{answer['prediction']!r} (probabilities {q}), where it was {recorded['prediction']!r} "
                    f"(probabilities {p}) when packaged (tolerance {tolerance})")
        return None
    expected, got = recorded["prediction"], answer["prediction"]
    if abs(got - expected) / max(1.0, abs(expected)) > tolerance:
        return f"{got!r}, where it was {expected!r} when packaged (relative tolerance {tolerance})"
    return None


# ---------------------------------------------------------------- building


def _spec(feature: Feature) -> FeatureSpec:
    return FeatureSpec(feature.name, feature.type, feature.categories, feature.allow_unknown)


def _plain(value: Any) -> Any:
    """numpy scalars to the Python value JSON can hold."""
    return value.item() if isinstance(value, np.generic) else value


def _column_type(values: np.ndarray) -> str:
    kind = values.dtype.kind
    if kind == "b":
        return "bool"
    if kind in "iu":
        return "int"
    if kind == "f":
        return "float"
    present = [v for v in values.tolist() if v is not None]
    if present and all(isinstance(v, (bool, np.bool_)) for v in present):
        return "bool"
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return "int"
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return "float"
    return "string"


def _sample_columns(sample: Any, feature_names: list[str]) -> list[np.ndarray]:
    """The sample's columns in feature order: a DataFrame by name, an array by position."""
    columns = getattr(sample, "columns", None)
    if columns is not None:  # a DataFrame: select by name
        missing = [name for name in feature_names if name not in set(columns)]
        if missing:
            raise ValueError(f"the sample has no column(s) {missing}; its columns are {list(columns)}")
        out = []
        for name in feature_names:
            column = sample[name]
            if column.isna().any():
                raise ValueError(f"the sample's column {name!r} holds missing values; give a clean reference sample")
            # Categoricals and pandas strings as plain objects; numbers and booleans as numpy sees them.
            dtype = column.dtype
            numeric = getattr(dtype, "kind", "O") in "biuf" and not hasattr(dtype, "categories")
            out.append(column.to_numpy() if numeric else column.astype(object).to_numpy())
        return out
    array = np.asarray(sample)
    if array.ndim != 2:
        raise ValueError(f"the sample must be 2-D (rows x features), got shape {array.shape}")
    if array.shape[1] != len(feature_names):
        raise ValueError(f"the sample has {array.shape[1]} columns, the model takes {len(feature_names)}")
    return [array[:, j] for j in range(array.shape[1])]


def _as_type(values: np.ndarray, kind: str, name: str) -> list[Any]:
    """A sample column as the Python values a request of that type holds."""
    if kind == "string":
        return [str(v) for v in values.tolist()]
    if kind == "bool":
        return [bool(v) for v in values.tolist()]
    try:
        return [float(v) for v in values.tolist()]
    except (TypeError, ValueError):
        raise ValueError(f"the sample's column {name!r} is not numeric, but its type is {kind}") from None


def encoder_categories(estimator: Any, feature_names: list[str]) -> dict[str, tuple[list[Any], bool]]:
    """{feature: (categories, unknown ones scored)} for every column an OneHotEncoder or OrdinalEncoder of
    the model encodes, found through Pipelines and ColumnTransformers; columns it cannot trace are left out."""
    from sklearn.compose import ColumnTransformer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, OrdinalEncoder

    found: dict[str, tuple[list[Any], bool]] = {}

    def visit(step: Any, columns: list[str]) -> None:
        if isinstance(step, Pipeline):
            # Only the first step sees the input columns; later ones see its output.
            if step.steps:
                visit(step.steps[0][1], columns)
        elif isinstance(step, ColumnTransformer):
            indices = getattr(step, "_transformer_to_input_indices", {})
            for name, transformer, _ in getattr(step, "transformers_", []):
                selected = [columns[i] for i in indices.get(name, []) if i < len(columns)]
                if selected and transformer not in ("drop", "passthrough"):
                    visit(transformer, selected)
        elif isinstance(step, (OneHotEncoder, OrdinalEncoder)) and hasattr(step, "categories_"):
            if isinstance(step, OneHotEncoder):
                scored = step.handle_unknown in ("ignore", "infrequent_if_exist", "warn")
            else:
                scored = step.handle_unknown == "use_encoded_value"
            for column, categories in zip(columns, step.categories_, strict=False):
                found[column] = ([_plain(c) for c in categories if c is not None and c == c], scored)

    visit(estimator, list(feature_names))
    return found


def _typed_features(
    estimator: Any, names: list[str], columns: list[np.ndarray], types: dict[str, str]
) -> list[Feature]:
    encoded = encoder_categories(estimator, names)
    features = []
    for name, column in zip(names, columns, strict=True):
        texts = name in encoded and bool(encoded[name][0]) and all(isinstance(c, str) for c in encoded[name][0])
        kind = types.get(name) or ("string" if texts else _column_type(column))
        if kind not in FEATURE_TYPES:
            raise ValueError(f"feature {name!r}: type {kind!r} is not one of {', '.join(FEATURE_TYPES)}")
        if kind == "int" and name in encoded and not encoded[name][1] and encoded[name][0] and all(
                isinstance(c, (int, float)) and not isinstance(c, bool) and float(c).is_integer()
                for c in encoded[name][0]):
            # An encoder that refuses unknown values (OneHotEncoder's default) would fail the whole request on
            # one: the service refuses such a value by name instead.
            features.append(Feature(name, kind, tuple(sorted({int(c) for c in encoded[name][0]}))))
            continue
        if kind != "string":
            features.append(Feature(name, kind))
            continue
        seen = sorted({str(v) for v in column.tolist()})
        categories, scored = encoded.get(name, (seen, False))
        known = [str(c) for c in categories]
        # An encoder's categories are what the model knows; without one, the sample's are all that is known.
        features.append(Feature(name, "string", tuple(known), scored if name in encoded else False))
    return features


def _feature_names(estimator: Any, sample: Any, given: list[str] | None) -> list[str]:
    fitted = getattr(estimator, "feature_names_in_", None)
    if fitted is not None:
        fitted = [str(n) for n in fitted]
        if given is not None and list(given) != fitted:
            raise ValueError(f"the feature names given {list(given)} differ from the fitted ones {fitted}")
        return fitted
    if given is not None:
        return list(given)
    columns = getattr(sample, "columns", None)
    if columns is not None and all(isinstance(c, str) for c in columns):
        n_in = getattr(estimator, "n_features_in_", None)
        if n_in is None or n_in == len(columns):
            return list(columns)
    raise ValueError(
        "the model was fitted without feature names (no feature_names_in_); give them in training order "
        "(feature_names=[...], or --features a,b,c on the command line)"
    )


def _initial_types(X: np.ndarray, dtype: type, features: list[Feature] | None) -> list[tuple[str, Any]]:
    """skl2onnx inputs: one [n, k] tensor of numbers, or one [n, 1] tensor per feature when some are strings."""
    from skl2onnx.common.data_types import (
        BooleanTensorType,
        DoubleTensorType,
        FloatTensorType,
        Int64TensorType,
        StringTensorType,
    )

    number = FloatTensorType if dtype is np.float32 else DoubleTensorType
    if features is None:
        return [("input", number([None, X.shape[1]]))]
    kinds = {"float": number, "int": Int64TensorType, "bool": BooleanTensorType, "string": StringTensorType}
    return [(f.name, kinds[f.type]([None, 1])) for f in features]


def _onnx_candidate(
    estimator: Any,
    task: str,
    X: np.ndarray,
    dtype: type,
    tolerance: float,
    fitted_input: Any = None,
    features: list[Feature] | None = None,
) -> tuple[bytes | None, dict[str, Any]]:
    """Convert with skl2onnx at one precision and measure it against scikit-learn on X.

    With ``features`` (a model with string features) each feature is an input of its own, fed from
    ``fitted_input``, the DataFrame or object array scikit-learn scores."""
    from skl2onnx import to_onnx

    precision = "float32" if dtype is np.float32 else "float64"
    options = {id(estimator): {"zipmap": False}} if task == "classifier" else None
    record: dict[str, Any] = {"precision": precision}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = to_onnx(estimator, initial_types=_initial_types(X, dtype, features), options=options)
        data = model.SerializeToString()
        engine = OnnxEngine(data, task)
        record["output"] = engine.output_names[0]
        got = engine.run(X if features is None else fitted_input)
    except Exception as exc:  # unsupported estimators raise many kinds of errors
        record["reason"] = f"skl2onnx cannot convert it: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        return None, record
    # scikit-learn scores what it serves on (a DataFrame for a model fitted on one), ONNX the plain matrix.
    expected = SklearnEngine(estimator, task).run(X if fitted_input is None else fitted_input)
    if got.shape != expected.shape:
        record["reason"] = f"ONNX output shape {got.shape} differs from scikit-learn's {expected.shape}"
        return None, record
    diff = np.abs(got - expected)
    record["max_abs_diff"] = float(diff.max())
    if task == "classifier":
        flipped = int(np.sum(np.argmax(got, axis=1) != np.argmax(expected, axis=1)))
        if flipped:
            record["reason"] = f"at {precision} {flipped} of {len(X)} sample rows get another label"
            return None, record
        if record["max_abs_diff"] > tolerance:
            record["reason"] = (
                f"at {precision} probabilities differ by up to {record['max_abs_diff']:.3g} (limit {tolerance})"
            )
            return None, record
    else:
        scaled = float((diff / np.maximum(1.0, np.abs(expected))).max())
        record["max_scaled_diff"] = scaled
        if scaled > tolerance:
            record["reason"] = f"at {precision} values differ by up to {scaled:.3g} relative (limit {tolerance})"
            return None, record
    return data, record


def _convert_onnx(
    estimator: Any,
    task: str,
    X: np.ndarray,
    tolerance: float = ONNX_TOLERANCE,
    fitted_input: Any = None,
    features: list[Feature] | None = None,
) -> tuple[bytes | None, dict[str, Any]]:
    """model.onnx bytes if a conversion passes the equivalence gate, and what the manifest records.

    float32 first (fastest, and exact for trees, which compare in float32 in
    scikit-learn too); float64 when float32 converts but misses the gate.
    """
    attempts = []
    for dtype in (np.float32, np.float64):
        data, record = _onnx_candidate(estimator, task, X, dtype, tolerance, fitted_input, features)
        if data is not None:
            return data, {
                "kept": True,
                "reason": None,
                "max_abs_diff": record["max_abs_diff"],
                "precision": record["precision"],
                "output": record["output"],
                "tolerance": tolerance,
                "checked_rows": len(X),
            }
        attempts.append(record)
        if "max_abs_diff" not in record:
            break  # skl2onnx cannot convert it at all: another precision will not help
    diffs = [a["max_abs_diff"] for a in attempts if "max_abs_diff" in a]
    return None, {
        "kept": False,
        "reason": "; ".join(a["reason"] for a in attempts),
        "max_abs_diff": min(diffs) if diffs else None,
        "tolerance": tolerance,
        "checked_rows": len(X),
    }


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (Linux renameat2); False where unsupported."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd = -100
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def build_package(
    estimator: Any,
    *,
    name: str,
    version: str,
    models_dir: Path,
    sample: Any,
    feature_names: list[str] | None = None,
    feature_types: list[str] | dict[str, str] | None = None,
    metrics: dict | None = None,
    onnx: bool = True,
    overwrite: bool = False,
    onnx_tolerance: float = ONNX_TOLERANCE,
) -> Path:
    """Write <models_dir>/<name>/<version>/ atomically; returns its path. Raises ValueError on bad input.

    Feature types are inferred from the sample (and the model's encoders for categories); ``feature_types``
    overrides them, as a list in feature order or a {name: type} mapping of some.
    """
    import joblib

    for label, value in (("name", name), ("version", version)):
        if not _NAME.match(str(value)):
            raise ValueError(
                f"model {label} {value!r} must start with a letter or digit and hold only letters, digits, . _ -"
            )
    models_dir = Path(models_dir)
    final = models_dir / name / version
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists; choose another version or overwrite it explicitly (--force)")

    task = _estimator_task(estimator)
    if task is None or not hasattr(estimator, "predict"):
        raise ValueError(
            f"a {type(estimator).__name__} is neither a classifier with predict_proba nor a regressor; "
            "package a fitted scikit-learn estimator or pipeline"
        )
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted

    try:
        check_is_fitted(estimator)
    except NotFittedError:
        raise ValueError(f"the {type(estimator).__name__} is not fitted; fit it before packaging") from None

    names = _feature_names(estimator, sample, feature_names)
    if len(set(names)) != len(names):
        raise ValueError(f"feature names are not unique: {names}")
    n_in = getattr(estimator, "n_features_in_", None)
    if n_in is not None and n_in != len(names):
        raise ValueError(f"the model takes {n_in} features but {len(names)} names were given: {names}")
    columns = _sample_columns(sample, names)
    if len(columns[0]) == 0:
        raise ValueError("the sample has no rows")
    if isinstance(feature_types, dict):
        unknown = sorted(set(feature_types) - set(names))
        if unknown:
            raise ValueError(f"feature types given for {unknown}, which are not features of the model {names}")
        types = dict(feature_types)
    elif feature_types is not None:
        if len(feature_types) != len(names):
            raise ValueError(f"give one feature type per feature, in order; got {list(feature_types)} for {names}")
        types = dict(zip(names, feature_types, strict=True))
    else:
        types = {}
    bad = {n: t for n, t in types.items() if t not in FEATURE_TYPES}
    if bad:
        raise ValueError(f"feature types must be one of {', '.join(FEATURE_TYPES)}; got {bad}")
    features = _typed_features(estimator, names, columns, types)
    frame = getattr(estimator, "feature_names_in_", None) is not None and hasattr(sample, "columns")
    schema = InputSchema([_spec(f) for f in features], frame=frame)
    try:
        batch = schema.columns(
            [_as_type(c, f.type, f.name) for c, f in zip(columns, features, strict=True)], math.inf
        )
    except ValidationFailure as exc:
        d = exc.details[0]
        raise ValueError(
            f"the sample does not fit its feature types: row {d['loc'][0] if d['loc'] else '?'}, "
            f"feature {d['loc'][1] if len(d['loc']) > 1 else '?'}: {d['msg']}"
        ) from None
    if schema.numeric and not np.isfinite(batch.codes).all():
        raise ValueError("the sample holds NaN or infinite values; give a clean reference sample")
    X = batch.X

    # Serving scores the input the schema builds and derives labels from probabilities: check both hold.
    try:
        served = SklearnEngine(estimator, task).run(X)
    except Exception as exc:
        shape = "a DataFrame of the training columns" if frame else "a plain array"
        raise ValueError(
            f"the model cannot score the sample as {shape} ({type(exc).__name__}: {exc}); "
            "fit it on a DataFrame (columns by name) or an array in feature order"
        ) from None
    classes = None
    if task == "classifier":
        classes = [_plain(c) for c in estimator.classes_]
        if served.ndim != 2 or served.shape[1] != len(classes):
            raise ValueError("multi-output classifiers are not supported")
        from_proba = np.asarray(estimator.classes_)[np.argmax(served, axis=1)]
        disagree = int(np.sum(from_proba != np.asarray(estimator.predict(X))))
        if disagree:
            raise ValueError(
                f"on {disagree} sample rows predict() disagrees with the most probable class of predict_proba(); "
                "the service derives labels from probabilities, so package a model whose predict is the argmax "
                "(e.g. calibrate it with CalibratedClassifierCV)"
            )
    elif served.shape != (len(batch),):
        raise ValueError("multi-output regressors are not supported")

    onnx_record: dict[str, Any]
    onnx_bytes, onnx_record = (None, {"kept": False, "reason": "disabled when packaging", "max_abs_diff": None})
    if onnx:
        # String features: one ONNX input per feature (string tensors for the encoders), through the same gate.
        per_feature = None if schema.numeric else features
        onnx_bytes, onnx_record = _convert_onnx(estimator, task, batch.values, onnx_tolerance, batch.X, per_feature)
        if per_feature is not None and not onnx_record["kept"]:
            strings = [f.name for f in features if f.type == "string"]
            onnx_record["reason"] = f"with string features {strings}: {onnx_record['reason']}"

    reference = reference_statistics(batch.codes, features)
    smoke_row = schema.smoke_batch(reference).X
    smoke = {"features": dict(zip(names, reference_row(features, reference), strict=True)),
             **smoke_answer(task, classes, SklearnEngine(estimator, task).run(smoke_row)[0], onnx_tolerance)}
    if onnx_bytes is not None:
        kept = OnnxEngine(onnx_bytes, task, output=onnx_record.get("output")).run(smoke_row)[0]
        differs = smoke_differs(smoke, smoke_answer(task, classes, kept, onnx_tolerance))
        if differs:  # the equivalence gate covers the sample; the gates score this row too
            onnx_bytes = None
            onnx_record = {**onnx_record, "kept": False, "reason": f"on the smoke row ONNX answers {differs}"}

    buffer = io.BytesIO()
    joblib.dump(estimator, buffer, compress=0)  # uncompressed: loads fastest
    files = {MODEL_JOBLIB: buffer.getvalue()}
    if onnx_bytes is not None:
        files[MODEL_ONNX] = onnx_bytes
    manifest = Manifest(
        name=name,
        version=str(version),
        created=datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        task=task,  # type: ignore[arg-type]
        features=features,
        classes=classes,
        versions=runtime_versions(),
        files={filename: _sha256(data) for filename, data in files.items()},
        metrics=dict(metrics or {}),
        reference=reference,
        onnx=onnx_record,
        input="frame" if frame else "array",
        smoke=smoke,
    )

    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=parent))
    try:
        for filename, data in files.items():
            _write(staging / filename, data)
        _write(staging / MANIFEST, (json.dumps(manifest.to_dict(), indent=2) + "\n").encode())
        os.chmod(staging, 0o755)
        if not final.exists():
            os.rename(staging, final)
        elif not overwrite:
            raise FileExistsError(f"{final} appeared while building; choose another version or use --force")
        elif _exchange(staging, final):
            shutil.rmtree(staging)  # now holds the old package
        else:
            retired = Path(tempfile.mkdtemp(prefix=f".{version}.old.", dir=parent))
            os.rename(final, retired / "package")
            os.rename(staging, final)
            shutil.rmtree(retired)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """``python -m app.packaging verify DIR``: ``mlapi verify`` under the module path hosts run it by.

    A release on a host is a folder, not an installed package, so it has no ``mlapi`` command.
    """
    from app.cli import add_command, verify

    parser = argparse.ArgumentParser(prog="python -m app.packaging", description=__doc__.split("\n\n")[0])
    add_command(parser.add_subparsers(dest="command", metavar="COMMAND", required=True), verify)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
