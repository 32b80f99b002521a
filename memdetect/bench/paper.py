"""The paper's benchmarks (Table 1 of Zhang et al. 2025) on one harness: ``memdetect bench laion | imagenet | cifar10``.

Each benchmark generates images with the model under test, labels them, scores them with the representation
detector and with every baseline that applies, and writes, into its output folder:

* ``results.csv``: ``method, auroc, tpr_at_1pct_fpr, seconds_per_sample, n_memorized, n_generalized, timing``;
* ``scores.csv``: one row per labelled unit (a prompt for laion, a generated image otherwise) with every score;
  laion also writes ``images.csv``, one row per generated image with the image-level scores;
* ``roc.png``; ``settings.json`` (everything that determines the numbers); ``images/`` (the generations, PNG);
* ``records/records-<rank>.jsonl``: a journal (``memdetect.journal``), one line per finished prompt or sample. A
  rerun into the same folder skips what is recorded there (same settings required), so an interrupted run resumes
  where it stopped.

**laion** (Stable Diffusion): label 1 = a prompt of the memorized list, 0 = of the normal list (prompt-level
labels, as in Wen et al. and NeMo). For each prompt, K generations (seeded, DDIM 50 steps, guidance 7.5). A method
that scores images scores each generation; the prompt's score is the **mean** over its K generations.

**imagenet** (DiT) / **cifar10** (pixel DDPM, EDM): generated samples are labelled by their nearest training image
(``memdetect.bench.labels``: pixel correlation, memorized >= 0.95, generalized < 0.80, the band between
excluded; the paper uses SSCD > 0.9 / < 0.5), then scored per image.

Methods (``memdetect.bench.baselines``; the same functions serve ``bench demo``):

* ``ours_<metric>``: the detector on the generated image alone (no prompt): the path ``memdetect scan`` takes.
* ``wen_first_step`` / ``wen_all_steps``: Wen et al.'s text-conditional noise-difference norm (class-conditional
  for DiT: class vs null class); not for unconditional models.
* ``nemo``: NeMo's value-neuron outlier score (SD only); its per-neuron statistics are computed **on the benchmark's
  normal prompts** (or ``nemo_reference``), not on NeMo's 50k held-out LAION prompts, which are not published.
  Those normal prompts are also scored: each against the statistics of the others (leave-one-out), since against
  statistics that include it a prompt looks typical by construction.
* ``ross_flipd``: Ross et al.'s local-intrinsic-dimension criterion, FLIPD with Hutchinson's estimator
  (``flipd_probes`` Rademacher probes), conditional on the prompt / class, at the detector's timestep.
* ``carlini``: Carlini et al.'s tiled-L2 density among generations: within a prompt's K generations (K - 1
  neighbours: all of them must be near-copies), or over the whole pool of samples (``carlini_neighbours``, 1).

**Timing.** Every method is timed on the same device with the same batches (laion: the K generations of one prompt;
otherwise ``batch_size`` samples), after one untimed warm-up per process, with CUDA synchronised around each timed
call; ``seconds_per_sample`` is the method's total time divided by the number of generated images it covers.
Generation is excluded, except for ``wen_all_steps``, which cannot be had without it: its time is the generation's
(the norms are recorded while sampling). The ``timing`` column of ``results.csv`` says this per method.

**Several GPUs.** Under ``accelerate launch`` (or torchrun: ``WORLD_SIZE`` > 1), one process per GPU, each process
takes every ``world``-th unfinished prompt or batch on its own device and appends to its own records file; the main
process waits for the others and writes the tables. accelerate splits across GPUs only: several CPU processes are
refused rather than each redoing all the work.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from .._version import __version__
from ..detector import Detector
from ..errors import InputError, UsageError
from ..io import ImageError, discover, image_seed, load_image
from ..journal import Journal, read_journals
from ..models.base import CONDITIONING
from ..scores import SCORES, compute_all
from . import baselines
from .demo import plot_roc, results_table
from .generate import generate, generation_seed, save_png
from .labels import LabelRule, nearest_neighbours_in
from .prompts import DEFAULT_MEMORIZED, DEFAULT_MEMORIZED_LABELLED, DEFAULT_NORMAL, load_list

log = logging.getLogger(__name__)

OURS = [f"ours_{m}" for m in SCORES]
LAION_METHODS = [*OURS, "wen_first_step", "wen_all_steps", "nemo", "ross_flipd", "carlini"]
#: what each benchmark's model must be conditioned on (``Adapter.conditioning``)
BENCH_CONDITIONING = {"laion": "text", "imagenet": "class", "cifar10": None}
#: classifier-free guidance of class-conditional samples (DiTPipeline's default)
CLASS_GUIDANCE = 4.0
#: settings that must match for a rerun to reuse recorded prompts or samples
RESUME_KEYS = ("bench", "family", "source", "layer", "timestep", "steps", "guidance", "generations", "seed",
               "flipd_probes", "dtype", "classes")

Progress = Callable[[int, int], None]  # (finished in this run, to do in this run)


# -- processes, clocks, records ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Processes:
    """This process's share of the work: every ``world``-th item from ``rank``."""

    rank: int = 0
    world: int = 1
    device: str | None = None  # the process's device under accelerate
    wait: Callable[[], None] = field(default=lambda: None)

    @property
    def main(self) -> bool:
        return self.rank == 0


