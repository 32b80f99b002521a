"""Ray Data: score a dataset on a cluster, one ``Detector`` per actor (``pip install 'memdetect[ray]'``).

    import ray
    from memdetect.integrations.ray import score_dataset
    ds = ray.data.read_binary_files("s3://bucket/day/", include_paths=True)   # columns: bytes, path
    scored = score_dataset(ds, model="sd14", threshold=4.2, concurrency=8)   # a lazy ray.data.Dataset
    scored.write_parquet("s3://bucket/report/")

or from the command line, ``memdetect scan URI... --engine ray [--ray-address ADDR]``, which writes the same report
as a local scan (same rows, same order).

The input dataset has a ``bytes`` column (image file bytes) and/or a ``path`` column (a local path readable on
every worker, an fsspec URL or ``shard.tar::member``, opened with ``memdetect.store.sources.open_source``, URLs allowed:
the dataset is the caller's). ``memdetect scan --engine ray`` resolves the inputs on the driver (remote URLs only
with ``--allow-remote``) and adds a ``ref`` column (``memdetect.store.sources.item_ref``: the real path's bytes, the tar
member's place), which the workers open instead of the displayed name. Each row of
the output has the report's columns (``memdetect.store.report.COLUMNS``) plus the input's other columns (``bytes``
dropped); a bad image is an error row. Scoring is a ``map_batches`` over an actor pool of ``concurrency`` actors,
each loading the model once, on a GPU when the cluster has GPUs (``num_gpus``, default: 1 per actor if the
cluster has any). Rows are keyed as ``memdetect.workflows.scan`` keys them (the image bytes, the settings, the weights'
content hash). The Ray engine keeps no journal: Ray Data retries failed tasks itself, and a rerun scores again.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from typing import Any

import numpy as np
import pandas as pd

from ..errors import UsageError

log = logging.getLogger(__name__)


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise UsageError("--engine ray needs Ray Data: pip install 'memdetect[ray]'") from None
    return ray


class Scorer:
    """The actor: one ``Detector`` (``Detector.from_pretrained(model, model_path, **detector_kwargs)``), called on
    pandas batches. ``retain_freed_memory``: apply the CLI's CPU allocator setting in the actor too (it is part of
    the settings, hence of every row's key)."""

    def __init__(self, model: str, model_path: str | None, detector_kwargs: dict, retain_freed_memory: bool = False):
        from ..speed import runtime
        from ..detector import Detector
        from ..store.journal import fingerprint
        from ..store.state import StateDir

        if retain_freed_memory:
            runtime.retain_freed_memory()
        self.det = Detector.from_pretrained(model, model_path, **detector_kwargs)
        self.fp = fingerprint(asdict(self.det.settings), weights=self.det.weights_digest(StateDir()))

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        import torch

        from ..detector import frame_scores
        from ..store.io import ImageError, content_digest, decode_frames, image_seed
        from ..store.journal import row_key
        from ..store.report import COLUMNS, METRIC_COLUMNS
        from ..store.sources import from_ref, open_source, read_item
        from ..text import printable

        det = self.det
        has_bytes, has_path, has_ref = "bytes" in batch.columns, "path" in batch.columns, "ref" in batch.columns
        items = []
        for j in range(len(batch)):
            path = str(batch["path"].iloc[j]) if has_path else None
            it = {"path": path, "pixels": None, "error": None, "digest": None}
            try:
                if has_bytes:
                    data = batch["bytes"].iloc[j]
                else:  # the driver's reference of what it resolved (a name cannot always be opened again)
                    item = from_ref(str(batch["ref"].iloc[j])) if has_ref else open_source(path, allow_remote=True)
                    data = read_item(item)
                if data is None:
                    raise ImageError("no bytes")
                data = bytes(data)
                it["digest"] = content_digest(data)
                if it["path"] is None:
                    it["path"] = f"bytes:{it['digest'][:16]}"
                it["pixels"] = decode_frames(data, det.adapter.resolution)
            except ImageError as e:
                it["error"] = str(e)
            except Exception as e:  # one bad row never stops the batch
                it["error"] = printable(f"{type(e).__name__}: {e}", 300)
            if it["path"] is None:
                it["path"] = f"row:{j}"
            items.append(it)
        frames = [f for it in items if it["error"] is None for f in it["pixels"]]  # every frame, as a local scan
        scores: dict[str, list[float]] = {}
        for start in range(0, len(frames), det.batch_size):
            chunk = frames[start:start + det.batch_size]
            s = det.score_tensor(torch.from_numpy(np.stack(chunk)), [image_seed(f, det.seed) for f in chunk])
            for k, v in s.items():
                scores.setdefault(k, []).extend(float(x) for x in v)
        rows, n = [], 0
        for it in items:
            key = row_key(it["digest"], self.fp)
            if it["error"] is None:
                m = len(it["pixels"])
                best, where = frame_scores({k: np.asarray(v[n:n + m]) for k, v in scores.items()})
                rows.append(det.row(it["path"], best, key=key, frames=where))
                n += m
            else:
                rows.append(det.row(it["path"], None, error=it["error"], key=key))
        out = pd.DataFrame(rows, columns=COLUMNS)
        for c in ("score", *METRIC_COLUMNS):  # floats even in a batch of error rows only (all None)
            out[c] = out[c].astype("float64")
        out["memorized"] = out["memorized"].astype(object)
        out["frame"] = out["frame"].astype(object)
        for c in batch.columns:
            if c not in ("bytes", "ref", *COLUMNS):
                out[c] = batch[c].to_numpy()
        return out


