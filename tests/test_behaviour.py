"""Behaviour is pinned: the shipped demo model's scores on ``examples/demo`` equal those of the recorded version.

``tests/data/demo_scores_a60ee8e.csv`` was written by commit a60ee8e (before the scan pipeline moved into the
library) with ``Detector.from_pretrained("demo", device="cpu").scan(["examples/demo"])``, once with
``MEMDETECT_WINOGRAD=0`` (columns ``std`` ...) and once with Winograd on (``std_winograd`` ...), each float written
with ``repr`` so that it reads back to the same bits. The direct convolution gives the same bits on any thread
count; Winograd's matmuls do not (their reduction order follows the threads), hence its tolerance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from memdetect.cli import app

REPO = Path(__file__).resolve().parents[1]
RECORDED = Path(__file__).parent / "data" / "demo_scores_a60ee8e.csv"
METRICS = ["std", "l4l2", "entropy", "maxmin"]


@pytest.mark.parametrize("winograd", ["0", "1"])
def test_demo_scores_match_the_recorded_version(winograd, tmp_path, monkeypatch):
    monkeypatch.setenv("MEMDETECT_WINOGRAD", winograd)
    out = tmp_path / "report.csv"
    res = CliRunner().invoke(app, ["scan", str(REPO / "examples" / "demo"), "--model", "demo", "--device", "cpu",
                                   "--output", str(out), "--workers", "0", "--quiet"])
    assert res.exit_code == 0, res.output
    got = pd.read_csv(out, float_precision="round_trip")
    want = pd.read_csv(RECORDED, float_precision="round_trip")
    assert list(got["path"].map(lambda p: Path(p).name)) == list(want["path"])
    for m in METRICS:
        if winograd == "0":
            np.testing.assert_array_equal(got[m].to_numpy(), want[m].to_numpy(), err_msg=m)  # bit for bit
        else:
            np.testing.assert_allclose(got[m].to_numpy(), want[f"{m}_winograd"].to_numpy(), rtol=1e-4, err_msg=m)
            np.testing.assert_allclose(got[m].to_numpy(), want[m].to_numpy(), rtol=1e-4, err_msg=m)
