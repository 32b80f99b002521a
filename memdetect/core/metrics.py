"""Detection metrics: AUROC and TPR at a fixed FPR (scikit-learn), bootstrap intervals, paired differences and
recall per group at a method's own threshold.

TPR@1%FPR is the highest TPR among the ROC curve's points (all thresholds, ``drop_intermediate=False``) whose FPR
is at most 1%; it is a conservative read of the curve (no interpolation between points). Equivalently: with ``k =
floor(0.01 * n_generalized)`` false positives allowed, it is the fraction of memorized samples scoring strictly above
the (k+1)-th highest generalized score (``_fast_tpr``, checked against scikit-learn in the tests).

Intervals: a stratified percentile bootstrap (memorized and generalized samples resampled separately, so every
replicate has both classes and the class balance of the benchmark), 95% by default, ``n_boot`` replicates from a
seeded generator. A paired bootstrap resamples the same indices for two methods scored on the same samples and gives
an interval for the difference; a method is "ahead" of another only when that interval excludes 0.

Clustered samples (``groups``: e.g. the K generations of one prompt, which share its label and are not independent)
are resampled as whole groups, within each class: a replicate draws as many memorized (generalized) groups as there
are, with replacement, and keeps all their samples. Every group must hold one label and, so that every replicate has
the same size, the same number of samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score, roc_curve

from . import pvalues

#: Defaults of every interval in the benchmarks.
N_BOOT = 1000
LEVEL = 0.95


def tpr_at_fpr(labels, scores, max_fpr: float = 0.01) -> float:
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    ok = fpr <= max_fpr
    return float(tpr[ok].max()) if ok.any() else 0.0


def _checked(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels, dtype=int)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.shape != scores.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} must be 1-D and the same length")
    if np.unique(labels).size < 2:
        raise ValueError("AUROC needs both memorized and generalized samples")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinity")
    return labels, scores


def roc_metrics(labels, scores, max_fpr: float = 0.01) -> dict:
    """``labels``: 1 = memorized, 0 = generalized. ``scores``: higher = more memorized."""
    labels, scores = _checked(labels, scores)
    return {"auroc": float(roc_auc_score(labels, scores)), "tpr_at_1pct_fpr": tpr_at_fpr(labels, scores, max_fpr)}


# -- vectorised forms for the bootstrap (rows = replicates) ------------------------------------------------------------
def _fast_auroc(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUROC per row of ``pos`` [R, P] against ``neg`` [R, N] (ties count one half)."""
    both = np.concatenate([pos, neg], axis=1)
    ranks = rankdata(both, axis=1)  # average ranks: ties count 1/2
    p = pos.shape[1]
    return (ranks[:, :p].sum(axis=1) - p * (p + 1) / 2) / (p * neg.shape[1])


def _fast_tpr(pos: np.ndarray, neg: np.ndarray, max_fpr: float) -> np.ndarray:
    """TPR at FPR <= ``max_fpr`` per row (see the module docstring)."""
    n = neg.shape[1]
    k = int(np.floor(max_fpr * n + 1e-9))
    if k >= n:
        return np.ones(pos.shape[0])
    cut = -np.partition(-neg, k, axis=1)[:, k]  # the (k+1)-th largest generalized score
    return (pos > cut[:, None]).mean(axis=1)


