"""Evidence for a flag: why this image, how sure, and what it may be a copy of.

For the top ``top`` images of a scan (flagged ones, highest score first; without a threshold, the highest scores)
``collect`` runs the detector's forward pass once more (same noise seed as the scan) and keeps:

* ``channels``: the ``k`` channels with the largest pooled activation (the spikes the score measures), each with the
  reference images' mean and standard deviation of that channel (``[calibration.channels]`` of the config) and the
  z-score ``(value - mean) / std``;
* ``map``: where those channels fire: the layer's activation on its spatial grid (``Detector.activation_maps``: a
  UNet's feature map, a DiT's token grid), averaged over the top channels, ``[h, w]``; the HTML report lays it over
  the image;
* ``reference``: the score's place among the reference (novel) scores: its conformal p-value and percentile
  (``memdetect.core.pvalues``); the document carries the reference histogram once;
* ``nearest`` (with a ``reference_dir``, for example a sample of the training set): the reference images closest by
  the model's pooled features (cosine similarity, top ``nearest``) and by flip-, shift- and colour-cast-invariant
  pixel correlation (``memdetect.core.similarity.nearest_match(..., colour="cast")``, as the shipped ground-truth labels,
  at ``min(resolution, 64)`` px), so a reviewer can tell an exact or tinted copy (pixel correlation near 1) from a
  template copy (close features, lower pixel correlation).

Everything is a JSON-ready dict (``memdetect.workflows.html_report`` renders it; ``scan --evidence-json`` writes it). Names
are kept as they are: every writer escapes them for its place.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from ..detector import Detector
from ..store.io import decode_image, discover, display_path, image_seed, read_file
from ..core.pvalues import Reference
from ..core.scores import SCORES
from ..core.similarity import nearest_match

log = logging.getLogger(__name__)

#: defaults: images with evidence, channels per image, nearest reference images by features, copy-search resolution
TOP, K, NEAREST, PIXEL_RESOLUTION = 20, 8, 3, 64


def _sig(x: float, digits: int = 6) -> float:
    return float(f"{float(x):.{digits}g}")


def select(frame: pd.DataFrame, top: int, flagged_only: bool) -> pd.DataFrame:
    """The rows that get evidence: flagged (or, without a threshold, every scored) rows, highest score first."""
    scored = frame[frame["error"].isna()]
    if flagged_only:
        scored = scored[scored["memorized"].fillna(False).astype(bool)]
    return scored.sort_values("score", ascending=False, kind="stable").head(max(int(top), 0))


def _load(files: Sequence[os.PathLike], resolution: int) -> tuple[list[int], np.ndarray | None]:
    """Decode ``files`` as the scan does; the indices that decoded and their pixels ``[N, 3, R, R]``."""
    ok, pixels = [], []
    for i, f in enumerate(files):
        try:
            pixels.append(decode_image(read_file(f), resolution))
            ok.append(i)
        except Exception as e:  # a file that changed or vanished since the scan: no evidence for it
            log.warning("no evidence for %s: %s", display_path(f), e)
    return ok, (np.stack(pixels) if pixels else None)


def _batches(det: Detector, pixels: np.ndarray):
    for start in range(0, len(pixels), det.batch_size):
        chunk = pixels[start:start + det.batch_size]
        seeds = [image_seed(p, det.seed) for p in chunk]
        yield torch.from_numpy(np.ascontiguousarray(chunk)), seeds


def reference_features(det: Detector, files: Sequence[os.PathLike]) -> tuple[list[str], torch.Tensor,
                                                                            torch.Tensor]:
    """The pooled features of every decodable reference image and its pixels at the copy-search resolution."""
    res = min(det.adapter.resolution, PIXEL_RESOLUTION)
    ok, pixels = _load(files, det.adapter.resolution)
    if pixels is None:
        return [], torch.empty(0), torch.empty(0)
    feats = torch.cat([det.features(x, s) for x, s in _batches(det, pixels)])
    small = _resize(pixels, res)
    return [display_path(files[i]) for i in ok], feats, small


def _resize(pixels: np.ndarray, res: int) -> torch.Tensor:
    x = torch.from_numpy(pixels).float()
    if x.shape[-1] != res:
        x = torch.nn.functional.interpolate(x, size=(res, res), mode="bilinear", align_corners=False, antialias=True)
    return x


def collect(det: Detector, frame: pd.DataFrame, files: Mapping[str, os.PathLike] | None = None, *,
            top: int = TOP, k: int = K, reference: Reference | None = None,
            channels: Mapping[str, Sequence[float]] | None = None,
            reference_dir: str | os.PathLike | None = None, nearest: int = NEAREST) -> dict:
    """The evidence document for ``frame`` (a scan's rows; ``files`` maps a row's path to its file). See the
    module docstring; ``reference``: the config's reference scores of the detector's metric; ``channels``: the
    config's per-channel reference ``mean`` and ``std``."""
    flagged_only = det.threshold is not None
    rows = select(frame, top, flagged_only)
    doc: dict = {"selected": "flagged" if flagged_only else "highest", "top": int(top), "k": int(k),
                 "metric": det.metric, "layer": str(det.layer), "threshold": det.threshold,
                 "reference": None, "channel_reference": channels is not None, "reference_dir": None, "images": []}
    if reference is not None:
        edges, counts = reference.histogram()
        doc["reference"] = {"n": reference.n, "exact": reference.exact, "edges": [_sig(e) for e in edges],
                            "counts": counts}
    if not len(rows):
        return doc
    paths = list(rows["path"])
    ok, pixels = _load([(files or {}).get(p, p) for p in paths], det.adapter.resolution)
    if pixels is None:
        return doc
    grids = torch.cat([det.activation_maps(x, s) for x, s in _batches(det, pixels)])  # [N, C, h, w]
    pooled = grids.flatten(2).amax(dim=2)  # = the scan's pooled features (spatial-max / token-max)
    recomputed = SCORES[det.metric](pooled).numpy()
    if det.draws != 1 or det.normalise is not None:  # the maps are one draw's raw activations; the score is not
        recomputed = np.concatenate([det.score_tensor(x, s)[det.metric] for x, s in _batches(det, pixels)])
    mean = np.asarray(channels["mean"], np.float64) if channels is not None else None
    std = np.asarray(channels["std"], np.float64) if channels is not None else None
    if mean is not None and mean.size != pooled.shape[1]:
        log.warning("the config's channel statistics have %d channels, the layer %d: not used", mean.size,
                    pooled.shape[1])
        mean = std = None
        doc["channel_reference"] = False
    for j, i in enumerate(ok):
        r = rows.iloc[i]
        v = pooled[j].double().numpy()
        order = np.argsort(-v, kind="stable")[:k]
        chans = []
        for c in order:
            item = {"channel": int(c), "value": _sig(v[c])}
            if mean is not None:
                z = (v[c] - mean[c]) / std[c] if std[c] > 0 else None
                item.update(reference_mean=_sig(mean[c]), reference_std=_sig(std[c]),
                            z=None if z is None else _sig(z, 4))
            chans.append(item)
        grid = grids[j, torch.as_tensor(order.copy())].mean(dim=0).double().numpy()
        ev = {"path": r["path"], "score": float(r["score"]), "score_recomputed": _sig(recomputed[j]),
              "channels": chans,
              "map": {"shape": list(grid.shape), "channels": [int(c) for c in order],
                      "values": [[_sig(x, 4) for x in row] for row in grid]}}
        if not np.isclose(recomputed[j], r["score"], rtol=1e-3, atol=1e-6):
            ev["note"] = "the file's score now differs from the report's: it changed after the scan"
        if reference is not None:
            ev["p_value"] = _sig(reference.p_values([r["score"]])[0])
            ev["percentile"] = _sig(reference.percentiles([r["score"]])[0], 4)
        doc["images"].append(ev)
    if reference_dir is not None:
        _nearest(det, doc, pooled[: len(doc["images"])], pixels, reference_dir, nearest)
    return doc


