"""Building packages: the estimator, its typed features, the ONNX export and its equivalence gate.

Run on the controller (``mlapi package``, ``mlapi train-demo``); the service never imports it
(tests/unit/test_layers.py). skl2onnx and onnx, which the export imports when it runs, are controller
requirements (requirements-dev.txt), so the ``mlapi`` command still starts on a host without them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import io
import json
import math
import os
import shutil
import tempfile
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from app.packages.engines import OnnxEngine, SklearnEngine
from app.packages.gate import estimator_task, plain, runtime_versions, sha256_hex, smoke_answer, smoke_differs
from app.packages.manifest import (
    FEATURE_TYPES,
    MANIFEST,
    MODEL_JOBLIB,
    MODEL_ONNX,
    NAME,
    ONNX_TOLERANCE,
    Feature,
    Manifest,
)
from app.packages.reference import reference_statistics
from app.packages.validation import FeatureSpec, InputSchema, ValidationFailure, reference_row


def _spec(feature: Feature) -> FeatureSpec:
    return FeatureSpec(feature.name, feature.type, feature.categories, feature.allow_unknown)


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
                found[column] = ([plain(c) for c in categories if c is not None and c == c], scored)

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
        if not NAME.match(str(value)):
            raise ValueError(
                f"model {label} {value!r} must start with a letter or digit and hold only letters, digits, . _ -"
            )
    models_dir = Path(models_dir)
    final = models_dir / name / version
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists; choose another version or overwrite it explicitly (--force)")

    task = estimator_task(estimator)
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
        classes = [plain(c) for c in estimator.classes_]
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
        files={filename: sha256_hex(data) for filename, data in files.items()},
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

