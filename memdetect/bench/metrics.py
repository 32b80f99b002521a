"""Detection metrics from scikit-learn: AUROC and TPR at a fixed FPR.

TPR@1%FPR is the highest TPR among the ROC curve's points (all thresholds, ``drop_intermediate=False``) whose FPR
is at most 1%; it is a conservative read of the curve (no interpolation between points).
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve


def tpr_at_fpr(labels, scores, max_fpr: float = 0.01) -> float:
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    ok = fpr <= max_fpr
    return float(tpr[ok].max()) if ok.any() else 0.0


def roc_metrics(labels, scores, max_fpr: float = 0.01) -> dict:
    """``labels``: 1 = memorized, 0 = generalized. ``scores``: higher = more memorized."""
    labels = np.asarray(labels, dtype=int)
    scores = np.asarray(scores, dtype=np.float64)
    if np.unique(labels).size < 2:
        raise ValueError("AUROC needs both memorized and generalized samples")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinity")
    return {"auroc": float(roc_auc_score(labels, scores)), "tpr_at_1pct_fpr": tpr_at_fpr(labels, scores, max_fpr)}
