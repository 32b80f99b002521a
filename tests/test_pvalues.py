"""Calibrated decisions: conformal p-values against a brute-force count, Clopper-Pearson against scipy's exact
binomial interval, subsampled references stay conservative, and --fpr thresholds follow calibrate's rule."""

import math

import numpy as np
import pytest
from scipy.stats import binomtest

from memdetect.workflows.calibrate import fpr_threshold
from memdetect.core.pvalues import Reference, clopper_pearson, min_reference, stored_ranks


def brute_p(ref, s):
    return (1 + sum(1 for r in ref if r >= s)) / (1 + len(ref))


def brute_pct(ref, s):
    return 100 * sum(1 for r in ref if r < s) / len(ref)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_p_value_formula_against_a_brute_force_count(seed):
    rng = np.random.default_rng(seed)
    ref = np.round(rng.normal(size=57), 1)  # rounded: many ties
    queries = np.r_[np.round(rng.normal(scale=1.5, size=40), 1), ref[:5], ref.max(), ref.max() + 1, ref.min() - 1]
    r = Reference.from_scores(ref)
    assert r.exact and r.n == 57
    np.testing.assert_allclose(r.p_values(queries), [brute_p(ref, s) for s in queries], rtol=0, atol=0)
    np.testing.assert_allclose(r.percentiles(queries), [brute_pct(ref, s) for s in queries], rtol=0, atol=1e-12)
    assert r.p_values([ref.max() + 1])[0] == 1 / 58  # the smallest possible p-value
    assert r.p_values([ref.min() - 1])[0] == 1.0
    assert math.isnan(r.p_values([np.nan])[0]) and math.isnan(r.percentiles([np.nan])[0])


def test_conformal_p_values_are_valid_on_novel_images():
    """P(p <= a) <= a for a new image drawn like the reference (the guarantee the report states)."""
    rng = np.random.default_rng(0)
    hits = 0
    trials = 4000
    for _ in range(trials):
        ref = rng.normal(size=99)
        hits += Reference.from_scores(ref).p_values([rng.normal()])[0] <= 0.05
    assert hits / trials <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / trials)


def test_subsampled_reference_is_conservative():
    rng = np.random.default_rng(3)
    ref = np.round(rng.normal(size=5000), 2)
    full, small = Reference.from_scores(ref, max_stored=10**6), Reference.from_scores(ref, max_stored=50)
    assert full.exact and not Reference.from_scores(ref).exact  # 2,000 order statistics by default
    assert not small.exact and len(small.scores) == 50 and small.n == 5000
    assert list(stored_ranks(5000, 50)[[0, -1]]) == [1, 5000]
    q = np.r_[np.linspace(-4, 4, 301), ref[:50]]
    exact, bound = full.count_at_least(q), small.count_at_least(q)
    assert (bound >= exact).all()  # never a smaller p-value than the exact one
    assert (bound - exact).max() <= 5000 / 49 + 1  # off by at most one gap of stored ranks
    assert (small.p_values(q) >= full.p_values(q)).all()
    for fpr in (0.0, 0.001, 0.01, 0.05, 0.3):
        t = small.threshold(fpr)
        assert (ref >= t).sum() <= math.floor(fpr * 5000 + 1e-9)


def test_threshold_for_fpr_is_calibrates_rule():
    rng = np.random.default_rng(4)
    ref = np.round(rng.normal(size=300), 1)
    r = Reference.from_scores(ref)
    for fpr in (0.0, 0.005, 0.01, 0.1, 0.29, 0.5):
        assert r.threshold(fpr) == fpr_threshold(ref, fpr)


@pytest.mark.parametrize("k,n", [(0, 100), (1, 100), (3, 300), (20, 20), (7, 40), (0, 1), (1, 1), (499, 1000)])
@pytest.mark.parametrize("confidence", [0.95, 0.9])
def test_clopper_pearson_is_scipys_exact_interval(k, n, confidence):
    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="exact")
    lo, hi = clopper_pearson(k, n, confidence)
    assert lo == pytest.approx(ci.low, abs=1e-12) and hi == pytest.approx(ci.high, abs=1e-12)


def test_clopper_pearson_refuses_impossible_counts():
    for k, n in [(-1, 10), (11, 10), (0, 0)]:
        with pytest.raises(ValueError):
            clopper_pearson(k, n)


def test_min_reference_is_the_rule_of_three():
    assert min_reference(0.01) == 300 and min_reference(0.05) == 60 and min_reference(0.001) == 3000
    # at that size, zero flagged images bound the FPR near the target (one-sided 95 %: 1 - 0.05 ** (1 / n))
    assert 1 - 0.05 ** (1 / 300) < 0.0101


def test_reference_refuses_bad_data():
    with pytest.raises(ValueError, match="sorted"):
        Reference(3, (1.0, 2.0, 0.5))
    with pytest.raises(ValueError, match="finite"):
        Reference(2, (1.0, float("nan")))
    with pytest.raises(ValueError):
        Reference(2, (3.0, 2.0, 1.0))
    with pytest.raises(ValueError):
        Reference.from_scores([])


def test_histogram_counts_every_reference_image():
    ref = np.random.default_rng(5).normal(size=5000)
    for r in (Reference.from_scores(ref), Reference.from_scores(ref, max_stored=200)):
        edges, counts = r.histogram(bins=20)
        assert len(edges) == 21 and abs(sum(counts) - 5000) <= 20


def test_one_rule_for_every_threshold_at_a_false_positive_rate():
    """Calibration, a stored reference and the benchmarks' operating point choose the same cut: the (m+1)-th largest
    negative score, m = floor(fpr * n) (flag ``>`` it, or ``>=`` the next float above it)."""
    from memdetect.core import metrics
    from memdetect.core.pvalues import allowed_flags, threshold_at_fpr

    rng = np.random.default_rng(5)
    neg = np.round(rng.normal(size=300), 1)  # many ties
    labels = np.r_[np.ones(20, int), np.zeros(neg.size, int)]
    scores = np.r_[np.round(rng.normal(1.0, size=20), 1), neg]
    for fpr in (0.0, 0.005, 0.01, 0.1, 0.29, 0.5):
        cut = threshold_at_fpr(neg, fpr)
        assert cut == np.sort(neg)[::-1][allowed_flags(neg.size, fpr)]
        assert (neg > cut).sum() <= allowed_flags(neg.size, fpr)
        assert metrics.threshold_at_fpr(labels, scores, fpr) == cut
        assert fpr_threshold(neg, fpr) == Reference.from_scores(neg).threshold(fpr) == np.nextafter(cut, np.inf)
    assert threshold_at_fpr(neg, 1.0) == -np.inf == metrics.threshold_at_fpr(labels, scores, 1.0)