def processes() -> Processes:
    """One process, or accelerate's ``PartialState`` when launched as several (``WORLD_SIZE`` > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return Processes()
    try:
        from accelerate import PartialState
    except ImportError:  # pragma: no cover - accelerate is a dependency
        raise UsageError("WORLD_SIZE > 1 but accelerate is not installed; pip install accelerate") from None
    state = PartialState()
    if state.num_processes == 1:  # e.g. torchrun on CPUs: every process would redo (and rewrite) all the work
        raise UsageError(f"launched as {os.environ['WORLD_SIZE']} processes, but accelerate sees one (it splits "
                         f"work across GPUs); run one process, or one per GPU")
    return Processes(state.process_index, state.num_processes, str(state.device), state.wait_for_everyone)


class Clock:
    """Wall-clock timing that waits for the GPU, so asynchronous CUDA work is counted where it is launched."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], Any]) -> tuple[Any, float]:
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if self.cuda:
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0


def _journals(output: Path) -> list[Path]:
    return sorted((output / "records").glob("records-*.jsonl"))


def check_settings(output: Path, settings: dict, write: bool) -> None:
    """Refuse to resume a folder recorded with other settings (keys of ``RESUME_KEYS``; None = not known yet, not
    compared); write ``settings.json`` (main process)."""
    path = output / "settings.json"
    if path.is_file() and any(output.glob("records/records-*.jsonl")):
        old = json.loads(path.read_text())
        diff = [k for k in RESUME_KEYS if settings.get(k) is not None and old.get(k) != settings[k]]
        if diff:
            k = diff[0]
            raise UsageError(f"{output} holds a run with {k}={old.get(k)!r}, not {settings[k]!r}; use another "
                             f"--output or delete that folder to start over")
    if write:
        output.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name("settings.json.part")
        tmp.write_text(json.dumps(settings, indent=1, default=str) + "\n")
        tmp.replace(path)


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).transpose(2, 0, 1).copy()


def _image_seeds(images: torch.Tensor, seed: int) -> list[int]:
    return [image_seed(a, seed) for a in images.numpy()]


# -- the image-level methods shared by every benchmark -----------------------------------------------------------


@dataclass
class Context:
    det: Detector
    output: Path
    clock: Clock
    steps: int
    guidance: float
    flipd_probes: int
    seed: int
    warm: bool = False  # set once this process has run the untimed warm-up

    @property
    def adapter(self):
        return self.det.adapter


