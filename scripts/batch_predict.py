#!/usr/bin/env python3
"""Score a CSV file with a model package, offline, into a new CSV file.

    python scripts/batch_predict.py --package models/iris/1 --input in.csv --output out.csv \\
        [--engine auto] [--chunk 10000] [--max-abs 1e9]

The package goes through the service's own gate and every row through the
service's own validation: each feature named in the header, every value a
finite number within --max-abs (default: the service's MLAPI_MAX_ABS_VALUE).
The output holds the input columns plus ``prediction`` and, for a classifier,
one ``probability_<class>`` column per class. On the first bad row the command
stops, names the line and column, and writes nothing (the output is written to
a temporary file and renamed into place only when every row scored).
"""

from __future__ import annotations

import argparse
import csv
import difflib
import os
import sys
import tempfile
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.packaging import LoadedModel, PackageError, load_package  # noqa: E402
from app.validation import ValidationFailure, to_matrix  # noqa: E402


class InputError(Exception):
    """A problem with the input file; the message names the line and column."""


def _number(cell: str) -> float | str:
    # Anything that is not a number stays a string, so to_matrix names it in its own words.
    try:
        return float(cell)
    except ValueError:
        return cell


def _output_columns(header: list[str], model: LoadedModel) -> list[str]:
    added = ["prediction"]
    if model.classes is not None:
        added += [f"probability_{c}" for c in model.classes]
    clash = [c for c in added if c in header]
    if clash:
        raise InputError(f"the input already has column(s) {clash}; rename them so the output can add its own")
    return header + added


def _chunks(reader: Iterator[list[str]], size: int) -> Iterator[list[list[str]]]:
    while chunk := list(islice(reader, size)):
        yield chunk


def score_file(model: LoadedModel, source: Path, target: Path, chunk_size: int, max_abs: float) -> int:
    """Write target from source; returns the number of rows. Nothing is left at target on error."""
    features = model.feature_names
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    rows_done = 0
    try:
        with open(source, newline="") as fh_in, os.fdopen(fd, "w", newline="") as fh_out:
            reader = csv.reader(fh_in)
            header = [h.strip() for h in next(reader, [])]
            if not header:
                raise InputError(f"{source} is empty; it needs a header row naming the features")
            missing = [name for name in features if name not in header]
            if missing:
                hints = []
                for name in missing:
                    close = difflib.get_close_matches(name, header, n=1)
                    hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
                raise InputError(f"{source} has no column {', '.join(hints)}; the model needs {features}")
            columns = [header.index(name) for name in features]
            writer = csv.writer(fh_out)
            writer.writerow(_output_columns(header, model))
            for chunk in _chunks(reader, chunk_size):
                first_line = rows_done + 2  # line 1 is the header
                for offset, record in enumerate(chunk):
                    if len(record) != len(header):
                        raise InputError(
                            f"{source} line {first_line + offset}: {len(record)} fields, the header has {len(header)}"
                        )
                values = [[_number(record[j]) for j in columns] for record in chunk]
                try:
                    X = to_matrix(values, features, max_abs)
                except ValidationFailure as exc:
                    where = exc.details[0]["loc"]
                    line = first_line + where[0] if where else first_line
                    column = f", column {where[1]!r}" if len(where) > 1 else ""
                    raise InputError(f"{source} line {line}{column}: {exc.details[0]['msg']}") from None
                predictions, probabilities = model.score(X)
                if probabilities is None:
                    added = [[repr(float(v))] for v in predictions]
                else:
                    added = [
                        [label, *map(repr, p)] for label, p in zip(predictions, probabilities.tolist(), strict=True)
                    ]
                writer.writerows(record + extra for record, extra in zip(chunk, added, strict=True))
                rows_done += len(chunk)
            fh_out.flush()
            os.fsync(fh_out.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return rows_done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", type=Path, required=True, help="package folder <models dir>/<name>/<version>")
    parser.add_argument("--input", type=Path, required=True, help="CSV with a header naming the features")
    parser.add_argument("--output", type=Path, required=True, help="CSV to write (replaced only on success)")
    parser.add_argument("--engine", choices=("auto", "onnx", "sklearn"), default="auto")
    parser.add_argument("--chunk", type=int, default=10000, help="rows scored per model call (default 10000)")
    parser.add_argument("--max-abs", type=float, help="largest absolute value accepted (default: MLAPI_MAX_ABS_VALUE)")
    args = parser.parse_args(argv)
    if args.chunk < 1:
        parser.error("--chunk must be at least 1")
    if args.max_abs is None:
        from app.settings import load_settings

        args.max_abs = load_settings().max_abs_value
    if args.input.resolve() == args.output.resolve():
        parser.error("--output must differ from --input")
    try:
        model = load_package(args.package, engine=args.engine)
        rows = score_file(model, args.input, args.output, args.chunk, args.max_abs)
    except PackageError as exc:
        print(f"batch_predict: {exc}", file=sys.stderr)
        return 1
    except InputError as exc:
        print(f"batch_predict: {exc}; nothing was written to {args.output}", file=sys.stderr)
        return 1
    except FileNotFoundError as exc:
        print(f"batch_predict: {exc.filename} does not exist; nothing was written", file=sys.stderr)
        return 1
    print(
        f"batch_predict: {rows} rows scored with {model.name} {model.version} ({model.engine.name}) into {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
