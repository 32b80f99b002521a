"""Progress for long commands: a rich bar in a terminal, plain lines in a log.

    with Progress("scanning", console=err, unit="images") as progress:
        scan(..., on_batch=progress)          # progress(done, total) after each batch

In a terminal (``console.is_terminal``) this is a rich progress bar with its total (``done/total``, elapsed, ETA).
Anywhere else (a CI log, a file, a pipe) a live bar prints nothing until the end, so ``Progress`` writes a plain line
instead (``scanning: 120/1,000 images (12%), 3.4 images/s, ETA 4m 18s``) when the total is known (or when it starts,
for a step without a count), every ``interval`` seconds while it runs (also when no batch finished since the last line: a slow first batch or a step without a count still
shows the command is alive) and when it ends. ``MEMDETECT_PROGRESS_INTERVAL`` sets the interval (seconds, default
10). ``quiet=True`` prints nothing.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable, Optional

from rich.console import Console

DEFAULT_INTERVAL = 10.0


def interval_from_env() -> float:
    """``MEMDETECT_PROGRESS_INTERVAL`` in seconds (default 10; a bad value falls back to the default)."""
    try:
        value = float(os.environ.get("MEMDETECT_PROGRESS_INTERVAL", DEFAULT_INTERVAL))
    except ValueError:
        return DEFAULT_INTERVAL
    return value if value > 0 else DEFAULT_INTERVAL


def duration(seconds: float) -> str:
    """``42s``, ``4m 18s``, ``2h 05m``."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def plural(n: int, word: str) -> str:
    """``1 image``, ``2 images`` (``word`` is the plural; a trailing "s" is dropped for one)."""
    return f"{n:,} {word[:-1] if n == 1 and word.endswith('s') else word}"


def status_line(what: str, done: int, total: Optional[int], elapsed: float, unit: str = "images") -> str:
    """One plain progress line: done/total, percentage, rate and ETA (what is known of them)."""
    if total == 0:
        line = f"{what}: no {unit}"
    elif total:
        line = f"{what}: {done:,}/{plural(total, unit)} ({100.0 * done / total:.0f}%)"
    elif done:
        line = f"{what}: {plural(done, unit)}"
    else:
        line = f"{what}: working"
    rate = done / elapsed if elapsed > 0 and done else 0.0
    if rate:
        line += f", {rate:.3g} {unit}/s"
        if total and total > done:
            line += f", ETA {duration((total - done) / rate)}"
    return line + f", {duration(elapsed)} elapsed"


def _count_column():
    """``done/total``, and nothing until the total is known (rich's MofNCompleteColumn shows ``0/?``)."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class Count(ProgressColumn):
        def render(self, task) -> Text:
            if task.total is None:
                return Text("")
            return Text(f"{int(task.completed):,}/{int(task.total):,}", style="progress.download")

    return Count()


class Progress:
    """The ``(done, total)`` callback of a long command, as a rich bar (terminal) or plain lines (logs).

    ``total`` may be given up front or with each call; ``on_update`` (e.g. a signal check) runs on every call.
    ``counted=False``: a step that reports no count (a spinner and the time elapsed, never ``0/?``).
    """

    def __init__(self, what: str, *, console: Console, unit: str = "images", quiet: bool = False,
                 total: Optional[int] = None, interval: Optional[float] = None,
                 on_update: Optional[Callable[[], None]] = None, terminal: Optional[bool] = None,
                 counted: bool = True):
        self.what, self.console, self.unit, self.quiet = what, console, unit, quiet
        self.total, self.done = total, 0
        self.interval = interval_from_env() if interval is None else interval
        self.on_update = on_update
        self.counted = counted
        self.terminal = console.is_terminal if terminal is None else terminal
        self._bar = None
        self._task = None
        self._start = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.lines = 0  # plain lines printed (tests)
        self._printed: Optional[tuple] = None  # (done, total) of the last plain line

    # -- the callback ------------------------------------------------------------------------------------------------
    def __call__(self, done: int, total: Optional[int] = None) -> None:
        if self.on_update is not None:
            self.on_update()
        with self._lock:
            first_total = total is not None and self.total is None
            self.done = int(done)
            if total is not None:
                self.total = int(total)
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, total=self.total)
        elif first_total and self._thread is not None:
            self._line()  # the total is known: say it at once

    # -- plain lines -------------------------------------------------------------------------------------------------
    def _line(self, final: bool = False) -> None:
        with self._lock:
            if final and self._printed == (self.done, self.total):
                return  # the last line said it already
            self._printed = (self.done, self.total)
            text = status_line(self.what, self.done, self.total, time.monotonic() - self._start, self.unit)
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)
        self.lines += 1

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            self._line()

    # -- context -----------------------------------------------------------------------------------------------------
    def __enter__(self) -> "Progress":
        self._start = time.monotonic()
        if self.quiet:
            return self
        if self.terminal:
            from rich.progress import (BarColumn, Progress as Bar, SpinnerColumn, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            columns = ((TextColumn(self.what), BarColumn(), _count_column(), TimeElapsedColumn(),
                        TimeRemainingColumn()) if self.counted
                       else (SpinnerColumn(), TextColumn(self.what), TimeElapsedColumn()))
            self._bar = Bar(*columns, console=self.console, transient=True)
            self._task = self._bar.add_task(self.what, total=self.total, completed=self.done)
            self._bar.__enter__()
        else:
            if not self.counted or self.total is not None:
                self._line()
            self._thread = threading.Thread(target=self._beat, name="memdetect-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._bar is not None:
            self._bar.__exit__(exc_type, exc, tb)
            self._bar = None
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._thread = None
            if exc_type is None:
                self._line(final=True)


__all__ = ["DEFAULT_INTERVAL", "Progress", "duration", "interval_from_env", "plural", "status_line"]