def score_images(ctx: Context, methods: dict[str, Callable[[], Any]]) -> tuple[dict, dict]:
    """Run each method (a thunk returning per-image scores, or a dict of them for ``ours``) timed, after one
    untimed warm-up per process. Returns (scores name -> np.ndarray, seconds name -> float)."""
    if not ctx.warm:
        for fn in methods.values():
            fn()
        ctx.warm = True
    scores: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    for name, fn in methods.items():
        out, sec = ctx.clock(fn)
        if isinstance(out, dict):
            for k, v in out.items():
                scores[k] = np.asarray(v, dtype=np.float64)
                seconds[k] = sec
        else:
            scores[name] = np.asarray(out, dtype=np.float64)
            seconds[name] = sec
    return scores, seconds


def ours(det: Detector, images: torch.Tensor) -> dict[str, np.ndarray]:
    """The representation detector on the images alone, seeded as ``memdetect scan`` seeds them."""
    feats = det.features(images, _image_seeds(images, det.seed))
    return {f"ours_{k}": v.numpy() for k, v in compute_all(feats).items()}


def _ross(ctx: Context, images: torch.Tensor, cond: Any) -> np.ndarray:
    return baselines.flipd(ctx.adapter, images, ctx.det.timestep, _image_seeds(images, ctx.det.seed),
                           probes=ctx.flipd_probes, cond=cond).numpy()


# -- laion ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptItem:
    key: str
    source: str  # "memorized" | "normal"
    row: int
    prompt: str

    @property
    def label(self) -> int:
        return int(self.source == "memorized")


def _laion_prompt(ctx: Context, item: PromptItem, k: int) -> dict:
    """Generate the K images of one prompt, save them, score them with the image- and generation-level methods."""
    a = ctx.adapter
    seeds = [generation_seed(ctx.seed, item.key, j) for j in range(k)]

    def embed():  # prompt-using methods pay for their text encoding
        cond = a.encode_condition([item.prompt])
        return cond.expand(k, *cond.shape[1:])

    cond = embed()
    gen, gen_sec = ctx.clock(lambda: generate(a, seeds, cond=cond, steps=ctx.steps, guidance=ctx.guidance))
    paths = [ctx.output / "images" / f"{item.key}_{j}.png" for j in range(k)]
    save_png(gen.images, paths)
    images = gen.images
    methods = {
        "ours": lambda: ours(ctx.det, images),
        "wen_first_step": lambda: baselines.wen_first_step(a, gen.sample.x_T, gen.sample.first_t, embed()).numpy(),
        "ross_flipd": lambda: _ross(ctx, images, embed()),
        "carlini": lambda: baselines.carlini_density(images, neighbours=k - 1).numpy(),
    }
    scores, seconds = score_images(ctx, methods)
    scores["wen_all_steps"] = baselines.wen_all_steps(gen.sample.noise_difference).numpy()
    seconds["wen_all_steps"] = gen_sec
    return {"key": item.key, "source": item.source, "row": item.row, "prompt": item.prompt, "label": item.label,
            "seeds": seeds, "images": [str(p.relative_to(ctx.output)) for p in paths], "n_images": k,
            "image_scores": {m: [float(x) for x in v] for m, v in scores.items()},
            "seconds": seconds, "generation_seconds": gen_sec}


def _nemo_scores(ctx: Context, prompts: Sequence[str], reference: Sequence[str]) -> tuple:
    """NeMo's statistics on ``reference`` (untimed, like a calibration), then each prompt's score, timed one
    prompt at a time (text encoder + value layers + z-scores). A prompt that is also a reference prompt is scored
    against the statistics of the other reference prompts (leave-one-out): the default reference is the normal
    prompts themselves. Returns (scores [N], seconds [N])."""
    a = ctx.adapter
    values = list(a.cross_attention_values().values())
    reference = list(reference)
    ref = torch.cat([baselines.nemo_activations(values, a.encode_condition(b)) for b in _batches(reference, 32)])
    stats = baselines.NemoStatistics.fit(ref)
    row_of = {p: i for i, p in enumerate(reference)}

    def one(p: str) -> float:
        st = stats.without(ref[row_of[p]]) if p in row_of else stats
        return float(st.score(baselines.nemo_activations(values, a.encode_condition([p])))[0])

    if prompts:
        one(prompts[0])  # warm-up
    out = [ctx.clock(lambda p=p: one(p)) for p in prompts]
    return np.array([s for s, _ in out]), np.array([t for _, t in out])


