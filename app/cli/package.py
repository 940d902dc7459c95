"""``mlapi package``: turn a fitted scikit-learn model saved with joblib into a model package.

Building runs on the controller: the ONNX conversion (skl2onnx) is imported by
app/packages/build.py only when a package is built; the service never imports that module.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from app.packages.build import build_package, encoder_categories
from app.packages.manifest import FEATURE_TYPES

COMMAND = "package"
SUMMARY = "turn a fitted scikit-learn model (joblib) into a verified model package"
DESCRIPTION = """\
Turn a fitted scikit-learn model saved with joblib into a model package:
<models dir>/<name>/<version>/ with model.joblib, manifest.json and, when it
passes the equivalence gate on the sample, model.onnx.

The sample CSV (with a header row naming the features) is the drift reference
and the data the ONNX equivalence gate runs on: pass held-out data the model
has not been fitted on, a few hundred rows or more. Feature names come from the
model (fitted on a DataFrame) or from --features, in training order.

Each feature gets a type: float, int, bool or string (a category). It is read
from the model's encoders (a column an OneHotEncoder or OrdinalEncoder encodes
as text is a string, with the encoder's categories and its handle_unknown) and
from the sample (int for whole numbers, bool for true/false, string for
anything else that is not a number); --feature-type NAME=TYPE overrides one.
A model fitted on a DataFrame is scored on a DataFrame of the training columns
and dtypes. The command prints a JSON summary of the package on stdout."""

EPILOG = """\
example:
  mlapi package churn.joblib --name churn --version 3 --models-dir models \\
      --sample validation.csv --metrics metrics.json
  mlapi package churn.joblib --name churn --version 4 --models-dir models \\
      --sample validation.csv --feature-type zip_code=string --feature-type seats=int

Loading a joblib file runs code stored in it: package only models you trust."""

_INTEGER = re.compile(r"^\s*[-+]?\d+\s*$")


class UsageError(Exception):
    """Bad input to this command; the message says what to fix."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, metavar="MODEL.joblib",
                        help="fitted estimator or pipeline saved with joblib")
    parser.add_argument("--name", required=True, help="model name (letters, digits, . _ -), e.g. churn")
    parser.add_argument("--version", required=True, help="version (letters, digits, . _ -), e.g. 3")
    parser.add_argument("--models-dir", type=Path, required=True, metavar="DIR", help="folder of model packages")
    parser.add_argument("--sample", type=Path, required=True, metavar="CSV",
                        help="CSV with a header row: the drift reference and the ONNX check data")
    parser.add_argument("--features", metavar="A,B,C",
                        help="feature names in training order, comma-separated (default: the model's own)")
    parser.add_argument("--feature-types", metavar="float,int,...",
                        help=f"one type per feature in order, comma-separated, each one of {', '.join(FEATURE_TYPES)} "
                        "(default: inferred from the model and the sample)")
    parser.add_argument("--feature-type", action="append", default=[], metavar="NAME=TYPE",
                        help=f"the type of one feature, one of {', '.join(FEATURE_TYPES)}; repeat for more "
                        "(e.g. --feature-type zip_code=string)")
    parser.add_argument("--metrics", type=Path, metavar="JSON",
                        help="JSON file of training/validation metrics to record in the manifest")
    parser.add_argument("--no-onnx", action="store_true", help="do not convert to ONNX; the service uses scikit-learn")
    parser.add_argument("--force", action="store_true", help="replace the version if it exists")


_BOOLEAN_CELLS = {"true": True, "false": False}


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _cell_type(cells: list[str]) -> str:
    """int, float, bool or string, from every cell of a column. A column of numbers with a few other cells
    is numbers with bad cells (named when read as numbers), not text: --feature-type NAME=string says otherwise."""
    if all(_INTEGER.match(c) for c in cells):
        return "int"
    numbers = sum(map(_is_number, cells))
    if numbers:
        return "float"
    if all(c.strip().lower() in _BOOLEAN_CELLS for c in cells):
        return "bool"
    return "string"


def _typed_column(path: Path, name: str, cells: list[str], kind: str) -> np.ndarray:
    if kind == "string":
        return np.asarray(cells, dtype=object)
    if kind == "bool":
        bad = next((c for c in cells if c.strip().lower() not in (*_BOOLEAN_CELLS, "1", "0")), None)
        if bad is not None:
            raise UsageError(f"{path}, column {name!r}: {bad!r} is not true or false (the feature is a bool)")
        return np.asarray([c.strip().lower() in ("true", "1") for c in cells], dtype=np.bool_)
    values = []
    for line, cell in enumerate(cells, start=2):
        try:
            value = float(cell)
        except ValueError:
            raise UsageError(f"{path} line {line}, column {name!r}: {cell!r} is not a number") from None
        if not math.isfinite(value):
            raise UsageError(f"{path} line {line}, column {name!r}: {cell!r} is not a finite number")
        if kind == "int" and value != int(value):
            raise UsageError(
                f"{path} line {line}, column {name!r}: {cell!r} is not a whole number (the feature is an int)"
            )
        values.append(value)
    return np.asarray(values, dtype=np.int64 if kind == "int" else np.float64)


