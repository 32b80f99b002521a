"""The shipped ground-truth models (demo-sd, demo-dit, demo-edm, demo-sd3): each loads through its family's adapter, as a
real model of that family does, and its own labelled generations separate by the default std score.

Each test scores a fixed, seeded, label-balanced subset of 100 labelled samples (``balanced_subset``) on CPU;
none needs ../shared.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from memdetect import Detector
from memdetect.bench.labels import LabelRule
from memdetect.models.presets import PRESETS, packaged

from .conftest import REPO, SHARED, needs_shared

MODELS = {  # preset -> (family, bench folder, adapter class name, default layer)
    "demo-sd": ("sd", "demo_sd_bench", "StableDiffusionAdapter", "up_blocks.0.resnets.2.conv2:in"),
    "demo-dit": ("dit", "demo_dit_bench", "DiTAdapter", "transformer_blocks.3.ff.net.0"),
    "demo-edm": ("edm", "demo_edm_bench", "EDMAdapter", "model.enc.8x8_block3.norm0"),
    "demo-sd3": ("sd3", "demo_sd3_bench", "SD3Adapter", "transformer_blocks.2.ff.net.0"),
}
#: the training command recorded in each recipe's flags (benchmarks/train_sd3_ground_truth.py's is ``train``)
TRAIN_COMMAND = {"demo-sd3": "train"}
DATA = Path(packaged("demo")).parent


def labelled(bench: str) -> tuple[torch.Tensor, pd.DataFrame]:
    folder = DATA / bench
    images = torch.from_numpy(np.load(folder / "samples.npz")["samples"])
    man = pd.read_csv(folder / "manifest.csv")
    rule = LabelRule()
    man["label"] = [rule.label(s) for s in man["similarity"]]
    return images, man


def balanced_subset(man: pd.DataFrame, size: int = 100, seed: int = 0) -> np.ndarray:
    """A fixed (seeded) sample of labelled generations stratified by label with equal allocation: up to half
    memorized, the rest generalized (a proportional split would leave a handful of memorized samples on a model
    that memorizes few, e.g. 13 of 100 on demo-sd)."""
    rng = np.random.default_rng(seed)
    mem = man.loc[man["label"] == "memorized", "sample"].to_numpy()
    gen = man.loc[man["label"] == "generalized", "sample"].to_numpy()
    k = min(size // 2, len(mem))
    return np.sort(np.concatenate([rng.choice(mem, k, replace=False), rng.choice(gen, size - k, replace=False)]))


#: The issue's bar: std AUROC >= 0.9 at the family's default layer on this subset (measured: demo-sd 0.999, demo-edm
#: 0.988, demo-dit 0.972 on the balanced model shipped 2026-12-04; the retired unbalanced one measured 0.732 and was
#: held to 0.65 here; benchmarks/RESULTS.md, issue 12). The defaults are the paper's layers for the real models and
#: are not tuned on these miniatures.
BAR = 0.9


#: measured below the bar, kept as a strict expected failure so a change either way is seen: demo-sd3's default layer
#: (the image MLP of its middle MMDiT block, read as for sd3-medium) is *inverted* on its generations (std AUROC 0.116
#: on this subset, 2026-12-08; benchmarks/RESULTS.md, "demo-sd3")
BELOW_BAR = {"demo-sd3"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(
    strict=True, reason="the default layer is inverted on demo-sd3 (RESULTS.md)")) if n in BELOW_BAR else n
    for n in MODELS])
def test_shipped_model_scores_its_labelled_samples(name):
    family, bench, adapter_cls, layer = MODELS[name]
    assert PRESETS[name].family == family
    det = Detector.from_pretrained(name, device="cpu")
    assert type(det.adapter).__name__ == adapter_cls and det.adapter.family == family
    assert str(det.layer) == layer and det.timestep == 50 and det.adapter.resolution == 32
    assert all(p.dtype == torch.float32 for p in det.adapter.denoiser.parameters())  # fp16 files load as float32

    images, man = labelled(bench)
    keep = balanced_subset(man)
    y_keep = (man.set_index("sample").loc[keep, "label"] == "memorized").to_numpy().astype(int)
    assert 20 <= y_keep.sum() <= 50 and len(keep) == 100
    std = det.score_tensor(images[keep])["std"]
    auroc = roc_auc_score(y_keep, std)
    assert auroc >= BAR, f"{name}: std AUROC {auroc:.3f} on the fixed subset"


@pytest.mark.parametrize("name", list(MODELS))
def test_shipped_files_sizes_and_labels(name):
    family, bench, _, _ = MODELS[name]
    model_dir = DATA / name
    files = [f for f in model_dir.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 20e6
    weights = [f for f in files if f.suffix in (".safetensors", ".bin", ".pkl", ".pt", ".ckpt")]
    assert weights and all(f.suffix == ".safetensors" for f in weights)

    images, man = labelled(bench)
    assert images.dtype == torch.uint8 and tuple(images.shape[1:]) == (3, 32, 32) and len(images) == len(man)
    counts = man["label"].value_counts()
    assert counts.get("memorized", 0) + counts.get("generalized", 0) >= 1000
    assert counts.get("memorized", 0) >= 50 and counts.get("generalized", 0) >= 100  # dozens memorized at least
    for col in ("similarity", "nearest_train", "nearest_grade", "nearest_count", "nearest_kind", "flipped",
                "shift_dy", "shift_dx", "similarity_rgb", "similarity_plain"):
        assert col in man.columns
    # the labelling similarity adds colour-cast invariance to the flip/shift-invariant RGB one: never below it
    assert (man["similarity"] >= man["similarity_rgb"] - 1e-5).all()
    recipe = json.loads((DATA / bench / "recipe.json").read_text())
    assert recipe["flags"]["cmd"] == TRAIN_COMMAND.get(name, family) and recipe["steps_done"] > 0
    assert "grade_table" in recipe
    # the memorized generations copy duplicated training images (which grades each model reproduces is in
    # RESULTS.md)
    mem = man[man["label"] == "memorized"]
    assert (mem["nearest_count"] > 1).mean() >= 0.9


def test_package_data_budget():
    total = sum(f.stat().st_size for f in DATA.rglob("*") if f.is_file())
    assert total <= 100e6  # issue 31: package data stays <= 100 MB in all


def test_demo_sd_prompt_lists_load_with_the_laion_reader():
    from memdetect.bench.prompts import load_list

    folder = DATA / "demo-sd"
    mem, _ = load_list(folder / "memorized_prompts.csv", "wen-memorized")
    normal, _ = load_list(folder / "normal_prompts.csv", "nemo-unmemorized", option="--normal")
    assert len(mem) >= 50 and len(normal) >= 50
    assert mem["prompt"].is_unique and not set(mem["prompt"]) & set(normal["prompt"])
    assert {"count", "kind", "grade", "train_image"} <= set(mem.columns)
    high, _ = load_list(folder / "memorized_prompts.csv", "wen-memorized", filters=["count>=64"])
    assert 0 < len(high) < len(mem)


def test_demo_dit_depth_is_even_and_null_class_is_ten():
    cfg = json.loads((DATA / "demo-dit" / "transformer" / "config.json").read_text())
    assert cfg["num_layers"] % 2 == 0 and cfg["num_embeds_ada_norm"] == 10 and cfg["patch_size"] == 2


def test_layer_sweep_on_a_transformer_skips_what_token_pooling_cannot_reduce():
    from memdetect.bench.demo import bench_folder, load_demo_set, subset, sweep_layers

    det = Detector.from_pretrained("demo-dit", device="cpu", prune=False)  # a sweep runs every layer
    data = subset(load_demo_set(bench_folder("demo-dit")), 40)  # 40: a few memorized samples to split
    sweep = sweep_layers(det, data, timesteps=(50,), batch_size=8, select_fraction=0.5)
    assert "transformer_blocks.3.ff.net.0" in set(sweep["layer"])
    assert not any(s.startswith("pos_embed.proj") for s in sweep["layer"])  # [B, C, H, W]: no token axis
    assert sweep["auroc_select"].between(0, 1).all()


def benchmarks_module(name: str):
    """A module of benchmarks/ (scripts, not a package: they import each other from their own folder)."""
    import importlib
    import sys

    if str(REPO / "benchmarks") not in sys.path:
        sys.path.insert(0, str(REPO / "benchmarks"))
    return importlib.import_module(name)


def test_edm_sampler_of_the_script_reproduces_the_shipped_samples():
    """``train_ground_truth.py edm``'s sampling stage (the library's ``sample_heun``) gives the shipped demo-edm
    samples again from the shipped network (seed 0, 18 steps), up to rounding: they were made by an earlier copy of
    the sampler with a float64 state."""
    from memdetect.models.edm import load_network

    train_ground_truth = benchmarks_module("train_ground_truth")
    net = load_network(Path(packaged("demo-edm")) / "demo-edm.safetensors")
    samples, seeds = train_ground_truth.edm_sample(net, 4, seed=0, steps=18, batch=4)
    shipped = torch.from_numpy(np.load(DATA / "demo_edm_bench" / "samples.npz")["samples"][:4])
    diff = (samples.int() - shipped.int()).abs()
    assert seeds == [0, 1, 2, 3] and samples.dtype == torch.uint8 and samples.shape == shipped.shape
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 1e-3


@needs_shared("data", "datasets", "cifar10-jpg")
def test_relabel_reproduces_the_shipped_labels(tmp_path):
    """``train_ground_truth.py relabel`` on a copy of demo-edm's folder writes the shipped manifest again."""
    import shutil

    train_ground_truth = benchmarks_module("train_ground_truth")
    folder = tmp_path / "demo_edm_bench"
    shutil.copytree(DATA / "demo_edm_bench", folder)
    data = SHARED / "data" / "datasets" / "cifar10-jpg"
    data = next(data.glob("*.tar.gz"), data)
    train_ground_truth.main(["relabel", str(folder), "--data", str(data), "--examples", "0"])
    shipped = pd.read_csv(DATA / "demo_edm_bench" / "manifest.csv")
    again = pd.read_csv(folder / "manifest.csv")
    assert list(again.columns) == list(shipped.columns)
    assert (again["label"] == shipped["label"]).all()
    assert np.allclose(again["similarity"], shipped["similarity"], atol=1e-5)
    assert (again["nearest_train"] == shipped["nearest_train"]).all()


