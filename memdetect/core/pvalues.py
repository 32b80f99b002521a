"""Calibrated decisions: conformal p-values, percentiles and exact binomial intervals from a reference set.

A reference set is ``n`` scores of images known to be novel (``memdetect calibrate``). For a new image with score
``s`` (higher = more likely memorized) the conformal p-value is

    p(s) = (1 + #{reference scores >= s}) / (1 + n)

If the new image is novel and exchangeable with the reference images, ``P(p <= a) <= a`` for every ``a``: flagging
``p <= 0.01`` flags at most 1 % of novel images, whatever the model, layer or metric. The smallest possible p-value
is ``1 / (n + 1)``: a reference of 100 images cannot give a p-value below 0.0099. The ``percentile`` of ``s`` is
``100 * #{reference scores < s} / n``: where the score sits in the reference distribution.

Stored form (``Reference``): the reference scores sorted from the largest down. A large reference is stored as
``MAX_STORED`` order statistics (ranks ``1 = r_1 < ... < r_K = n``, ``stored_ranks``); counts are then bounded
conservatively: ``#{>= s}`` is at most ``r_(j+1) - 1`` when the j-th stored value is the last one ``>= s``, so a
p-value is never smaller than the exact one, and a threshold chosen by ``threshold(fpr)`` never flags more than
``floor(fpr * n)`` reference images (off by at most ``n / K`` ranks).

Intervals: ``clopper_pearson(k, n)`` is the exact (Clopper-Pearson) two-sided interval for a binomial proportion,
the one ``scipy.stats.binomtest(k, n).proportion_ci(method="exact")`` gives. Calibration reports it for the false
positive rate a threshold achieves (``k`` of ``n`` reference images flagged) and, with memorized images, for the
true positive rate. ``min_reference(fpr)``: with fewer than ``ceil(3 / fpr)`` reference images (300 for 1 %) even
zero flagged images cannot show that the FPR is below ``fpr`` at 95 % confidence (the "rule of three": with 0 of
``n`` flagged, the one-sided 95 % upper bound is about ``3 / n``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: how many order statistics of each metric's reference scores a config stores at most
MAX_STORED = 2000


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact two-sided interval for a binomial proportion with ``k`` successes in ``n`` trials."""
    from scipy.stats import beta

    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n > 0, got k={k}, n={n}")
    a = 1.0 - confidence
    lo = 0.0 if k == 0 else float(beta.ppf(a / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a / 2, k + 1, n - k))
    return lo, hi


def min_reference(fpr: float) -> int:
    """The fewest reference images that can show an FPR of ``fpr`` (rule of three: ``ceil(3 / fpr)``)."""
    return math.ceil(3.0 / fpr - 1e-9) if fpr > 0 else 0


def allowed_flags(n: int, fpr: float) -> int:
    """``floor(fpr * n)``: how many of ``n`` reference (novel, generalized) images a false-positive rate of ``fpr``
    lets a threshold flag, robust to binary fractions (0.29 * 100 is 28.999...)."""
    return int(math.floor(fpr * n + 1e-9))


def threshold_at_fpr(negatives, fpr: float) -> float:
    """The one rule of every threshold chosen at a false-positive rate (calibration, ``Reference.threshold``, the
    benchmarks' operating points): the (m+1)-th largest of the ``negatives`` (scores of novel / generalized images),
    ``m = allowed_flags(n, fpr)``. Flagging ``score > threshold`` flags at most ``m`` negatives (a tie with the
    threshold stays unflagged); ``-inf`` when ``m >= n`` (every negative may be flagged). Flag-when-``>=`` callers
    take the next float above it."""
    neg = np.sort(np.asarray(negatives, dtype=np.float64))[::-1]
    m = allowed_flags(neg.size, fpr)
    return float(neg[m]) if m < neg.size else float("-inf")


def stored_ranks(n: int, k: int) -> np.ndarray:
    """The 1-based descending ranks of the ``k`` order statistics kept of ``n`` scores (all of them when k >= n):
    evenly spaced, the first (largest score) and the last (smallest) always kept."""
    if k >= n:
        return np.arange(1, n + 1)
    return np.unique(np.round(np.linspace(1, n, k)).astype(np.int64))