def score_dataset(ds, model: str = "demo", model_path: str | None = None, *, concurrency: int = 1,
                  num_gpus: float | None = None, rows_per_batch: int | None = None,
                  retain_freed_memory: bool = False, **detector_kwargs: Any):
    """Score a ``ray.data.Dataset`` of images (``bytes`` and/or ``path`` columns) with ``concurrency`` actors, one
    ``Detector`` each; returns the lazy scored ``ray.data.Dataset`` (report columns plus the input's others).
    ``rows_per_batch``: rows per ``map_batches`` call (default: 4 detector batches, 64 when unknown)."""
    ray = _ray()
    if concurrency < 1:
        raise UsageError("concurrency must be at least 1")
    if num_gpus is None:
        num_gpus = 1 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1 else 0
        if num_gpus:
            detector_kwargs.setdefault("device", "cuda")
    rows = rows_per_batch or 4 * int(detector_kwargs.get("batch_size") or 16)
    strategy = getattr(ray.data, "ActorPoolStrategy", None)
    pool = {"compute": strategy(size=concurrency)} if strategy is not None else {"concurrency": concurrency}
    return ds.map_batches(Scorer, fn_constructor_kwargs={"model": model, "model_path": model_path,
                                                         "detector_kwargs": detector_kwargs,
                                                         "retain_freed_memory": retain_freed_memory},
                          batch_size=rows, batch_format="pandas", num_gpus=num_gpus, **pool)


def scan_with_ray(det, paths, *, model: str, model_path: str | None, output=None, html=None, shard=None,
                  address: str | None = None, concurrency: int | None = None, on_batch=None, reference=None,
                  shard_key: bytes | None = None, allow_remote: bool = False, **detector_kwargs):
    """``memdetect scan --engine ray``: resolve ``paths`` here (``memdetect.store.sources``), score them on Ray (joining
    ``address``, or ``RAY_ADDRESS``, else a local Ray), and write the report a local scan would write (rows in
    input order). ``det``: the driver's detector, loaded with the same options (its settings go into the report;
    ``detector_kwargs`` are those options, given to every actor; ``reference``: the config's reference scores, for
    the ``p_value`` and ``percentile`` columns). Returns a ``memdetect.workflows.scan.ScanResult``."""
    from ..store import report
    from ..speed import runtime
    from ..errors import InputError
    from ..workflows.html_report import write_html
    from ..store.io import check_destinations, check_report_path, display_path
    from ..workflows.scan import ScanResult
    from ..store.sources import inputs_digest, is_url, item_name, item_ref, resolve, shard as shard_of
    from ..store.state import StateDir

    ray = _ray()
    if output is not None:
        check_report_path(output)
    check_destinations({"report": None if output is None or is_url(str(output)) else output, "HTML report": html})
    everything = resolve(paths, allow_remote=allow_remote)
    if not everything:
        raise InputError(f"no image files found under {', '.join(display_path(p) for p in paths)}")
    items = shard_of(everything, *shard) if shard is not None else everything
    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False,
                 include_dashboard=False, logging_level=logging.WARNING)
    if concurrency is None:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        concurrency = max(1, gpus) if gpus else 1
    ds = ray.data.from_items([{"path": item_name(it), "ref": item_ref(it), "index": i} for i, it in enumerate(items)])
    scored = score_dataset(ds, model=model, model_path=model_path, concurrency=concurrency,
                           retain_freed_memory=runtime.retained(), **detector_kwargs)
    frames, done = [], 0
    for batch in scored.iter_batches(batch_format="pandas"):
        frames.append(batch)
        done += len(batch)
        if on_batch:
            on_batch(done, len(items))
    df = pd.concat(frames, ignore_index=True).sort_values("index", kind="stable")
    if len(df) != len(items) or list(df["index"]) != list(range(len(items))):
        raise RuntimeError(f"Ray returned {len(df)} rows for {len(items)} inputs")
    frame = report.rows_to_frame(df[report.COLUMNS].astype(object).where(df[report.COLUMNS].notna(), None)
                                 .to_dict("records"))
    if reference is not None:
        frame = report.add_p_values(frame, reference)
    weights = det.weights_digest(StateDir())
    settings_dict = {**asdict(det.settings), "weights": weights}
    inputs = inputs_digest(everything) if shard is not None else None
    if output is not None:
        written, written_settings = frame, settings_dict
        if shard is not None:
            from ..workflows.merge import mark_shard

            written, written_settings = mark_shard(frame, settings_dict, shard, inputs, key=shard_key,
                                                   suffix=os.path.splitext(str(output))[1].lower())
        report.write_anywhere(written, output, written_settings)
    html_path = write_html(frame, html, settings_dict) if html is not None else None
    return ScanResult(frame, tuple(), det.settings, resumed=0, computed=len(frame), output=output, html=html_path,
                      weights=weights, shard=shard, inputs=inputs)


__all__ = ["Scorer", "scan_with_ray", "score_dataset"]
