"""Calibration: choose a threshold from images known to be novel, at a target false-positive rate.

Why from novel images only: a team can collect images it knows are *not* copies (its own photos, generations
checked by hand) far more easily than memorized ones, and the false-positive rate is what a CI gate must bound.

The rule (per metric; an image is flagged when ``score >= threshold``): with ``n`` reference scores sorted
descending ``s_1 >= s_2 >= ... >= s_n`` and ``m = floor(fpr * n)`` flags allowed,

    threshold = the next float above s_(m+1)

i.e. the smallest threshold that flags at most ``m`` reference images. ``count(s >= t) <= m`` holds exactly when
``t > s_(m+1)``, so ties are safe: every score equal to ``s_(m+1)`` stays unflagged, even if that leaves fewer than
``m`` flagged. With ``fpr * n < 1`` (e.g. 1 % of 50 images) no reference image may be flagged and the threshold sits
just above the largest reference score; the FPR actually achieved on the reference set is reported next to the
target.

With a labelled set (``--memorized``) the same threshold is kept (the memorized images do not move it) and its ROC
point is reported: sklearn's ``roc_curve`` gives the (FPR, TPR) of every distinct score; the chosen point is the one
whose score threshold is the smallest ``>=`` ours (which flags exactly the same images), plus the AUROC.

How sure: the FPR a threshold achieves is given with its exact (Clopper-Pearson) 95 % interval on the count of
flagged reference images (``memdetect.core.pvalues.clopper_pearson``), the TPR likewise on the memorized images, and a
reference set smaller than ``ceil(3 / fpr)`` images (300 for 1 %) is called too small (``Calibration.too_small``).
The config keeps each metric's reference distribution (``memdetect.core.pvalues.Reference``: every score, or 2,000 order
statistics of a larger set), from which scans compute conformal p-values and thresholds for ``--fpr``, and the
reference images' per-channel mean and standard deviation of the pooled activations (evidence: how far an image's
top channels are from the novel images').

``calibrate_paths`` does the whole job for image files: scan the reference (and memorized) images, choose the
thresholds, write ``memdetect.toml`` (``memdetect.config``) atomically.

``normalise="reference"`` (``calibrate --normalise reference``): every score is taken of the pooled vector
standardised per channel, (v - mean) / std, with the statistics of known-novel images. The reference is split in
two, seeded: one half gives the statistics, the other, scored with them, the thresholds and reference scores, so the
FPR is measured on images the statistics never saw (on the same images it would be optimistic).
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from .._version import __version__
from ..config import CONFIG_VERSION, to_toml
from ..detector import Detector
from ..errors import InputError, UsageError
from ..store.io import atomic_write, check_destination, display_path, expand_globs
from ..core.pvalues import Reference, allowed_flags, clopper_pearson, min_reference, threshold_at_fpr
from .scan import scan
from ..core.scores import SCORES
from ..settings import Settings, check_fpr
from ..text import printable

RULE = "threshold = next float above the (floor(fpr*n)+1)-th largest reference score; flag when score >= threshold"




def check_output(output: str | os.PathLike, force: bool = False) -> None:
    """Refuse to overwrite an existing config without ``force``, and a destination that cannot be written (a folder,
    a link, an unwritable place) before any image is scored."""
    if Path(output).exists() and not force and not Path(output).is_dir():
        raise UsageError(f"{display_path(output)} exists; pass --force to overwrite it")
    check_destination(output, "config")


def fpr_threshold(scores, fpr: float) -> float:
    """The smallest threshold flagging at most ``floor(fpr * n)`` of ``scores`` (see the module docstring)."""
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0:
        raise InputError("no reference scores to calibrate on")
    check_fpr(fpr)
    if not np.isfinite(s).all():
        raise InputError("reference scores contain NaN or infinity")
    return float(np.nextafter(threshold_at_fpr(s, fpr), np.inf))


def roc_point(novel, memorized, threshold: float) -> dict:
    """AUROC and the (FPR, TPR) of ``threshold`` on a labelled set, via sklearn's ``roc_curve``."""
    from sklearn.metrics import roc_auc_score, roc_curve

    neg, pos = np.asarray(novel, np.float64), np.asarray(memorized, np.float64)
    y = np.r_[np.zeros(neg.size), np.ones(pos.size)]
    s = np.r_[neg, pos]
    fprs, tprs, thr = roc_curve(y, s, drop_intermediate=False)
    idx = int(np.flatnonzero(thr >= threshold)[-1])  # thr[0] is +inf, so there is always one
    return {"auroc": float(roc_auc_score(y, s)), "roc_fpr": float(fprs[idx]), "tpr": float(tprs[idx])}