def run_laion(output: str | Path, *, model: str = "sd14", model_path: str | None = None,
              memorized: str | Path | None = None, normal: str | Path | None = None,
              memorized_filters: Sequence[str] = (), limit: int | None = None, generations: int = 4,
              steps: int = 50, guidance: float = 7.5, device: str = "auto", dtype: str = "auto", seed: int = 0,
              flipd_probes: int = 1, nemo_reference: str | Path | None = None,
              progress: Progress | None = None) -> dict:
    """The LAION memorization benchmark (module docstring). Returns a dict with ``results``, ``scores``, ``images``
    (frames), ``settings`` and ``generated`` (prompts generated by this run); only the main process gets tables."""
    output = Path(output)
    if generations < 2:
        raise UsageError(f"--generations must be at least 2 (Carlini et al.'s criterion compares a prompt's "
                         f"generations), got {generations}")
    if flipd_probes < 1:
        raise UsageError(f"--flipd-probes must be at least 1, got {flipd_probes}")
    mem_default = DEFAULT_MEMORIZED_LABELLED if memorized_filters else DEFAULT_MEMORIZED
    mem_df, mem_origin = load_list(memorized, mem_default, filters=memorized_filters, limit=limit,
                                   option="--memorized")
    norm_df, norm_origin = load_list(normal, DEFAULT_NORMAL, limit=limit, option="--normal")
    ref_origin = "the normal prompts (each scored against the others: leave-one-out)"
    reference = list(norm_df["prompt"])
    if nemo_reference is not None:
        ref_df, ref_origin = load_list(nemo_reference, DEFAULT_NORMAL, option="--nemo-reference")
        reference = list(ref_df["prompt"])
    if len(reference) < 3:
        raise UsageError(f"NeMo's statistics need at least 3 reference prompts (a normal prompt is scored against "
                         f"the others), got {len(reference)}: raise --limit or pass --nemo-reference FILE")

    # what can be compared before the (slow) model load is, so that a mismatch fails at once
    check_settings(output, {"bench": "laion", "steps": steps or None, "guidance": guidance, "seed": seed,
                            "generations": generations, "flipd_probes": flipd_probes}, write=False)
    procs = processes()
    det = _load(model, model_path, "laion", procs, device, dtype)
    a = det.adapter
    steps = steps or a.sampling_steps
    items = ([PromptItem(f"mem-{r:05d}", "memorized", int(r), p) for r, p in zip(mem_df["row"], mem_df["prompt"])]
             + [PromptItem(f"normal-{r:05d}", "normal", int(r), p) for r, p in zip(norm_df["row"], norm_df["prompt"])])
    settings = {**_common_settings("laion", det, steps, guidance, seed, flipd_probes, procs),
                "generations": generations, "memorized": mem_origin, "memorized_filters": list(memorized_filters),
                "normal": norm_origin, "limit": limit, "nemo_reference": ref_origin,
                "aggregation": "prompt score = mean over its generations",
                "carlini": {"grid": 4, "neighbours": generations - 1}}
    check_settings(output, settings, procs.main)
    ctx = Context(det, output, Clock(a.device), steps, guidance, flipd_probes, seed)
    done = read_journals(_journals(output))
    todo = [it for it in items if done.get(it.key, {}).get("prompt") != it.prompt]
    procs.wait()  # every process has read the same records before any adds to them: the shares do not overlap
    mine = todo[procs.rank::procs.world]
    with Journal(output / "records" / f"records-{procs.rank}.jsonl") as journal:
        for n, item in enumerate(mine, 1):
            journal.append([_laion_prompt(ctx, item, generations)])
            if progress:
                progress(n, len(mine))
    procs.wait()
    result = {"settings": settings, "generated": len(mine), "skipped": len(items) - len(todo)}
    if not procs.main:
        return result

    recs = _recorded(output, [it.key for it in items], "prompts")
    nemo, nemo_sec = _nemo_scores(ctx, [it.prompt for it in items], reference)
    image_rows, prompt_rows = [], []
    for rec, nemo_score in zip(recs, nemo):
        row = {"key": rec["key"], "source": rec["source"], "row": rec["row"], "prompt": rec["prompt"],
               "label": rec["label"], "n_images": rec["n_images"]}
        for j in range(rec["n_images"]):
            image_rows.append({**row, "image": rec["images"][j], "seed": rec["seeds"][j],
                               **{m: v[j] for m, v in rec["image_scores"].items()}})
        prompt_rows.append({**row, **{m: float(np.mean(v)) for m, v in rec["image_scores"].items()},
                            "nemo": float(nemo_score)})
    per_prompt = pd.DataFrame(prompt_rows)
    n_images = sum(r["n_images"] for r in recs)
    seconds = {m: sum(r["seconds"][m] for r in recs) / n_images for m in LAION_METHODS if m != "nemo"}
    seconds["nemo"] = float(nemo_sec.sum()) / n_images
    seconds = {m: seconds[m] for m in LAION_METHODS}
    timing = _timing(ctx, a.device, f"batch = the {generations} generations of one prompt", generations)
    labels = per_prompt["label"].to_numpy()
    result.update(_write_tables(output, per_prompt[["key", "source", "row", "prompt", "label", "n_images",
                                                    *LAION_METHODS]], seconds, labels, timing,
                                f"bench laion: {det.name}, {len(items)} prompts x {generations} generations"))
    images_df = pd.DataFrame(image_rows)
    images_df.to_csv(output / "images.csv", index=False)
    result["images"] = images_df
    return result


