"""``memdetect bench demo``: the ground-truth benchmark on the shipped memorizing model.

The shipped ``demo`` model (``benchmarks/train_demo.py``) was trained on CIFAR-10 images of which 40 were
duplicated 150 times each. Its generations are labelled by their nearest training image (pixel correlation, see
``memdetect.bench.labels``): memorized at >= 0.95, generalized below 0.80, the band between excluded. The
generations and labels ship with the package (``memdetect/data/demo_bench``), so this benchmark needs no training
data and no generation step.

Methods, all on the same device, batch size and labelled samples, each timed over the whole set:
ours (std, l4l2, entropy, maxmin from one early-exit pass), the denoising loss, FLIPD (Ross et al.'s LID
criterion) and the nearest-generation criterion (Carlini et al.-style; its time excludes generating the pool).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..capture import LayerSpec, Trace, pool
from ..detector import Detector
from ..errors import UsageError
from ..io import image_seed
from ..models.presets import packaged
from ..scores import SCORES, std
from . import baselines
from .labels import LabelRule
from .metrics import roc_metrics

log = logging.getLogger(__name__)

RESULT_COLUMNS = ["method", "auroc", "tpr_at_1pct_fpr", "seconds_per_sample", "n_memorized", "n_generalized"]
SWEEP_TIMESTEPS = (10, 25, 50, 100, 200, 400)


@dataclass
class DemoSet:
    images: torch.Tensor  # uint8 [N, 3, 32, 32], all generations (the nearest-generation pool)
    manifest: pd.DataFrame  # one row per generation, with a `label` column
    labelled: np.ndarray  # indices of memorized + generalized rows

    @property
    def labels(self) -> np.ndarray:
        return (self.manifest["label"].to_numpy()[self.labelled] == "memorized").astype(int)


def load_demo_set(folder: str | Path | None = None, rule: LabelRule = LabelRule()) -> DemoSet:
    folder = Path(folder or packaged("demo_bench"))
    if not (folder / "samples.npz").is_file():
        raise FileNotFoundError(f"demo benchmark data not found in {folder} (samples.npz, manifest.csv)")
    images = torch.from_numpy(np.load(folder / "samples.npz")["samples"])
    manifest = pd.read_csv(folder / "manifest.csv")
    manifest["label"] = [rule.label(s) for s in manifest["similarity"]]
    labelled = np.flatnonzero(manifest["label"].isin(["memorized", "generalized"]).to_numpy())
    return DemoSet(images, manifest, labelled)


def subset(data: DemoSet, limit: int | None, seed: int = 0) -> DemoSet:
    """A stratified, seeded subset of ``limit`` labelled samples (the nearest-generation pool stays whole)."""
    if limit is None or limit >= len(data.labelled):
        return data
    from sklearn.model_selection import train_test_split

    if limit < 4:
        raise UsageError(f"--limit must be at least 4 (2 per class), got {limit}")
    keep, _ = train_test_split(data.labelled, train_size=limit, stratify=data.labels, random_state=seed)
    return DemoSet(data.images, data.manifest, np.sort(keep))


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _timed(fn, images: torch.Tensor, batch_size: int) -> tuple[np.ndarray, float]:
    out = []
    t0 = time.perf_counter()
    for sl in _batches(len(images), batch_size):
        out.append(np.asarray(fn(images[sl]), dtype=np.float64))
    return np.concatenate(out), (time.perf_counter() - t0) / len(images)


def score_methods(det: Detector, data: DemoSet, *, batch_size: int, flipd_probes: int = 1,
                  methods: tuple[str, ...] = ("ours", "denoising_loss", "flipd", "nearest_generation")) -> tuple[pd.DataFrame, dict]:
    """Per-sample scores of every method on the labelled samples, and seconds per sample per method."""
    images = data.images[data.labelled]
    seeds_of = lambda x: [image_seed(a, det.seed) for a in x.numpy()]  # noqa: E731
    scores: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    a, t = det.adapter, det.timestep
    if "ours" in methods:
        det.score_tensor(images[:2])  # warm-up (allocations, lazy init), not timed
        feats, sec = _timed(lambda x: det.features(x, seeds_of(x)).numpy(), images, batch_size)
        feats_t = torch.from_numpy(feats)
        for name, fn in SCORES.items():
            scores[f"ours_{name}"] = fn(feats_t).numpy()
            seconds[f"ours_{name}"] = sec
    if "denoising_loss" in methods:
        scores["denoising_loss"], seconds["denoising_loss"] = _timed(
            lambda x: baselines.denoising_loss(a, x, t, seeds_of(x)).numpy(), images, batch_size)
    if "flipd" in methods:
        scores["flipd"], seconds["flipd"] = _timed(
            lambda x: baselines.flipd(a, x, t, seeds_of(x), probes=flipd_probes).numpy(), images, batch_size)
    if "nearest_generation" in methods:
        pool_imgs = torch.cat([images, data.images[np.setdiff1d(np.arange(len(data.images)), data.labelled)]])
        t0 = time.perf_counter()
        scores["nearest_generation"] = baselines.nearest_generation(images, pool_imgs).numpy()
        seconds["nearest_generation"] = (time.perf_counter() - t0) / len(images)
    df = data.manifest.iloc[data.labelled].reset_index(drop=True).assign(**scores)
    return df, seconds


def results_table(per_sample: pd.DataFrame, seconds: dict, labels: np.ndarray,
                  timing: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per method of ``seconds``. ``timing``: how each method was timed, written as a ``timing`` column.

    A method with a NaN or infinite score gets NaN metrics and a warning instead of stopping the table.
    """
    rows = []
    for method, sec in seconds.items():
        scores = per_sample[method].to_numpy(dtype=np.float64)
        if np.isfinite(scores).all():
            m = roc_metrics(labels, scores)
        else:
            log.warning("%s: %d of %d scores are NaN or infinite; its AUROC is left empty", method,
                        int((~np.isfinite(scores)).sum()), len(scores))
            m = {"auroc": float("nan"), "tpr_at_1pct_fpr": float("nan")}
        rows.append({"method": method, **m, "seconds_per_sample": sec, "n_memorized": int(labels.sum()),
                     "n_generalized": int((1 - labels).sum())})
        if timing is not None:
            rows[-1]["timing"] = timing.get(method, "")
    return pd.DataFrame(rows, columns=RESULT_COLUMNS + (["timing"] if timing is not None else []))