def calibrate(novel: pd.DataFrame, fpr: float, memorized: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per metric: threshold, target and achieved FPR on the reference set with its 95 % Clopper-Pearson
    interval (``fpr_low``, ``fpr_high``); with ``memorized``, TPR at the threshold (``tpr_low``, ``tpr_high``), the
    ROC point's FPR and AUROC. ``novel`` / ``memorized``: frames with a column per metric (scored
    rows only)."""
    if memorized is not None and len(memorized) == 0:
        raise InputError("no memorized images could be scored")
    rows = []
    for m in SCORES:
        ref = novel[m].to_numpy(np.float64)
        t = fpr_threshold(ref, fpr)
        k = int((ref >= t).sum())
        lo, hi = clopper_pearson(k, ref.size)
        row = {"metric": m, "threshold": t, "fpr_target": fpr, "fpr_reference": float((ref >= t).mean()),
               "flagged_reference": k, "n_reference": int(ref.size), "fpr_low": lo, "fpr_high": hi}
        if memorized is not None:
            pos = memorized[m].to_numpy(np.float64)
            row.update(roc_point(ref, pos, t))
            found = int((pos >= t).sum())
            row["tpr_low"], row["tpr_high"] = clopper_pearson(found, pos.size)
            row["flagged_memorized"] = found
            row["n_memorized"] = int(len(memorized))
        rows.append(row)
    return pd.DataFrame(rows)


def config_document(settings: dict, table: pd.DataFrame, *, metric: str, fpr: float, reference: list[str],
                    memorized: list[str] | None, n_errored: int, model: str, model_path: str | None,
                    sigma: float | None = None, distributions: dict[str, Reference] | None = None,
                    channels: dict | None = None) -> dict:
    """The TOML document ``memdetect calibrate`` writes (see ``memdetect.config`` for what is read back).
    ``distributions``: each metric's reference scores (``[calibration.reference]``); ``channels``: the reference
    images' per-channel ``mean`` and ``std`` of the pooled activations (``[calibration.channels]``)."""
    import diffusers
    import torch

    by = table.set_index("metric")
    cal = {"fpr": fpr, "rule": RULE, "reference": reference, "n_reference": int(by.loc[metric, "n_reference"]),
           "n_errored": n_errored, "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "family": settings["family"], "source": settings["source"], "pooling": settings["pooling"],
           "preprocess": settings["preprocess"], "dtype": settings["dtype"], "device": settings["device"],
           "winograd": settings["winograd"], "allocator": settings["allocator"],
           "thresholds": {m: float(by.loc[m, "threshold"]) for m in SCORES},
           "fpr_reference": {m: float(by.loc[m, "fpr_reference"]) for m in SCORES},
           "fpr_interval": {m: [float(by.loc[m, "fpr_low"]), float(by.loc[m, "fpr_high"])] for m in SCORES}}
    if memorized is not None:
        cal["memorized"] = memorized
        cal["n_memorized"] = int(by.loc[metric, "n_memorized"])
        cal["tpr"] = {m: float(by.loc[m, "tpr"]) for m in SCORES}
        cal["tpr_interval"] = {m: [float(by.loc[m, "tpr_low"]), float(by.loc[m, "tpr_high"])] for m in SCORES}
        cal["auroc"] = {m: float(by.loc[m, "auroc"]) for m in SCORES}
    if distributions:
        n = next(iter(distributions.values())).n
        cal["reference_scores"] = {"n": n, **{m: list(d.scores) for m, d in distributions.items()}}
    if channels:
        cal["channels"] = {k: [float(v) for v in channels[k]] for k in ("mean", "std")}
    written = Settings.written("toml", settings)  # layer, timestep, seed; draws and normalise unless the default
    return {"version": CONFIG_VERSION, "model": model, "model_path": model_path, "layer": written["layer"],
            "timestep": written["timestep"], "sigma": sigma, "seed": written["seed"], "draws": written.get("draws"),
            "normalise": written.get("normalise"), "metric": metric, "threshold": float(by.loc[metric, "threshold"]),
            "calibration": cal,
            "versions": {"memdetect": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
                         "python": platform.python_version()}}


