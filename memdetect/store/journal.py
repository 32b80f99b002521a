"""Journals: append-only, fsynced JSON-lines files of finished work, and the keys that say what is finished.

Why: a CI scan over thousands of images (or a benchmark over thousands of generations) can be killed part-way (job
timeouts, preemption, OOM killer, SIGKILL). Each batch's records are appended to the journal as soon as they are
computed, then flushed and fsynced, so a kill loses at most the batch in flight; a rerun reads the journal and
skips what it holds. ``memdetect.workflows.scan`` keeps a scan's journal next to its report (``journal_path``), or for
``memdetect audit`` in the state directory (``memdetect.store.state``); ``memdetect.bench.paper`` keeps one per process in
its output folder.

File format: one JSON object per line with a string ``key``; the last record of a key wins. A torn last line (the
process died mid-write) is cut off when the journal is opened for writing; unparseable lines are skipped. An open
journal holds an exclusive lock, so two runs cannot interleave their lines in one file.

Trust: a journal decides which images are *not* scored again, so whoever can write it could make memorized images
pass. A scan's journal is therefore signed: opened with a ``secret`` (the state directory's, ``memdetect.store.state``),
every record carries ``"mac"``, HMAC-SHA256 over ``MAC_CONTEXT`` and the record's canonical JSON (sorted keys, no
spaces, ASCII, without the ``mac`` field). On reading, a record whose MAC does not verify (written by anyone else,
edited, or copied from another state directory) is dropped (``rejected``) and its image is scored again. A journal
is never opened through a symbolic link (``O_NOFOLLOW``) and must be a regular file with no other hard link. Without
a secret (the benchmarks) records are neither signed nor checked.

Scan records (``scan_record``): ``{"key", "path", <every score>, "mac"}``, plus ``"frames"`` (the frame each score
came from) for an image with several frames. The key of an image is a hash of its
file's bytes (sha256) and of everything that changes a score (``fingerprint``): the settings in ``KEY_SETTINGS``
(model name and source, family, layer, timestep, sigma, pooling, seed, preprocessing recipe, resolution, dtype, the
speed settings (Winograd convolutions, the allocator), memdetect version, the number of noise draws when not 1 and
the reference normalisation when there is one) and, for a resumable scan, the content hash of the model's weights
(``memdetect.store.state``). Deliberately *not* in the key:

* metric and threshold: records keep every metric; ``score`` and ``memorized`` are re-derived on reuse, so a
  recalibrated threshold reuses the journal;
* the path: a renamed or copied image is not scored again;
* device and batch size: scores agree to float tolerance.

Only scored rows are journaled. A file that could not be read is tried again on every run: that costs a decode
attempt, not a forward pass, and a failure that was transient (a file still being written, a full disk, memory)
must not stick.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import logging
import os
import stat
from pathlib import Path
from typing import Iterable

from ..errors import UsageError
from .io import display_path
from ..core.scores import SCORES
from ..settings import KEY_FIELDS, Settings

try:  # POSIX advisory locks; on other platforms concurrent runs are simply not detected
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

log = logging.getLogger(__name__)

#: Settings that change a score (see the module docstring for what is left out and why): ``Settings``' key fields.
KEY_SETTINGS = KEY_FIELDS


#: What a record's MAC is computed over, before its canonical JSON (a version: the format can change).
MAC_CONTEXT = b"memdetect journal record v1\n"
MAC_FIELD = "mac"
#: Lines longer than this are never written by memdetect: they are skipped unread.
MAX_LINE = 64 * 1024
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def fingerprint(settings: dict, weights: str | None = None) -> str:
    """A short hash of the score-determining settings (``Detector.settings`` as a dict) and, when given, of the
    weights' content hash (``memdetect.store.state``)."""
    # draws and normalise (by digest) only when not the default: one draw, no normalisation keep the old keys
    keep = Settings.written("key", settings)
    if weights is not None:
        keep["weights"] = weights
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def record_mac(record: dict, secret: bytes) -> str:
    """HMAC-SHA256 (hex) of a journal record without its ``mac`` field (see the module docstring)."""
    body = json.dumps({k: v for k, v in record.items() if k != MAC_FIELD}, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True, allow_nan=True)
    return hmac.new(secret, MAC_CONTEXT + body.encode("ascii"), hashlib.sha256).hexdigest()


def verified(record: dict, secret: bytes) -> bool:
    """Whether ``record`` carries a MAC made with ``secret`` over exactly its other fields."""
    mac = record.get(MAC_FIELD)
    return isinstance(mac, str) and hmac.compare_digest(mac, record_mac(record, secret))


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
    rec = {"key": row["key"], "path": row["path"], **{m: row.get(m) for m in SCORES}}
    if row.get(FRAMES_FIELD):
        rec["frames"] = row[FRAMES_FIELD]
    return rec


#: A report row's private field (not a column) with the frame each score came from, for an image of several frames.
FRAMES_FIELD = "_frames"


