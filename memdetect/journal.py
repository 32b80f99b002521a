"""Journals: append-only, fsynced JSON-lines files of finished work, and the keys that say what is finished.

Why: a CI scan over thousands of images (or a benchmark over thousands of generations) can be killed part-way (job
timeouts, preemption, OOM killer, SIGKILL). Each batch's records are appended to the journal as soon as they are
computed, then flushed and fsynced, so a kill loses at most the batch in flight; a rerun reads the journal and
skips what it holds. ``memdetect.scan`` keeps a scan's journal next to its report (``journal_path``);
``memdetect.bench.paper`` keeps one per process in its output folder.

File format: one JSON object per line with a string ``key``; the last record of a key wins. A torn last line (the
process died mid-write) is cut off when the journal is opened for writing; unparseable lines are skipped. An open
journal holds an exclusive lock, so two runs cannot interleave their lines in one file.

Scan records (``scan_record``): ``{"key", "path", <every score>}``. The key of an image is a hash of its file's
bytes (sha256) and of every setting that changes a score (``fingerprint`` of ``KEY_SETTINGS``): model name and
source, family, layer, timestep, sigma, pooling, seed, preprocessing recipe, resolution, dtype, the speed settings
(Winograd convolutions, the allocator) and memdetect version. Deliberately *not* in the key:

* metric and threshold: records keep every metric; ``score`` and ``memorized`` are re-derived on reuse, so a
  recalibrated threshold reuses the journal;
* the path: a renamed or copied image is not scored again;
* device and batch size: scores agree to float tolerance;
* the weights' bytes (hashing SD's 4 GB per run is too slow): after changing the weights behind the same name or
  folder, rerun with ``--no-resume``.

Only scored rows are journaled. A file that could not be read is tried again on every run: that costs a decode
attempt, not a forward pass, and a failure that was transient (a file still being written, a full disk, memory)
must not stick.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Iterable

from .errors import UsageError
from .io import display_path
from .scores import SCORES

try:  # POSIX advisory locks; on other platforms concurrent runs are simply not detected
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

log = logging.getLogger(__name__)

#: Settings that change a score (see the module docstring for what is left out and why).
KEY_SETTINGS = ("model", "source", "family", "layer", "timestep", "sigma", "pooling", "seed", "preprocess",
                "resolution", "dtype", "winograd", "allocator", "memdetect")


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


def scan_record(row: dict) -> dict | None:
    """The journal record of a scan's report row: key, path and every score; None for a row that is not journaled
    (an error row, or a file without a key)."""
    if row.get("key") is None or row.get("error") is not None:
        return None
    return {"key": row["key"], "path": row["path"], **{m: row.get(m) for m in SCORES}}


def record_scores(record: dict) -> dict[str, float] | None:
    """The scores of a scan record, or None when it does not hold a number for every score (not reusable)."""
    values = {m: record.get(m) for m in SCORES}
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values.values()):
        return None
    return {m: float(v) for m, v in values.items()}


def _parse(data: bytes, source: Path) -> tuple[dict[str, dict], int]:
    """The records of the complete lines of ``data`` (last one per key wins) and how many lines were skipped."""
    done: dict[str, dict] = {}
    skipped = 0
    for line in data[: data.rfind(b"\n") + 1].splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            skipped += 1
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("key"), str):
            skipped += 1
            continue
        done[rec["key"]] = rec
    if skipped:
        log.info("journal %s: %d unreadable line(s) skipped", source, skipped)
    return done, skipped


def read_journals(paths: Iterable[str | os.PathLike]) -> dict[str, dict]:
    """The records of several journals (for example one per process), read without locking; later files win."""
    done: dict[str, dict] = {}
    for path in paths:
        p = Path(path)
        if p.is_file():
            done.update(_parse(p.read_bytes(), p)[0])
    return done


class Journal:
    """One journal file, opened for appending; use as a context manager.

    Opening reads what earlier runs finished (``done``: key -> record), cuts a torn last line and takes an
    exclusive lock. ``fresh=True`` starts the file over.
    """

    def __init__(self, path: str | os.PathLike, *, fresh: bool = False):
        self.path = Path(path)
        self.fresh = fresh
        self.done: dict[str, dict] = {}
        self.skipped_lines = 0
        self._file = None

    def __enter__(self) -> "Journal":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+b")
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise UsageError(f"another memdetect run is writing {display_path(self.path)}; wait for it to "
                                     f"finish or choose another output") from None
                except OSError as e:  # some network filesystems have no locks: go on anyway
                    log.warning("cannot lock %s (%s); concurrent runs on it will not be detected", self.path, e)
            if self.fresh:
                f.truncate(0)
            else:
                f.seek(0)
                data = f.read()
                end = data.rfind(b"\n") + 1
                if end < len(data):  # a torn last line: the previous run died while writing it
                    log.info("journal %s: dropping a torn last line (%d bytes)", self.path, len(data) - end)
                    f.truncate(end)
                self.done, self.skipped_lines = _parse(data, self.path)
        except BaseException:
            f.close()
            raise
        self._file = f
        return self

    def append(self, records: Iterable[dict]) -> int:
        """Write ``records`` (dicts with a string ``key``) as one flushed and fsynced batch; return how many."""
        lines = []
        for rec in records:
            if not isinstance(rec.get("key"), str):
                raise ValueError(f"a journal record needs a string key, got {rec.get('key')!r}")
            lines.append(json.dumps(rec, ensure_ascii=True, allow_nan=True) + "\n")
            self.done[rec["key"]] = rec
        if lines:
            self._file.write("".join(lines).encode())
            self._file.flush()
            os.fsync(self._file.fileno())
        return len(lines)

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()  # closing releases the lock
            self._file = None


__all__ = ["Journal", "KEY_SETTINGS", "fingerprint", "journal_path", "read_journals", "record_scores", "row_key",
           "scan_record"]
