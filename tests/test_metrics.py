"""Bootstrap metrics against scikit-learn and brute force."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from memdetect.core import metrics as M


def _data(seed, n_pos=40, n_neg=300, ties=False):
    rng = np.random.default_rng(seed)
    pos, neg = rng.normal(1.0, 1.0, n_pos), rng.normal(0.0, 1.0, n_neg)
    if ties:
        pos, neg = np.round(pos, 1), np.round(neg, 1)
    labels = np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]
    return labels, np.r_[pos, neg]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("max_fpr", [0.0, 0.01, 0.05, 0.3, 1.0])
def test_fast_forms_equal_sklearn(seed, ties, max_fpr):
    labels, scores = _data(seed, ties=ties)
    pos, neg = scores[labels == 1][None], scores[labels == 0][None]
    assert M._fast_auroc(pos, neg)[0] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert M._fast_tpr(pos, neg, max_fpr)[0] == pytest.approx(M.tpr_at_fpr(labels, scores, max_fpr), abs=1e-12)


def test_threshold_and_recall_match_tpr():
    labels, scores = _data(1, ties=True)
    th = M.threshold_at_fpr(labels, scores, 0.01)
    flagged_neg = (scores[labels == 0] > th).sum()
    assert flagged_neg <= int(0.01 * (labels == 0).sum())
    rec = M.recall_by_group(scores[labels == 1], np.zeros(int(labels.sum())), th)
    assert rec[0][0] == pytest.approx(M.tpr_at_fpr(labels, scores, 0.01))
    assert rec[0][1] == labels.sum()


def test_bootstrap_interval_covers_point_and_is_seeded():
    labels, scores = _data(2)
    a = M.bootstrap_metrics(labels, scores, n_boot=300, seed=3)
    b = M.bootstrap_metrics(labels, scores, n_boot=300, seed=3)
    assert a == b
    for iv in a.values():
        assert iv.lo <= iv.value <= iv.hi
        assert iv.hi - iv.lo > 0.01  # 40 positives: the interval is not degenerate


def test_paired_difference_identical_methods_is_zero_and_not_ahead():
    labels, scores = _data(3)
    d = M.paired_difference(labels, scores, scores.copy(), n_boot=200)
    assert d["auroc"].value == d["auroc"].lo == d["auroc"].hi == 0
    assert not M.ahead(d["auroc"])


def test_paired_difference_detects_a_clearly_better_method():
    labels, scores = _data(4, n_pos=200, n_neg=600)
    better = scores + 3.0 * labels  # far more separable on the same samples
    d = M.paired_difference(labels, better, scores, n_boot=300)
    assert M.ahead(d["auroc"]) and M.ahead(d["tpr"])
    assert not M.ahead(M.paired_difference(labels, scores, better, n_boot=300)["auroc"])


def test_checks():
    with pytest.raises(ValueError, match="both"):
        M.bootstrap_metrics([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        M.bootstrap_metrics([1, 0], [np.nan, 0.2])


def test_grouped_bootstrap_resamples_whole_groups():
    labels, scores = _data(5)
    # one sample per group: the same draws, the same intervals as the ungrouped bootstrap
    assert M.bootstrap_metrics(labels, scores, n_boot=200, seed=1, groups=np.arange(len(labels))) == \
        M.bootstrap_metrics(labels, scores, n_boot=200, seed=1)
    # each sample repeated 4 times (4 identical generations per prompt): the per-sample bootstrap believes it has 4x
    # the data and narrows; resampling whole groups gives back the interval of the distinct samples
    k = 4
    rep_labels, rep_scores = np.repeat(labels, k), np.repeat(scores, k)
    groups = np.repeat(np.arange(len(labels)), k)
    naive = M.bootstrap_metrics(rep_labels, rep_scores, n_boot=400, seed=2)["auroc"]
    grouped = M.bootstrap_metrics(rep_labels, rep_scores, n_boot=400, seed=2, groups=groups)["auroc"]
    single = M.bootstrap_metrics(labels, scores, n_boot=400, seed=2)["auroc"]
    assert (naive.hi - naive.lo) < 0.7 * (grouped.hi - grouped.lo)
    assert grouped.hi - grouped.lo == pytest.approx(single.hi - single.lo, rel=0.25)
    d = M.paired_difference(rep_labels, rep_scores, rep_scores, n_boot=50, groups=groups)
    assert d["auroc"].value == d["auroc"].lo == d["auroc"].hi == 0
    with pytest.raises(ValueError, match="same number of samples"):
        M.bootstrap_metrics(labels, scores, groups=np.r_[0, 0, np.arange(1, len(labels) - 1)])
    with pytest.raises(ValueError, match="one label"):
        M.bootstrap_metrics([1, 0, 1, 0], [0.3, 0.1, 0.4, 0.2], groups=[0, 0, 1, 1])