# -- imagenet / cifar10 --------------------------------------------------------------------------------------------


def _sample_batch(ctx: Context, keys: Sequence[str], seeds: Sequence[int], classes: Sequence[int] | None) -> list[dict]:
    a = ctx.adapter
    cond = None if classes is None else a.encode_condition(classes)
    gen, gen_sec = ctx.clock(lambda: generate(a, seeds, cond=cond, steps=ctx.steps, guidance=ctx.guidance))
    paths = [ctx.output / "images" / f"{k}.png" for k in keys]
    save_png(gen.images, paths)
    images = gen.images
    methods: dict[str, Callable[[], Any]] = {"ours": lambda: ours(ctx.det, images)}
    if cond is not None:
        methods["wen_first_step"] = lambda: baselines.wen_first_step(a, gen.sample.x_T, gen.sample.first_t,
                                                                     cond).numpy()
    methods["ross_flipd"] = lambda: _ross(ctx, images, cond)
    scores, seconds = score_images(ctx, methods)
    if gen.sample.noise_difference is not None:
        scores["wen_all_steps"] = baselines.wen_all_steps(gen.sample.noise_difference).numpy()
        seconds["wen_all_steps"] = gen_sec
    b = len(keys)
    return [{"key": k, "seed": int(s), "class": None if classes is None else int(classes[j]),
             "image": str(paths[j].relative_to(ctx.output)), "n_images": 1,
             "scores": {m: float(v[j]) for m, v in scores.items()},
             "seconds": {m: sec / b for m, sec in seconds.items()}, "generation_seconds": gen_sec / b}
            for j, (k, s) in enumerate(zip(keys, seeds))]


class _Folder(torch.utils.data.Dataset):
    def __init__(self, files: Sequence[Path], resolution: int):
        self.files, self.resolution = list(files), resolution

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            return load_image(self.files[i], self.resolution)
        except ImageError:
            return None