def test_balanced_split_spreads_every_duplicated_grade_over_the_classes():
    """``build_split(balanced=True)`` (demo-dit's split): each duplicated grade has its images spread over the classes
    as evenly as its size allows, no image is used twice, and the uniques are the same random draw as unbalanced."""
    gt = benchmarks_module("gt_common")
    rng = np.random.default_rng(1)
    classes = rng.integers(0, 10, size=3000)
    images = rng.integers(0, 256, size=(3000, 3, 4, 4), dtype=np.uint8)
    names = [f"train/{c}/{i}.jpg" for i, c in enumerate(classes)]
    kw = dict(seed=0, unique=200, exact="2:20,16:15,64:10", edited="16:10")
    plain = gt.build_split(images, names, classes, **kw)
    spread = gt.build_split(images, names, classes, **kw, balanced=True)
    assert [g.index for g in spread.grades if g.kind == "unique"] == [g.index for g in plain.grades
                                                                       if g.kind == "unique"]
    assert len({g.index for g in spread.grades}) == len(spread.grades)
    assert [g.grade for g in spread.grades] == [g.grade for g in plain.grades]
    for grade in {g.grade for g in spread.grades if g.kind != "unique"}:
        per_class = np.bincount([g.cls for g in spread.grades if g.grade == grade], minlength=10)
        assert per_class.max() - per_class.min() <= 1, (grade, per_class)
    # the random draw is not spread like that (with these seeds at least one grade is uneven)
    assert any(np.ptp(np.bincount([g.cls for g in plain.grades if g.grade == grade], minlength=10)) > 1
               for grade in {g.grade for g in plain.grades if g.kind != "unique"})
    assert len(spread.rows) == len(plain.rows)
