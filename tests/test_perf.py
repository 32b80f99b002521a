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


def _random_weights():
    import importlib

    if str(REPO / "benchmarks") not in sys.path:
        sys.path.insert(0, str(REPO / "benchmarks"))
    return importlib.import_module("random_weights")


def test_random_weights_are_streamed_into_shards_that_diffusers_and_the_lazy_reader_load(tmp_path):
    """A real-architecture folder is written tensor by tensor (never the state dict in memory): with a small shard
    size it becomes several safetensors files and an index; diffusers loads it, and ``LazyModule`` reads any tensor
    by name from the right shard, with the constructor's buffers written as they are."""
    import torch
    from diffusers import PixArtTransformer2DModel

    from memdetect.models.lazy import INDEX_NAME, LazyModule

    cfg = dict(sample_size=8, num_layers=4, patch_size=2, attention_head_dim=4, num_attention_heads=2,
               caption_channels=16, in_channels=4, cross_attention_dim=8, out_channels=8, norm_num_groups=4)
    folder = tmp_path / "transformer"
    info = _random_weights().write_random_diffusers(PixArtTransformer2DModel, cfg, folder, shard_bytes=4000)
    assert len(info["files"]) > 2 and (folder / INDEX_NAME).is_file()
    index = json.loads((folder / INDEX_NAME).read_text())
    assert set(index["weight_map"].values()) == set(info["files"])
    model = PixArtTransformer2DModel.from_pretrained(folder, torch_dtype=torch.bfloat16)
    ref = PixArtTransformer2DModel(**cfg)
    assert set(model.state_dict()) == set(ref.state_dict())
    w = [p for n, p in model.named_parameters() if p.dim() == 2]
    assert all(p.dtype == torch.bfloat16 for p in w)
    std = torch.cat([p.detach().float().flatten() for p in w]).std()
    assert 0.015 < float(std) < 0.025  # N(0, 0.02^2)
    assert not torch.equal(w[0].flatten()[:8], w[1].flatten()[:8])  # random windows, not one repeated tensor
    lazy = LazyModule(PixArtTransformer2DModel, str(tmp_path), "transformer")
    last = "transformer_blocks.3.ff.net.2.weight"
    lazy.materialise([last], torch.device("cpu"), torch.bfloat16)
    assert torch.equal(dict(lazy.module.named_parameters())[last], dict(model.named_parameters())[last])


@pytest.mark.slow  # about 1 minute on 2 idle cores (4 subprocesses); CI runs it
@needs_shared("data", "configs", "sd14", "tokenizer")
def test_perf_today_rows_report_cpu_seconds_peak_rss_and_the_blocks_read(tmp_path):
    """``perf.py --models pixart-sigma`` on a tiny PixArt-Σ config folder laid out like tests/data/configs: random
    weights written, the condition and the scan each in its own subprocess, a row with the blocks read (half of
    them: the default layer is the middle block), CPU and wall seconds per image and both peaks; the weights are
    deleted afterwards."""
    from . import tiny_pipelines as tp

    configs = tmp_path / "configs"
    tp.make_tiny_pixart(configs / "pixart")
    work = tmp_path / "work"
    cmd = [sys.executable, str(REPO / "benchmarks" / "perf.py"), "--models", "pixart-sigma", "--today-configs",
           str(configs), "--today-workdir", str(work), "--configs", str(CONFIGS), "--margin-gb", "0", "--first"]
    out = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", "MEMDETECT_CACHE": str(tmp_path / "c")},
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert row["model"] == "pixart-sigma" and row["dtype"] == "bfloat16", row
    assert row["layer"] == "transformer_blocks.1.ff.net.0" and row["blocks_read"] == {"transformer_blocks": "2/4"}
    assert 0 < row["parameters_read"] < row["parameters_total"] == row["denoiser_parameters"]
    assert row["cpu_seconds_per_image"] > 0 and row["seconds_per_image"] > 0 and row["scores_finite"]
    for phase in ("condition", "scan", "first"):  # first: a cold-cache scan in one process
        assert 0.2 < row[f"peak_rss_gb_{phase}"] < 4, row
    assert row["condition"]["prompt_embeds"] == [1, 300, 16]
    assert not (work / "pixart-sigma").exists()  # deleted after measuring


def test_run_measured_kills_a_child_past_the_rss_cap(capsys):
    """The guard for a shared machine: a child whose RSS passes ``rss_cap_gb`` is killed (SIGKILL), not waited for."""
    import time

    from .test_ground_truth import benchmarks_module

    perf = benchmarks_module("perf")
    hog = [sys.executable, "-c", "import time; x = bytearray(400_000_000); time.sleep(60)"]
    t0 = time.perf_counter()
    _, err, rc, wall, peak = perf.run_measured(hog, dict(os.environ), rss_cap_gb=0.2)
    assert rc == -9 and time.perf_counter() - t0 < 50
    assert "passed the cap of 0.2 GB: killed" in capsys.readouterr().err
    out, _, rc, _, _ = perf.run_measured([sys.executable, "-c", "print('ok')"], dict(os.environ), rss_cap_gb=2)
    assert rc == 0 and out.strip() == "ok"