def train_batches(files: Sequence[Path], resolution: int, batch_size: int = 512,
                  num_workers: int | None = None, skipped: list | None = None) -> Iterator[torch.Tensor]:
    """uint8 [B, 3, R, R] batches of the training images (``pil-fit-bicubic``); unreadable files are skipped and
    their indices appended to ``skipped`` (they never become a nearest neighbour)."""
    if num_workers is None:
        num_workers = 0 if len(files) <= batch_size else min(8, os.cpu_count() or 1)
    loader = torch.utils.data.DataLoader(_Folder(files, resolution), batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=list)
    start = 0
    for batch in loader:
        ok = [x for x in batch if x is not None]
        if skipped is not None:
            skipped.extend(start + i for i, x in enumerate(batch) if x is None)
        start += len(batch)
        if ok:
            yield torch.from_numpy(np.stack(ok))


def label_rule(memorized_at: float, generalized_below: float) -> LabelRule:
    """The labelling rule of ``--memorized-at`` / ``--generalized-below``, checked (a one-line UsageError)."""
    if not generalized_below <= memorized_at:
        raise UsageError(f"--generalized-below ({generalized_below}) must not exceed --memorized-at ({memorized_at})")
    return LabelRule(memorized_at=memorized_at, generalized_below=generalized_below)


def label_samples(paths: Sequence[Path], train_dir: str | Path, resolution: int,
                  rule: LabelRule) -> pd.DataFrame:
    """Nearest training image of each generated image (pixel correlation at ``resolution``) and its label."""
    files = discover([train_dir])
    if not files:
        raise InputError(f"no training images under {train_dir}")
    samples = torch.from_numpy(np.stack([load_image(p, resolution) for p in paths]))
    skipped: list[int] = []
    sim, idx = nearest_neighbours_in(samples, train_batches(files, resolution, skipped=skipped))
    if len(skipped) == len(files):
        raise InputError(f"none of the {len(files)} files under {train_dir} could be read as an image")
    if skipped:
        log.warning("%d unreadable files under %s were skipped", len(skipped), train_dir)
    unread = set(skipped)
    readable = [f for i, f in enumerate(files) if i not in unread]  # nearest_neighbours_in counts these only
    return pd.DataFrame({"similarity": sim.numpy(), "nearest_train": [str(readable[int(i)]) for i in idx],
                         "label": [rule.label(float(s)) for s in sim]})


