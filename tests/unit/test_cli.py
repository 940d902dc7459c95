"""The mlapi command: package, verify, score, train-demo (serve is an integration test: it runs gunicorn).

The main path of each runs the real command in a subprocess, exactly as a
person runs it (scripts.harness.servers.mlapi: the installed entry point when it is this
checkout's, else ``python -m app.cli``); the many ways to get the input wrong
call the same ``main`` in-process, which saves a few seconds of imports per case.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import joblib
import numpy as np
import pytest
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from app.cli import build_parser
from app.cli import main as cli_main
from app.packages.gate import load_package
from scripts.harness.servers import ROOT, mlapi, mlapi_command
from tests.model_packages import ODD_FEATURES, odd_names_package, rows_csv

IRIS_FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
COMMANDS = ["package", "verify", "score", "train-demo", "serve"]


def _main(capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str]:
    """Exit code and stderr of the command's main() called in-process."""
    code = cli_main([str(a) for a in args])
    return code, capsys.readouterr().err


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def iris_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    X = load_iris().data
    rows = [[f"id-{i}", *row] for i, row in enumerate(X)]
    return _write_csv(tmp_path_factory.mktemp("csv") / "iris.csv", ["id", *IRIS_FEATURES], rows)


# ---------------------------------------------------------------- the command and its help


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_the_command_lists_every_subcommand():
    result = mlapi("--help")
    assert result.returncode == 0, result.stderr
    assert sorted(_subcommands()) == sorted(COMMANDS)
    for command in COMMANDS:
        assert re.search(rf"^\s+{re.escape(command)}\b", result.stdout, re.MULTILINE), result.stdout


def test_the_command_without_a_subcommand_says_what_is_missing():
    result = mlapi()
    assert result.returncode == 2
    assert "required: COMMAND" in result.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_help_describes_the_command_every_option_and_an_example(command: str):
    result = mlapi(command, "--help")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert text.startswith(f"usage: mlapi {command}")
    assert f"example:\n  mlapi {command} " in text
    for action in _subcommands()[command]._actions:
        assert action.help and action.help != argparse.SUPPRESS, f"{action.dest} of {command} has no help"
        for name in action.option_strings or [action.metavar]:
            assert name in text, f"mlapi {command} --help does not show {name}"


# ---------------------------------------------------------------- verify