@dataclass(frozen=True)
class Reference:
    """A reference score distribution: ``n`` scores, stored as ``scores`` (descending) at ``ranks`` (1-based,
    descending order; ``None``: every score, ranks 1..n)."""

    n: int
    scores: tuple[float, ...]

    def __post_init__(self):
        if self.n < 1 or not 1 <= len(self.scores) <= self.n or (len(self.scores) < self.n and len(self.scores) < 2):
            raise ValueError(f"a reference holds 1..n scores (the first and last at least when subsampled), got "
                             f"{len(self.scores)} of n={self.n}")
        s = np.asarray(self.scores, np.float64)
        if not np.isfinite(s).all():
            raise ValueError("reference scores must be finite")
        if (np.diff(s) > 0).any():
            raise ValueError("reference scores must be sorted from the largest down")

    @classmethod
    def from_scores(cls, scores, max_stored: int = MAX_STORED) -> "Reference":
        s = np.sort(np.asarray(scores, np.float64))[::-1]
        if s.size == 0:
            raise ValueError("no reference scores")
        ranks = stored_ranks(s.size, max_stored)
        return cls(int(s.size), tuple(float(v) for v in s[ranks - 1]))

    @property
    def exact(self) -> bool:
        """Whether every reference score is stored (counts and p-values are then exact)."""
        return len(self.scores) == self.n

    @property
    def ranks(self) -> np.ndarray:
        return stored_ranks(self.n, len(self.scores)) if not self.exact else np.arange(1, self.n + 1)

    def count_at_least(self, scores) -> np.ndarray:
        """``#{reference >= s}`` for each score (exact, or an upper bound for a subsampled reference)."""
        s = np.asarray(scores, np.float64)
        desc = np.asarray(self.scores, np.float64)
        # j = how many stored values are >= s (stored values are descending: search the ascending reverse)
        j = len(desc) - np.searchsorted(desc[::-1], s, side="left")
        if self.exact:
            return j.astype(np.int64)
        ranks = self.ranks
        nxt = np.append(ranks, self.n + 1)  # the next stored rank after the j-th; past the end: n + 1
        return np.where(j == 0, 0, nxt[np.minimum(j, len(ranks))] - 1).astype(np.int64)

    def p_values(self, scores) -> np.ndarray:
        """Conformal p-values ``(1 + #{reference >= s}) / (1 + n)`` (NaN for a NaN score)."""
        s = np.asarray(scores, np.float64)
        p = (1.0 + self.count_at_least(np.nan_to_num(s, nan=-np.inf))) / (1.0 + self.n)
        return np.where(np.isnan(s), np.nan, p)

    def percentiles(self, scores) -> np.ndarray:
        """``100 * #{reference < s} / n`` (a lower bound for a subsampled reference; NaN for a NaN score)."""
        s = np.asarray(scores, np.float64)
        pct = 100.0 * (self.n - self.count_at_least(np.nan_to_num(s, nan=-np.inf))) / self.n
        return np.where(np.isnan(s), np.nan, pct)

    def threshold(self, fpr: float) -> float:
        """The smallest threshold (flag when ``score >= threshold``) that flags at most ``floor(fpr * n)`` reference
        images: the next float above the (m+1)-th largest score (``memdetect.workflows.calibrate``'s rule). Subsampled: the
        next float above the stored score of the largest stored rank <= m + 1 (at most ``m`` flagged)."""
        if not 0.0 <= fpr < 1.0:
            raise ValueError(f"fpr must be in [0, 1), got {fpr}")
        if self.exact:
            return float(np.nextafter(threshold_at_fpr(self.scores, fpr), np.inf))
        m = allowed_flags(self.n, fpr)
        ranks = self.ranks
        j = int(np.searchsorted(ranks, m + 1, side="right")) - 1  # the largest stored rank <= m + 1
        return float(np.nextafter(self.scores[j], np.inf))

    def histogram(self, bins: int = 30) -> tuple[list[float], list[int]]:
        """Bin edges and counts of the stored scores (each stored score weighted by the ranks it stands for)."""
        s = np.asarray(self.scores, np.float64)
        if self.exact:
            weights = np.ones_like(s)
        else:
            r = self.ranks.astype(np.float64)
            weights = np.diff(np.r_[0.5, (r[:-1] + r[1:]) / 2, self.n + 0.5])
        lo, hi = float(s.min()), float(s.max())
        if lo == hi:
            lo, hi = lo - 0.5, hi + 0.5
        counts, edges = np.histogram(s, bins=bins, range=(lo, hi), weights=weights)
        return [float(e) for e in edges], [int(round(c)) for c in counts]


__all__ = ["MAX_STORED", "Reference", "allowed_flags", "clopper_pearson", "min_reference", "stored_ranks",
           "threshold_at_fpr"]
