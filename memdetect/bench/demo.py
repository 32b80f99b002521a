"""``memdetect bench demo``: the ground-truth benchmark on the shipped memorizing models.

Five shipped models memorize on purpose, each with its own labelled generations (``memdetect/data/<model>_bench``,
written by ``benchmarks/train_demo.py``, ``benchmarks/train_ground_truth.py ship`` and
``benchmarks/train_sd3_ground_truth.py ship``):

* ``demo``: pixel DDPM, 40 CIFAR-10 images duplicated 150 times each;
* ``demo-sd``: a miniature ``StableDiffusionPipeline`` (text-conditional latent UNet), graded duplication and
  memorized captions; ``demo-dit``: a miniature ``DiTPipeline`` (class-conditional latent transformer);
  ``demo-edm``: a SongUNet with EDM preconditioning (pixels); ``demo-sd3``: a miniature ``StableDiffusion3Pipeline``
  (an MMDiT trained by flow matching, two small CLIPs, no T5). Those four duplicate images at several counts
  (2 ... 256 copies) and as edited ("template") copies: the ``nearest_grade`` of a generation's nearest training
  image is its duplication grade.

Generations are labelled by their nearest training image (pixel correlation, max over flip and small shifts, see
``memdetect.bench.labels``): memorized at >= 0.95, generalized below 0.80, the band between excluded. No training
data and no generation step are needed.

Methods, all on the same device, batch size and labelled samples, each timed over the whole set. Which baselines
apply is read from the model's adapter (``Adapter.conditioning``, ``Adapter.cross_attention_values``), never from
the model's name:

* ours: std, l4l2, entropy, maxmin from one early-exit pass, ``ours_std_K`` (the std averaged over K seeded noise
  draws per image, ``DRAW_COUNTS``; K passes, timed as such), plus the variants ``*_centred`` (l4l2 / entropy of
  v - mean(v), the row mean over channels) and ``*_standardised`` (of (v - mu_c) / sigma_c per channel, with mu and
  sigma from the model's whole generation pool: every generation, labelled or not, *no labels used*). std and
  maxmin are unchanged by centring, so they have no centred variant;
* denoising loss and FLIPD (Ross et al.'s LID criterion) with the null condition (image only, as a scan sees it);
  the loss is the family's own training loss (``Adapter.denoising_error``: the flow-matching loss for ``demo-sd3``);
* nearest generation (Carlini et al.-style; its time excludes generating the pool);
* conditional models (text or class): ``flipd_conditional`` (FLIPD given each generation's own prompt / class, as
  Ross et al. use it on text-to-image models) and ``wen_first_step`` (Wen et al.'s noise-difference norm at the
  sampler's first step, from the generation's own initial noise, rebuilt from its seed, in the family's own terms:
  ``Adapter.first_step_difference``, for flow-matching models the velocity difference at the Euler sampler's first
  sigma);
* text cross-attention (NeMo): ``nemo``, the prompt's largest neuron z-score against statistics of the *normal*
  prompts of the generation plan (prompt list membership, as ``bench laion`` uses it; a normal prompt is scored
  leave-one-out). Every generation of a prompt gets that prompt's score.

Outputs: ``results.csv`` (AUROC and TPR@1%FPR with stratified bootstrap 95% intervals, the method's own 1%-FPR
threshold, seconds per sample), ``recall_by_grade.csv`` (recall of memorized generations per duplication grade at
that threshold), ``pairs.csv`` (ours_std minus each other method, paired bootstrap; "ahead" only when the interval
excludes 0), ``scores.csv``, ``roc.png``; with ``--sweep-layers`` also ``sweep.csv``, ``sweep.png`` and
``layer_proof.json`` (layer and timestep chosen on a seeded, stratified selection half, confirmed on the held-out
half).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..core.capture import LayerSpec, Trace, pool
from ..detector import Detector
from ..errors import LayerError, UnsupportedModelError, UsageError
from ..store.io import image_seed
from ..models.capabilities import CrossAttention, require
from ..models.presets import packaged
from ..core.scores import SCORES, centre, standardise, std
from ..store import strict_json
from . import baselines
from .labels import LabelRule
from ..core.metrics import bootstrap_metrics, paired_difference, recall_by_group, roc_metrics, threshold_at_fpr

log = logging.getLogger(__name__)

#: The shipped ground-truth models (``memdetect/data/<name>`` with labelled generations in ``<name>_bench``).
DEMO_MODELS = ("demo", "demo-sd", "demo-dit", "demo-edm", "demo-sd3")
#: ``bench demo``'s results.csv (and a ``timing`` column): bootstrap intervals and each method's own 1%-FPR threshold
DEMO_COLUMNS = ["method", "auroc", "auroc_lo", "auroc_hi", "tpr_at_1pct_fpr", "tpr_lo", "tpr_hi", "threshold",
                "seconds_per_sample", "n_memorized", "n_generalized"]
SWEEP_TIMESTEPS = (10, 25, 50, 100, 200, 400)
#: the variants of ours (``scores.centre`` / ``scores.standardise``); std and maxmin are centring-invariant
VARIANT_SCORES = ("l4l2", "entropy")
#: the sampler's step count when the bench data's recipe does not say (Wen's first timestep)
DEFAULT_SAMPLE_STEPS = 50
#: ``ours_std_K`` rows: the std score averaged over K noise draws per image (``Detector(draws=K)``); K = 1 is ours_std
DRAW_COUNTS = (2, 4)


def bench_folder(model: str) -> Path:
    """The labelled generations shipped for ``model`` (``memdetect/data/<model with _>_bench``)."""
    return Path(packaged(model.replace("-", "_") + "_bench"))


@dataclass
class DemoSet:
    images: torch.Tensor  # uint8 [N, 3, 32, 32], all generations (the nearest-generation pool)
    manifest: pd.DataFrame  # one row per generation, with `label` and `grade` columns
    labelled: np.ndarray  # indices of memorized + generalized rows
    recipe: dict | None = None

    @property
    def labels(self) -> np.ndarray:
        return (self.manifest["label"].to_numpy()[self.labelled] == "memorized").astype(int)

    @property
    def grades(self) -> np.ndarray:
        return self.manifest["grade"].to_numpy()[self.labelled]

    def conditions(self, conditioning: str | None) -> list | None:
        """Each labelled generation's own condition for a ``conditioning`` ("text": its prompt, "class": its class
        index), from the manifest; None when the model is unconditional or the data has no such column."""
        column = {"text": "prompt", "class": "class_index"}.get(conditioning or "")
        if column is None or column not in self.manifest.columns:
            return None
        values = self.manifest[column].to_numpy()[self.labelled]
        return [("" if pd.isna(v) else str(v)) for v in values] if conditioning == "text" else \
            [int(v) for v in values]

    def seeds(self) -> list[int] | None:
        """The sampler's seed of each labelled generation (its initial noise), if the manifest records it."""
        if "seed" not in self.manifest.columns:
            return None
        return [int(s) for s in self.manifest["seed"].to_numpy()[self.labelled]]


