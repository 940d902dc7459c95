"""The prediction log: a sample of scored requests, their inputs and outputs, as JSON lines.

One record per sampled request (``MLAPI_PREDICTION_LOG_SAMPLE``), a batch included: its rows stay
together under ``instances``, each with its inputs by feature name, its prediction and, for
classifiers, its probabilities. Values of the features named in ``MLAPI_PREDICTION_LOG_REDACT``
are replaced before anything leaves the process.

Nothing here can fail or slow a prediction. ``write()`` only samples and queues what the request
already holds; a background thread per worker builds the records and writes them. A record that
does not fit the bounded queue, or that the sink cannot take (an unwritable path, a full disk), is
dropped and counted in ``mlapi_prediction_log_dropped_total``; a failing sink is logged once and
tried again every ``RETRY_SECONDS``.

The file sink is shared by every worker (and every instance pointed at the same path): each
worker appends whole lines with one ``write(2)`` on an ``O_APPEND`` descriptor, which Linux never
interleaves with another writer's on a local filesystem. Rotation by size is done by whichever
worker finds the file full, under an ``flock`` on ``<path>.lock``; the others notice the file was
renamed (its inode changed) and reopen the path. So no worker index is needed (gunicorn has
none), recycled workers leave no files behind, and the files stay bounded: the path and
``<path>.1`` to ``<path>.N``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from app.logs import PREDICTION_LOGGER, get_logger
from app.metrics import PREDICTION_LOG_DROPPED, PREDICTION_LOG_WRITTEN, labelled
from app.serving.inference import PredictionResult
from app.settings import Settings

JOURNAL = "journal"
REDACTED = "[redacted]"
# How long a failing sink rests before the writer tries it again; records meanwhile are dropped.
RETRY_SECONDS = 10.0
# Bytes per write(2): whole lines only, so a batch is split at line ends below this.
WRITE_CHUNK_BYTES = 1 << 20
# Longest wait for queued records when the worker stops.
CLOSE_TIMEOUT_SECONDS = 5.0

log = get_logger("predictionlog")
journal = logging.getLogger(PREDICTION_LOGGER)


@dataclass(frozen=True, slots=True)
class _Pending:
    """What a sampled request already holds; the record is built from it off the request path."""

    request_id: str | None
    scored: PredictionResult
    X: np.ndarray
    latency_ms: float | None
    time: float


class _Queue:
    """Records waiting for the writer, bounded by the rows they hold."""

    def __init__(self, max_rows: int) -> None:
        self._cond = threading.Condition()
        self._items: list[_Pending] = []
        self._rows = 0
        self._max_rows = max_rows
        self._busy = False  # the writer holds a batch taken from the queue
        self._closed = False

    def put(self, item: _Pending) -> bool:
        rows = len(item.X)
        with self._cond:
            if self._closed or self._rows + rows > self._max_rows:
                return False
            self._items.append(item)
            self._rows += rows
            self._cond.notify_all()
        return True

    def take(self) -> list[_Pending] | None:
        """Every queued record, once there is one; None when closed and empty."""
        with self._cond:
            self._busy = False
            self._cond.notify_all()
            while not self._items and not self._closed:
                self._cond.wait()
            if not self._items:
                return None
            items, self._items, self._rows = self._items, [], 0
            self._busy = True
            return items

    def wait_idle(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: not self._items and not self._busy, timeout)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class FileSink:
    """Appends whole lines to ``path``, rotating it by size together with the other writers of it."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._fd: int | None = None
        self._torn = False  # the last write stopped inside a line

    def write(self, lines: list[bytes]) -> int:
        """Append the lines; returns how many were written whole. Raises OSError when none could be."""
        self._open_current()
        self._rotate_if_full()
        written = 0
        for chunk, count in _chunks(lines, WRITE_CHUNK_BYTES):
            if self._torn:
                chunk = b"\n" + chunk  # the fragment of the failed write stays a line of its own
            try:
                done = self._write_all(chunk)
            except OSError:
                if written:
                    return written
                raise
            if done < len(chunk):
                self._torn = done > 0 and chunk[done - 1] != ord("\n")
                return written + _whole_lines(chunk, done)
            self._torn = False
            written += count
        return written

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _write_all(self, chunk: bytes) -> int:
        """Bytes of chunk written; fewer than all only when the filesystem refused the rest."""
        assert self._fd is not None
        done = 0
        while done < len(chunk):
            try:
                n = os.write(self._fd, chunk[done:])
            except OSError:
                if done:
                    return done
                raise
            if n == 0:
                return done
            done += n
        return done

    def _open_current(self) -> None:
        """Reopen the path when another writer rotated it away from the descriptor held."""
        if self._fd is not None:
            try:
                if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                    return
            except FileNotFoundError:
                pass
            self.close()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def _rotate_if_full(self) -> None:
        assert self._fd is not None
        if os.fstat(self._fd).st_size < self.max_bytes:
            return
        lock = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            # Another writer may have rotated while this one waited for the lock.
            if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                if self.backups == 0:
                    os.unlink(self.path)
                else:
                    for n in range(self.backups - 1, 0, -1):
                        with contextlib.suppress(FileNotFoundError):
                            os.replace(f"{self.path}.{n}", f"{self.path}.{n + 1}")
                    os.replace(self.path, f"{self.path}.1")
            self.close()
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        finally:
            os.close(lock)  # releases the lock


