"""A whole scan, once and in one direction: discover the files, reuse the journal, score the rest, write the report.

    from memdetect import Detector
    from memdetect.scan import scan
    result = scan(Detector.from_pretrained("demo"), ["generated/"], output="report.csv", html="report.html")
    result.frame                                       # one row per file, in discovery order
    result.resumed, result.computed                    # rows taken from the journal, rows scored now

With an ``output``, every batch's rows are appended to ``<output>.journal.jsonl`` as soon as they are scored
(``memdetect.journal``), and a rerun with the same settings scores only the files whose key is not there yet: each
file's bytes are then hashed once, up front, and the hash is passed on to the scoring of the files still to do. A
fresh scan hashes the files in the loader, next to decoding them. The report is written atomically at the end; the
HTML page (``memdetect.html_report``) too.
"""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import pandas as pd

from . import report
from .detector import Detector, Settings
from .errors import InputError
from .html_report import write_html
from .io import check_report_path, discover, display_path, file_digest
from .journal import Journal, journal_path, record_scores, row_key, scan_record

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScanResult:
    """One row per file in discovery order (``frame``), the settings that produced them, how many rows came from
    the journal (``resumed``) and were scored now (``computed``), and the files written."""

    frame: pd.DataFrame
    files: tuple[Path, ...]
    settings: Settings
    resumed: int
    computed: int
    output: Path | None = None
    html: Path | None = None

    @property
    def counts(self) -> dict:
        """``images``, ``scored``, ``errored``, ``flagged``."""
        return report.counts(self.frame)

    @property
    def flagged(self) -> bool:
        """Whether any image was flagged memorized (the exit-code contract's 1)."""
        return bool(self.frame["memorized"].fillna(False).any())


def scan(detector: Detector, paths: Iterable[str | os.PathLike], *, output: str | os.PathLike | None = None,
         resume: bool = True, html: str | os.PathLike | None = None,
         on_batch: Callable[[int, int], None] | None = None, num_workers: int | None = None) -> ScanResult:
    """Score every image file under ``paths`` with ``detector``.

    ``output``: the report (.csv, .json or .parquet), with its journal beside it; ``resume=False`` starts the journal
    over. ``html``: also a self-contained HTML report. ``on_batch(done, total)``: progress, called once the journal's
    rows are taken and after each scored batch. Raises InputError when ``paths`` hold no image file.
    """
    paths = list(paths)
    output = check_report_path(output) if output is not None else None
    files = discover(paths)
    if not files:
        raise InputError(f"no image files found under {', '.join(display_path(p) for p in paths)}")
    settings = detector.settings
    fp = detector.fingerprint
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if on_batch:
            on_batch(done, len(files))

    rows: list[dict | None] = [None] * len(files)
    todo = list(range(len(files)))
    digests: list[str | None] | None = None
    with Journal(journal_path(output), fresh=not resume) if output is not None else nullcontext() as journal:
        if journal is not None and journal.done:
            todo, digests = [], []
            for i, f in enumerate(files):
                digest = file_digest(f)
                key = row_key(digest, fp)
                scores = _reusable(journal, key)
                if scores is None:
                    todo.append(i)
                    digests.append(digest)
                else:
                    rows[i] = detector.row(display_path(f), scores, key=key)
            if len(files) > len(todo):
                advance(len(files) - len(todo))
        pos = 0
        for n, batch in enumerate(detector.iter_files([files[i] for i in todo], digests=digests,
                                                      num_workers=num_workers, on_batch=advance)):
            log.info("batch %d scored (%d rows)", n + 1, len(batch))
            if journal is not None:  # a key is written once: two files with the same bytes share it
                records = {rec["key"]: rec for rec in map(scan_record, batch)
                           if rec is not None and not _reusable(journal, rec["key"])}
                journal.append(records.values())
            for row in batch:
                rows[todo[pos]] = row
                pos += 1
    frame = report.rows_to_frame(rows)
    settings_dict = asdict(settings)
    if output is not None:
        report.write(frame, output, settings_dict)
    html_path = None
    if html is not None:
        html_path = write_html(frame, html, settings_dict, files={display_path(f): f for f in files})
    return ScanResult(frame, tuple(files), settings, resumed=len(files) - len(todo), computed=len(todo),
                      output=output, html=html_path)


def _reusable(journal: Journal, key: str | None) -> dict[str, float] | None:
    """The scores the journal holds for ``key``, when it holds a complete record of them."""
    rec = journal.done.get(key) if key is not None else None
    return record_scores(rec) if rec is not None else None


__all__ = ["ScanResult", "scan"]
