"""``mlapi verify DIR``: the compatibility gate and one smoke score on a package folder.

Hosts run the same gate as ``python -m app.cli verify DIR`` from the
release folder, where the ``mlapi`` command is not installed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from app.cli.arguments import positive_int
from app.packages.gate import load_package
from app.packages.manifest import PackageError

COMMAND = "verify"
SUMMARY = "run the compatibility gate and one smoke score on a package folder"
DESCRIPTION = """\
Run the service's compatibility gate on a package folder, as the service does
before it serves a package: the sha256 of every file against the manifest
(before anything is unpickled), the scikit-learn and numpy versions it was
built with, the estimator, its features and classes, and model.onnx when the
package kept it; then one smoke score on the reference means.

Prints a JSON summary on stdout and exits 0 when the package passes; names the
failed check and what to do on stderr and exits 1 when it does not."""

EPILOG = """\
example:
  mlapi verify models/iris/1
  mlapi verify models/iris/1 --engine sklearn

On a host, where the release is not pip-installed: python -m app.cli verify DIR"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path, metavar="DIR", help="package folder <models dir>/<name>/<version>")
    parser.add_argument("--engine", choices=("auto", "onnx", "sklearn"), default="auto",
                        help="engine to load and smoke-score: auto (model.onnx when kept, as the service), onnx "
                        "(fails when the package kept none) or sklearn (default: auto)")
    parser.add_argument("--onnx-threads", type=positive_int, default=1, metavar="N",
                        help="ONNX Runtime intra-op threads, as MLAPI_ONNX_THREADS (default: 1)")


def verify(path: Path, engine: str = "auto", onnx_threads: int = 1) -> dict[str, Any]:
    """The summary of a package that passed the gate and scored one row; raises PackageError otherwise."""
    model = load_package(path, engine=engine, onnx_threads=onnx_threads)
    labels, _ = model.infer(model.inputs.smoke_batch(model.manifest.reference).X)
    return {
        "ok": True,
        "package": str(path),
        "name": model.name,
        "version": model.version,
        "task": model.task,
        "engine": model.engine.name,
        "features": model.feature_names,
        "onnx_kept": bool(model.manifest.onnx.get("kept")),
        "smoke_prediction": labels.tolist()[0],  # tolist: numpy scalars as the Python values JSON holds
    }


def run(args: argparse.Namespace) -> int:
    try:
        summary = verify(args.path, args.engine, args.onnx_threads)
    except PackageError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(json.dumps(summary, default=str))
    return 0