def run_samples(bench: str, output: str | Path, *, model: str, train_dir: str | Path, model_path: str | None = None,
                num_samples: int = 1000, batch_size: int | None = None, steps: int | None = None,
                guidance: float | None = None, classes: Sequence[int] | None = None, rule: LabelRule = LabelRule(),
                label_resolution: int | None = None, device: str = "auto", dtype: str = "auto", seed: int = 0,
                flipd_probes: int = 1, carlini_neighbours: int = 1, progress: Progress | None = None) -> dict:
    """``bench imagenet`` (class-conditional: DiT) / ``bench cifar10`` (unconditional: pixel DDPM, EDM): generate,
    label by nearest training image, score, tabulate (module docstring). ``classes`` and ``guidance`` (default
    ``CLASS_GUIDANCE``) apply to class-conditional models only."""
    output = Path(output)
    if bench not in ("imagenet", "cifar10"):
        raise UsageError(f"unknown benchmark {bench!r}; choose imagenet or cifar10")
    if num_samples < 2:
        raise UsageError(f"--num-samples must be at least 2, got {num_samples}")
    if not 1 <= carlini_neighbours < num_samples:
        raise UsageError(f"carlini neighbours must be in [1, {num_samples - 1}], got {carlini_neighbours}")
    if flipd_probes < 1:
        raise UsageError(f"--flipd-probes must be at least 1, got {flipd_probes}")
    if not Path(train_dir).is_dir():
        raise FileNotFoundError(f"--train-dir {train_dir} is not a folder")
    check_settings(output, {"bench": bench, "steps": steps, "seed": seed, "flipd_probes": flipd_probes}, write=False)
    procs = processes()
    det = _load(model, model_path, bench, procs, device, dtype)
    a = det.adapter
    steps = steps or a.sampling_steps
    conditional = a.conditioning == "class"
    if conditional:
        guidance = CLASS_GUIDANCE if guidance is None else guidance
        n_classes = int(a.num_classes)
        classes = list(range(n_classes)) if classes is None else [int(c) for c in classes]
        bad = [c for c in classes if not 0 <= c < n_classes]
        if bad or not classes:
            raise UsageError(f"--classes must be class indices in [0, {n_classes}), got {bad or 'none'}")
    elif classes is not None or guidance is not None:
        given = "--classes" if classes is not None else "--guidance"
        raise UsageError(f"{given} applies to class-conditional models; {det.name} is unconditional")
    else:
        guidance = 1.0
    bs = batch_size or det.batch_size
    if bs < 1:
        raise UsageError("batch size must be at least 1")
    res = label_resolution or min(a.resolution, 64)
    keys = [f"sample-{i:06d}" for i in range(num_samples)]
    seeds = {k: generation_seed(seed, k) for k in keys}
    cls_of = {k: classes[i % len(classes)] for i, k in enumerate(keys)} if conditional else {}
    settings = {**_common_settings(bench, det, steps, guidance, seed, flipd_probes, procs),
                "num_samples": num_samples, "classes": classes if conditional else None, "batch_size": bs,
                "labels": {"similarity": "pixel correlation to the nearest training image", "resolution": res,
                           "memorized_at": rule.memorized_at, "generalized_below": rule.generalized_below,
                           "train_dir": str(train_dir)},
                "carlini": {"grid": 4, "neighbours": carlini_neighbours, "pool": "all generated samples"}}
    check_settings(output, settings, procs.main)
    ctx = Context(det, output, Clock(a.device), steps, guidance, flipd_probes, seed)
    done = read_journals(_journals(output))
    todo = [k for k in keys if k not in done]
    procs.wait()  # as in run_laion: the same list of unfinished samples in every process
    mine = list(_batches(todo, bs))[procs.rank::procs.world]
    total = sum(len(b) for b in mine)
    finished = 0
    with Journal(output / "records" / f"records-{procs.rank}.jsonl") as journal:
        for batch in mine:
            journal.append(_sample_batch(ctx, batch, [seeds[k] for k in batch],
                                         [cls_of[k] for k in batch] if conditional else None))
            finished += len(batch)
            if progress:
                progress(finished, total)
    procs.wait()
    result = {"settings": settings, "generated": total, "skipped": len(keys) - len(todo)}
    if not procs.main:
        return result

    recs = _recorded(output, keys, "samples")
    paths = [output / r["image"] for r in recs]
    images = torch.from_numpy(np.stack([_read_png(p) for p in paths]))
    methods = [*OURS, *(["wen_first_step", "wen_all_steps"] if conditional else []), "ross_flipd", "carlini"]
    carlini, carlini_sec = ctx.clock(lambda: baselines.carlini_density(images, neighbours=carlini_neighbours).numpy())
    labels = label_samples(paths, train_dir, res, rule)
    per_sample = pd.DataFrame([{"key": r["key"], "seed": r["seed"], "class": r["class"], "image": r["image"],
                                **r["scores"]} for r in recs])
    per_sample["carlini"] = carlini
    per_sample = pd.concat([per_sample, labels], axis=1)
    seconds = {m: sum(r["seconds"][m] for r in recs) / len(recs) for m in methods if m != "carlini"}
    seconds["carlini"] = carlini_sec / len(recs)
    seconds = {m: seconds[m] for m in methods}
    per_sample.to_csv(output / "scores.csv", index=False)
    lab = per_sample[per_sample["label"].isin(["memorized", "generalized"])]
    n_mem, n_gen = int((lab["label"] == "memorized").sum()), int((lab["label"] == "generalized").sum())
    if n_mem == 0 or n_gen == 0:
        raise InputError(f"the {num_samples} samples hold {n_mem} memorized and {n_gen} generalized ones (nearest "
                         f"training image, memorized >= {rule.memorized_at}, generalized < {rule.generalized_below}); "
                         f"the ROC needs both: generate more samples or change the thresholds (scores.csv is written)")
    timing = _timing(ctx, a.device, f"batch = {bs} samples", 1)
    timing["carlini"] = (f"scoring only, {a.device}: tiled L2 over the pool of {len(recs)} generations, "
                         f"{carlini_neighbours} neighbour(s); per generated image")
    result.update(_write_tables(output, lab[["key", "seed", "class", "image", "similarity", "nearest_train", "label",
                                             *methods]].reset_index(drop=True),
                                seconds, (lab["label"] == "memorized").astype(int).to_numpy(), timing,
                                f"bench {bench}: {det.name}, {len(lab)} labelled of {num_samples} samples",
                                scores_name=None))
    result["scores"] = per_sample
    return result


