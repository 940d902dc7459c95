"""``mlapi package``: turn a fitted scikit-learn model saved with joblib into a model package.

Building runs on the controller: the ONNX conversion (skl2onnx) is imported by
app.packaging only when a package is built, never by the service.
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

from app.packaging import FEATURE_TYPES, build_package

COMMAND = "package"
SUMMARY = "turn a fitted scikit-learn model (joblib) into a verified model package"
DESCRIPTION = """\
Turn a fitted scikit-learn model saved with joblib into a model package:
<models dir>/<name>/<version>/ with model.joblib, manifest.json and, when it
passes the equivalence gate on the sample, model.onnx.

The sample CSV (with a header row naming the features) is the drift reference
and the data the ONNX equivalence gate runs on: pass held-out data the model
has not been fitted on, a few hundred rows or more. Feature names come from the
model (fitted on a DataFrame) or from --features, in training order. The
command prints a JSON summary of the package on stdout."""

EPILOG = """\
example:
  mlapi package churn.joblib --name churn --version 3 --models-dir models \\
      --sample validation.csv --metrics metrics.json

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
                        help="float or int per feature, comma-separated (default: int for columns of whole numbers "
                        "in the sample, else float)")
    parser.add_argument("--metrics", type=Path, metavar="JSON",
                        help="JSON file of training/validation metrics to record in the manifest")
    parser.add_argument("--no-onnx", action="store_true", help="do not convert to ONNX; the service uses scikit-learn")
    parser.add_argument("--force", action="store_true", help="replace the version if it exists")


def read_sample(path: Path, features: list[str]) -> tuple[np.ndarray, list[str]]:
    """The named columns of a CSV file as float64, and each column's type (int when every value is one)."""
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
            rows, types = [], {name: "int" for name in features}
            for line, record in enumerate(reader, start=2):
                if not record:
                    continue
                values = []
                for name, j in index.items():
                    cell = record[j] if j < len(record) else ""
                    try:
                        value = float(cell)
                    except ValueError:
                        raise UsageError(f"{path} line {line}, column {name!r}: {cell!r} is not a number") from None
                    if not math.isfinite(value):
                        raise UsageError(f"{path} line {line}, column {name!r}: {cell!r} is not a finite number")
                    if not _INTEGER.match(cell):
                        types[name] = "float"
                    values.append(value)
                rows.append(values)
    except FileNotFoundError:
        raise UsageError(f"sample file {path} does not exist") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not a text CSV file") from None
    if not rows:
        raise UsageError(f"{path} has a header but no data rows")
    return np.asarray(rows, dtype=np.float64), [types[name] for name in features]


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
        raise UsageError(f"--feature-types takes {' or '.join(FEATURE_TYPES)} per feature, got {given_types}")
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
    sample, inferred_types = read_sample(args.sample, features)
    return build_package(
        model,
        name=args.name,
        version=args.version,
        models_dir=args.models_dir,
        sample=sample,
        feature_names=features,
        feature_types=given_types or inferred_types,
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
