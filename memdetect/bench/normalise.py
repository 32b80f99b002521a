"""Label-free normalisations of the pooled vector, fitted on a reference (novel) set only (issue 29, point 3).

The std score measures how spiky a pooled vector ``v`` [C] is. Channels differ in level and spread on novel images
too, and on a class-conditional model the level moves with the class. Each variant here fits statistics on the
*reference*: the generalized (novel) samples of the selection half of ``bench.demo.split_halves``, and is evaluated on
the held-out half, paired against the raw std on the same samples:

* ``std``: the score as shipped (no reference);
* ``std_pool_standardised``: std of (v - mu) / sigma with mu, sigma over *every* generation of the model (labelled or
  not, held-out half included: transductive; what ``bench demo``'s ``*_standardised`` rows use);
* ``std_ref_centred``: std of v - mu_ref (reference channel means only);
* ``std_ref_standardised``: std of (v - mu_ref) / sigma_ref;
* ``maxz_ref``: max over channels of (v - mu_ref) / sigma_ref (the largest reference z-score; a spikiness score
  relative to the reference rather than within the vector);
* where each sample's class is known (``classes``): ``std_class_standardised`` (mu, sigma of the reference samples
  of the sample's own class; the whole reference for a class with fewer than ``min_class`` of them) and
  ``std_class_zscore`` ((std(v) - m_c) / s_c, the std score standardised by its mean and spread over the class's
  reference samples: the score level per class, not the channels).

No memorization label is used beyond "this reference sample is novel"; no held-out sample's label or vector enters
a statistic (except the pool variant, which sees vectors, never labels).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..core.scores import standardise, std
from ..core.metrics import bootstrap_metrics, paired_difference

#: fewest reference samples of a class for its own statistics (else the whole reference's)
MIN_CLASS = 10


@dataclass(frozen=True)
class Reference:
    """Per-channel mean and standard deviation of the reference vectors, and their std scores' mean and spread."""

    mean: torch.Tensor
    scale: torch.Tensor
    score_mean: float
    score_scale: float

    @classmethod
    def fit(cls, feats: torch.Tensor) -> "Reference":
        if len(feats) < 2:
            raise ValueError("a reference needs at least 2 vectors")
        f = feats.double()
        s = std(f)
        return cls(f.mean(dim=0), f.std(dim=0), float(s.mean()), float(s.std()))


def variants(feats: torch.Tensor, reference: np.ndarray, *, pool: torch.Tensor | None = None,
             classes: np.ndarray | None = None, min_class: int = MIN_CLASS) -> dict[str, np.ndarray]:
    """Every variant's score for every row of ``feats`` [N, C]; statistics from the rows ``reference`` (indices)
    only (``pool``: the vectors of the pool variant; ``classes``: each row's class, for the per-class variants)."""
    f = feats.double()
    ref = Reference.fit(f[reference])
    z = standardise(f, ref.mean, ref.scale)
    out = {"std": std(f).numpy(),
           "std_ref_centred": std(f - ref.mean).numpy(),
           "std_ref_standardised": std(z).numpy(),
           "maxz_ref": z.amax(dim=1).numpy()}
    if pool is not None:
        p = pool.double()
        out["std_pool_standardised"] = std(standardise(f, p.mean(dim=0), p.std(dim=0))).numpy()
    if classes is not None:
        classes = np.asarray(classes)
        by_class = np.empty(len(f))
        zscore = np.empty(len(f))
        raw = out["std"]
        for c in np.unique(classes):
            rows = np.flatnonzero(classes == c)
            own = reference[classes[reference] == c]
            r = Reference.fit(f[own]) if len(own) >= min_class else ref
            by_class[rows] = std(standardise(f[rows], r.mean, r.scale)).numpy()
            zscore[rows] = (raw[rows] - r.score_mean) / max(r.score_scale, 1e-12)
        out["std_class_standardised"] = by_class
        out["std_class_zscore"] = zscore
    return out


def study(feats: torch.Tensor, labels: np.ndarray, sel: np.ndarray, held: np.ndarray, *,
          pool: torch.Tensor | None = None, classes: np.ndarray | None = None, n_boot: int = 1000,
          seed: int = 0, reference_size: int | None = None) -> pd.DataFrame:
    """Each variant on the held-out half (``held``), statistics from the generalized rows of ``sel``: AUROC and
    TPR@1%FPR with bootstrap intervals, and the paired difference to the raw ``std`` on the same samples.
    ``reference_size``: a seeded random subset of that many reference rows (how many novel images the statistics
    need)."""
    reference = sel[labels[sel] == 0]
    if reference_size is not None and reference_size < len(reference):
        reference = np.sort(np.random.default_rng(seed).choice(reference, reference_size, replace=False))
    scores = variants(feats, reference, pool=pool, classes=classes)
    y = labels[held]
    rows = []
    for name, s in scores.items():
        b = bootstrap_metrics(y, s[held], n_boot=n_boot, seed=seed)
        row = {"variant": name, "auroc": b["auroc"].value, "auroc_lo": b["auroc"].lo, "auroc_hi": b["auroc"].hi,
               "tpr": b["tpr"].value, "tpr_lo": b["tpr"].lo, "tpr_hi": b["tpr"].hi,
               "n_reference": len(reference), "n_memorized": int(y.sum()), "n_generalized": int((1 - y).sum())}
        if name != "std":
            d = paired_difference(y, s[held], scores["std"][held], n_boot=n_boot, seed=seed)
            for k in ("auroc", "tpr"):
                iv = d[k]
                row.update({f"d_{k}": iv.value, f"d_{k}_lo": iv.lo, f"d_{k}_hi": iv.hi,
                            f"{k}_verdict": "better" if iv.lo > 0 else "worse" if iv.hi < 0 else "no difference"})
        rows.append(row)
    return pd.DataFrame(rows)


__all__ = ["MIN_CLASS", "Reference", "study", "variants"]
