"""A whole scan, once and in one direction: discover the files, reuse the journal, score the rest, write the report.

    from memdetect import Detector
    from memdetect.workflows.scan import scan
    result = scan(Detector.from_pretrained("demo"), ["generated/"], output="report.csv", html="report.html")
    result.frame                                       # one row per file, in discovery order
    result.resumed, result.computed                    # rows taken from the journal, rows scored now

Every destination (report, HTML) is checked before any image is read (``io.check_destinations``). With an
``output``, every batch's rows are appended to a journal as soon as they are scored (``memdetect.store.journal``): beside
the report (``<output>.journal.jsonl``) or, with ``journal_in_state=True`` (``memdetect audit``), in the state
directory (``memdetect.store.state``), keyed by the settings, the weights' content hash and the report path. Journal rows
are signed with the state directory's secret; rows that do not verify are scored again. A rerun with
``resume=True`` scores only the files whose key is not in the journal: each file's bytes are then hashed up front to
look its key up, and a file that must be scored is read again by the loader, which hashes and decodes the same bytes
(so a file replaced in between is keyed by what was scored). The report is written atomically at the end; the HTML
page (``memdetect.workflows.html_report``) too.

With a ``reference`` (the config's reference scores of the detector's metric, ``memdetect.core.pvalues.Reference``) the
rows get ``p_value`` and ``percentile`` columns. With an HTML page or ``evidence_json``, the top ``evidence_top``
flagged images get their evidence (``memdetect.workflows.evidence``; ``channels``: the config's per-channel reference
statistics; ``reference_dir``: a folder to search for each flagged image's nearest copies).

Row keys hash the image bytes, the settings and the weights' content hash (``Detector.weights_digest``).
"""

from __future__ import annotations

import logging
import os
from contextlib import closing, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import pandas as pd

from . import evidence as _evidence
from ..store import report
from ..detector import Detector, Settings
from ..errors import InputError
from .html_report import write_html
from ..core.pvalues import Reference
from ..store.io import check_destinations, check_report_path, display_path, file_digest
from ..store.journal import Journal, fingerprint, journal_path, record_frames, record_scores, row_key, scan_record
from ..store.sources import (Source, inputs_digest, is_url, item_digest, item_identity, item_name, resolve,
                      shard as shard_of)
from ..store.state import StateDir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScanResult(report.Counted):
    """One row per file in discovery order (``frame``), the settings that produced them, how many rows came from
    the journal (``resumed``) and were scored now (``computed``), whether the journal was read (``resume``), how
    many of its rows failed verification (``rejected``), the weights' content hash (``weights``), and the files
    written."""

    frame: pd.DataFrame
    files: Sequence
    settings: Settings
    resumed: int
    computed: int
    output: Path | None = None
    html: Path | None = None
    journal: Path | None = None
    resume: bool = False
    rejected: int = 0
    weights: str | None = None
    evidence: dict | None = None
    evidence_json: Path | None = None
    shard: tuple[int, int] | None = None
    inputs: str | None = None
    configuration: str | None = None  # where layer/timestep/metric came from (``Detector.configuration``)

    @property
    def settings_dict(self) -> dict:
        """The settings as written into reports: ``Settings`` plus the weights' content hash (and, from a config,
        where its layer, timestep and metric came from)."""
        return {**asdict(self.settings), "weights": self.weights,
                **({"configuration": self.configuration} if self.configuration else {})}