# -- shared ----------------------------------------------------------------------------------------------------------


def _recorded(output: Path, keys: Sequence[str], what: str) -> list[dict]:
    """The records of ``keys`` in order, from every process's journal; an error naming how many are missing (a
    process that failed)."""
    found = read_journals(_journals(output))
    missing = [k for k in keys if k not in found]
    if missing:
        raise InputError(f"{len(missing)} {what} have no record in {output / 'records'} (first: {missing[0]}); a process "
                         f"stopped early: rerun the same command to finish them")
    return [found[k] for k in keys]


def _load(model: str, model_path: str | None, bench: str, procs: Processes, device: str, dtype: str) -> Detector:
    if procs.device is not None and device == "auto":
        device = procs.device
    det = Detector.from_pretrained(model, model_path, device=device, dtype=dtype)
    need, have = BENCH_CONDITIONING[bench], det.adapter.conditioning
    if have != need:
        raise UsageError(f"bench {bench} needs a model that is {CONDITIONING[need]}; {det.name} is a "
                         f"{det.adapter.family} model, {CONDITIONING[have]}")
    return det


def _common_settings(bench: str, det: Detector, steps: int, guidance: float, seed: int, flipd_probes: int,
                     procs: Processes) -> dict:
    st = asdict(det.settings)
    return {"bench": bench, "family": st["family"], "source": st["source"], "model": st["model"],
            "layer": st["layer"], "timestep": st["timestep"], "dtype": st["dtype"], "device": st["device"],
            "winograd": st["winograd"], "steps": steps, "sampler": det.adapter.sampler, "guidance": guidance, "seed": seed, "flipd_probes": flipd_probes,
            "flipd_timestep": st["timestep"], "processes": procs.world, "memdetect": __version__,
            "torch": torch.__version__}


def _timing(ctx: Context, device: torch.device, batch: str, per: int) -> dict[str, str]:
    base = f"scoring only (generation excluded), {device}, {batch}, after an untimed warm-up"
    t = {m: f"{base}; one early-exit forward per image, shared by the four metrics" for m in OURS}
    t["wen_first_step"] = f"{base}; text/class encoding + one conditional and one unconditional call per image"
    t["wen_all_steps"] = (f"the generation itself ({ctx.steps} steps with guidance {ctx.guidance:g}): the norms are "
                          f"recorded while sampling")
    t["nemo"] = (f"scoring only, {device}, one prompt at a time (text encoder + value layers), divided by its {per} "
                 f"images; statistics fitted once on the reference prompts (leave-one-out for those), not timed")
    t["ross_flipd"] = f"{base}; FLIPD with {ctx.flipd_probes} Hutchinson probe(s) at t={ctx.det.timestep}"
    t["carlini"] = f"{base}; tiled L2 (4x4 tiles) among the prompt's {per} generations"
    return t


def _write_tables(output: Path, per_sample: pd.DataFrame, seconds: dict, labels: np.ndarray, timing: dict,
                  title: str, scores_name: str | None = "scores.csv") -> dict:
    if scores_name:
        per_sample.to_csv(output / scores_name, index=False)
    results = results_table(per_sample, seconds, labels, timing)
    tmp = output / "results.csv.part"
    results.to_csv(tmp, index=False)
    tmp.replace(output / "results.csv")
    plot_roc(per_sample, list(seconds), labels, output / "roc.png", title)
    return {"results": results, "scores": per_sample}
