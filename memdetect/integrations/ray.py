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
from dataclasses import replace
from typing import Any

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
        from ..store.state import StateDir

        if retain_freed_memory:
            runtime.retain_freed_memory()
        self.det = Detector.from_pretrained(model, model_path, **detector_kwargs)
        self.fp = self.det.row_fingerprint(StateDir())

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from .. import rows as _rows
        from ..store.report import COLUMNS
        from ..store.sources import from_ref, open_source

        resolution = self.det.adapter.resolution
        has_bytes, has_path, has_ref = "bytes" in batch.columns, "path" in batch.columns, "ref" in batch.columns
        items = []
        for j in range(len(batch)):
            path = str(batch["path"].iloc[j]) if has_path else None
            try:
                if has_bytes:
                    data = batch["bytes"].iloc[j]
                    source = None if data is None else bytes(data)
                else:  # the driver's reference of what it resolved (a name cannot always be opened again)
                    source = from_ref(str(batch["ref"].iloc[j])) if has_ref else open_source(path, allow_remote=True)
                it = _rows.load(source, resolution, name=path)
            except Exception as e:  # one bad row never stops the batch
                it = _rows.Item(path or "", error=_rows.error_text(e))
            if path is None and it.digest is None:  # no name and no bytes to name it by
                it = replace(it, name=f"row:{j}")
            items.append(it)
        out = _rows.report_frame(_rows.score(self.det, items, fingerprint=self.fp))
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


def score_items(items, *, model: str, model_path: str | None, address: str | None = None,
                concurrency: int | None = None, on_batch=None, **detector_kwargs) -> pd.DataFrame:
    """The report rows of ``items`` (resolved by ``memdetect.store.sources.resolve``), scored on Ray (joining
    ``address``, or ``RAY_ADDRESS``, else a local Ray) by ``concurrency`` actors (default: one per GPU, else one),
    each a ``Detector.from_pretrained(model, model_path, **detector_kwargs)``: the typed report frame, rows in
    input order. ``on_batch(done, total)``: progress. ``memdetect.workflows.scan.scan(..., engine="ray")`` writes
    the report from them."""
    from .. import rows as _rows
    from ..speed import runtime
    from ..store.report import COLUMNS
    from ..store.sources import item_name, item_ref

    ray = _ray()
    if not items:
        return _rows.report_frame([])
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
    return _rows.report_frame(df[COLUMNS].astype(object).where(df[COLUMNS].notna(), None).to_dict("records"))


__all__ = ["Scorer", "score_dataset", "score_items"]
