"""The shipped flow-matching ground truth ``demo-sd3`` (a miniature ``StableDiffusion3Pipeline`` without T5) and the
baselines in flow-matching terms: the flow-matching loss and Wen et al.'s velocity difference, each checked against
an independent computation with the pipeline's own ``encode_prompt`` and direct transformer calls. No ../shared."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from memdetect import Detector
from memdetect.bench import baselines
from memdetect.bench.demo import bench_folder, load_demo_set, run_demo, subset
from memdetect.models.presets import PRESETS, packaged

SOURCE = packaged("demo-sd3")


@pytest.fixture(scope="module")
def det(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEMDETECT_CACHE", str(cache))
        mp.setenv("MEMDETECT_OFFLINE", "1")
        yield Detector.from_pretrained("demo-sd3", device="cpu", prune=False)


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(SOURCE, text_encoder_3=None, tokenizer_3=None)


def images(n: int = 4) -> torch.Tensor:
    return torch.from_numpy(np.load(bench_folder("demo-sd3") / "samples.npz")["samples"][:n])


def pipeline_condition(pipe, prompts):
    e, _, p, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=torch.device("cpu"),
                                    do_classifier_free_guidance=False,
                                    max_sequence_length=PRESETS["demo-sd3"].options["max_sequence_length"])
    return e, p


def velocity(pipe, x, s, embeds, pooled):
    t = torch.full((x.shape[0],), 1000.0 * s)
    return pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=embeds, pooled_projections=pooled).sample


def test_preset_loads_offline_and_scans(det):
    a = det.adapter
    assert PRESETS["demo-sd3"].family == "sd3" and type(a).__name__ == "SD3Adapter"
    assert str(det.layer) == "transformer_blocks.2.ff.net.0" and det.timestep == 50 and a.resolution == 32
    assert a.sigma(50) == pytest.approx(0.4036, abs=1e-4)  # SD's t = 50 by SNR, shifted by the model's 3.0
    assert all(p.dtype == torch.float32 for p in a.denoiser.parameters())  # fp16 files load as float32
    scores = det.score_tensor(images())
    assert scores["std"].shape == (4,) and np.isfinite(scores["std"]).all()


@torch.no_grad()
def test_empty_condition_and_prompts_are_the_pipelines_own(det, pipe):
    a = det.adapter
    e, p = pipeline_condition(pipe, ["", "a photo of a cat"])
    torch.testing.assert_close(a.cond["prompt_embeds"][0].float(), e[0])  # the cached empty prompt (no T5: zeros)
    torch.testing.assert_close(a.cond["pooled_prompt_embeds"][0].float(), p[0])
    c = a.encode_condition(["", "a photo of a cat"])
    torch.testing.assert_close(c["prompt_embeds"], e)
    torch.testing.assert_close(c["pooled_prompt_embeds"], p)


@torch.no_grad()
def test_denoising_loss_is_the_flow_matching_loss(det, pipe):
    a = det.adapter
    x = images()
    x0 = a.encode(x)
    seeds = [3, 5, 7, 11]
    eps = a.draw_noise(x0, seeds)
    s = a.sigma(50)
    e, p = pipeline_condition(pipe, [""] * 4)
    v = velocity(pipe, (1 - s) * x0 + s * eps, s, e, p)
    expected = (v - (eps - x0)).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(baselines.denoising_loss(a, x, 50, seeds), -expected, rtol=1e-4, atol=1e-6)
    # at a fixed s the epsilon error of predict_noise is (1 - s)^2 times it: the same ranking
    eps_err = (a.predict_noise(a.apply_noise(x0, 50, eps), 50) - eps).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(eps_err, (1 - s) ** 2 * expected, rtol=1e-4, atol=1e-6)


@torch.no_grad()
def test_wen_first_step_is_the_velocity_difference_at_the_samplers_first_sigma(det, pipe):
    a = det.adapter
    assert a.first_sampling_sigma(28) == 1.0  # SD3's Euler sampler starts from pure noise
    seeds = [10, 20, 30]
    prompts = ["a photo of a cat", "", "a picture of a ship"]
    x_T = torch.stack([torch.randn(8, 8, 8, generator=torch.Generator().manual_seed(s)) for s in seeds])
    e, p = pipeline_condition(pipe, prompts)
    e0, p0 = pipeline_condition(pipe, [""] * 3)
    expected = (velocity(pipe, x_T, 1.0, e, p) - velocity(pipe, x_T, 1.0, e0, p0)).flatten(1).norm(dim=1)
    got = baselines.wen_first_step_of(a, seeds, a.encode_condition(prompts), 28)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert got[1] < 1e-3 < got[0]  # the empty prompt against itself: no difference
    # the epsilon difference would vanish at s = 1 (eps_hat = x_T + (1 - s) v): why the velocity is taken
    assert baselines.wen_first_step(a, x_T, 999, a.encode_condition(prompts)).max() < got.max()


def test_bench_demo_on_demo_sd3_runs_every_applicable_baseline(tmp_path):
    data = subset(load_demo_set(bench_folder("demo-sd3")), 24)
    assert 0 < data.labels.sum() < 24
    out = run_demo(tmp_path, model="demo-sd3", limit=24, n_boot=50, select=False, batch_size=12)
    results = out["results"].set_index("method")
    for m in ("ours_std", "denoising_loss", "flipd", "flipd_conditional", "wen_first_step", "nearest_generation"):
        assert m in results.index and np.isfinite(results.loc[m, "auroc"])
    assert "nemo" not in results.index  # an MMDiT has no text cross-attention
    assert "s=1.000" in results.loc["wen_first_step", "timing"]
    scores = pd.read_csv(tmp_path / "scores.csv")
    assert len(scores) == 24 and scores["wen_first_step"].notna().all()