def _grades(manifest: pd.DataFrame, recipe: dict | None) -> pd.Series:
    """The duplication grade of each generation's nearest training image: ``nearest_grade`` when recorded; the
    original demo's manifest records only whether that image was duplicated (150 copies: ``exact-150``)."""
    if "nearest_grade" in manifest.columns:
        return manifest["nearest_grade"].astype(str)
    if "nearest_is_duplicated" in manifest.columns:
        repeats = (recipe or {}).get("dup_repeats")
        dup = f"exact-{repeats}" if repeats else "duplicated"
        return manifest["nearest_is_duplicated"].map({1: dup, 0: "unique"}).astype(str)
    return pd.Series(["unknown"] * len(manifest), index=manifest.index)


def load_demo_set(folder: str | Path | None = None, rule: LabelRule = LabelRule()) -> DemoSet:
    folder = Path(folder or bench_folder("demo"))
    if not (folder / "samples.npz").is_file() or not (folder / "manifest.csv").is_file():
        raise FileNotFoundError(f"demo benchmark data not found in {folder} (samples.npz, manifest.csv)")
    images = torch.from_numpy(np.load(folder / "samples.npz")["samples"])
    manifest = pd.read_csv(folder / "manifest.csv")
    recipe = json.loads((folder / "recipe.json").read_text()) if (folder / "recipe.json").is_file() else None
    manifest["label"] = [rule.label(s) for s in manifest["similarity"]]
    manifest["grade"] = _grades(manifest, recipe)
    labelled = np.flatnonzero(manifest["label"].isin(["memorized", "generalized"]).to_numpy())
    return DemoSet(images, manifest, labelled, recipe)