def record_frames(record: dict) -> dict[str, int] | None:
    """The frame each score of a scan record came from (None: a still image, or not recorded)."""
    frames = record.get("frames")
    if not isinstance(frames, dict):
        return None
    return {m: int(v) for m, v in frames.items() if m in SCORES and isinstance(v, int) and not isinstance(v, bool)}


def record_scores(record: dict) -> dict[str, float] | None:
    """The scores of a scan record, or None when it does not hold a number for every score (not reusable)."""
    values = {m: record.get(m) for m in SCORES}
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values.values()):
        return None
    return {m: float(v) for m, v in values.items()}


def _record(line: bytes) -> dict | None:
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) and isinstance(rec.get("key"), str) else None


def _parse(data: bytes, source: Path) -> tuple[dict[str, dict], int]:
    """The records of the complete lines of ``data`` (last one per key wins) and how many lines were skipped."""
    done: dict[str, dict] = {}
    skipped = 0
    for line in data[: data.rfind(b"\n") + 1].splitlines():
        rec = _record(line)
        if rec is None:
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
    exclusive lock. ``fresh=True`` starts the file over. With a ``secret``, records are signed when appended and
    only records whose signature verifies are read back (``rejected`` counts the others). The file is created 0600,
    never opened through a symbolic link, and must be a regular file with a single link.
    """

    def __init__(self, path: str | os.PathLike, *, fresh: bool = False, secret: bytes | None = None):
        self.path = Path(path)
        self.fresh = fresh
        self.secret = secret
        self.done: dict[str, dict] = {}
        self.skipped_lines = 0
        self.rejected = 0
        self._file = None

    def _open(self):
        name = display_path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | _NOFOLLOW | _CLOEXEC, 0o600)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UsageError(f"journal {name} is a symbolic link; memdetect does not follow links to its "
                                 f"journals (remove it, or choose another output)") from None
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            what = "not a regular file" if not stat.S_ISREG(st.st_mode) else "has other hard links"
            raise UsageError(f"journal {name} is {what}; remove it, or choose another output")
        return os.fdopen(fd, "a+b")

    def __enter__(self) -> "Journal":
        f = self._open()
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
                end = self._read(f)
                size = os.fstat(f.fileno()).st_size
                if self.secret is not None and (self.rejected or self.skipped_lines):
                    self._rewrite(f)  # keep only what verified: the next run need not reject it again
                elif end < size:  # a torn last line: the previous run died while writing it
                    log.info("journal %s: dropping a torn last line (%d bytes)", self.path, size - end)
                    f.truncate(end)
        except BaseException:
            f.close()
            raise
        self._file = f
        return self

    def _read(self, f) -> int:
        """Read the complete lines into ``done`` (streaming, lines over ``MAX_LINE`` skipped unread); returns where
        the last complete line ends."""
        f.seek(0)
        pos = end = 0
        buf = b""
        overlong = False
        for chunk in iter(lambda: f.read(1 << 20), b""):
            start = 0
            while True:
                nl = chunk.find(b"\n", start)
                if nl < 0:
                    if not overlong:
                        buf += chunk[start:]
                        if len(buf) > MAX_LINE:
                            buf, overlong = b"", True
                    break
                if overlong:
                    self.skipped_lines += 1
                    overlong = False
                else:
                    self._take(buf + chunk[start:nl])
                buf = b""
                start = nl + 1
                end = pos + nl + 1
            pos += len(chunk)
        if self.skipped_lines:
            log.info("journal %s: %d unreadable line(s) skipped", self.path, self.skipped_lines)
        if self.rejected:
            log.info("journal %s: %d row(s) not signed by this state directory (written elsewhere, or edited) are "
                     "dropped; their images are scored again", self.path, self.rejected)
        return end

    def _rewrite(self, f) -> None:
        """Replace the file's contents (under the lock) with the verified records, signed."""
        f.truncate(0)
        self._file = f
        records = list(self.done.values())
        self.done = {}
        self.append(records)
        self._file = None

    def _take(self, line: bytes) -> None:
        rec = _record(line) if len(line) <= MAX_LINE else None
        if rec is None:
            self.skipped_lines += 1
        elif self.secret is not None and not verified(rec, self.secret):
            self.rejected += 1
        else:
            rec.pop(MAC_FIELD, None)
            self.done[rec["key"]] = rec

    def append(self, records: Iterable[dict]) -> int:
        """Write ``records`` (dicts with a string ``key``) as one flushed and fsynced batch; return how many."""
        lines = []
        for rec in records:
            if not isinstance(rec.get("key"), str):
                raise ValueError(f"a journal record needs a string key, got {rec.get('key')!r}")
            rec = {k: v for k, v in rec.items() if k != MAC_FIELD}
            line = {**rec, MAC_FIELD: record_mac(rec, self.secret)} if self.secret is not None else rec
            lines.append(json.dumps(line, ensure_ascii=True, allow_nan=True) + "\n")
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


__all__ = ["Journal", "KEY_SETTINGS", "MAC_FIELD", "fingerprint", "journal_path", "read_journals", "record_mac",
           "record_scores", "row_key", "scan_record", "verified"]