def read_sample(
    path: Path, features: list[str], types: dict[str, str] | None = None, frame: bool = False
) -> tuple[Any, dict[str, str]]:
    """The named columns of a CSV file, typed, and the type of each (given, or inferred from the cells).

    A DataFrame when the model was fitted on one (frame), else an array: float64 when every feature is a
    number, objects otherwise."""
    types = dict(types or {})
    try:
        with open(path, newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if not header:
                raise UsageError(f"{path} is empty; it needs a header row naming the features")
            header = [h.strip() for h in header]
            index = {}
            for name in features:
                if name not in header:
                    close = difflib.get_close_matches(name, header, n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    raise UsageError(f"{path} has no column {name!r}{hint}; its columns are {header}")
                index[name] = header.index(name)
            cells: dict[str, list[str]] = {name: [] for name in features}
            for record in reader:
                if not record:
                    continue
                for name, j in index.items():
                    cells[name].append(record[j] if j < len(record) else "")
    except FileNotFoundError:
        raise UsageError(f"sample file {path} does not exist") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not a text CSV file") from None
    if not cells[features[0]]:
        raise UsageError(f"{path} has a header but no data rows")
    kinds = {name: types.get(name) or _cell_type(cells[name]) for name in features}
    columns = {name: _typed_column(path, name, cells[name], kinds[name]) for name in features}
    if frame:
        import pandas as pd

        return pd.DataFrame(columns), kinds
    if all(kinds[name] != "string" for name in features):
        return np.column_stack([columns[name].astype(np.float64) for name in features]), kinds
    table = np.empty((len(cells[features[0]]), len(features)), dtype=object)
    for j, name in enumerate(features):
        table[:, j] = columns[name]
    return table, kinds


def _named_types(pairs: list[str], features: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, kind = pair.rpartition("=")
        if not sep or not name:
            raise UsageError(f"--feature-type takes NAME=TYPE (e.g. plan=string), got {pair!r}")
        if kind not in FEATURE_TYPES:
            raise UsageError(f"--feature-type {pair}: the type must be one of {', '.join(FEATURE_TYPES)}")
        if name not in features:
            close = difflib.get_close_matches(name, features, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UsageError(
                f"--feature-type {pair}: {name!r} is not a feature of the model{hint}; its features are {features}"
            )
        out[name] = kind
    return out


def _load_model(path: Path) -> Any:
    import joblib

    if not path.is_file():
        raise UsageError(f"model file {path} does not exist")
    try:
        return joblib.load(path)
    except Exception as exc:  # a broken pickle raises nearly anything
        raise UsageError(f"{path} cannot be loaded with joblib ({type(exc).__name__}: {exc})") from None


def _csv_list(text: str | None) -> list[str] | None:
    return [part.strip() for part in text.split(",") if part.strip()] if text else None


def package(args: argparse.Namespace) -> Path:
    given_features = _csv_list(args.features)
    given_types = _csv_list(args.feature_types)
    if given_types is not None and any(t not in FEATURE_TYPES for t in given_types):
        raise UsageError(f"--feature-types takes {', '.join(FEATURE_TYPES)} per feature, got {given_types}")
    metrics = None
    if args.metrics:
        try:
            metrics = json.loads(Path(args.metrics).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UsageError(f"--metrics {args.metrics}: {exc}") from None
        if not isinstance(metrics, dict):
            raise UsageError(f"--metrics {args.metrics} must hold a JSON object")

    model = _load_model(args.model)
    fitted = getattr(model, "feature_names_in_", None)
    features = given_features or ([str(n) for n in fitted] if fitted is not None else None)
    if features is None:
        raise UsageError(
            "the model was fitted without feature names; give them in training order with --features a,b,c"
        )
    if given_types is not None and len(given_types) != len(features):
        raise UsageError(f"--feature-types gives {len(given_types)} types for the {len(features)} features {features}")
    types = dict(zip(features, given_types, strict=True)) if given_types else {}
    types.update(_named_types(args.feature_type, features))
    # Columns the model's encoders take as text are strings unless the command line says otherwise.
    for name, (categories, _) in encoder_categories(model, features).items():
        if name not in types and categories and all(isinstance(c, str) for c in categories):
            types[name] = "string"
    sample, inferred_types = read_sample(args.sample, features, types, frame=fitted is not None)
    return build_package(
        model,
        name=args.name,
        version=args.version,
        models_dir=args.models_dir,
        sample=sample,
        feature_names=features,
        feature_types=inferred_types,
        metrics=metrics,
        onnx=not args.no_onnx,
        overwrite=args.force,
    )


def run(args: argparse.Namespace) -> int:
    print(
        f"mlapi package: loading {args.model} (a joblib file runs code when loaded: use only trusted models)",
        file=sys.stderr,
    )
    try:
        path = package(args)
    except (UsageError, ValueError, FileExistsError) as exc:
        print(f"mlapi package: {exc}", file=sys.stderr)
        return 1
    manifest = json.loads((path / "manifest.json").read_text())
    onnx = manifest["onnx"]
    if onnx["kept"]:
        checked = f"max abs diff {onnx['max_abs_diff']:.3g} on {onnx['checked_rows']} rows"
        engine = f"model.onnx kept ({onnx['precision']}, {checked})"
    else:
        engine = f"model.onnx not kept: {onnx['reason']}; the service will use scikit-learn"
    print(
        json.dumps(
            {
                "package": str(path),
                "task": manifest["task"],
                "features": [f["name"] for f in manifest["features"]],
                "classes": manifest["classes"],
                "onnx": engine,
            }
        )
    )
    return 0
