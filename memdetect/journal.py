"""Resumable scans: an append-only journal of report rows, keyed by image content and scoring settings.

Why: a CI scan over thousands of images can be killed part-way (job timeouts, preemption, OOM killer, SIGKILL).
Each batch's rows are appended to ``<report>.journal.jsonl`` as soon as they are computed, then flushed and
fsynced, so a kill loses at most the batch in flight. A rerun with the same report path reads the journal and
scores only the images whose key is not in it; the final report is then written atomically from journal + new rows.

The key of an image is a hash of its file's bytes (sha256) and of every setting that changes a score
(``fingerprint``): model name and source, family, layer, timestep, sigma, pooling, seed, preprocessing recipe,
resolution, dtype and memdetect version. Deliberately *not* in the key:

* metric and threshold: rows keep every metric; ``score`` and ``memorized`` are re-derived on reuse, so a
  recalibrated threshold reuses the journal;
* the path: a renamed or copied image is not scored again;
* device and batch size: scores agree to float tolerance;
* the weights' bytes (hashing SD's 4 GB per run is too slow): after changing the weights behind the same name or
  folder, rerun with ``--no-resume``.

Only scored rows are journaled. A file that could not be read is tried again on every run: that costs a decode
attempt, not a forward pass, and a failure that was transient (a file still being written, a full disk, memory)
must not stick. Format: JSON lines ``{"key", "path", "std", "l4l2", "entropy", "maxmin"}``; a torn last line (the
process died mid-write) is cut off when the journal is opened, unparseable lines are skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .errors import UsageError
from .io import display_path, file_digest

try:  # POSIX advisory locks; on other platforms concurrent runs are simply not detected
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

log = logging.getLogger(__name__)

METRICS = ("std", "l4l2", "entropy", "maxmin")
#: Settings that change a score (see the module docstring for what is left out and why).
KEY_SETTINGS = ("model", "source", "family", "layer", "timestep", "sigma", "pooling", "seed", "preprocess",
                "resolution", "dtype", "memdetect")


def fingerprint(settings: dict) -> str:
    """A short hash of the score-determining settings (``Detector.settings`` as a dict)."""
    keep = {k: settings.get(k) for k in KEY_SETTINGS}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def row_key(digest: str | None, settings_fingerprint: str) -> str | None:
    """The resume key of one image: its content hash combined with the settings' fingerprint (None: no digest)."""
    if digest is None:
        return None
    return hashlib.sha256(f"{digest}:{settings_fingerprint}".encode()).hexdigest()[:32]


def journal_path(report: str | os.PathLike) -> Path:
    """Where the journal of a report lives: next to it, ``report.csv`` -> ``report.csv.journal.jsonl``."""
    p = Path(report)
    return p.with_name(p.name + ".journal.jsonl")


class Journal:
    """An append-only, fsynced JSON-lines file of finished rows; use as a context manager.

    Opening reads what earlier runs finished (``done``: key -> record), cuts a torn last line and takes an
    exclusive lock, so two runs cannot interleave their rows in one journal. ``fresh=True`` starts it over.
    """

    def __init__(self, path: str | os.PathLike, *, fresh: bool = False):
        self.path = Path(path)
        self.fresh = fresh
        self.done: dict[str, dict] = {}
        self.skipped_lines = 0
        self._file = None
        self._written: set[str] = set()

    def __enter__(self) -> "Journal":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+b")
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise UsageError(f"another memdetect run is writing {display_path(self.path)}; wait for it to "
                                     f"finish or choose another --output") from None
                except OSError as e:  # some network filesystems have no locks: scan anyway
                    log.warning("cannot lock %s (%s); concurrent runs on it will not be detected", self.path, e)
            if self.fresh:
                f.truncate(0)
            else:
                self._load(f)
        except BaseException:
            f.close()
            raise
        self._file = f
        return self

    def _load(self, f) -> None:
        f.seek(0)
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a torn last line: the previous run died while writing it
            log.info("journal %s: dropping a torn last line (%d bytes)", self.path, len(data) - end)
            f.truncate(end)
        for line in data[:end].splitlines():
            try:
                rec = json.loads(line)
                key = rec["key"]
            except (ValueError, KeyError, TypeError):
                self.skipped_lines += 1
                continue
            if isinstance(key, str) and all(isinstance(rec.get(m), (int, float)) for m in METRICS):
                self.done[key] = rec
        self._written = set(self.done)

    def append(self, rows: Iterable[dict]) -> int:
        """Write the keyed rows of one batch, flush and fsync; return how many were written.

        Error rows are not written (they are retried on the next run); a key already in the journal is not written
        twice (two files with the same bytes share one key).
        """
        lines = []
        for r in rows:
            key = r.get("key")
            if key is None or r.get("error") is not None or key in self._written:
                continue
            self._written.add(key)
            rec = {"key": key, "path": r["path"], **{m: r.get(m) for m in METRICS}}
            lines.append(json.dumps(rec, ensure_ascii=True, allow_nan=True) + "\n")
        if lines:
            self._file.write("".join(lines).encode())
            self._file.flush()
            os.fsync(self._file.fileno())
        return len(lines)

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()  # closing releases the lock
            self._file = None


@dataclass
class ScanResult:
    """Rows in file order; how many came from the journal (``resumed``) and were computed now (``computed``)."""

    rows: list[dict]
    resumed: int
    computed: int


def scan_files(det, files: Sequence[os.PathLike], journal: Journal | None = None, *, num_workers: int | None = None,
               on_batch: Callable[[int], None] | None = None) -> ScanResult:
    """Score ``files`` with detector ``det`` (one row each, in order), reusing and extending ``journal``.

    The journal is consulted only when it already holds rows (each file is then hashed once up front); a fresh
    scan hashes files in the loader, next to decoding. Each batch is journaled before the next one is scored.
    """
    rows: list[dict | None] = [None] * len(files)
    todo = list(range(len(files)))
    if journal is not None and journal.done:
        fp = fingerprint(vars(det.settings))
        todo = []
        for i, f in enumerate(files):
            key = row_key(file_digest(f), fp)
            rec = journal.done.get(key) if key else None
            if rec is None:
                todo.append(i)
                continue
            scores = {m: float(rec[m]) for m in METRICS}
            rows[i] = det._row({"path": display_path(f), "error": None, "key": key, "scores": scores})
        if on_batch and len(files) - len(todo):
            on_batch(len(files) - len(todo))
    pos = 0
    for n, batch in enumerate(det.iter_files([files[i] for i in todo], num_workers=num_workers, on_batch=on_batch)):
        log.info("batch %d scored (%d rows)", n + 1, len(batch))
        if journal is not None:
            journal.append(batch)
        for row in batch:
            rows[todo[pos]] = row
            pos += 1
    return ScanResult(rows=rows, resumed=len(files) - len(todo), computed=len(todo))


__all__ = ["Journal", "ScanResult", "fingerprint", "journal_path", "row_key", "scan_files"]
