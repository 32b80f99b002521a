"""memdetect.guard: in-generation scores from the pipeline's own forward passes, on tiny diffusers pipelines."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import memdetect
from memdetect.core.capture import Trace, pool
from memdetect.errors import UsageError
from memdetect.workflows.guarding import MemorizedImageError, adapter_for_pipeline
from memdetect.core.scores import std


def _hooks(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


class Spy:
    """Counts denoiser calls and keeps each call's input and timestep (a hook of the test's own)."""

    def __init__(self, module, adapter):
        self.calls, self.module, self.adapter = [], module, adapter

    def __enter__(self):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
            t = args[1] if len(args) > 1 else kwargs["timestep"]
            t = int(torch.as_tensor(t).reshape(-1)[0])
            self.calls.append((x.detach().clone(), t, kwargs.get("class_labels")))
            return None

        self.handle = self.module.register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _reference_std(adapter, layer, x, t):
    """Independent reference: the adapter's null-condition forward on ``x`` at ``t``, hooked and pooled."""
    with torch.no_grad(), Trace(adapter.denoiser, [layer]) as tr:
        adapter.forward(x, t)
    return std(pool(tr[layer], adapter.pooling)).numpy()


@pytest.fixture
def sd_pipe(tiny_sd):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_ddpm_one_score_per_image_from_the_forward_nearest_step_t(ddpm_pipe):
    g = memdetect.guard(ddpm_pipe, threshold=None, step_t=50)
    n_hooks = _hooks(ddpm_pipe.unet)
    with Spy(ddpm_pipe.unet, g.adapter) as spy:
        out = g(batch_size=3, num_inference_steps=10, generator=torch.Generator().manual_seed(0), output_type="np")
    r = out.guard
    assert len(out.images) == 3 and r.scores["std"].shape == (3,) and not r.flagged.any()
    assert not r.extra_forward and len(spy.calls) == 10  # unconditional: no added forward
    steps = [t for _, t, _ in spy.calls]
    assert r.timestep == min(steps, key=lambda t: abs(t - 50))
    x = next(x for x, t, _ in spy.calls if t == r.timestep)
    np.testing.assert_allclose(r.scores["std"], _reference_std(g.adapter, g.layer, x, r.timestep), rtol=1e-5)
    assert _hooks(ddpm_pipe.unet) == n_hooks  # every hook removed


def test_sd_with_cfg_reads_the_unconditional_half_without_an_extra_unet_call(sd_pipe):
    g = memdetect.guard(sd_pipe, threshold=None)
    n_hooks = _hooks(sd_pipe.unet)
    call = dict(prompt=["a cat", "a dog"], num_images_per_prompt=2, num_inference_steps=4, guidance_scale=7.5,
                output_type="np", height=16, width=16)
    with Spy(sd_pipe.unet, g.adapter) as plain:
        sd_pipe(**call, generator=torch.Generator().manual_seed(0))
    with Spy(sd_pipe.unet, g.adapter) as spy:
        out = g(**call, generator=torch.Generator().manual_seed(0))
    assert len(spy.calls) == len(plain.calls) >= 4  # the number of UNet calls is unchanged (PNDM adds one)
    r = out.guard
    assert r.scores["std"].shape == (4,) and not r.extra_forward
    x = next(x for x, t, _ in spy.calls if t == r.timestep)
    assert x.shape[0] == 8
    np.testing.assert_allclose(r.scores["std"], _reference_std(g.adapter, g.layer, x[:4], r.timestep), rtol=1e-4)
    # the prompts' half would give other scores: the guard really reads the empty prompt's rows
    from memdetect.models.sd import prompt_embeddings

    cond = prompt_embeddings(sd_pipe.tokenizer, sd_pipe.text_encoder, ["a cat", "a cat", "a dog", "a dog"])
    with torch.no_grad(), Trace(g.adapter.denoiser, [g.layer]) as tr:
        g.adapter.predict_noise(x[4:], r.timestep, cond)
    assert not np.allclose(r.scores["std"], std(pool(tr[g.layer], "spatial-max")).numpy(), rtol=1e-4)
    assert _hooks(sd_pipe.unet) == n_hooks