def scan(detector: Detector, paths: Iterable[str | os.PathLike], *, output: str | os.PathLike | None = None,
         resume: bool = True, html: str | os.PathLike | None = None,
         on_batch: Callable[[int, int], None] | None = None, num_workers: int | None = None,
         state_dir: str | os.PathLike | StateDir | None = None, journal_in_state: bool = False,
         on_features: Callable | None = None, reference: Reference | None = None,
         channels: dict | None = None, evidence_top: int = _evidence.TOP,
         evidence_json: str | os.PathLike | None = None,
         reference_dir: str | os.PathLike | None = None,
         shard: tuple[int, int] | None = None, shard_key: bytes | None = None, allow_remote: bool = False,
         errors_fail: bool = False, allow_empty: bool = False, sniff: bool = False,
         context: Mapping | None = None) -> ScanResult:
    """Score every image file under ``paths`` with ``detector``.

    ``output``: the report (.csv, .json or .parquet), with its journal; ``resume=False`` starts the journal over
    (nothing is read from it). ``html``: also a self-contained HTML report. ``state_dir``: the state directory
    (journal secret, weight-hash cache; default ``memdetect.store.state.default_state_dir()``); ``journal_in_state``:
    keep the journal there instead of beside the report (always so for a report at a URL). ``paths``: local files
    and folders, fsspec URLs, tar shards and manifests (``memdetect.store.sources.resolve``). ``shard=(i, n)``: score only
    the ``i``-th (0-based) of ``n`` contiguous parts of the inputs; the report then carries the shard's marks
    (``memdetect.workflows.merge``; with ``shard_key``, a MAC that ``merge`` verifies), and ``memdetect merge`` joins the parts
    into the report one process would have written.
    ``on_batch(done, total)``: progress, called once the journal's rows are taken and after each scored batch.
    ``reference``, ``channels``, ``evidence_top``, ``evidence_json``, ``reference_dir``: p-values and evidence (module
    docstring; evidence images are read for local files only). ``allow_remote``: inputs and manifest rows may name
    URLs other than ``file://`` (``memdetect.store.sources.resolve``). ``sniff``: folders and tar shards are searched by
    content too, not only by image suffix (``resolve``; ``memdetect audit``); when a file was found so, the report
    has a ``found_by`` column after ``path`` (``content`` or ``name``). ``errors_fail``: the HTML page says error
    rows were not checked (``memdetect audit``). ``context``: the run context the HTML page shows (default:
    ``memdetect.workflows.run_context.run_context`` of ``paths``). Raises InputError when ``paths`` hold no image file
    and UsageError for a destination that cannot be written (before any image is read); ``allow_empty=True``: no
    image file is an empty result (and an empty report) instead.
    """
    paths = list(paths)
    remote_output = output is not None and is_url(str(output))
    if output is not None:
        check_report_path(output)
        output = str(output) if remote_output else Path(output)
    check_destinations({"report": None if remote_output else output, "HTML report": html,
                        "evidence JSON": evidence_json})
    if reference_dir is not None and not Path(reference_dir).is_dir():
        raise InputError(f"--reference-dir {display_path(reference_dir)} is not a folder")
    if evidence_top < 0:
        raise InputError(f"the number of images with evidence must be 0 or more, got {evidence_top}")
    everything = resolve(paths, allow_remote=allow_remote, sniff=sniff)
    if not everything and not allow_empty:
        raise InputError(f"no image files found under {', '.join(display_path(p) for p in paths)} (`memdetect "
                         f"audit --allow-empty` passes when there are none)")
    files = shard_of(everything, *shard) if shard is not None else everything
    state = state_dir if isinstance(state_dir, StateDir) else StateDir(state_dir)
    state.check_outside(paths)  # its secret must not sit in the tree under scan
    settings = detector.settings
    weights = detector.weights_digest(state)
    fp = fingerprint(asdict(settings), weights=weights)
    jpath = None
    if output is not None:
        jpath = state.journal_path(fp, output) if journal_in_state or remote_output else journal_path(output)
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if on_batch:
            on_batch(done, len(files))

    rows: list[dict | None] = [None] * len(files)
    todo: Sequence[int] = range(len(files))  # no list, no item built, before the first image
    journal_cm = Journal(jpath, fresh=not resume, secret=state.secret()) if jpath is not None else nullcontext()
    with journal_cm as journal:
        if journal is not None and journal.done:
            todo = []
            for i, f in enumerate(files):
                key = row_key(item_digest(f) if isinstance(f, Source) else file_digest(f), fp)
                scores = _reusable(journal, key)
                if scores is None:
                    todo.append(i)  # read, hashed and decoded again by the loader: keyed by what it scores
                else:
                    rows[i] = detector.row(item_name(f), scores, key=key, frames=record_frames(journal.done[key]))
            if len(files) > len(todo):
                advance(len(files) - len(todo))
        if on_batch and done == 0:
            on_batch(0, len(files))  # the total, before the first batch (a progress bar knows it from the start)
        pos = 0
        pending = files if len(todo) == len(files) else (
            files.take(todo) if hasattr(files, "take") else [files[i] for i in todo])
        batches = detector.iter_files(pending, fingerprint=fp, num_workers=num_workers,
                                      on_batch=advance, on_features=on_features)
        with closing(batches):  # an interrupt stops the decoding workers here, not at garbage collection
            for n, batch in enumerate(batches):
                log.info("batch %d scored (%d rows)", n + 1, len(batch))
                if journal is not None:  # a key is written once: two files with the same bytes share it
                    records = {rec["key"]: rec for rec in map(scan_record, batch)
                               if rec is not None and not _reusable(journal, rec["key"])}
                    journal.append(records.values())
                for row in batch:
                    rows[todo[pos]] = row
                    pos += 1
        rejected = journal.rejected if journal is not None else 0
    frame = report.rows_to_frame(rows)
    if getattr(everything, "by_content", None):  # say which files were images by their bytes, not their name
        sniffed = everything.by_content
        frame.insert(1, "found_by", pd.array(["content" if item_identity(f) in sniffed else "name" for f in files],
                                             dtype="string"))
    if reference is not None:
        frame = report.add_p_values(frame, reference)
    resumed = len(files) - len(todo)
    configuration = getattr(detector, "configuration", None)
    settings_dict = {**asdict(settings), "weights": weights,
                     **({"configuration": configuration} if configuration else {})}
    inputs = inputs_digest(everything) if shard is not None else None
    if output is not None:
        if shard is not None:
            from .merge import mark_shard

            written, written_settings = mark_shard(frame, settings_dict, shard, inputs, key=shard_key,
                                                   suffix=os.path.splitext(str(output))[1].lower())
        else:
            written, written_settings = frame, settings_dict
        report.write_anywhere(written, output, written_settings)
    by_name = ({item_name(f): f for f in files if isinstance(f, Path)}
               if html is not None or evidence_json is not None else {})
    ev = None
    if html is not None or evidence_json is not None:
        ev = _evidence.collect(detector, frame, by_name, top=evidence_top, reference=reference, channels=channels,
                               reference_dir=reference_dir)
    if evidence_json is not None:
        evidence_json = _evidence.write_json(ev, evidence_json)
    html_path = None
    if html is not None:
        from .run_context import run_context

        html_path = write_html(frame, html, settings_dict, files=by_name, resumed=resumed, evidence=ev,
                               not_checked=errors_fail, context=context if context is not None else run_context(
                                   p for p in paths if isinstance(p, (str, os.PathLike))))
    return ScanResult(frame, files, settings, resumed=resumed, computed=len(todo), output=output,
                      html=html_path, journal=jpath, resume=bool(resume and jpath is not None), rejected=rejected,
                      weights=weights, evidence=ev, evidence_json=evidence_json, shard=shard, inputs=inputs,
                      configuration=configuration)


def _reusable(journal: Journal, key: str | None) -> dict[str, float] | None:
    """The scores the journal holds for ``key``, when it holds a complete record of them."""
    rec = journal.done.get(key) if key is not None else None
    return record_scores(rec) if rec is not None else None


__all__ = ["ScanResult", "scan"]
