"""The load gate: finding packages, and loading one only when every check passes.

Loading a pickle runs code from it. ``load_package`` therefore checks every
file's sha256 against the manifest before anything is unpickled, and refuses a
package built with another scikit-learn or numpy than the one running; then it
scores the recorded smoke row with the engine it will serve.

``mlapi verify DIR`` (``python -m app.cli verify DIR`` on a host) runs the same
gate plus one smoke score; deployment runs it before switching a package in.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.packages.engines import Engine, OnnxEngine, SklearnEngine
from app.packages.manifest import MANIFEST, MODEL_JOBLIB, MODEL_ONNX, Check, Manifest, PackageError, as_refusal
from app.packages.validation import InputSchema, reference_row


@dataclass
class ModelVersion:
    """One loaded version of a model package: its manifest, the engine that runs it and its input schema. The
    versions served under one name, and how requests are split between them, are a ServedModel
    (app/serving/registry.py)."""

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

    def infer(self, X: Any) -> tuple[np.ndarray, np.ndarray | None]:
        """One call into the engine for the batch: (labels, probabilities) or (values, None).

        X is a Batch's estimator input, built by ``self.inputs`` (app/packages/validation.py).
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


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _natural_key(text: str) -> list[tuple[int, int | str]]:
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", text) if part]


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
        actual = sha256_hex(data)
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


def estimator_task(estimator: Any) -> str | None:
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
    task = estimator_task(estimator)
    if task != manifest.task:
        found = task or "neither a classifier with predict_proba nor a regressor"
        raise PackageError(path, "estimator", f"the manifest says {manifest.task} but the estimator is {found}", remedy)
    if task == "classifier":
        classes = [plain(c) for c in estimator.classes_]
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


def load_package(path: Path, *, engine: str = "auto", onnx_threads: int = 1) -> ModelVersion:
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
) -> ModelVersion:
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
        return ModelVersion(manifest, path, sklearn_engine)
    return ModelVersion(manifest, path, onnx_engine)


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
        return {"prediction": plain(classes[int(np.argmax(output))]),
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


def plain(value: Any) -> Any:
    """numpy scalars to the Python value JSON can hold."""
    return value.item() if isinstance(value, np.generic) else value