def plot_roc(per_sample: pd.DataFrame, methods, labels: np.ndarray, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for m in methods:
        if not np.isfinite(per_sample[m].to_numpy(dtype=np.float64)).all():
            continue
        fpr, tpr, _ = roc_curve(labels, per_sample[m])
        ax.plot(fpr, tpr, label=m)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.5, ls="--")
    ax.set_xscale("log")
    ax.set_xlim(1e-3, 1)
    ax.set_xlabel("false positive rate (generalized flagged)")
    ax.set_ylabel("true positive rate (memorized flagged)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sweep_layers(det: Detector, data: DemoSet, *, timesteps=SWEEP_TIMESTEPS, batch_size: int = 128,
                 select_fraction: float = 0.5, split_seed: int = 0) -> pd.DataFrame:
    """AUROC of the std score at every hookable layer (module output, every call) and each timestep.

    The labelled samples are split (stratified, seeded) into a *selection* half and a *held-out* half: pick a
    layer by ``auroc_select`` and quote its ``auroc_heldout``. AUROC below 0.5 means the layer is inverted
    (spiky = generalized there); such rows are marked, never silently flipped.
    """
    from sklearn.model_selection import train_test_split

    a = det.adapter
    images = data.images[data.labelled]
    labels = data.labels
    idx = np.arange(len(labels))
    sel, held = train_test_split(idx, train_size=select_fraction, stratify=labels, random_state=split_seed)
    specs = [i.spec for i in det.layers() if len(i.shape) in (2, 3, 4) and i.shape[1] >= 2 and i.shape[0] == 1]
    specs = [s for s in specs if not s.startswith("time_")]  # image-independent time-embedding layers
    default = str(det.layer)
    if default not in specs:  # e.g. an input hook (NAME:in): sweep it too, just before its module's output
        module = LayerSpec.parse(default).name
        at = next((i for i, s in enumerate(specs) if s.split("@")[0] == module), len(specs))
        specs.insert(at, default)
    rows = []
    for t in timesteps:
        feats: dict[str, list[torch.Tensor]] = {s: [] for s in specs}
        for sl in _batches(len(images), batch_size):
            x = images[sl]
            x_t = a.noise(a.encode(x), t, [image_seed(v, det.seed) for v in x.numpy()])
            with torch.inference_mode(), Trace(a.denoiser, specs, stop=False,
                                               transform=lambda z: pool(z, a.pooling).float().cpu()) as tr:
                a.forward(x_t, t)
            for s in specs:
                feats[s].append(tr[s])
        for depth, s in enumerate(specs):
            v = torch.cat(feats[s])
            score = std(v).numpy()
            if not np.isfinite(score).all() or np.ptp(score) == 0:
                continue
            au_sel = roc_metrics(labels[sel], score[sel])["auroc"]
            au_held = roc_metrics(labels[held], score[held])["auroc"]
            rows.append({"layer": s, "depth": depth, "timestep": t, "channels": v.shape[1],
                         "auroc_select": au_sel, "auroc_heldout": au_held, "inverted": au_sel < 0.5})
    return pd.DataFrame(rows)


