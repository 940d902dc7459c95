"""Progress of a long command on stderr: a bar redrawn in place on a terminal, plain lines anywhere else.

A pipe or a log file gets one self-contained line every few seconds (no carriage
returns or escape codes to garble it), so a CI log or ``2> score.log`` shows how
far the command got.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

# A terminal redraw faster than this costs time and shows nothing more.
REDRAW_SECONDS = 0.1
LINE_SECONDS = 5.0


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else (
        f"{seconds // 60}:{seconds % 60:02d}"
    )


class Progress:
    """Rows done so far and, when the total is known, the fraction done; shown on ``stream``.

    ``interval`` is the least time between two plain lines (default 5 s); a
    terminal is redrawn at most every 0.1 s. ``enabled=False`` shows nothing.
    """

    def __init__(self, label: str, *, stream: TextIO | None = None, interval: float | None = None,
                 enabled: bool = True):
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        try:
            self.terminal = self.stream.isatty()
        except (AttributeError, ValueError):
            self.terminal = False
        self.interval = REDRAW_SECONDS if self.terminal else (LINE_SECONDS if interval is None else interval)
        self.started = time.monotonic()
        self._shown_at = float("-inf")
        self._drawn = False
        self.rows = 0
        self.fraction: float | None = None

    def start(self) -> None:
        """Count the time (and so the rate) from now: the work starts after loading what it needs."""
        self.started = time.monotonic()

    def update(self, rows: int, fraction: float | None = None) -> None:
        self.rows = rows
        self.fraction = None if fraction is None else min(max(fraction, 0.0), 1.0)
        now = time.monotonic()
        if self.enabled and now - self._shown_at >= self.interval:
            self._shown_at = now
            self._show(now, final=False)

    def finish(self) -> None:
        """Show the end state (100 % when the total was known) and end the bar's line."""
        if self.fraction is not None:
            self.fraction = 1.0
        if self.enabled:
            self._show(time.monotonic(), final=True)

    def interrupt(self) -> None:
        """End a half-drawn bar's line, so that an error message starts on a line of its own."""
        if self.enabled and self._drawn and self.terminal:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False

    def _show(self, now: float, final: bool) -> None:
        elapsed = max(now - self.started, 1e-9)
        rate = self.rows / elapsed
        if self.terminal:
            self._draw_bar(elapsed, rate, final)
        else:
            percent = "" if self.fraction is None else f"{self.fraction * 100:.0f}% "
            tail = f"in {elapsed:.1f} s" if final else f"{rate:,.0f} rows/s"
            self.stream.write(f"{self.label}: {percent}{self.rows:,} rows ({tail})\n")
            self.stream.flush()

    def _draw_bar(self, elapsed: float, rate: float, final: bool) -> None:
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except OSError:
            columns = 0
        columns = columns or 80  # a terminal that reports no size (a fresh pty) has 0 columns
        stats = f" {self.rows:,} rows  {rate:,.0f} rows/s"
        if final:
            stats += f"  {_duration(elapsed)}"
        elif self.fraction:
            stats += f"  ETA {_duration(elapsed * (1 - self.fraction) / self.fraction)}"
        if self.fraction is None:
            line = f"{self.label}{stats}"
        else:
            percent = f"{self.fraction * 100:3.0f}%"
            # A fixed width, so the bar does not jump as the figures beside it grow; narrower on a narrow terminal.
            width = max(10, min(30, columns - len(self.label) - 50))
            filled = int(width * self.fraction)
            line = f"{self.label} [{'#' * filled}{'-' * (width - filled)}] {percent}{stats}"
        # \r returns to the start of the line, \x1b[K clears what a longer previous line left.
        self.stream.write(f"\r{line[:columns - 1]}\x1b[K" + ("\n" if final else ""))
        self.stream.flush()
        self._drawn = not final