def subset(data: DemoSet, limit: int | None, seed: int = 0) -> DemoSet:
    """A stratified, seeded subset of ``limit`` labelled samples (the nearest-generation pool stays whole)."""
    if limit is None or limit >= len(data.labelled):
        return data
    from sklearn.model_selection import train_test_split

    if limit < 4:
        raise UsageError(f"--limit must be at least 4 (2 per class), got {limit}")
    keep, _ = train_test_split(data.labelled, train_size=limit, stratify=data.labels, random_state=seed)
    return DemoSet(data.images, data.manifest, np.sort(keep), data.recipe)


def split_halves(labels: np.ndarray, select_fraction: float = 0.5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Positions (into the labelled samples) of a seeded, stratified *selection* part and its *held-out* rest."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    sel, held = train_test_split(idx, train_size=select_fraction, stratify=labels, random_state=seed)
    return np.sort(sel), np.sort(held)


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _timed(fn, n: int, batch_size: int) -> tuple[np.ndarray, float]:
    """``fn(slice)`` over batches of ``n`` items: the concatenated scores and seconds per item."""
    out = []
    t0 = time.perf_counter()
    for sl in _batches(n, batch_size):
        out.append(np.asarray(fn(sl), dtype=np.float64))
    return np.concatenate(out), (time.perf_counter() - t0) / n


def _nemo_layers(adapter) -> list | None:
    try:
        return list(require(adapter, CrossAttention, "NeMo").cross_attention_values().values())
    except UnsupportedModelError:
        return None


def nemo_scores(adapter, prompts: list[str], reference: list[str]) -> np.ndarray:
    """NeMo's score of each prompt (``baselines.NemoStatistics``) against statistics of the ``reference`` prompts;
    a prompt that is also a reference prompt is scored against the others (leave-one-out)."""
    values = _nemo_layers(adapter)
    unique = sorted(set(prompts) | set(reference))
    acts = {}
    for start in range(0, len(unique), 32):
        chunk = unique[start:start + 32]
        a = baselines.nemo_activations(values, adapter.encode_condition(chunk))
        acts.update({p: a[i] for i, p in enumerate(chunk)})
    ref = sorted(set(reference))
    stats = baselines.NemoStatistics.fit(torch.stack([acts[p] for p in ref]))
    ref_set = set(ref)
    score = {p: float((stats.without(acts[p]) if p in ref_set else stats).score(acts[p][None])[0])
             for p in sorted(set(prompts))}
    return np.array([score[p] for p in prompts])


def score_methods(det: Detector, data: DemoSet, *, batch_size: int, flipd_probes: int = 1,
                  methods: tuple[str, ...] = ("ours", "denoising_loss", "flipd", "nearest_generation", "wen",
                                              "nemo")) -> tuple[pd.DataFrame, dict, dict]:
    """Per-sample scores of every method that applies to the model, seconds per sample, and how each was timed.

    ``methods`` names groups; a group the model's adapter cannot run (a condition for an unconditional model, NeMo
    without text cross-attention) is left out and said so in the log.
    """
    images = data.images[data.labelled]
    n = len(images)
    seeds_of = lambda x: [image_seed(a, det.seed) for a in x.numpy()]  # noqa: E731
    scores: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    timing: dict[str, str] = {}
    a, t = det.adapter, det.timestep
    base = f"{det.adapter.device}, batch {batch_size}, after one untimed warm-up of the model"
    conds = data.conditions(a.conditioning)
    if "ours" in methods:
        det.score_tensor(images[:2])  # warm-up (allocations, lazy init), not timed
        feats, sec = _timed(lambda sl: det.features(images[sl], seeds_of(images[sl])).numpy(), n, batch_size)
        feats_t = torch.from_numpy(feats)
        # per-channel statistics of the whole generation pool (every generation, labelled or not; no labels)
        pool_feats = _pool_features(det, data, batch_size, feats_t)
        mu, sigma = pool_feats.mean(dim=0), pool_feats.std(dim=0)
        for name, fn in SCORES.items():
            scores[f"ours_{name}"] = fn(feats_t).numpy()
            seconds[f"ours_{name}"] = sec
            timing[f"ours_{name}"] = f"{base}; one early-exit forward per image, shared by every ours_* score"
        for name in VARIANT_SCORES:
            scores[f"ours_{name}_centred"] = SCORES[name](centre(feats_t)).numpy()
            scores[f"ours_{name}_standardised"] = SCORES[name](standardise(feats_t, mu, sigma)).numpy()
            for v in ("centred", "standardised"):
                seconds[f"ours_{name}_{v}"] = sec
                timing[f"ours_{name}_{v}"] = timing[f"ours_{name}"]
        timing.update({f"ours_{k}_standardised": timing["ours_std"] + "; per-channel mean/std of all "
                       f"{len(data.images)} generations (no labels), not timed" for k in VARIANT_SCORES})
        for k in DRAW_COUNTS:
            scores[f"ours_std_{k}"], seconds[f"ours_std_{k}"] = _draws_std(det, images, seeds_of, k, batch_size)
            timing[f"ours_std_{k}"] = (f"{base}; {k} seeded noise draws per image, one early-exit forward each "
                                       f"(batched, at most {max(det.batch_size, batch_size)} inputs per pass), "
                                       f"mean of the draws' std")
    if "denoising_loss" in methods:
        scores["denoising_loss"], seconds["denoising_loss"] = _timed(
            lambda sl: baselines.denoising_loss(a, images[sl], t, seeds_of(images[sl])).numpy(), n, batch_size)
        timing["denoising_loss"] = f"{base}; one null-condition denoiser call per image at t={t}"
    if "flipd" in methods:
        scores["flipd"], seconds["flipd"] = _timed(
            lambda sl: baselines.flipd(a, images[sl], t, seeds_of(images[sl]), probes=flipd_probes).numpy(), n,
            batch_size)
        timing["flipd"] = f"{base}; null condition, {flipd_probes} Hutchinson probe(s) at t={t}"
        if conds is not None:
            scores["flipd_conditional"], seconds["flipd_conditional"] = _timed(
                lambda sl: baselines.flipd(a, images[sl], t, seeds_of(images[sl]), probes=flipd_probes,
                                           cond=a.encode_condition(conds[sl])).numpy(), n, batch_size)
            timing["flipd_conditional"] = (f"{base}; each generation's own {a.conditioning} condition (encoding "
                                           f"included), {flipd_probes} probe(s) at t={t}")
    if "nearest_generation" in methods:
        pool_imgs = torch.cat([images, data.images[np.setdiff1d(np.arange(len(data.images)), data.labelled)]])
        t0 = time.perf_counter()
        scores["nearest_generation"] = baselines.nearest_generation(images, pool_imgs).numpy()
        seconds["nearest_generation"] = (time.perf_counter() - t0) / n
        timing["nearest_generation"] = f"pixel RMS distance to all {len(pool_imgs)} generations (pool given)"
    sample_seeds = data.seeds()
    if "wen" in methods and conds is not None and sample_seeds is not None:
        steps = int(((data.recipe or {}).get("flags") or {}).get("sample_steps", DEFAULT_SAMPLE_STEPS))
        first = a.first_sampling_step(steps)
        scores["wen_first_step"], seconds["wen_first_step"] = _timed(
            lambda sl: baselines.wen_first_step_of(a, sample_seeds[sl], a.encode_condition(conds[sl]),
                                                   steps).numpy(), n, batch_size)
        first = f"t={first}" if isinstance(first, int) else first
        timing["wen_first_step"] = (f"{base}; the generation's initial noise (from its seed) at the first of "
                                    f"{steps} steps of the model's sampler ({first}), one conditional + one null "
                                    f"call per image")
    elif "wen" in methods:
        log.info("wen_first_step left out: the model is unconditional or the data records no condition and seed")
    if "nemo" in methods and a.conditioning == "text" and conds is not None and _nemo_layers(a) is not None:
        man = data.manifest
        if "prompt_source" in man.columns:
            reference = sorted(set(man.loc[man["prompt_source"] == "normal", "prompt"].astype(str)))
        else:
            reference = []
        if len(reference) >= 3:
            nemo_scores(a, conds[:2], reference)  # warm-up
            t0 = time.perf_counter()
            scores["nemo"] = nemo_scores(a, conds, reference)
            seconds["nemo"] = (time.perf_counter() - t0) / n
            timing["nemo"] = (f"{a.device}; text encoder + value layers once per distinct prompt, divided by the "
                              f"{n} labelled images; statistics of the {len(reference)} normal prompts of the plan "
                              f"(leave-one-out for those) fitted inside the timing")
        else:
            log.info("nemo left out: the data names fewer than 3 normal (reference) prompts")
    df = data.manifest.iloc[data.labelled].reset_index(drop=True).assign(**scores)
    return df, seconds, timing


def _draws_std(det: Detector, images: torch.Tensor, seeds_of, draws: int, batch_size: int
               ) -> tuple[np.ndarray, float]:
    """The std score averaged over ``draws`` noise draws per image (what ``Detector(draws=...)`` scores), timed."""
    before = det.draws
    det.draws = draws
    try:
        return _timed(lambda sl: det.scores_of(det.draw_features(images[sl], seeds_of(images[sl])))["std"].numpy(),
                      len(images), batch_size)
    finally:
        det.draws = before


def selected_rows(det: Detector, data: DemoSet, per_sample: pd.DataFrame, methods: list[str], *, batch_size: int,
                  n_boot: int = 1000, split_seed: int = 0) -> dict | None:
    """The ``ours_selected`` method: ``memdetect.workflows.select.select_from_images`` (what ``memdetect calibrate
    --select-layer`` runs) on the *selection* half of ``split_halves`` only, its configuration then scanned (timed) on
    the *held-out* half (a reference-normalised pick: statistics fitted on the selection half's novel images only).
    Returns its results.csv and recall_by_grade.csv rows, ``pairs`` (ours_selected minus every
    other method, paired on the held-out half) and the selection's record; its scores are added to ``per_sample``
    (NaN on the selection half). None when the selection half is too small to choose on."""
    from ..workflows.select import needed_message, select_from_images

    labels, images = data.labels, data.images[data.labelled]
    sel, held = split_halves(labels, 0.5, split_seed)
    msg = needed_message(int(labels[sel].sum()), int((1 - labels[sel]).sum()))
    if msg:
        log.info("ours_selected left out: the selection half is too small (%s)", msg)
        return None
    selection, cands, _ = select_from_images(det, images[sel], labels[sel], batch_size=batch_size, n_boot=n_boot)
    c = selection.chosen
    scanner = Detector(det.adapter, layer=c.layer, timestep=c.timestep, metric=c.metric, seed=det.seed,
                       batch_size=batch_size, prune=False, name=det.name)
    x = images[held]
    scanner.features(x[:2])  # warm-up, not timed
    feats, sec = _timed(lambda sl: scanner.features(x[sl], [image_seed(v, det.seed) for v in x[sl].numpy()]).numpy(),
                        len(x), batch_size)
    if c.normalise == "reference":  # statistics from the selection half's novel images only
        from ..workflows.select import reference_statistics

        ref = images[torch.from_numpy(sel[labels[sel] == 0])]
        ref_feats = torch.cat([scanner.features(ref[i:i + batch_size],
                                                [image_seed(v, det.seed) for v in ref[i:i + batch_size].numpy()])
                               for i in range(0, len(ref), batch_size)])
        scanner.normalise = reference_statistics(ref_feats)
    score = c.sign * scanner.scores_of(torch.from_numpy(feats)[:, None, :])[c.metric].numpy()
    per_sample["ours_selected"] = np.nan
    per_sample.loc[held, "ours_selected"] = score
    heldout = per_sample.iloc[held].reset_index(drop=True)
    timing = {"ours_selected": (f"{det.adapter.device}, batch {batch_size}, after one warm-up; held-out half only "
                                f"({len(held)} samples): {c} chosen on the selection half ({len(sel)}) among "
                                f"{len(cands)} candidates ({selection.reason}); one early-exit forward per image")}
    results, recall = interval_table(heldout, {"ours_selected": sec}, labels[held], data.grades[held], timing,
                                     n_boot=n_boot)
    pairs = pairs_table(heldout, [m for m in methods if m != "ours_selected"] + ["ours_selected"], labels[held],
                        reference="ours_selected", n_boot=n_boot).assign(samples="held-out half")
    record = {**selection.record(), "split": {"selection": len(sel), "heldout": len(held), "stratified": True,
                                              "seed": split_seed}, "model": det.name}
    return {"results": results, "recall": recall, "pairs": pairs, "record": record}


def _pool_features(det: Detector, data: DemoSet, batch_size: int, labelled_feats: torch.Tensor) -> torch.Tensor:
    """Pooled features of every generation (the labelled ones already computed, the excluded ones added)."""
    rest = np.setdiff1d(np.arange(len(data.images)), data.labelled)
    if len(rest) == 0:
        return labelled_feats
    imgs = data.images[rest]
    extra = [det.features(imgs[sl], [image_seed(v, det.seed) for v in imgs[sl].numpy()])
             for sl in _batches(len(imgs), batch_size)]
    return torch.cat([labelled_feats, *[e.to(labelled_feats.dtype) for e in extra]])


def interval_table(per_sample: pd.DataFrame, seconds: dict, labels: np.ndarray, grades: np.ndarray,
                   timing: dict[str, str] | None = None, *, n_boot: int = 1000, seed: int = 0
                   ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``results.csv`` (DEMO_COLUMNS + timing) and ``recall_by_grade.csv``: for each method, the recall of the
    memorized samples of each duplication grade at the method's own 1%-FPR threshold (and, as grade
    ``generalized (FPR)``, the fraction of generalized samples flagged there)."""
    rows, recall_rows = [], []
    for method, sec in seconds.items():
        scores = per_sample[method].to_numpy(dtype=np.float64)
        row = {"method": method, "seconds_per_sample": sec, "n_memorized": int(labels.sum()),
               "n_generalized": int((1 - labels).sum()), "timing": (timing or {}).get(method, "")}
        if not np.isfinite(scores).all():
            log.warning("%s: %d of %d scores are NaN or infinite; its AUROC is left empty", method,
                        int((~np.isfinite(scores)).sum()), len(scores))
            rows.append(row)
            continue
        b = bootstrap_metrics(labels, scores, n_boot=n_boot, seed=seed)
        thr = threshold_at_fpr(labels, scores)
        row.update(auroc=b["auroc"].value, auroc_lo=b["auroc"].lo, auroc_hi=b["auroc"].hi,
                   tpr_at_1pct_fpr=b["tpr"].value, tpr_lo=b["tpr"].lo, tpr_hi=b["tpr"].hi, threshold=thr)
        rows.append(row)
        mem = labels == 1
        for g, (rec, k) in recall_by_group(scores[mem], grades[mem], thr).items():
            recall_rows.append({"method": method, "grade": g, "recall": rec, "n": k})
        fpr = float((scores[~mem] > thr).mean())
        recall_rows.append({"method": method, "grade": "generalized (FPR)", "recall": fpr, "n": int((~mem).sum())})
    results = pd.DataFrame(rows, columns=DEMO_COLUMNS + ["timing"])
    return results, pd.DataFrame(recall_rows, columns=["method", "grade", "recall", "n"])


def pairs_table(per_sample: pd.DataFrame, methods, labels: np.ndarray, reference: str = "ours_std", *,
                n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """``reference`` minus every other method (paired bootstrap on the same samples): ``ahead`` / ``behind`` only
    when the interval of the difference excludes 0."""
    rows = []
    ref = per_sample[reference].to_numpy(dtype=np.float64)
    for m in methods:
        other = per_sample[m].to_numpy(dtype=np.float64)
        if m == reference or not (np.isfinite(ref).all() and np.isfinite(other).all()):
            continue
        d = paired_difference(labels, ref, other, n_boot=n_boot, seed=seed)
        row = {"method": reference, "versus": m}
        for k, name in (("auroc", "auroc"), ("tpr", "tpr")):
            iv = d[k]
            row.update({f"d_{name}": iv.value, f"d_{name}_lo": iv.lo, f"d_{name}_hi": iv.hi,
                        f"{name}_verdict": "ahead" if iv.lo > 0 else "behind" if iv.hi < 0 else "no difference"})
        rows.append(row)
    return pd.DataFrame(rows)


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
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _poolable(shape: tuple[int, ...], how: str) -> bool:
    """Whether the adapter's pooling reduces a capture of this shape (e.g. token-max skips a transformer's
    patch-embedding convolution, [B, C, H, W])."""
    try:
        pool(torch.zeros(shape), how)
    except LayerError:
        return False
    return True


def sweep_layers(det: Detector, data: DemoSet, *, timesteps=SWEEP_TIMESTEPS, batch_size: int = 128,
                 select_fraction: float = 0.5, split_seed: int = 0, keep_scores: bool = False):
    """AUROC and TPR@1%FPR of the std score at every hookable layer (module output, every call) and each timestep.

    The labelled samples are split (``split_halves``: stratified, seeded) into a *selection* half and a *held-out*
    half: pick a layer by ``auroc_select`` and quote its ``auroc_heldout``. AUROC below 0.5 means the layer is
    inverted (spiky = generalized there); such rows are marked, never silently flipped. With ``keep_scores``, also
    returns the std scores of every (layer, t) row (all labelled samples) and the two halves.
    """
    a = det.adapter
    images = data.images[data.labelled]
    labels = data.labels
    sel, held = split_halves(labels, select_fraction, split_seed)
    specs = [i.spec for i in det.layers() if len(i.shape) in (2, 3, 4) and i.shape[1] >= 2 and i.shape[0] == 1
             and _poolable(i.shape, a.pooling)]
    specs = [s for s in specs if not s.startswith("time_")]  # image-independent time-embedding layers
    default = str(det.layer)
    if default not in specs:  # e.g. an input hook (NAME:in): sweep it too, just before its module's output
        module = LayerSpec.parse(default).name
        at = next((i for i, s in enumerate(specs) if s.split("@")[0] == module), len(specs))
        specs.insert(at, default)
    rows, kept = [], {}
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
            m_sel = roc_metrics(labels[sel], score[sel])
            m_held = roc_metrics(labels[held], score[held])
            rows.append({"layer": s, "depth": depth, "timestep": t, "channels": v.shape[1],
                         "auroc_select": m_sel["auroc"], "tpr_select": m_sel["tpr_at_1pct_fpr"],
                         "auroc_heldout": m_held["auroc"], "tpr_heldout": m_held["tpr_at_1pct_fpr"],
                         "inverted": m_sel["auroc"] < 0.5})
            if keep_scores:
                kept[(s, t)] = score
    sweep = pd.DataFrame(rows)
    return (sweep, kept, sel, held) if keep_scores else sweep


#: the issue's bar for a family's default layer, on its ground-truth model
DEFAULT_BAR = {"auroc": 0.98, "tpr": 0.90}


def layer_proof(sweep: pd.DataFrame, kept: dict, labels: np.ndarray, sel: np.ndarray, held: np.ndarray,
                default_layer: str, default_t: int, *, n_boot: int = 1000) -> dict:
    """The default (layer, t) on both halves with bootstrap intervals, whether it meets ``DEFAULT_BAR`` on the
    held-out half, and the (layer, t) that the *selection* half picks (highest AUROC, then TPR), confirmed on the
    held-out half. Nothing is chosen on the held-out half."""
    def measured(layer, t):
        s = kept[(layer, t)]
        out = {"layer": layer, "timestep": int(t)}
        for name, part in (("select", sel), ("heldout", held)):
            b = bootstrap_metrics(labels[part], s[part], n_boot=n_boot)
            out[name] = {"auroc": str(b["auroc"]), "tpr_at_1pct_fpr": str(b["tpr"]),
                         "auroc_value": b["auroc"].value, "tpr_value": b["tpr"].value,
                         "n_memorized": int(labels[part].sum()), "n_generalized": int((1 - labels[part]).sum())}
        return out

    best = sweep.sort_values(["auroc_select", "tpr_select", "depth"], ascending=[False, False, True]).iloc[0]
    proof = {"split": {"selection": len(sel), "heldout": len(held), "stratified": True, "seed": 0},
             "bar": DEFAULT_BAR, "rule": "choose on the selection half only; quote the held-out half"}
    if (default_layer, default_t) in kept:
        d = measured(default_layer, default_t)
        d["meets_bar_heldout"] = bool(d["heldout"]["auroc_value"] >= DEFAULT_BAR["auroc"]
                                      and d["heldout"]["tpr_value"] >= DEFAULT_BAR["tpr"])
        proof["default"] = d
    proof["selected"] = measured(best["layer"], best["timestep"])
    return proof


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


def run_demo(output: Path, *, model: str = "demo", device: str = "auto", batch_size: int | None = None,
             flipd_probes: int = 1, sweep: bool = False, data_folder: str | Path | None = None,
             model_path: str | None = None, limit: int | None = None, sweep_timesteps=SWEEP_TIMESTEPS,
             n_boot: int = 1000, select: bool = True) -> dict:
    """Run the benchmark on ``model`` (one of ``DEMO_MODELS``, or any model with ``data_folder``) and write
    results.csv, recall_by_grade.csv, pairs.csv, scores.csv, roc.png (and sweep.csv, sweep.png, layer_proof.json).

    ``limit``: score a stratified subset of that many labelled samples (quick checks; RESULTS.md uses all).
    ``select``: add the ``ours_selected`` row (``selected_rows``; left out, with a log line, when the selection
    half is too small for ``memdetect.workflows.select``) and selection.json.
    """
    folder = Path(data_folder) if data_folder else bench_folder(model)
    if not (folder / "samples.npz").is_file():
        shipped = [m for m in DEMO_MODELS if (bench_folder(m) / "samples.npz").is_file()]
        raise UsageError(f"no labelled generations for model {model!r} (looked in {folder}); bench demo runs on "
                         f"the shipped ground-truth models: {', '.join(shipped)}")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    # FLIPD's full forward and the layer sweep need the whole model (prune=False)
    det = Detector.from_pretrained(model, model_path, device=device, dtype="float32", prune=False)
    data = subset(load_demo_set(folder), limit)
    labels = data.labels
    if labels.sum() < 2 or (1 - labels).sum() < 2:
        raise UsageError(f"{folder} labels {int(labels.sum())} memorized and {int((1 - labels).sum())} generalized "
                         f"samples: too few to benchmark")
    bs = batch_size or det.batch_size
    per_sample, seconds, timing = score_methods(det, data, batch_size=bs, flipd_probes=flipd_probes)
    per_sample["grade"] = data.grades
    results, recall = interval_table(per_sample, seconds, labels, data.grades, timing, n_boot=n_boot)
    pairs = pairs_table(per_sample, list(seconds), labels, n_boot=n_boot)
    chosen = None
    if select:  # ours_selected: chosen on the selection half, measured on the held-out half (same library function)
        chosen = selected_rows(det, data, per_sample, list(seconds), batch_size=bs, n_boot=n_boot)
        if chosen is not None:
            results, recall = pd.concat([results, chosen["results"]], ignore_index=True), \
                pd.concat([recall, chosen["recall"]], ignore_index=True)
            pairs = pd.concat([pairs.assign(samples="all labelled"), chosen["pairs"]], ignore_index=True)
            (output / "selection.json").write_text(json.dumps(chosen["record"], indent=1))
    results.to_csv(output / "results.csv", index=False)
    recall.to_csv(output / "recall_by_grade.csv", index=False)
    pairs.to_csv(output / "pairs.csv", index=False)
    per_sample.to_csv(output / "scores.csv", index=False)
    plot_roc(per_sample, list(seconds), labels, output / "roc.png",
             f"{model}, {det.layer}, t={det.timestep}: {labels.sum()} memorized vs {(1 - labels).sum()} generalized")
    out = {"results": results, "recall": recall, "pairs": pairs, "settings": det.settings, "batch_size": bs,
           "flipd_probes": flipd_probes, "model": model}
    if chosen is not None:
        out["selection"] = chosen["record"]
    if sweep:
        sw, kept, sel, held = sweep_layers(det, data, timesteps=tuple(sweep_timesteps), keep_scores=True)
        sw.to_csv(output / "sweep.csv", index=False)
        plot_sweep(sw, output / "sweep.png", str(det.layer))
        proof = layer_proof(sw, kept, labels, sel, held, str(det.layer), det.timestep, n_boot=n_boot)
        proof["model"] = model
        (output / "layer_proof.json").write_text(strict_json.dumps(proof, indent=1))
        out["sweep"], out["proof"] = sw, proof
    return out
