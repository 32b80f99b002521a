"""benchmarks/independent_check.py (issue 29, goal 2): the independent model's graded split and its data."""

from __future__ import annotations

import numpy as np

from .conftest import needs_shared
from .test_ground_truth import benchmarks_module


def test_split_is_graded_seeded_and_disjoint():
    ic = benchmarks_module("independent_check")
    a, b, c = ic.split(0), ic.split(0), ic.split(1)
    assert np.array_equal(a["index"], b["index"]) and not np.array_equal(a["index"], c["index"])
    assert len(set(a["index"].tolist())) == len(a["index"]) == sum(ic.GRADES.values())  # distinct digits
    counts = np.bincount(a["rows"], minlength=len(a["index"]))
    assert np.array_equal(counts, a["count"])  # every distinct digit appears exactly its grade's number of times
    assert {int(k): int((a["count"] == k).sum()) for k in ic.GRADES} == ic.GRADES
    assert ic.grade_name(1) == "unique" and ic.grade_name(64) == "exact-64"


@needs_shared("data", "datasets", "mnist")
def test_mnist_test_digits_load_as_rgb_32px():
    ic = benchmarks_module("independent_check")
    x, y = ic.load_mnist_test()
    assert x.shape == (10000, 3, 32, 32) and x.dtype == np.uint8 and y.shape == (10000,)
    assert (x[:, 0] == x[:, 1]).all() and x[:, :, :2].max() == 0  # grey over RGB, 2 px zero padding
    assert set(np.unique(y).tolist()) == set(range(10))