def test_verify_passes_a_demo_package_as_the_module_path_hosts_use(demo_models: Path):
    package = demo_models / "iris" / "1"
    result = mlapi("verify", package)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["ok"] is True and summary["engine"] == "onnx" and summary["features"] == IRIS_FEATURES
    on_host = subprocess.run([sys.executable, "-m", "app.cli", "verify", str(package)],
                             capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert on_host.returncode == 0 and json.loads(on_host.stdout) == summary


def test_verify_refuses_a_tampered_package_naming_the_check(models_copy: Path):
    package = models_copy / "iris" / "1"
    with open(package / "model.joblib", "ab") as fh:
        fh.write(b"\0")
    result = mlapi("verify", package)
    assert result.returncode == 1 and result.stdout == ""
    assert "failed the sha256 check" in result.stderr and "copy the package again or rebuild it" in result.stderr


@pytest.mark.parametrize(("args", "problem"), [
    (["--engine", "gpu"], "invalid choice: 'gpu'"),
    (["--onnx-threads", "0"], "0 is less than 1"),
])
def test_verify_refuses_a_bad_option_naming_it(demo_models: Path, capsys, args: list[str], problem: str):
    with pytest.raises(SystemExit) as exited:
        cli_main(["verify", str(demo_models / "iris" / "1"), *args])
    assert exited.value.code == 2 and problem in capsys.readouterr().err


# ---------------------------------------------------------------- train-demo


def test_train_demo_makes_every_demo_package(demo_models: Path):
    assert sorted(p.name for p in demo_models.iterdir()) == ["churn", "diabetes", "iris", "iris-logreg"]
    for name in ("iris", "iris-logreg", "diabetes", "churn"):
        load_package(demo_models / name / "1")


def test_train_demo_leaves_an_existing_version_as_it_is(models_copy: Path):
    before = (models_copy / "iris" / "1" / "manifest.json").read_bytes()
    result = mlapi("train-demo", "--models-dir", models_copy, "--only", "iris")
    assert result.returncode == 0, result.stderr
    assert "left as it is" in result.stdout
    assert (models_copy / "iris" / "1" / "manifest.json").read_bytes() == before


def test_train_demo_writes_a_new_version_of_one_model(models_copy: Path):
    result = mlapi("train-demo", "--models-dir", models_copy, "--only", "diabetes", "--version", "2")
    assert result.returncode == 0, result.stderr
    assert load_package(models_copy / "diabetes" / "2").version == "2"
    assert not (models_copy / "iris" / "2").exists()


# ---------------------------------------------------------------- package


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LogisticRegression fitted on a plain array: it knows no feature names."""
    data = load_iris()
    path = tmp_path_factory.mktemp("joblib") / "model.joblib"
    joblib.dump(LogisticRegression(max_iter=500).fit(data.data, data.target), path)
    return path


def test_package_builds_a_package_that_loads(tmp_path: Path, plain_model: Path, iris_csv: Path):
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"validation_accuracy": 0.97}))
    result = mlapi(
        "package", plain_model, "--name", "flowers", "--version", "3", "--models-dir", tmp_path / "models", "--sample",
        iris_csv, "--features", ",".join(IRIS_FEATURES), "--metrics", metrics
    )
    assert result.returncode == 0, result.stderr
    assert "trusted" in result.stderr
    summary = json.loads(result.stdout)
    assert summary["features"] == IRIS_FEATURES and summary["classes"] == [0, 1, 2]
    assert "model.onnx kept" in summary["onnx"]
    model = load_package(tmp_path / "models" / "flowers" / "3")
    assert model.manifest.metrics == {"validation_accuracy": 0.97}
    assert model.engine.name == "onnx"


def test_package_without_onnx_says_scikit_learn_will_serve(tmp_path: Path, plain_model: Path, iris_csv: Path):
    result = mlapi(
        "package", plain_model, "--name", "m", "--version", "1", "--models-dir", tmp_path, "--sample", iris_csv,
        "--features", ",".join(IRIS_FEATURES), "--no-onnx"
    )
    assert result.returncode == 0, result.stderr
    assert "scikit-learn" in json.loads(result.stdout)["onnx"]


def test_package_needs_feature_names_for_a_model_without_them(tmp_path, plain_model, iris_csv, capsys):
    code, stderr = _main(
        capsys, "package", plain_model, "--name", "m", "--version", "1", "--models-dir", tmp_path, "--sample", iris_csv
    )
    assert code == 1
    assert "--features" in stderr
    assert not (tmp_path / "m").exists()


def test_package_names_a_missing_sample_column_and_the_close_one(tmp_path, plain_model, capsys):
    sample = _write_csv(
        tmp_path / "s.csv", ["sepal_length", "sepal_width", "petal_length", "petal_widht"], [[1, 2, 3, 4]]
    )
    code, stderr = _main(
        capsys, "package", plain_model, "--name", "m", "--version", "1", "--models-dir", tmp_path / "models",
        "--sample", sample, "--features", ",".join(IRIS_FEATURES)
    )
    assert code == 1
    assert "no column 'petal_width'" in stderr and "did you mean 'petal_widht'" in stderr
    assert not (tmp_path / "models" / "m").exists()


def test_package_names_a_non_numeric_sample_cell(tmp_path, plain_model, capsys):
    sample = _write_csv(tmp_path / "s.csv", IRIS_FEATURES, [[1, 2, 3, 4], [1, "two", 3, 4]])
    code, stderr = _main(
        capsys, "package", plain_model, "--name", "m", "--version", "1", "--models-dir", tmp_path / "models",
        "--sample", sample, "--features", ",".join(IRIS_FEATURES)
    )
    assert code == 1
    assert "line 3, column 'sepal_width'" in stderr


def test_package_refuses_to_overwrite_without_force(tmp_path, plain_model, iris_csv, capsys):
    args = [plain_model, "--name", "m", "--version", "1", "--models-dir", tmp_path, "--sample", iris_csv,
            "--features", ",".join(IRIS_FEATURES), "--no-onnx"]  # fmt: skip
    assert _main(capsys, "package", *args)[0] == 0
    code, stderr = _main(capsys, "package", *args)
    assert code == 1 and "--force" in stderr
    assert _main(capsys, "package", *args, "--force")[0] == 0


# ---------------------------------------------------------------- score


def test_score_adds_predictions_and_probabilities(demo_models: Path, iris_csv: Path, tmp_path: Path):
    output = tmp_path / "out.csv"
    result = mlapi(
        "score", "--package", demo_models / "iris" / "1", "--input", iris_csv, "--output", output, "--chunk", 40
    )
    assert result.returncode == 0, result.stderr
    rows = _read_csv(output)
    assert list(rows[0]) == [
        "id",
        *IRIS_FEATURES,
        "prediction",
        "probability_setosa",
        "probability_versicolor",
        "probability_virginica",
    ]
    assert len(rows) == 150 and rows[0]["id"] == "id-0"
    model = load_package(demo_models / "iris" / "1")
    labels, proba = model.infer(load_iris().data)
    assert [r["prediction"] for r in rows] == labels.tolist()
    np.testing.assert_allclose([float(r["probability_virginica"]) for r in rows], proba[:, 2])


def test_score_scores_a_regressor(demo_models: Path, tmp_path: Path):
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    source = _write_csv(tmp_path / "in.csv", list(data.feature_names), data.data[:25].tolist())
    output = tmp_path / "out.csv"
    result = mlapi(
        "score", "--package", demo_models / "diabetes" / "1", "--input", source, "--output", output, "--engine",
        "sklearn"
    )
    assert result.returncode == 0, result.stderr
    rows = _read_csv(output)
    assert list(rows[0])[-1] == "prediction" and len(rows) == 25
    expected, _ = load_package(demo_models / "diabetes" / "1", engine="sklearn").infer(data.data[:25])
    np.testing.assert_allclose([float(r["prediction"]) for r in rows], expected)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([[1, 2, 3, 4], [1, 2, "x", 4]], "line 3, column 'petal_length': must be a number"),
        ([[1, 2, 3, 4], [1, 2, 3, "nan"]], "line 3, column 'petal_width': must be a finite number"),
        ([[1, 2, 3, 4]] * 5 + [[1e12, 2, 3, 4]], "line 7, column 'sepal_length'"),
        ([[1, 2, 3, 4], [1, 2, "", 4]], "line 3, column 'petal_length'"),
    ],
)
def test_score_refuses_a_bad_row_and_writes_nothing(demo_models, tmp_path, capsys, rows, message):
    source = _write_csv(tmp_path / "in.csv", IRIS_FEATURES, rows)
    output = tmp_path / "out.csv"
    code, stderr = _main(
        capsys, "score", "--package", demo_models / "iris" / "1", "--input", source, "--output", output, "--chunk", 2
    )
    assert code == 1
    assert message in stderr and "nothing was written" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv"]


def test_score_refuses_a_bad_row_as_a_command(demo_models: Path, tmp_path: Path):
    source = _write_csv(tmp_path / "in.csv", IRIS_FEATURES, [[1, 2, 3, 4], [1, 2, 3, "-inf"]])
    output = tmp_path / "out.csv"
    result = mlapi("score", "--package", demo_models / "iris" / "1", "--input", source, "--output", output)
    assert result.returncode == 1
    assert "line 3, column 'petal_width'" in result.stderr and "nothing was written" in result.stderr
    assert not output.exists()


def test_score_names_a_misspelled_column(demo_models, tmp_path, capsys):
    source = _write_csv(
        tmp_path / "in.csv", ["sepal_length", "sepal_width", "petal_length", "petal_widht"], [[1, 2, 3, 4]]
    )
    code, stderr = _main(
        capsys, "score", "--package", demo_models / "iris" / "1", "--input", source, "--output", tmp_path / "o.csv"
    )
    assert code == 1
    assert "'petal_width' (did you mean 'petal_widht'?)" in stderr


def test_score_keeps_an_existing_output_when_it_fails(demo_models, tmp_path, capsys):
    source = _write_csv(tmp_path / "in.csv", IRIS_FEATURES, [[1, 2, 3, "inf"]])
    output = tmp_path / "out.csv"
    output.write_text("previous results\n")
    code, _ = _main(
        capsys, "score", "--package", demo_models / "iris" / "1", "--input", source, "--output", output
    )
    assert code == 1
    assert output.read_text() == "previous results\n"


def test_score_refuses_a_package_that_fails_the_gate(models_copy, iris_csv, tmp_path, capsys):
    package = models_copy / "iris" / "1"
    with open(package / "model.joblib", "ab") as fh:
        fh.write(b"\0")
    output = tmp_path / "out.csv"
    code, stderr = _main(capsys, "score", "--package", package, "--input", iris_csv, "--output", output)
    assert code == 1 and "failed the sha256 check" in stderr
    assert not output.exists()


def test_score_scores_features_named_like_pydantic_attributes(tmp_path: Path):
    package = odd_names_package(tmp_path / "models", "odd", "1")
    X = load_iris().data
    source = _write_csv(tmp_path / "in.csv", ODD_FEATURES, X.tolist())
    output = tmp_path / "out.csv"
    result = mlapi("score", "--package", package, "--input", source, "--output", output)
    assert result.returncode == 0, result.stderr
    labels, _ = load_package(package).infer(X)
    assert [r["prediction"] for r in _read_csv(output)] == labels.tolist()


# ---------------------------------------------------------------- score: progress on stderr

PROGRESS_LINE = re.compile(r"^mlapi score: (\d+)% ([\d,]+) rows \((?:[\d,]+ rows/s|in [\d.]+ s)\)$")
ROWS = 100_000


@pytest.fixture(scope="module")
def many_rows(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rows") / "rows.csv"
    rows_csv(demo_models / "iris" / "1", path, ROWS)
    return path


def _score_args(demo_models: Path, source: Path, output: Path, *extra: object) -> list[str]:
    return [*mlapi_command(), "score", "--package", str(demo_models / "iris" / "1"), "--input", str(source),
            "--output", str(output), *map(str, extra)]


def _with_stderr_on_a_terminal(argv: list[str]) -> tuple[int, str, str]:
    """Exit code, what the command wrote to its stderr (a pseudo-terminal) and its stdout (a pipe)."""
    controller, terminal = pty.openpty()
    with subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=terminal) as proc:
        os.close(terminal)  # the child holds the only copy now: reading ends when it exits
        written = b""
        while True:
            try:
                data = os.read(controller, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            written += data
        stdout = proc.stdout.read().decode()
        code = proc.wait(timeout=120)
    os.close(controller)
    return code, written.decode(errors="replace"), stdout


def _assert_scored(output: Path) -> None:
    """Header plus one line per row and nothing else: no progress in the output."""
    with open(output, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0][-4:] == ["prediction", "probability_setosa", "probability_versicolor", "probability_virginica"]
    assert len(rows) == ROWS + 1 and all(len(r) == 9 for r in rows)


def test_score_draws_a_progress_bar_reaching_100_percent_on_a_terminal(demo_models, many_rows, tmp_path):
    output = tmp_path / "scored.csv"
    code, text, stdout = _with_stderr_on_a_terminal(_score_args(demo_models, many_rows, output))
    assert code == 0, text
    frames = [f for f in re.split(r"[\r\n]+", text.replace("\x1b[K", "")) if f]
    bars = [re.match(r"^mlapi score \[([#-]+)\] +(\d+)% ", f) for f in frames]
    assert bars and all(bars), f"not a progress bar: {text!r}"
    percents = [int(b.group(2)) for b in bars]
    assert percents == sorted(percents) and percents[-1] == 100
    assert set(bars[-1].group(1)) == {"#"}, "the last frame is a full bar"
    assert "100,000 rows" in frames[-1] and text.endswith("\n"), "the bar's line is ended"
    assert stdout.startswith(f"mlapi score: {ROWS} rows scored with iris 1 (onnx)")
    _assert_scored(output)


def test_score_writes_plain_progress_lines_into_a_pipe(demo_models, many_rows, tmp_path):
    output = tmp_path / "scored.csv"
    result = subprocess.run(_score_args(demo_models, many_rows, output, "--progress-interval", 0),
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr and "\x1b" not in result.stderr
    lines = result.stderr.splitlines()
    matches = [PROGRESS_LINE.match(line) for line in lines]
    assert len(lines) == ROWS // 10000 + 1 and all(matches), lines  # one per chunk, then the final one
    percents = [int(m.group(1)) for m in matches]
    assert percents == sorted(percents) and percents[-1] == 100 and matches[-1].group(2) == "100,000"
    assert result.stdout.count("\n") == 1 and "rows scored" in result.stdout
    _assert_scored(output)


def test_score_without_progress_writes_only_the_summary(demo_models, iris_csv, tmp_path):
    result = mlapi("score", "--package", demo_models / "iris" / "1", "--input", iris_csv,
                   "--output", tmp_path / "o.csv", "--no-progress")
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.startswith("mlapi score: 150 rows scored")


def test_score_ends_a_half_drawn_bar_before_the_error(demo_models, tmp_path):
    rows = [[1, 2, 3, 4]] * 30 + [[1, 2, 3, "x"]]
    source = _write_csv(tmp_path / "in.csv", IRIS_FEATURES, rows)
    code, text, _ = _with_stderr_on_a_terminal(_score_args(demo_models, source, tmp_path / "o.csv", "--chunk", 10))
    assert code == 1
    last = text.replace("\r\n", "\n").split("\n")[-2]
    assert last.startswith("mlapi score: ") and "line 32, column 'petal_width'" in last