def _chunks(lines: list[bytes], limit: int) -> list[tuple[bytes, int]]:
    """Lines joined into chunks of at most ``limit`` bytes (or one line, when a line is longer)."""
    chunks: list[tuple[bytes, int]] = []
    current: list[bytes] = []
    size = 0
    for line in lines:
        if current and size + len(line) > limit:
            chunks.append((b"".join(current), len(current)))
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current:
        chunks.append((b"".join(current), len(current)))
    return chunks


def _whole_lines(chunk: bytes, done: int) -> int:
    """Record lines of chunk written whole when only its first ``done`` bytes were (a leading newline
    only ended an earlier fragment)."""
    ended = chunk.count(b"\n", 0, done)
    return max(ended - 1, 0) if chunk.startswith(b"\n") else ended


class PredictionLog:
    """The prediction log of one app; ``write()`` is the one function every scoring path calls."""

    def __init__(self, settings: Settings, features: set[str] | None = None) -> None:
        self.sample = settings.prediction_log_sample
        self.redact = frozenset(settings.prediction_log_redact)
        self.destination = settings.prediction_log_path
        self._max_rows = max(settings.prediction_log_queue_rows, 1)
        self._file = None if self.destination == JOURNAL else FileSink(
            Path(self.destination), settings.prediction_log_max_bytes, settings.prediction_log_backups
        )
        self._start_lock = threading.Lock()
        self._pid: int | None = None
        self._queue = _Queue(self._max_rows)
        self._thread: threading.Thread | None = None
        self._failing_since: float | None = None
        self._retry_at = 0.0
        unknown = sorted(self.redact - features) if features is not None else []
        if self.sample and unknown:
            # A misspelt name would leave the feature it meant in the clear.
            log.warning("MLAPI_PREDICTION_LOG_REDACT names features no model has; check the spelling",
                        extra={"unknown_features": unknown})

    def write(self, state: Any, scored: PredictionResult) -> None:
        """Queue a record of this scored request when the sample picks it; never raises, never waits."""
        if not self.sample or random.random() >= self.sample:
            return
        started = getattr(state, "started", None)
        now = time.perf_counter()
        pending = _Pending(
            request_id=getattr(state, "request_id", None),
            scored=scored,
            X=scored.batch.values,
            latency_ms=round((now - started) * 1000, 3) if started is not None else None,
            time=time.time(),
        )
        if self._pid != os.getpid():
            self._start()
        if not self._queue.put(pending):
            labelled(PREDICTION_LOG_DROPPED, "queue_full").inc()

    def flush(self, timeout: float = CLOSE_TIMEOUT_SECONDS) -> bool:
        """Wait until every queued record is written or dropped; whether that happened within timeout."""
        return self._thread is None or self._queue.wait_idle(timeout)

    def close(self, timeout: float = CLOSE_TIMEOUT_SECONDS) -> None:
        """Write what is queued (within timeout), then stop the writer. Called when the worker stops."""
        if self._thread is None or self._pid != os.getpid():
            return
        self._queue.close()
        self._thread.join(timeout)

    def _start(self) -> None:
        """One writer thread per process, started in the worker: a thread does not survive a fork."""
        with self._start_lock:
            if self._pid == os.getpid():
                return
            self._queue = _Queue(self._max_rows)
            self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
            self._thread.start()
            self._pid = os.getpid()

    def _run(self) -> None:
        queue = self._queue
        while (batch := queue.take()) is not None:
            try:
                self._write_batch(batch)
            except Exception:  # the writer must outlive any one record
                log.exception("prediction log records dropped", extra={"records": len(batch)})
                labelled(PREDICTION_LOG_DROPPED, "sink_error").inc(len(batch))
        if self._file is not None:
            self._file.close()

    def _write_batch(self, batch: list[_Pending]) -> None:
        records = [self.record(p) for p in batch]
        if self._file is None:
            for record in records:
                journal.info("prediction", extra=record)
            PREDICTION_LOG_WRITTEN.inc(len(records))
            return
        if self._failing_since is not None and time.monotonic() < self._retry_at:
            labelled(PREDICTION_LOG_DROPPED, "sink_error").inc(len(records))
            return
        lines = [orjson.dumps(record) + b"\n" for record in records]
        try:
            written = self._file.write(lines)
        except OSError as exc:
            written = 0
            self._failed(exc)
        else:
            if written < len(lines):
                self._failed(OSError(errno.ENOSPC, "the filesystem took only part of a write"))
            elif self._failing_since is not None:
                log.info("prediction log writable again", extra={
                    "path": self.destination, "failed_for_seconds": round(time.monotonic() - self._failing_since, 1)})
                self._failing_since = None
        if written:
            PREDICTION_LOG_WRITTEN.inc(written)
        if written < len(lines):
            labelled(PREDICTION_LOG_DROPPED, "sink_error").inc(len(lines) - written)

    def _failed(self, exc: OSError) -> None:
        self._retry_at = time.monotonic() + RETRY_SECONDS
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            log.warning(
                "cannot write the prediction log; its records are dropped and counted in "
                "mlapi_prediction_log_dropped_total until it can; make MLAPI_PREDICTION_LOG_PATH writable "
                "by the service, or free space on its filesystem",
                extra={"path": self.destination, "error": f"{errno.errorcode.get(exc.errno or 0, exc.errno)}: "
                       f"{exc.strerror or exc}", "retry_seconds": RETRY_SECONDS},
            )
        if self._file is not None:
            self._file.close()  # reopened on the next try: the path may have been fixed meanwhile

    def record(self, pending: _Pending) -> dict[str, Any]:
        """The JSON record of one request; its shape is documented in docs/runbook.md."""
        scored = pending.scored
        model = scored.model
        names = model.feature_names
        redacted = [name for name in names if name in self.redact]
        probabilities = scored.probability_maps()
        instances = []
        for row, prediction, probs in zip(pending.X.tolist(), scored.predictions(), probabilities or repeat(None),
                                          strict=False):  # repeat(None) never ends
            inputs = dict(zip(names, row, strict=True))
            for name in redacted:
                inputs[name] = REDACTED
            instances.append({"inputs": inputs, "prediction": prediction, "probabilities": probs})
        return {
            "time": datetime.fromtimestamp(pending.time, UTC).isoformat(timespec="milliseconds"),
            "request_id": pending.request_id,
            "model": model.name,
            "version": model.version,
            "engine": model.engine.name,
            "latency_ms": pending.latency_ms,
            "instances": instances,
        }
