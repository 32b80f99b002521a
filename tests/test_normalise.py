"""Reference-only normalisations of the pooled vector (``memdetect.bench.normalise``, issue 29 point 3)."""

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from memdetect.bench.demo import split_halves
from memdetect.bench.normalise import study, variants

REF_VARIANTS = ("std_ref_centred", "std_ref_standardised", "maxz_ref")


def planted(n: int = 400, c: int = 16, seed: int = 0):
    """Novel vectors whose channel 0 swings widely (sd 10) and the rest barely (sd 0.1); memorized ones (every
    second row) carry a spike of 1 in channel 5, small beside channel 0's swings."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.full((c,), 0.1)
    scale[0] = 10.0
    v = torch.randn(n, c, generator=g) * scale
    y = np.arange(n) % 2
    v[torch.from_numpy(y == 1), 5] += 1.0
    return v, y


def test_reference_statistics_come_from_the_reference_rows_only():
    v, y = planted()
    ref = np.flatnonzero(y == 0)[:100]
    a = variants(v, ref)
    w = v.clone()
    others = np.setdiff1d(np.arange(len(v)), ref)
    w[others] = w[others] * 3 + 7  # change every vector outside the reference
    b = variants(w, ref)
    for name in REF_VARIANTS:
        np.testing.assert_allclose(a[name][ref], b[name][ref])  # a reference row's score sees only the reference


def test_standardising_on_the_reference_finds_a_spike_in_a_quiet_channel():
    v, y = planted()
    sel, held = split_halves(y)
    s = variants(v, sel[y[sel] == 0])
    assert roc_auc_score(y[held], s["std"][held]) < 0.65  # channel 0's swings hide the spike
    assert roc_auc_score(y[held], s["std_ref_standardised"][held]) > 0.95
    table = study(v, y, sel, held, n_boot=200).set_index("variant")
    assert table.loc["std_ref_standardised", "auroc_verdict"] == "better"
    assert table.loc["std", "n_reference"] == int((y[sel] == 0).sum())


def test_per_class_references_remove_a_class_dependent_score_level():
    g = torch.Generator().manual_seed(1)
    n, c = 600, 256
    classes = np.arange(n) % 3
    y = (np.arange(n) // 3) % 2
    level = torch.tensor([1.0, 2.0, 3.0])[torch.from_numpy(classes)]  # the score level moves with the class
    v = torch.randn(n, c, generator=g) * level[:, None] * (1 + 0.3 * torch.from_numpy(y)[:, None])
    sel, held = split_halves(y)
    s = variants(v, sel[y[sel] == 0], classes=classes)
    assert roc_auc_score(y[held], s["std"][held]) < 0.8
    assert roc_auc_score(y[held], s["std_class_zscore"][held]) > 0.95


def test_a_class_with_too_few_references_falls_back_to_the_whole_reference():
    v, y = planted(n=200)
    classes = np.where(np.arange(200) < 190, 0, 1)  # class 1: 10 rows, 5 of them novel
    ref = np.flatnonzero(y == 0)
    s = variants(v, ref, classes=classes, min_class=10)
    rare = classes == 1
    np.testing.assert_allclose(s["std_class_standardised"][rare], s["std_ref_standardised"][rare])
    with pytest.raises(ValueError, match="at least 2"):
        variants(v, ref[:1])