def _resample(labels: np.ndarray, n_boot: int, seed: int, groups=None) -> tuple[np.ndarray, np.ndarray]:
    """Stratified bootstrap indices: [n_boot, P] into the memorized and [n_boot, N] into the generalized samples
    (whole groups when ``groups`` is given: see the module docstring)."""
    rng = np.random.default_rng(seed)
    if groups is None:
        pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
        return (pos[rng.integers(0, pos.size, (n_boot, pos.size))],
                neg[rng.integers(0, neg.size, (n_boot, neg.size))])
    groups = np.asarray(groups)
    if groups.shape != labels.shape:
        raise ValueError(f"groups {groups.shape} and labels {labels.shape} must be the same length")
    _, inverse = np.unique(groups, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    sizes = np.bincount(inverse)
    if np.unique(sizes).size != 1:
        raise ValueError(f"every group must hold the same number of samples, got sizes {sorted(set(sizes.tolist()))}")
    members = order.reshape(len(sizes), sizes[0])  # [groups, size]: the samples of each group
    group_label = labels[members]
    if not (group_label == group_label[:, :1]).all():
        raise ValueError("every group must hold samples of one label")
    out = []
    for cls in (1, 0):
        g = np.flatnonzero(group_label[:, 0] == cls)
        pick = g[rng.integers(0, g.size, (n_boot, g.size))]  # [n_boot, groups of the class]
        out.append(members[pick].reshape(n_boot, -1))
    return out[0], out[1]


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap interval."""

    value: float
    lo: float
    hi: float

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.lo:.3f}, {self.hi:.3f}]"


def bootstrap_metrics(labels, scores, *, max_fpr: float = 0.01, n_boot: int = N_BOOT, level: float = LEVEL,
                      seed: int = 0, groups=None) -> dict[str, Interval]:
    """AUROC and TPR@``max_fpr`` with stratified percentile-bootstrap intervals: ``{"auroc", "tpr"}``
    (``groups``: resample whole groups, see the module docstring)."""
    labels, scores = _checked(labels, scores)
    point = roc_metrics(labels, scores, max_fpr)
    ip, ineg = _resample(labels, n_boot, seed, groups)
    auc = _fast_auroc(scores[ip], scores[ineg])
    tpr = _fast_tpr(scores[ip], scores[ineg], max_fpr)
    return {"auroc": Interval(point["auroc"], *_interval(auc, level)),
            "tpr": Interval(point["tpr_at_1pct_fpr"], *_interval(tpr, level))}


def paired_difference(labels, scores_a, scores_b, *, max_fpr: float = 0.01, n_boot: int = N_BOOT,
                      level: float = LEVEL, seed: int = 0, groups=None) -> dict[str, Interval]:
    """A minus B for AUROC and TPR@``max_fpr``, both methods resampled on the same indices (paired bootstrap;
    ``groups``: whole groups, see the module docstring)."""
    labels, a = _checked(labels, scores_a)
    _, b = _checked(labels, scores_b)
    pa, pb = roc_metrics(labels, a, max_fpr), roc_metrics(labels, b, max_fpr)
    ip, ineg = _resample(labels, n_boot, seed, groups)
    d_auc = _fast_auroc(a[ip], a[ineg]) - _fast_auroc(b[ip], b[ineg])
    d_tpr = _fast_tpr(a[ip], a[ineg], max_fpr) - _fast_tpr(b[ip], b[ineg], max_fpr)
    return {"auroc": Interval(pa["auroc"] - pb["auroc"], *_interval(d_auc, level)),
            "tpr": Interval(pa["tpr_at_1pct_fpr"] - pb["tpr_at_1pct_fpr"], *_interval(d_tpr, level))}


def ahead(difference: Interval) -> bool:
    """Whether A is ahead of B: the paired interval of A - B lies entirely above 0."""
    return difference.lo > 0


def threshold_at_fpr(labels, scores, max_fpr: float = 0.01) -> float:
    """The method's own operating threshold for ``tpr_at_fpr``: flag ``score > threshold``, where the threshold is
    the (k+1)-th highest generalized score, k = floor(max_fpr * n_generalized) (so at most k generalized samples are
    flagged); ``-inf`` when every generalized sample may be flagged."""
    labels, scores = _checked(labels, scores)
    return pvalues.threshold_at_fpr(scores[labels == 0], max_fpr)


def recall_by_group(scores, groups, threshold: float) -> dict:
    """For each group value (e.g. a duplication grade), the fraction of its samples with ``score > threshold`` and
    how many there are: ``{group: (recall, n)}``, groups in sorted order."""
    scores = np.asarray(scores, dtype=np.float64)
    groups = np.asarray(groups)
    out = {}
    for g in sorted(set(groups.tolist()), key=lambda v: (str(type(v)), v)):
        sel = groups == g
        out[g] = (float((scores[sel] > threshold).mean()), int(sel.sum()))
    return out


__all__ = ["Interval", "LEVEL", "N_BOOT", "ahead", "bootstrap_metrics", "paired_difference", "recall_by_group",
           "roc_metrics", "threshold_at_fpr", "tpr_at_fpr"]