def _shorten(items: list[str], keep: int = 10) -> list[str]:
    """A shell glob can expand to thousands of files: the config records the first few and a count."""
    return items if len(items) <= keep else [*items[:keep], f"... and {len(items) - keep} more"]


@dataclass(frozen=True)
class Calibration:
    """What ``calibrate_paths`` chose and wrote: ``table`` (one row per metric, see ``calibrate``), the config
    ``document`` written to ``path``, and the image counts."""

    table: pd.DataFrame
    document: dict
    path: Path
    metric: str
    fpr: float
    n_reference: int
    n_errored: int
    n_memorized: int | None

    @property
    def min_reference(self) -> int:
        """The fewest reference images that can show the target FPR (``memdetect.core.pvalues.min_reference``)."""
        return min_reference(self.fpr)

    @property
    def too_small(self) -> bool:
        """Whether the reference set is too small for the target FPR (fewer than ``min_reference`` images)."""
        return self.fpr > 0 and self.n_reference < self.min_reference

    @property
    def strict(self) -> bool:
        """Whether ``fpr x n_reference < 1``: no reference image may be flagged, the threshold sits just above the
        largest reference score."""
        return allowed_flags(self.n_reference, self.fpr) == 0


def calibrate_paths(detector: Detector, reference: Iterable[str | os.PathLike], *, fpr: float = 0.01,
                    memorized: Iterable[str | os.PathLike] = (), output: str | os.PathLike = "memdetect.toml",
                    force: bool = False, model: str | None = None, model_path: str | os.PathLike | None = None,
                    sigma: float | None = None, on_batch: Callable[[int, int], None] | None = None,
                    num_workers: int | None = None, normalise: str = "none",
                    selection: dict | None = None) -> Calibration:
    """Scan ``reference`` (images known to be novel; files, folders, quoted globs) and optionally ``memorized``,
    choose every metric's threshold at ``fpr`` and write the config to ``output`` (refused if it exists, unless
    ``force``). ``model`` / ``model_path`` / ``sigma``: what the config records to load the model again (default:
    the detector's name). ``normalise="reference"``: scores of reference-standardised activations (module
    docstring); the detector keeps the statistics. ``selection``: the ``[selection]`` table (``memdetect.workflows.select``:
    how the detector's layer, timestep and metric were chosen, with the evidence)."""
    if normalise not in ("none", "reference"):
        raise UsageError(f"unknown normalisation {printable(normalise, 40)!r}; choose none or reference")
    check_fpr(fpr)
    check_output(output, force)
    output = Path(output)
    reference, memorized = expand_globs(reference), expand_globs(memorized)
    acc = _ChannelStats()
    n_fit = None
    detector.normalise = None  # the statistics are this calibration's own, or none
    if normalise == "reference":
        fit, thresholds_half = split_reference(reference)
        scan(detector, fit, on_batch=on_batch, num_workers=num_workers, on_features=acc.add)
        stats = acc.result()
        if stats is None or acc.n < 2:
            raise InputError("fewer than 2 images of the reference's statistics half could be scored")
        detector.normalise = stats
        n_fit = acc.n
        ref = scan(detector, thresholds_half, on_batch=on_batch, num_workers=num_workers).frame
    else:
        ref = scan(detector, reference, on_batch=on_batch, num_workers=num_workers, on_features=acc.add).frame
    novel = ref[ref["error"].isna()]
    if not len(novel):
        raise InputError("none of the reference images could be scored")
    mem = None
    if memorized:
        scored = scan(detector, memorized, on_batch=on_batch, num_workers=num_workers).frame
        mem = scored[scored["error"].isna()]
    table = calibrate(novel, fpr, mem)
    n_errored = int(ref["error"].notna().sum())
    doc = config_document(vars(detector.settings), table, metric=detector.metric, fpr=fpr,
                          reference=_shorten([display_path(p) for p in reference]),
                          memorized=_shorten([display_path(p) for p in memorized]) if memorized else None,
                          n_errored=n_errored, model=model or detector.name,
                          model_path=str(model_path) if model_path else None, sigma=sigma,
                          distributions={m: Reference.from_scores(novel[m].to_numpy(np.float64)) for m in SCORES},
                          channels=acc.result())
    from ..config import portable_model, portable_paths

    doc["model"], doc["model_path"], doc["calibration"]["source"] = portable_model(
        doc["model"], doc["model_path"], doc["calibration"]["source"], detector.settings.family, output)
    doc["calibration"]["weights"] = detector.weights_digest()  # identity: the same bytes in any folder
    for key in ("reference", "memorized"):  # a record of the images: local ones relative to the config file
        if key in doc["calibration"]:
            doc["calibration"][key] = portable_paths(doc["calibration"][key], output)
    if n_fit is not None:
        doc["calibration"]["n_normalise"] = n_fit  # reference images behind [calibration.channels]
    if selection is not None:
        doc["selection"] = selection
    header = (f"memdetect calibration ({len(novel)} novel reference images, target FPR {fpr:g}).\n"
              f"Use: memdetect audit PATH... --config {output.name}   (or: memdetect scan PATH... --config ...)")
    atomic_write(output, lambda tmp: Path(tmp).write_text(to_toml(doc, header), encoding="utf-8"))
    return Calibration(table, doc, output, detector.metric, fpr, len(novel), n_errored,
                       None if mem is None else len(mem))


