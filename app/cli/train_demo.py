"""``mlapi train-demo``: train the demo models on datasets scikit-learn ships (or generates) and package them."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from app.packages.build import build_package

IRIS_FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
RANDOM_STATE = 42

COMMAND = "train-demo"
SUMMARY = "train and package the demo models (iris, iris-logreg, diabetes, churn)"
DESCRIPTION = """\
Train the demo models on datasets scikit-learn ships and package them:

  iris         RandomForestClassifier (100 trees) predicting species names
  iris-logreg  StandardScaler + LogisticRegression on the same data
  diabetes     GradientBoostingRegressor on the diabetes progression data
  churn        ColumnTransformer (OneHotEncoder on the string columns plan and
               region, StandardScaler on the numbers) + LogisticRegression,
               fitted on a DataFrame of customers generated with a fixed seed:
               an unknown plan is refused, an unknown region is scored

Each model is fitted on a training split; its metrics on the training and the
held-out validation split go into the manifest, and the validation split is the
drift reference. An existing version is left as it is unless --force is given.
`make models` runs this into models/."""

EPILOG = """\
example:
  mlapi train-demo --models-dir models
  mlapi train-demo --models-dir /tmp/new-models --version 2 --only iris"""


def _iris() -> tuple[np.ndarray, np.ndarray, list[str]]:
    from sklearn.datasets import load_iris

    data = load_iris()
    # String labels, so the service answers "setosa" rather than 0.
    return data.data, np.asarray(data.target_names)[data.target], IRIS_FEATURES


def _diabetes() -> tuple[np.ndarray, np.ndarray, list[str]]:
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    return data.data, data.target, list(data.feature_names)


CHURN_ROWS = 2000
CHURN_PLANS = ["basic", "pro", "team"]
CHURN_REGIONS = ["apac", "eu", "us"]


def churn_data(rows: int = CHURN_ROWS, seed: int = RANDOM_STATE) -> tuple[Any, np.ndarray, list[str]]:
    """Customers with string, int, float and bool columns and whether they churned; the same for a seed."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    plan = rng.choice(CHURN_PLANS, size=rows, p=[0.5, 0.3, 0.2])
    region = rng.choice(CHURN_REGIONS, size=rows, p=[0.2, 0.45, 0.35])
    seats = rng.integers(1, 60, size=rows)
    usage = np.round(rng.gamma(2.0, 12.0, size=rows), 2)
    annual = rng.random(rows) < 0.4
    logit = (0.8 + 1.1 * (plan == "basic") - 0.9 * (plan == "team") + 0.4 * (region == "apac")
             - 0.03 * seats - 0.04 * usage - 1.2 * annual)
    churned = rng.random(rows) < 1 / (1 + np.exp(-logit))
    frame = pd.DataFrame({"plan": plan.astype(object), "region": region.astype(object), "seats": seats,
                          "monthly_usage": usage, "annual": annual})
    return frame, np.where(churned, "churns", "stays"), list(frame.columns)


def _churn_pipeline() -> Any:
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    columns = ColumnTransformer([
        ("plan", OneHotEncoder(handle_unknown="error"), ["plan"]),
        ("region", OneHotEncoder(handle_unknown="ignore"), ["region"]),
        ("numbers", StandardScaler(), ["seats", "monthly_usage"]),
        ("flags", "passthrough", ["annual"]),
    ])
    return Pipeline([("columns", columns), ("classify", LogisticRegression(max_iter=1000))])


def _classifier_metrics(model: Any, X: np.ndarray, y: np.ndarray, split: str) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    predicted = model.predict(X)
    return {
        f"{split}_accuracy": round(float(accuracy_score(y, predicted)), 4),
        f"{split}_f1_macro": round(float(f1_score(y, predicted, average="macro")), 4),
    }


def _regressor_metrics(model: Any, X: np.ndarray, y: np.ndarray, split: str) -> dict[str, float]:
    from sklearn.metrics import mean_absolute_error, r2_score

    predicted = model.predict(X)
    return {
        f"{split}_r2": round(float(r2_score(y, predicted)), 4),
        f"{split}_mae": round(float(mean_absolute_error(y, predicted)), 4),
    }


def _random_forest() -> Any:
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(n_estimators=100, random_state=RANDOM_STATE)


def _logistic_regression() -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    return Pipeline([("scale", StandardScaler()), ("classify", LogisticRegression(max_iter=1000))])


def _gradient_boosting() -> Any:
    from sklearn.ensemble import GradientBoostingRegressor

    return GradientBoostingRegressor(n_estimators=100, max_depth=3, learning_rate=0.05, random_state=RANDOM_STATE)


# name: (data, estimator factory, metrics, stratify the split)
DEMO_MODELS: dict[str, tuple[Callable, Callable, Callable, bool]] = {
    "iris": (_iris, _random_forest, _classifier_metrics, True),
    "iris-logreg": (_iris, _logistic_regression, _classifier_metrics, True),
    "diabetes": (_diabetes, _gradient_boosting, _regressor_metrics, False),
    "churn": (churn_data, _churn_pipeline, _classifier_metrics, True),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models-dir", type=Path, required=True, metavar="DIR", help="folder of model packages")
    parser.add_argument("--version", default="1", help="version to write (default: 1)")
    parser.add_argument("--only", nargs="+", choices=sorted(DEMO_MODELS), metavar="NAME",
                        help=f"train only these, one or more of {', '.join(sorted(DEMO_MODELS))} (default: all)")
    parser.add_argument("--force", action="store_true", help="rebuild a version that exists")


def train_and_package(name: str, models_dir: Path, version: str, force: bool) -> Path | None:
    """Package one demo model; None when that version exists and force is off."""
    from sklearn.model_selection import train_test_split

    target = models_dir / name / version
    if target.exists() and not force:
        print(f"{name} {version}: {target} exists, left as it is (--force rebuilds it)")
        return None
    load, make_estimator, evaluate, stratify = DEMO_MODELS[name]
    X, y, features = load()
    X_train, X_valid, y_train, y_valid = train_test_split(
        X, y, test_size=0.3, random_state=RANDOM_STATE, stratify=y if stratify else None
    )
    model = make_estimator().fit(X_train, y_train)
    metrics = {**evaluate(model, X_train, y_train, "train"), **evaluate(model, X_valid, y_valid, "validation")}
    metrics.update(train_rows=len(X_train), validation_rows=len(X_valid))
    path = build_package(
        model,
        name=name,
        version=version,
        models_dir=models_dir,
        sample=X_valid,
        feature_names=features,
        metrics=metrics,
        overwrite=force,
    )
    onnx = json.loads((path / "manifest.json").read_text())["onnx"]
    engine = (
        f"ONNX kept ({onnx['precision']}, max diff {onnx['max_abs_diff']:.2g})"
        if onnx["kept"]
        else f"ONNX not kept: {onnx['reason']}"
    )
    shown = ", ".join(f"{k}={v}" for k, v in metrics.items() if k.startswith("validation_"))
    print(f"{name} {version}: {path} ({shown}; {engine})")
    return path


def run(args: argparse.Namespace) -> int:
    for name in args.only or DEMO_MODELS:
        try:
            train_and_package(name, args.models_dir, args.version, args.force)
        except (ValueError, FileExistsError, OSError) as exc:
            print(f"mlapi train-demo: {name}: {exc}", file=sys.stderr)
            return 1
    return 0
