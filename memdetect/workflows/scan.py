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

Engines (``engine=``): ``"local"`` scores in this process; ``"torchrun"`` is one rank of a ``torchrun`` /
``accelerate launch`` run (``memdetect.integrations.torchrun``: each rank scans its part with its own report and
journal, rank 0 gathers the parts and writes ``output``); ``"ray"`` scores on a Ray Data actor pool
(``memdetect.integrations.ray``; no journal). Every engine makes its rows with ``memdetect.rows`` and ends in the
same tail here (p-values, the report, evidence, the HTML page), so the three write the same report.
"""

from __future__ import annotations

import logging
import os
from contextlib import closing, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import pandas as pd

from . import evidence as _evidence
from ..store import report
from ..detector import Detector, Settings
from ..errors import InputError, UsageError
from ..integrations import ray as ray_engine, torchrun
from .merge import Part, mark_shard, merge_parts
from .html_report import write_html
from ..core.pvalues import Reference
from ..store.io import check_destinations, check_report_path, display_path, file_digest
from ..store.journal import Journal, journal_path, record_frames, record_scores, row_key, scan_record
from ..store.sources import (Source, inputs_digest, is_url, item_digest, item_identity, item_name, resolve,
                      shard as shard_of)
from ..store.state import StateDir

log = logging.getLogger(__name__)

#: ``scan(..., engine=...)``: this process, one rank of a torchrun / accelerate launch, a Ray Data actor pool
ENGINES = ("local", "torchrun", "ray")


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
         context: Mapping | None = None, engine: str = "local", world: torchrun.World | None = None,
         ray_address: str | None = None, ray_concurrency: int | None = None,
         detector_options: Mapping | None = None) -> ScanResult:
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

    ``engine``: ``"local"``, ``"torchrun"`` or ``"ray"`` (module docstring). ``"torchrun"`` needs an ``output`` and
    a launcher's ``world`` (default: ``torchrun.world()`` from the environment), and no ``shard``; returns the
    merged result on rank 0, the rank's own elsewhere. ``"ray"`` needs ``detector_options``: what every actor loads
    its detector with (``model``, ``model_path`` and the other ``Detector.from_pretrained`` arguments, the same as
    ``detector``'s), and joins ``ray_address`` (default ``RAY_ADDRESS``, else a local Ray) with
    ``ray_concurrency`` actors. Evidence (``evidence_json``, ``reference_dir``, the HTML page's) needs ``"local"``:
    it reads the flagged images again.
    """
    if engine not in ENGINES:
        raise UsageError(f"unknown engine {engine!r}; choose {', '.join(ENGINES)}")
    if engine != "local" and (evidence_json is not None or reference_dir is not None):
        raise UsageError("--evidence-json and --reference-dir need a scan in one process (evidence reads the flagged "
                         "images again): scan the flagged images again without torchrun / --engine ray")
    if engine != "ray" and (ray_address is not None or ray_concurrency is not None):
        raise UsageError("--ray-address needs --engine ray")
    if engine == "ray" and detector_options is None:
        raise UsageError("engine='ray' needs detector_options (model, model_path, ...: what each actor loads)")
    if engine == "torchrun":
        return _scan_ranks(detector, paths, world=world, output=output, html=html, shard=shard, resume=resume,
                           on_batch=on_batch, num_workers=num_workers, state_dir=state_dir,
                           journal_in_state=journal_in_state, on_features=on_features, reference=reference,
                           allow_remote=allow_remote, errors_fail=errors_fail, allow_empty=allow_empty,
                           sniff=sniff, context=context)
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
    fp = detector.row_fingerprint(state)
    jpath = None
    if output is not None and engine == "local":  # the Ray engine keeps no journal (Ray Data retries its tasks)
        jpath = state.journal_path(fp, output) if journal_in_state or remote_output else journal_path(output)
    if engine == "ray":
        frame = ray_engine.score_items(files, address=ray_address, concurrency=ray_concurrency, on_batch=on_batch,
                                       **detector_options)
        resumed, computed, rejected = 0, len(files), 0
    else:
        frame, resumed, computed, rejected = _score_here(detector, files, jpath=jpath, resume=resume, fp=fp,
                                                         secret=state.secret, on_batch=on_batch,
                                                         num_workers=num_workers, on_features=on_features)
    if getattr(everything, "by_content", None):  # say which files were images by their bytes, not their name
        sniffed = everything.by_content
        frame.insert(1, "found_by", pd.array(["content" if item_identity(f) in sniffed else "name" for f in files],
                                             dtype="string"))
    configuration = getattr(detector, "configuration", None)
    settings_dict = {**asdict(settings), "weights": weights,
                     **({"configuration": configuration} if configuration else {})}
    inputs = inputs_digest(everything) if shard is not None else None
    frame, html_path, ev, evidence_json = _finish(
        frame, settings_dict, output=output, html=html, shard=shard, inputs=inputs, shard_key=shard_key,
        reference=reference, resumed=resumed, errors_fail=errors_fail, paths=paths, context=context,
        evidence=None if engine != "local" else dict(detector=detector, files=files, top=evidence_top,
                                                     channels=channels, reference_dir=reference_dir),
        evidence_json=evidence_json)
    return ScanResult(frame, files, settings, resumed=resumed, computed=computed, output=output,
                      html=html_path, journal=jpath, resume=bool(resume and jpath is not None), rejected=rejected,
                      weights=weights, evidence=ev, evidence_json=evidence_json, shard=shard, inputs=inputs,
                      configuration=configuration)