#: ``--normalise reference``: the fewest reference images (half for the statistics, half for the thresholds). On the
#: ground-truth demo-dit (1,152 channels) statistics from 50 novel images made the score worse, from 100 better in
#: AUROC only, from 200 as good as from all (benchmarks/RESULTS.md)
MIN_NORMALISE = 200


def split_reference(reference: Sequence[str | os.PathLike], seed: int = 0) -> tuple[list[Path], list[Path]]:
    """The reference images in two seeded halves: statistics, thresholds (local files and folders only)."""
    from ..store.sources import resolve

    items = resolve(reference)
    if any(not isinstance(it, Path) for it in items):
        raise UsageError("--normalise reference takes local image files and folders (it splits them in two)")
    if len(items) < MIN_NORMALISE:
        raise UsageError(f"--normalise reference needs at least {MIN_NORMALISE} reference images (half fit the "
                         f"channel statistics, half set the threshold), got {len(items)}")
    order = np.random.default_rng(seed).permutation(len(items))
    half = len(items) // 2
    return [items[i] for i in sorted(order[:half])], [items[i] for i in sorted(order[half:])]


class _ChannelStats:
    """Per-channel mean and standard deviation (float64 sums) of pooled activations seen batch by batch."""

    def __init__(self):
        self.n, self.sum, self.sumsq = 0, None, None

    def add(self, feats) -> None:
        x = feats.double().numpy() if hasattr(feats, "numpy") else np.asarray(feats, np.float64)
        if self.sum is None:
            self.sum, self.sumsq = np.zeros(x.shape[1]), np.zeros(x.shape[1])
        self.n += x.shape[0]
        self.sum += x.sum(axis=0)
        self.sumsq += (x * x).sum(axis=0)

    def result(self) -> dict | None:
        if not self.n:
            return None
        mean = self.sum / self.n
        var = np.maximum(self.sumsq / self.n - mean * mean, 0.0) * (self.n / max(self.n - 1, 1))
        return {"mean": mean, "std": np.sqrt(var)}


__all__ = ["RULE", "Calibration", "allowed_flags", "calibrate", "calibrate_paths", "check_fpr", "check_output",
           "config_document",
           "fpr_threshold", "roc_point"]
