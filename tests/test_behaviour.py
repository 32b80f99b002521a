"""Behaviour is pinned: the shipped demo model's scores on ``examples/demo`` equal those of the recorded version.

``tests/data/demo_scores_a60ee8e.csv`` was written by commit a60ee8e (before the scan pipeline moved into the
library) with ``Detector.from_pretrained("demo", device="cpu").scan(["examples/demo"])``, once with
``MEMDETECT_WINOGRAD=0`` (columns ``std`` ...) and once with Winograd on (``std_winograd`` ...), each float written
with ``repr`` so that it reads back to the same bits.

The comparison holds on any CPU, never bit for bit: the scores are float32 computations, and another CPU's kernels
(other vector widths, hence other summation orders) round differently: on one x86 CPU 26 of 40 ``std`` values
differed from the recorded ones by one float32 ulp (at most 2.4e-7). The stated tolerance is ``ULPS`` float32 ulps
of max(|value|, 1): relative for the scores above 1, absolute below (``entropy`` is 1 - H/log C, so its rounding
is that of a number near 1, not of its small value). A change of behaviour (another layer, timestep, seed, pooling
or preprocessing) moves the scores by orders of magnitude more. Winograd's matmuls reduce in an order that follows
the thread count, hence its looser tolerance.
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
ULPS = 8  # float32 ulps of max(|value|, 1) a recorded score may move by on another CPU
FLOAT32_TOLERANCE = ULPS * float(np.finfo(np.float32).eps)  # 9.5e-7


def assert_float32_close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    """|got - want| <= ULPS float32 ulps of max(|want|, 1), element by element."""
    bound = FLOAT32_TOLERANCE * np.maximum(np.abs(want), 1.0)
    worst = np.abs(got - want) / bound
    assert np.all(worst <= 1.0), f"{what}: {int((worst > 1).sum())} of {len(want)} scores moved by more than {ULPS} " \
                                 f"float32 ulps (largest difference {np.abs(got - want).max():.3g})"


def test_the_tolerance_is_a_few_float32_ulps_and_catches_a_real_change():
    want = np.array([1.3068, 0.3577, 0.0231, 7.924])
    one_ulp = want + np.spacing(np.maximum(want, 1.0).astype(np.float32)).astype(np.float64)
    assert_float32_close(one_ulp, want, "one ulp")  # what another CPU's rounding does
    with pytest.raises(AssertionError, match="moved by more than"):
        assert_float32_close(want * (1 + 1e-5), want, "a change")  # what a change of behaviour does (and more)


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
            assert_float32_close(got[m].to_numpy(), want[m].to_numpy(), m)  # a few float32 ulps, not bit for bit
        else:
            np.testing.assert_allclose(got[m].to_numpy(), want[f"{m}_winograd"].to_numpy(), rtol=1e-4, err_msg=m)
            np.testing.assert_allclose(got[m].to_numpy(), want[m].to_numpy(), rtol=1e-4, err_msg=m)