def _score_here(detector: Detector, files: Sequence, *, jpath, resume: bool, fp: str, secret, on_batch,
                num_workers, on_features) -> tuple[pd.DataFrame, int, int, int]:
    """The local engine: the journal's rows where they verify, the others scored in this process
    (``Detector.iter_files``) and journaled batch by batch. Returns the rows' frame, how many were resumed,
    computed, and rejected by the journal."""
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if on_batch:
            on_batch(done, len(files))

    rows: list[dict | None] = [None] * len(files)
    todo: Sequence[int] = range(len(files))  # no list, no item built, before the first image
    journal_cm = Journal(jpath, fresh=not resume, secret=secret()) if jpath is not None else nullcontext()
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
    return report.rows_to_frame(rows), len(files) - len(todo), len(todo), rejected


def _finish(frame: pd.DataFrame, settings_dict: dict, *, output, html, shard, inputs, shard_key, reference,
            resumed: int, errors_fail: bool, paths: Sequence, context: Mapping | None, evidence: dict | None,
            evidence_json) -> tuple[pd.DataFrame, Path | None, dict | None, Path | None]:
    """The tail every engine shares: ``p_value`` and ``percentile`` (with a ``reference``), the report at
    ``output`` (with a shard's marks), the evidence (``evidence``: the arguments of ``evidence.collect``, local
    engine only) and the HTML page. Returns the frame, the HTML page's path, the evidence and its JSON's path."""
    if reference is not None:
        frame = report.add_p_values(frame, reference)
    if output is not None:
        if shard is not None:
            written, written_settings = mark_shard(frame, settings_dict, shard, inputs, key=shard_key,
                                                   suffix=os.path.splitext(str(output))[1].lower())
        else:
            written, written_settings = frame, settings_dict
        report.write_anywhere(written, output, written_settings)
    by_name = ({item_name(f): f for f in evidence["files"] if isinstance(f, Path)}
               if evidence is not None and (html is not None or evidence_json is not None) else {})
    ev = None
    if evidence is not None and (html is not None or evidence_json is not None):
        ev = _evidence.collect(evidence["detector"], frame, by_name, top=evidence["top"], reference=reference,
                               channels=evidence["channels"], reference_dir=evidence["reference_dir"])
    if evidence_json is not None:
        evidence_json = _evidence.write_json(ev, evidence_json)
    html_path = None
    if html is not None:
        from .run_context import run_context

        html_path = write_html(frame, html, settings_dict, files=by_name, resumed=resumed, evidence=ev,
                               not_checked=errors_fail, context=context if context is not None else run_context(
                                   p for p in paths if isinstance(p, (str, os.PathLike))))
    return frame, html_path, ev, evidence_json


def _scan_ranks(detector: Detector, paths: Iterable[str | os.PathLike], *, world: torchrun.World | None, output,
                html, shard, context: Mapping | None, **scan_kwargs) -> ScanResult:
    """``engine="torchrun"``: this rank's part (``shard=(rank, size)``, the rank's own report and journal:
    ``torchrun.rank_output``), gathered on rank 0, which checks the parts as ``memdetect merge`` does and ends in
    the common tail (``_finish``) with the merged rows."""
    w = world if world is not None else torchrun.world()
    if w is None:
        raise UsageError("engine='torchrun' is one rank of a torchrun / accelerate launch, but WORLD_SIZE says this "
                         "process runs alone: launch it with torchrun, or scan with engine='local'")
    if output is None:
        raise UsageError("a scan under torchrun / accelerate needs --output: each rank keeps its part and journal "
                         "beside it, and rank 0 writes the report there")
    if shard is not None:
        raise UsageError("under torchrun / accelerate launch each rank already scores its own part: drop --shard")
    check_report_path(output)
    check_destinations({"report": None if is_url(str(output)) else output, "HTML report": html})
    paths = list(paths)
    with torchrun.Group() as g:  # joined before the scan: a launcher's misconfiguration fails before any image
        mine = scan(detector, paths, output=torchrun.rank_output(output, w.rank, w.size), shard=(w.rank, w.size),
                    **scan_kwargs)
        frame, marked = mark_shard(mine.frame, mine.settings_dict, (w.rank, w.size), mine.inputs)
        gathered = g.gather((Part(frame, marked, f"rank {w.rank}"), mine.resumed, mine.computed, mine.rejected), w)
    if w.rank != 0:
        return mine
    merged, merged_settings = merge_parts([p for p, *_ in gathered])
    resumed = sum(r for _, r, _, _ in gathered)
    merged, html_path, _, _ = _finish(merged, merged_settings, output=output, html=html, shard=None, inputs=None,
                                      shard_key=None, reference=None, resumed=resumed,
                                      errors_fail=scan_kwargs.get("errors_fail", False), paths=paths,
                                      context=context, evidence=None, evidence_json=None)
    log.info("rank 0 merged %d parts into %s", w.size, output)
    return replace(mine, frame=merged, files=(), resumed=resumed, computed=sum(c for *_, c, _ in gathered),
                   rejected=sum(x for *_, x in gathered), output=output, html=html_path, shard=None)


def _reusable(journal: Journal, key: str | None) -> dict[str, float] | None:
    """The scores the journal holds for ``key``, when it holds a complete record of them."""
    rec = journal.done.get(key) if key is not None else None
    return record_scores(rec) if rec is not None else None


__all__ = ["ENGINES", "ScanResult", "scan"]