def _nearest(det: Detector, doc: dict, pooled: torch.Tensor, pixels: np.ndarray, reference_dir, nearest: int):
    """Copy search: each image's nearest reference images by pooled features and by pixels."""
    files = discover([reference_dir])
    names, ref_feats, ref_small = reference_features(det, files)
    doc["reference_dir"] = {"path": display_path(reference_dir), "images": len(names),
                            "pixel_resolution": min(det.adapter.resolution, PIXEL_RESOLUTION)}
    if not names:
        return
    a = torch.nn.functional.normalize(pooled.double(), dim=1)
    b = torch.nn.functional.normalize(ref_feats.double(), dim=1)
    sim = a @ b.T
    kk = min(nearest, len(names))
    val, idx = sim.topk(kk, dim=1)
    match = nearest_match(_resize(pixels, ref_small.shape[-1]), ref_small, colour="cast")
    for j, ev in enumerate(doc["images"]):
        ev["nearest"] = {
            "features": [{"path": names[int(i)], "similarity": _sig(s, 4)} for s, i in zip(val[j], idx[j])],
            "pixels": {"path": names[int(match.index[j])], "similarity": _sig(match.similarity[j], 4),
                       "flipped": bool(match.flipped[j]), "dy": int(match.dy[j]), "dx": int(match.dx[j])},
        }


def write_json(doc: dict, path: str | os.PathLike) -> Path:
    from ..store.io import atomic_write
    from ..store.strict_json import dumps

    return atomic_write(path, lambda tmp: Path(tmp).write_text(dumps(doc, indent=1) + "\n", encoding="utf-8"))


__all__ = ["K", "NEAREST", "TOP", "collect", "reference_features", "select", "write_json"]