@pytest.mark.parametrize("variant", ["no-cfg", "negative-prompt"])
def test_sd_without_unconditional_rows_runs_one_stated_extra_forward(sd_pipe, variant):
    g = memdetect.guard(sd_pipe, threshold=None)
    call = dict(prompt="a cat", num_images_per_prompt=2, num_inference_steps=3, output_type="np", height=16,
                width=16, guidance_scale=1.0 if variant == "no-cfg" else 7.5)
    if variant == "negative-prompt":
        call["negative_prompt"] = "blurry"
    with Spy(sd_pipe.unet, g.adapter) as spy:
        out = g(**call, generator=torch.Generator().manual_seed(0))
    with Spy(sd_pipe.unet, g.adapter) as plain:
        sd_pipe(**call, generator=torch.Generator().manual_seed(0))
    assert len(spy.calls) == len(plain.calls) + 1 and out.guard.extra_forward and "extra" in out.guard.note
    x, t, _ = next(c for c in spy.calls if c[1] == out.guard.timestep)
    # the extra forward runs the empty prompt on x_t, one row per image (under CFG both halves hold the same x_t)
    np.testing.assert_allclose(out.guard.scores["std"], _reference_std(g.adapter, g.layer, x[:2], t), rtol=1e-4)


def test_dit_with_cfg_reads_the_null_class_half(tmp_path):
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    from tests.conftest import tiny_vae

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8,
                                        num_layers=4, sample_size=8, patch_size=2, num_embeds_ada_norm=1000)
    pipe = DiTPipeline(transformer=transformer, vae=tiny_vae(), scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    g = memdetect.guard(pipe, threshold=None)
    with Spy(pipe.transformer, g.adapter) as spy:
        out = g(class_labels=[1, 2, 3], num_inference_steps=4, guidance_scale=4.0, output_type="np",
                generator=torch.Generator().manual_seed(0))
    r = out.guard
    assert len(spy.calls) == 4 and not r.extra_forward and r.scores["std"].shape == (3,)
    x, t, labels = next(c for c in spy.calls if c[1] == r.timestep)
    assert labels[3:].tolist() == [1000] * 3
    np.testing.assert_allclose(r.scores["std"], _reference_std(g.adapter, g.layer, x[3:], t), rtol=1e-4)
    with Spy(pipe.transformer, g.adapter) as spy:
        out = g(class_labels=[1, 2], num_inference_steps=2, guidance_scale=1.0, output_type="np")
    assert len(spy.calls) == 2 + 1 and out.guard.extra_forward


def test_dit_with_fewer_than_1000_classes_samples_with_guidance_through_the_adapter(tmp_path):
    """DiTPipeline passes ImageNet's null label 1000 under guidance; the adapter's pipeline maps it to the model's own
    null label (here 10), so a 10-class model (like demo-dit) generates and is guarded."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    from memdetect.models.dit import DiTAdapter
    from tests.conftest import tiny_vae

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8,
                                        num_layers=4, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    DiTPipeline(transformer=transformer, vae=tiny_vae(), scheduler=DDIMScheduler()).save_pretrained(tmp_path / "m")
    bare = DiTPipeline.from_pretrained(tmp_path / "m")
    with pytest.raises(IndexError):  # what diffusers does on its own
        bare(class_labels=[1], num_inference_steps=2, guidance_scale=4.0, output_type="np")
    pipe = DiTAdapter.load_pipeline(str(tmp_path / "m"), device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    g = memdetect.guard(pipe, threshold=None)
    with Spy(pipe.transformer, g.adapter) as spy:
        out = g(class_labels=[1, 2, 3], num_inference_steps=4, guidance_scale=4.0, output_type="np",
                generator=torch.Generator().manual_seed(0))
    r = out.guard
    assert out.images.shape[0] == 3 and len(spy.calls) == 4 and not r.extra_forward
    x, t, labels = next(c for c in spy.calls if c[1] == r.timestep)
    assert labels[3:].tolist() == [10] * 3  # the model's own null label reached the transformer
    np.testing.assert_allclose(r.scores["std"], _reference_std(g.adapter, g.layer, x[3:], t), rtol=1e-4)


def test_regenerate_uses_fresh_seeds_and_reports_the_retries(ddpm_pipe):
    call = dict(batch_size=3, num_inference_steps=5, output_type="np")
    first = memdetect.guard(ddpm_pipe, threshold=None)(**call, generator=torch.Generator().manual_seed(0))
    s = first.guard.scores["std"]
    threshold = float(np.sort(s)[1])  # flags the two highest-scoring images
    g = memdetect.guard(ddpm_pipe, threshold=threshold, on_memorized="regenerate", max_retries=2)
    out = g(**call, generator=torch.Generator().manual_seed(0))
    r = out.guard
    assert 1 <= len(r.retries) <= 2
    assert r.retries[0].indices == np.flatnonzero(s >= threshold).tolist()
    seeds = [seed for retry in r.retries for seed in retry.seeds]
    assert len(set(seeds)) == len(seeds)  # every regeneration has its own seed
    kept = np.flatnonzero(s < threshold)
    np.testing.assert_array_equal(out.images[kept], first.images[kept])
    for i in r.retries[0].indices:
        assert not np.array_equal(out.images[i], first.images[i])
    last = {i: (sc, fl) for retry in r.retries for i, sc, fl in zip(retry.indices, retry.scores, retry.flagged)}
    for i, (sc, fl) in last.items():
        assert r.scores["std"][i] == pytest.approx(sc) and r.flagged[i] == fl
    if len(r.retries) < 2:
        assert not r.flagged.any()
    assert [row["regenerated"] for row in r.rows()] == [
        max((retry.attempt for retry in r.retries if i in retry.indices), default=0) for i in range(3)]


def test_raise_and_bad_arguments(ddpm_pipe):
    g = memdetect.guard(ddpm_pipe, threshold=0.0, on_memorized="raise")  # std >= 0: every image is flagged
    with pytest.raises(MemorizedImageError, match="flagged 2 of 2") as e:
        g(batch_size=2, num_inference_steps=2, output_type="np")
    assert e.value.result.flagged.all()
    with pytest.raises(UsageError, match="on_memorized"):
        memdetect.guard(ddpm_pipe, threshold=1.0, on_memorized="drop")
    with pytest.raises(UsageError, match="needs a threshold"):
        memdetect.guard(ddpm_pipe, threshold=None, on_memorized="regenerate")
    with pytest.raises(memdetect.errors.LayerError):
        memdetect.guard(ddpm_pipe, threshold=1.0, layer="up_blocks.9.nope")
    with pytest.raises(memdetect.errors.UnsupportedModelError, match="does not support"):
        adapter_for_pipeline(object())
    with pytest.raises(UsageError, match="return_dict"):
        memdetect.guard(ddpm_pipe, threshold=None)(batch_size=1, num_inference_steps=2, return_dict=False)
    assert _hooks(ddpm_pipe.unet) == 0


def test_cli_calibrate_guard_then_generate_guarded(tiny_ddpm, tmp_path):
    import pandas as pd
    from typer.testing import CliRunner

    from memdetect.cli import app
    from memdetect.config import load_config

    def invoke(*args):
        return CliRunner().invoke(app, [str(a) for a in args])

    cfg = tmp_path / "memdetect.toml"
    res = invoke("calibrate", "--guard", "--model", "ddpm", "--model-path", tiny_ddpm, "-n", 4, "--steps", 3,
                 "--device", "cpu", "-o", cfg)
    assert res.exit_code == 0, res.output
    conf = load_config(cfg)
    from memdetect.config import tomllib

    doc = tomllib.loads(cfg.read_text())
    assert doc["guard"]["fpr_reference"]["std"] == 0.0  # strict rule: no reference generation flagged
    # portable: the model folder relative to the config file, resolved against it when read
    assert not os.path.isabs(doc["model_path"]) and Path(conf.model_path).resolve() == Path(tiny_ddpm).resolve()
    assert conf.threshold is None and conf.guard["steps"] == 3 and conf.guard["metric"] == "std"
    # 1% of 4 reference generations < 1: the threshold sits just above the largest reference score
    ref = memdetect.guard(memdetect.workflows.guarding.load_guardable("ddpm", str(tiny_ddpm), device="cpu")[0], threshold=None)
    # fewer steps than the family's 1,000 ancestral ones: the command samples with DDIM, eta 0 (and records it)
    assert doc["guard"]["eta"] == 0.0
    again = memdetect.workflows.guarding.generate(ref, None, 4, steps=3, seed=0, eta=0.0)
    assert conf.guard["threshold"] == pytest.approx(float(np.nextafter(again.result.scores["std"].max(), np.inf)),
                                                    rel=1e-5)

    res = invoke("scan", tmp_path, "--config", cfg)
    assert res.exit_code == 2 and "guard threshold" in res.output

    out = tmp_path / "gen"
    res = invoke("generate", "--model", "ddpm", "--model-path", tiny_ddpm, "-n", 3, "--guard", "--config", cfg,
                 "--device", "cpu", "--seed", 1, "-o", out)
    assert res.exit_code in (0, 1), res.output
    report = pd.read_csv(out / "report.csv")
    assert len(report) == 3 and sorted(p.name for p in out.glob("*.png")) == list(report["file"])
    assert (report["flagged"] == (report["std"] >= conf.guard["threshold"])).all()
    assert res.exit_code == int(report["flagged"].any())
    assert "no extra pass" in res.output


def test_demo_flags_its_memorized_generations_at_the_shipped_guard_calibration():
    """The first 16 generations of benchmarks/guard_demo.py (DDIM from one CPU generator seeded 0), made again
    under the guard with the calibration it shipped (memdetect/data/demo_guard): flagged exactly where the label
    (nearest training image, memdetect.bench.labels) says memorized. Regenerated images must match the labelled ones."""
    import pandas as pd

    from memdetect.config import load_config
    from memdetect.models.presets import packaged

    folder = packaged("demo_guard")
    conf = load_config(f"{folder}/memdetect.toml")
    manifest = pd.read_csv(f"{folder}/manifest.csv")
    shipped = torch.from_numpy(np.load(f"{folder}/samples.npz")["samples"])
    pipe, _ = memdetect.workflows.guarding.load_guardable("demo", device="cpu")
    g = memdetect.guard(pipe, threshold=conf.guard["threshold"], step_t=conf.guard["step_t"])
    out = g(batch_size=len(shipped), generator=torch.Generator().manual_seed(0),
            num_inference_steps=conf.guard["steps"], eta=0.0, output_type="np")
    images = torch.from_numpy(np.round(out.images * 255).astype(np.uint8)).permute(0, 3, 1, 2)
    assert (images.int() - shipped.int()).abs().float().mean() < 1.0  # the same generations (up to rounding)
    label = manifest["label"].to_numpy()
    used = np.isin(label, ["memorized", "generalized"])
    assert (label[used] == "memorized").sum() >= 1 and (label[used] == "generalized").sum() >= 5
    np.testing.assert_array_equal(out.guard.flagged[used], label[used] == "memorized")


def test_demo_sd_flags_copies_from_memorized_prompts_and_not_normal_prompts_at_its_guard_calibration():
    """demo-sd's guard calibration (memdetect/data/demo_sd_guard, made by ``benchmarks/guard_gt.py --ship`` with
    ``calibrate_guard`` on the even-numbered normal prompts) and its fixed set (one generation, seed 0, for each memorized
    prompt of the exact-256/64/16 grades and each odd-numbered normal prompt), made again under the guard: every
    generation of a memorized prompt that the label calls a copy is flagged, and no generalized generation of a normal
    prompt is."""
    import pandas as pd

    from memdetect.config import load_config
    from memdetect.workflows.guarding import generate
    from memdetect.models.presets import packaged

    folder = packaged("demo_sd_guard")
    conf = load_config(f"{folder}/memdetect.toml")
    manifest = pd.read_csv(f"{folder}/manifest.csv", keep_default_na=False)
    shipped = torch.from_numpy(np.load(f"{folder}/samples.npz")["samples"])
    pipe, _ = memdetect.workflows.guarding.load_guardable("demo-sd", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    g = memdetect.guard(pipe, threshold=conf.guard["threshold"], step_t=conf.guard["step_t"])
    gen = generate(g, manifest["condition"].tolist(), 1, steps=conf.guard["steps"], seed=0)
    images = torch.from_numpy(gen.images).permute(0, 3, 1, 2)
    assert (images.int() - shipped.int()).abs().float().mean() < 1.0  # the same generations (up to rounding)
    label, source = manifest["label"].to_numpy(), manifest["prompt_source"].to_numpy()
    copies = (source == "memorized") & (label == "memorized")
    novel = (source == "normal") & (label == "generalized")
    assert copies.sum() >= 1 and novel.sum() >= 10
    flagged = gen.result.flagged
    assert flagged[copies].all(), manifest[copies & ~flagged]
    assert not flagged[novel].any(), manifest[novel & flagged]


def test_hooks_are_removed_when_the_pipeline_raises_inside_the_guarded_forward(ddpm_pipe):
    g = memdetect.guard(ddpm_pipe, threshold=None)
    unet = ddpm_pipe.unet

    def boom(module, args, output):
        raise RuntimeError("boom")

    mine = unet.conv_out.register_forward_hook(boom)  # fires after the guarded layer, inside the same forward
    before = _hooks(unet)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            g(batch_size=1, num_inference_steps=1, output_type="np")  # the one step is the guarded one
    finally:
        mine.remove()
    assert _hooks(unet) == before - 1 == 0


def test_guarding_leaves_the_users_module_flags_as_they_were(sd_pipe):
    sd_pipe.unet.train()  # e.g. a pipeline that is being fine-tuned
    sd_pipe.vae.requires_grad_(False)
    sd_pipe.unet.requires_grad_(True)
    sd_pipe.unet.conv_in.requires_grad_(False)
    def flags():
        return {name: (m.training, [p.requires_grad for p in m.parameters(recurse=False)])
                for comp in ("unet", "vae", "text_encoder")
                for name, m in getattr(sd_pipe, comp).named_modules(prefix=comp)}

    before = flags()
    g = memdetect.guard(sd_pipe, threshold=None)
    after = flags()
    assert after == before and g.adapter.denoiser is sd_pipe.unet  # shared, not copied, and not re-flagged
    assert sd_pipe.unet.training and not any(p.requires_grad for p in sd_pipe.vae.parameters())


def test_a_schedule_without_a_step_near_step_t_warns_and_reports_the_step_read(ddpm_pipe):
    g = memdetect.guard(ddpm_pipe, threshold=None, step_t=50)
    with pytest.warns(UserWarning, match="no step near t=50; the guard reads t=0 "):
        out = g(batch_size=1, num_inference_steps=4, output_type="np")  # DDIM over 1000 steps: 750, 500, 250, 0
    assert out.guard.timestep == 0


def test_a_step_near_step_t_does_not_warn(ddpm_pipe):
    import warnings

    g = memdetect.guard(ddpm_pipe, threshold=None, step_t=50)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        out = g(batch_size=1, num_inference_steps=50, output_type="np")
    assert abs(out.guard.timestep - 50) <= 10