def plot_sweep(sweep: pd.DataFrame, path: Path, default_layer: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    for t, g in sweep.groupby("timestep"):
        ax.plot(g["depth"], g["auroc_select"], marker=".", lw=0.8, label=f"t={t}")
    d = sweep.loc[sweep["layer"] == default_layer, "depth"]
    if len(d):
        ax.axvline(d.iloc[0], color="k", ls=":", lw=0.8, label="default layer")
    ax.axhline(0.5, color="grey", lw=0.5)
    ax.set_xlabel("layer (forward order)")
    ax.set_ylabel("AUROC of std (selection half)")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo(output: Path, *, device: str = "auto", batch_size: int | None = None, flipd_probes: int = 1,
             sweep: bool = False, data_folder: str | Path | None = None, model_path: str | None = None,
             limit: int | None = None, sweep_timesteps=SWEEP_TIMESTEPS) -> dict:
    """Run the benchmark and write results.csv, scores.csv, roc.png (and sweep.csv, sweep.png).

    ``limit``: score a stratified subset of that many labelled samples (quick checks; RESULTS.md uses all).
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    det = Detector.from_pretrained("demo", model_path, device=device, dtype="float32")
    data = subset(load_demo_set(data_folder), limit)
    bs = batch_size or det.batch_size
    per_sample, seconds = score_methods(det, data, batch_size=bs, flipd_probes=flipd_probes)
    labels = data.labels
    results = results_table(per_sample, seconds, labels)
    results.to_csv(output / "results.csv", index=False)
    per_sample.to_csv(output / "scores.csv", index=False)
    plot_roc(per_sample, list(seconds), labels, output / "roc.png",
             f"demo model, {det.layer}, t={det.timestep}: {labels.sum()} memorized vs {(1 - labels).sum()} generalized")
    out = {"results": results, "settings": det.settings, "batch_size": bs, "flipd_probes": flipd_probes}
    if sweep:
        sw = sweep_layers(det, data, timesteps=tuple(sweep_timesteps))
        sw.to_csv(output / "sweep.csv", index=False)
        plot_sweep(sw, output / "sweep.png", str(det.layer))
        out["sweep"] = sw
    return out
