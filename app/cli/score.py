"""``mlapi score``: score a CSV file with a model package, offline, into a new CSV file."""

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
from typing import BinaryIO, cast

from app.cli.arguments import non_negative_float, positive_int
from app.cli.progress import LINE_SECONDS, Progress
from app.packages.gate import ModelVersion, load_package
from app.packages.manifest import PackageError
from app.packages.validation import ValidationFailure

COMMAND = "score"
SUMMARY = "score a CSV file offline with a model package"
DESCRIPTION = """\
Score a CSV file with a model package, offline, into a new CSV file.

The package goes through the service's own gate and every row through the
service's own validation: each feature named in the header, every number
finite and within --max-abs, an int feature a whole number, a bool feature
true/false (or 1/0), a string feature one of the model's categories unless its
encoder scores unknown ones. The output holds the input columns plus
`prediction` and, for a classifier, one `probability_<class>` column per class.
On the first bad row the command stops, names the line and column, and writes
nothing: the output is written to a temporary file and renamed into place only
when every row scored.

Progress goes to stderr, never into the output: a bar on a terminal, a plain
line every --progress-interval seconds in a pipe or a log file. The summary
line goes to stdout."""

EPILOG = """\
example:
  mlapi score --package models/iris/1 --input rows.csv --output scored.csv
  mlapi score --package models/iris/1 --input rows.csv --output scored.csv --engine sklearn 2> score.log"""


class InputError(Exception):
    """A problem with the input file; the message names the line and column."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--package", type=Path, required=True, metavar="DIR",
                        help="package folder <models dir>/<name>/<version>, e.g. models/iris/1")
    parser.add_argument("--input", type=Path, required=True, metavar="CSV",
                        help="CSV file with a header row naming (at least) the model's features")
    parser.add_argument("--output", type=Path, required=True, metavar="CSV",
                        help="CSV file to write; an existing file is replaced only when every row scored")
    parser.add_argument("--engine", choices=("auto", "onnx", "sklearn"), default="auto",
                        help="auto: model.onnx when the package kept it (as the service does), else scikit-learn; "
                        "onnx or sklearn: that engine only (default: auto)")
    parser.add_argument("--chunk", type=positive_int, default=10000, metavar="ROWS",
                        help="rows scored per model call (default: 10000)")
    parser.add_argument("--max-abs", type=float, metavar="VALUE",
                        help="largest absolute feature value accepted (default: MLAPI_MAX_ABS_VALUE, as the service)")
    parser.add_argument("--progress-interval", type=non_negative_float, default=LINE_SECONDS, metavar="SECONDS",
                        help="seconds between progress lines when stderr is not a terminal "
                        f"(default: {LINE_SECONDS:g}; 0 prints one per chunk)")
    parser.add_argument("--no-progress", action="store_true", help="show no progress, only the summary and errors")


def _number(cell: str) -> float | str:
    # Anything that is not a number stays a string, so the input path names it in its own words.
    try:
        return float(cell)
    except ValueError:
        return cell


_BOOLEANS = {"true": True, "false": False, "1": True, "0": False}


def _boolean(cell: str) -> bool | str:
    return _BOOLEANS.get(cell.strip().lower(), cell)


def _string(cell: str) -> str:
    return cell


# A CSV cell is text: each feature type reads it as the value a JSON request would hold.
CELL_READERS = {"float": _number, "int": _number, "bool": _boolean, "string": _string}


def _output_columns(header: list[str], model: ModelVersion) -> list[str]:
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


def score_file(
    model: ModelVersion, source: Path, target: Path, chunk_size: int, max_abs: float, progress: Progress | None = None
) -> int:
    """Write target from source; returns the number of rows. Nothing is left at target on error."""
    features = model.feature_names
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    rows_done = 0
    try:
        with open(source, newline="") as fh_in, os.fdopen(fd, "w", newline="") as fh_out:
            size = os.fstat(fh_in.fileno()).st_size
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
            readers = [CELL_READERS[f.type] for f in model.manifest.features]
            writer = csv.writer(fh_out)
            writer.writerow(_output_columns(header, model))
            if progress is not None:
                progress.start()
            for chunk in _chunks(reader, chunk_size):
                first_line = rows_done + 2  # line 1 is the header
                for offset, record in enumerate(chunk):
                    if len(record) != len(header):
                        raise InputError(
                            f"{source} line {first_line + offset}: {len(record)} fields, the header has {len(header)}"
                        )
                values = [[read(record[j]) for read, j in zip(readers, columns, strict=True)] for record in chunk]
                try:
                    batch = model.inputs.rows(values, max_abs)
                except ValidationFailure as exc:
                    where = exc.details[0]["loc"]
                    line = first_line + where[0] if where else first_line
                    column = f", column {where[1]!r}" if len(where) > 1 else ""
                    raise InputError(f"{source} line {line}{column}: {exc.details[0]['msg']}") from None
                predictions, probabilities = model.infer(batch.X)
                if probabilities is None:
                    added = [[repr(float(v))] for v in predictions]
                else:
                    added = [
                        [label, *map(repr, p)] for label, p in zip(predictions, probabilities.tolist(), strict=True)
                    ]
                writer.writerows(record + extra for record, extra in zip(chunk, added, strict=True))
                rows_done += len(chunk)
                if progress is not None:
                    # Bytes read over the file's size: known without a first pass to count the rows.
                    progress.update(rows_done, cast(BinaryIO, fh_in.buffer).tell() / size if size else None)
            fh_out.flush()
            os.fsync(fh_out.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    if progress is not None:
        progress.finish()
    return rows_done


def run(args: argparse.Namespace) -> int:
    if args.max_abs is None:
        from app.settings import load_settings

        args.max_abs = load_settings().max_abs_value
    if args.input.resolve() == args.output.resolve():
        return _fail("--output must differ from --input, or the input would be replaced by its scores")
    progress = Progress("mlapi score", interval=args.progress_interval, enabled=not args.no_progress)
    try:
        model = load_package(args.package, engine=args.engine)
        rows = score_file(model, args.input, args.output, args.chunk, args.max_abs, progress)
    except PackageError as exc:
        return _fail(str(exc), progress)
    except InputError as exc:
        return _fail(f"{exc}; nothing was written to {args.output}", progress)
    except FileNotFoundError as exc:
        return _fail(f"{exc.filename} does not exist; give an existing file. Nothing was written", progress)
    except KeyboardInterrupt:
        return _fail(f"interrupted; nothing was written to {args.output}", progress, code=130)
    print(f"mlapi score: {rows} rows scored with {model.name} {model.version} ({model.engine.name}) into {args.output}")
    return 0


def _fail(message: str, progress: Progress | None = None, code: int = 1) -> int:
    if progress is not None:
        progress.interrupt()
    print(f"mlapi score: {message}", file=sys.stderr)
    return code
