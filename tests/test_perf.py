"""``benchmarks/perf.py`` as CI runs it: a smoke test on ddpm-cifar10 with a tiny budget, each configuration in its
own subprocess, reporting seconds per image and peak RSS per setting."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import CONFIGS, REPO, needs_shared


@pytest.mark.slow  # about 40 s on 2 loaded cores (two subprocesses each load torch and the model); CI runs it
@needs_shared("data", "configs", "ddpm-cifar10-32")
def test_perf_reports_speed_and_peak_memory_per_setting_in_subprocesses(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks" / "perf.py"), "--models", "ddpm-cifar10", "--settings",
           "default,naive", "--images", "4", "--naive-images", "1", "--peak", "1e11", "--configs", str(CONFIGS),
           "--workdir", str(tmp_path), "--device", "cpu"]
    out = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert row["model"] == "ddpm-cifar10" and row["layer"] == "up_blocks.0.resnets.2.conv2:in"
    for setting in ("default", "naive"):
        assert row[f"seconds_per_image_{setting}"] > 0
        # each configuration's own peak (its subprocess's ru_maxrss): the model, torch and one batch
        assert 0.2 < row[f"peak_rss_gb_{setting}"] < 4, row
    assert row["gflops_per_image"] > row["gflops_run_per_image"] > 0  # Winograd runs fewer multiplications
    assert row["floor_seconds"] > 0 and row["speedup_vs_naive"] > 0
    assert "peak RSS" in out.stdout and "[ddpm-cifar10] naive" in out.stdout
    assert (tmp_path / "ddpm-cifar10" / ".complete").is_file()  # the model folder its subprocesses loaded
