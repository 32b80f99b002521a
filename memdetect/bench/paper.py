"""The paper's benchmarks, Table-1-style (Zhang et al. 2025): ``memdetect bench laion | imagenet | cifar10``.

Each benchmark generates images with the model under test, labels them, scores them with the representation
detector and with every baseline that applies, and writes, into its output folder:

* ``results.csv``: one row per method and unit: ``method, unit, auroc, auroc_lo, auroc_hi, tpr_at_1pct_fpr,
  tpr_lo, tpr_hi, seconds_per_sample, n_memorized, n_generalized, timing, note``. ``unit`` is ``image`` (the
  headline, Table 1's unit: every generated image scored on its own) or, for laion, ``prompt`` (the mean over a
  prompt's K generations, as Wen et al. and NeMo score prompts). ``*_lo`` / ``*_hi``: 95% bootstrap interval
  (``memdetect.core.metrics``; laion resamples whole prompts, since a prompt's K images are not independent);
* ``differences.csv``: ours minus each baseline, per unit, AUROC and TPR@1%FPR with paired-bootstrap 95% intervals
  over the same samples; ``ahead`` is true only where the AUROC interval lies above 0;
* ``scores.csv``: one row per generated image with every score (laion: also ``prompts.csv``, one row per prompt);
* ``roc.png`` (image level); ``settings.json`` (everything that determines the numbers); ``images/`` (PNG);
* ``records/records-<rank>.jsonl``: a journal (``memdetect.store.journal``), one line per finished prompt or sample. A
  rerun into the same folder skips what is recorded there (same settings required), so an interrupted run resumes
  where it stopped, and a run stopped for too few memorized samples keeps its generations for the next one.

**laion** (Stable Diffusion): label 1 = a prompt of the memorized list, 0 = of the normal list; each generated image
inherits its prompt's label. For each prompt, K generations (seeded, DDIM 50 steps, guidance 7.5).

**imagenet** (DiT) / **cifar10** (pixel DDPM, EDM): each generated sample is labelled by its nearest training image
through the shared labelling module (``memdetect.bench.labels``, ``make_labeller``): the flip-, shift- and
colour-cast-invariant pixel correlation (``pixel-cast``, as the shipped ground truth; ``pixel`` drops the colour
cast; memorized >= 0.95, generalized < 0.80, the band between excluded) or, with SSCD's weights, the
paper's SSCD similarity (> 0.9 / < 0.5). The public DiT-XL/2, DDPM and EDM checkpoints were trained on full data and
rarely memorize (the paper's rows come from models trained on a small subset with duplicates): the benchmark warns
before generating, and stops with exit 2 and a sentence when it finds fewer than ``min_memorized`` memorized samples.

Methods (``memdetect.bench.baselines``; the same functions serve ``bench demo``):

* ``ours_<metric>``: the detector on the generated image alone (no prompt): the path ``memdetect scan`` takes.
* ``wen_first_step`` / ``wen_all_steps``: Wen et al.'s text-conditional noise-difference norm (class-conditional
  for DiT: class vs null class); not for unconditional models.
* ``nemo``: NeMo's value-neuron outlier score (SD only), a function of the prompt (each image carries its prompt's
  score). Its per-neuron statistics are, in this order: ``nemo_stats`` (a file in NeMo's format); NeMo's published
  statistics over 50k LAION prompts for SD 1.4 (``memdetect.bench.nemo_stats``: downloaded once, SHA-256-checked,
  read as data), used by default for the ``sd14`` preset; else the prompts of ``nemo_reference`` or the normal
  prompts, each of those scored against the statistics of the others (leave-one-out). ``note`` names the one used.
* ``ross_flipd``: Ross et al.'s local-intrinsic-dimension criterion, FLIPD with Hutchinson's estimator
  (``flipd_probes`` Rademacher probes) at ``flipd_timestep`` (default: the detector's), **prompt-free** (empty
  prompt / null class), as Table 1 has it; ``ross_flipd_cond``: the same conditioned on the prompt or class.
* ``carlini``: Carlini et al.'s tiled-L2 criterion among generations: a generation's score is minus the tiled-L2
  distance to its ``carlini_neighbours``-th nearest other generation of the same prompt (laion: among
  ``carlini_generations`` >= K generations, the K scored ones first) or of the whole pool of samples. Carlini et al.
  generated 500 images per prompt and called a prompt memorized when >= 10 of them formed a clique; the default here
  (K = 4 generations, a star of 3 neighbours) is much weaker and cheaper, and says so in ``note``.

**Timing.** Every method is timed on the same device with the same batches (laion: the K generations of one prompt;
otherwise ``batch_size`` samples), after one untimed warm-up per process, with CUDA synchronised around each timed
call; ``seconds_per_sample`` is the method's total time divided by the number of scored images it covers. Generation
is excluded, except for ``wen_all_steps`` (its norms are recorded while sampling: its time is the generation's) and
``carlini`` (its criterion needs the generations: its time is theirs, all ``carlini_generations`` of a prompt or the
whole pool, plus the distances). The ``timing`` column of ``results.csv`` says this per method.

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
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from ..store import strict_json
from .._version import __version__
from ..detector import Detector
from ..errors import InputError, UsageError
from ..store.io import ImageError, discover, image_seed, load_image
from ..store.journal import Journal, read_journals
from ..models.base import CONDITIONING
from ..models.presets import PRESETS
from ..models.capabilities import Conditioning, CrossAttention, Generation, require
from ..core.scores import SCORES, compute_all
from . import baselines
from . import nemo_stats as nemo_stats_module
from .demo import plot_roc
from .generate import generate, generation_seed, save_png
from .labels import Labeller, LabelRule, PixelLabeller, make_labeller
from ..core.similarity import RunningBest, nearest_match
from ..core.metrics import ahead, bootstrap_metrics, paired_difference
from .prompts import DEFAULT_MEMORIZED, DEFAULT_MEMORIZED_LABELLED, DEFAULT_NORMAL, load_list

log = logging.getLogger(__name__)

OURS = [f"ours_{m}" for m in SCORES]
LAION_METHODS = [*OURS, "wen_first_step", "wen_all_steps", "nemo", "ross_flipd", "ross_flipd_cond", "carlini"]
RESULT_COLUMNS = ["method", "unit", "auroc", "auroc_lo", "auroc_hi", "tpr_at_1pct_fpr", "tpr_lo", "tpr_hi",
                  "seconds_per_sample", "n_memorized", "n_generalized", "timing", "note"]
DIFFERENCE_COLUMNS = ["ours", "baseline", "unit", "d_auroc", "d_auroc_lo", "d_auroc_hi", "d_tpr", "d_tpr_lo",
                      "d_tpr_hi", "ahead"]
#: the fewest memorized samples ``bench imagenet | cifar10`` accepts by default before tabulating
MIN_MEMORIZED = 10
#: what each benchmark's model must be conditioned on (``Adapter.conditioning``)
BENCH_CONDITIONING = {"laion": "text", "imagenet": "class", "cifar10": None}
#: classifier-free guidance of class-conditional samples (DiTPipeline's default)
CLASS_GUIDANCE = 4.0
#: settings that must match for a rerun to reuse recorded prompts or samples
RESUME_KEYS = ("bench", "family", "source", "layer", "timestep", "steps", "guidance", "generations", "seed",
               "flipd_probes", "flipd_timestep", "carlini_generations", "carlini_neighbours", "dtype", "classes")

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
        tmp.write_text(strict_json.dumps(settings, indent=1, default=str) + "\n")
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
    flipd_timestep: int
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
    """FLIPD at ``flipd_timestep``; ``cond`` None = prompt-free (empty prompt / null class)."""
    return baselines.flipd(ctx.adapter, images, ctx.flipd_timestep, _image_seeds(images, ctx.det.seed),
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


def _laion_prompt(ctx: Context, item: PromptItem, k: int, carlini_generations: int, carlini_neighbours: int) -> dict:
    """Generate the K images of one prompt (and the extra ones Carlini's criterion asks for), save them, score the
    K with the image- and generation-level methods."""
    a = ctx.adapter
    seeds = [generation_seed(ctx.seed, item.key, j) for j in range(max(k, carlini_generations))]

    def embed(n: int = k):  # prompt-using methods pay for their text encoding
        cond = a.encode_condition([item.prompt])
        return cond.expand(n, *cond.shape[1:])

    cond = embed()
    gen, gen_sec = ctx.clock(lambda: generate(a, seeds[:k], cond=cond, steps=ctx.steps, guidance=ctx.guidance))
    paths = [ctx.output / "images" / f"{item.key}_{j}.png" for j in range(k)]
    save_png(gen.images, paths)
    images = gen.images

    def extra():  # Carlini's other generations of this prompt, in batches of K
        out = []
        for start in range(k, carlini_generations, k):
            chunk = seeds[start:min(start + k, carlini_generations)]
            out.append(generate(a, chunk, cond=embed(len(chunk)), steps=ctx.steps, guidance=ctx.guidance).images)
        return torch.cat(out) if out else images[:0]

    more, extra_sec = ctx.clock(extra)
    if len(more):
        save_png(more, [ctx.output / "images" / "carlini" / f"{item.key}_{j}.png"
                        for j in range(k, carlini_generations)])
    pool = torch.cat([images, more])
    methods = {
        "ours": lambda: ours(ctx.det, images),
        "wen_first_step": lambda: baselines.wen_first_step(a, gen.sample.x_T, gen.sample.first_t, embed()).numpy(),
        "ross_flipd": lambda: _ross(ctx, images, None),
        "ross_flipd_cond": lambda: _ross(ctx, images, embed()),
        "carlini": lambda: baselines.carlini_density(images, pool, neighbours=carlini_neighbours).numpy(),
    }
    scores, seconds = score_images(ctx, methods)
    scores["wen_all_steps"] = baselines.wen_all_steps(gen.sample.noise_difference).numpy()
    seconds["wen_all_steps"] = gen_sec
    seconds["carlini"] += gen_sec + extra_sec  # the criterion needs every one of its generations
    return {"key": item.key, "source": item.source, "row": item.row, "prompt": item.prompt, "label": item.label,
            "seeds": seeds[:k], "images": [str(p.relative_to(ctx.output)) for p in paths], "n_images": k,
            "image_scores": {m: [float(x) for x in v] for m, v in scores.items()},
            "seconds": seconds, "generation_seconds": gen_sec, "carlini_generation_seconds": gen_sec + extra_sec}


@dataclass(frozen=True)
class NemoReference:
    """Where NeMo's statistics come from: fixed moments (a file) or reference prompts (fitted, leave-one-out)."""

    description: str
    moments: baselines.NemoMoments | None = None
    prompts: tuple[str, ...] = ()


def nemo_reference_for(adapter, *, preset: str, nemo_stats: str | Path | None, reference_file: str | Path | None,
                       normal: Sequence[str]) -> NemoReference:
    """The statistics NeMo is scored against (module docstring: ``nemo_stats``, the published ones for a preset that
    declares them (``Preset.nemo_published``: ``sd14``), ``nemo_reference`` or the normal prompts)."""
    values = require(adapter, CrossAttention, "NeMo").cross_attention_values()
    if nemo_stats is not None:
        moments = nemo_stats_module.read_statistics(nemo_stats, values)
        return NemoReference(f"statistics file {Path(nemo_stats).name} (NeMo's format)", moments)
    if reference_file is None and getattr(PRESETS.get(preset), "nemo_published", False):
        widths = nemo_stats_module.layer_widths(values)
        if widths != nemo_stats_module.SD1_WIDTHS:
            log.warning("NeMo's published statistics are for SD 1.4's value layers %s; this model's are %s: NeMo "
                        "falls back to leave-one-out statistics", list(nemo_stats_module.SD1_WIDTHS), list(widths))
        else:
            try:
                path = nemo_stats_module.fetch_published()
            except InputError as e:
                log.warning("%s; NeMo falls back to leave-one-out statistics over the normal prompts", e)
            else:
                return NemoReference(f"NeMo's published statistics (50k LAION prompts, sha256 "
                                     f"{nemo_stats_module.PUBLISHED.sha256[:12]})",
                                     nemo_stats_module.read_statistics(path, values))
    if reference_file is not None:
        ref_df, origin = load_list(reference_file, DEFAULT_NORMAL, option="--nemo-reference")
        prompts = tuple(ref_df["prompt"])
        what = f"{len(prompts)} reference prompts of {origin}"
    else:
        prompts, what = tuple(normal), f"the {len(normal)} normal prompts"
    if len(prompts) < 3:
        raise UsageError(f"NeMo's statistics need at least 3 reference prompts (a normal prompt is scored against "
                         f"the others), got {len(prompts)}: raise --limit, or pass --nemo-reference FILE or "
                         f"--nemo-stats FILE")
    return NemoReference(f"leave-one-out statistics over {what} (a reference prompt is scored against the others)",
                         prompts=prompts)


def _nemo_scores(ctx: Context, prompts: Sequence[str], reference: NemoReference) -> tuple:
    """Each prompt's NeMo score, timed one prompt at a time (text encoder + value layers + z-scores). Statistics
    fitted on reference prompts are computed first (untimed, like a calibration); a prompt that is also a
    reference prompt is scored against the statistics of the others (leave-one-out). Returns (scores [N],
    seconds [N])."""
    a = ctx.adapter
    values = list(a.cross_attention_values().values())
    if reference.moments is not None:
        def one(p: str) -> float:
            return float(reference.moments.score(baselines.nemo_activations(values, a.encode_condition([p])))[0])
    else:
        ref_prompts = list(reference.prompts)
        ref = torch.cat([baselines.nemo_activations(values, a.encode_condition(b)) for b in _batches(ref_prompts, 32)])
        stats = baselines.NemoStatistics.fit(ref)
        row_of = {p: i for i, p in enumerate(ref_prompts)}

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
              flipd_probes: int = 1, flipd_timestep: int | None = None, nemo_reference: str | Path | None = None,
              nemo_stats: str | Path | None = None, carlini_generations: int | None = None,
              carlini_neighbours: int | None = None, n_boot: int = 1000, progress: Progress | None = None) -> dict:
    """The LAION memorization benchmark (module docstring). Returns a dict with ``results``, ``differences``,
    ``scores`` (per image), ``prompts`` (per prompt), ``settings`` and ``generated`` (prompts generated by this
    run); only the main process gets tables.

    ``carlini_generations`` (default K = ``generations``): generations per prompt for Carlini's criterion, the K
    scored ones included; ``carlini_neighbours`` (default min(10, that - 1)): how many near-copies a generation
    needs (Carlini et al.: a clique of >= 10 among 500)."""
    output = Path(output)
    if generations < 2:
        raise UsageError(f"--generations must be at least 2 (Carlini et al.'s criterion compares a prompt's "
                         f"generations), got {generations}")
    if flipd_probes < 1:
        raise UsageError(f"--flipd-probes must be at least 1, got {flipd_probes}")
    if n_boot < 20:
        raise UsageError(f"--bootstrap must be at least 20 replicates, got {n_boot}")
    carlini_generations = generations if carlini_generations is None else int(carlini_generations)
    if carlini_generations < generations:
        raise UsageError(f"--carlini-generations ({carlini_generations}) must be at least --generations "
                         f"({generations}): the scored generations are among Carlini's")
    carlini_neighbours = min(10, carlini_generations - 1) if carlini_neighbours is None else int(carlini_neighbours)
    if not 1 <= carlini_neighbours < carlini_generations:
        raise UsageError(f"--carlini-neighbours must be in [1, {carlini_generations - 1}] (one less than Carlini's "
                         f"generations), got {carlini_neighbours}")
    if nemo_stats is not None and nemo_reference is not None:
        raise UsageError("--nemo-stats and --nemo-reference are alternatives; pass one")
    if nemo_stats is not None and not Path(nemo_stats).is_file():
        raise UsageError(f"--nemo-stats {nemo_stats} is not a file")
    mem_default = DEFAULT_MEMORIZED_LABELLED if memorized_filters else DEFAULT_MEMORIZED
    mem_df, mem_origin = load_list(memorized, mem_default, filters=memorized_filters, limit=limit,
                                   option="--memorized")
    norm_df, norm_origin = load_list(normal, DEFAULT_NORMAL, limit=limit, option="--normal")

    # what can be compared before the (slow) model load is, so that a mismatch fails at once
    check_settings(output, {"bench": "laion", "steps": steps or None, "guidance": guidance, "seed": seed,
                            "generations": generations, "flipd_probes": flipd_probes,
                            "carlini_generations": carlini_generations}, write=False)
    procs = processes()
    det = _load(model, model_path, "laion", procs, device, dtype)
    a = det.adapter
    flipd_timestep = _flipd_timestep(det, flipd_timestep)
    reference = nemo_reference_for(a, preset=det.name, nemo_stats=nemo_stats, reference_file=nemo_reference,
                                   normal=list(norm_df["prompt"]))
    steps = steps or a.sampling_steps
    items = ([PromptItem(f"mem-{r:05d}", "memorized", int(r), p) for r, p in zip(mem_df["row"], mem_df["prompt"])]
             + [PromptItem(f"normal-{r:05d}", "normal", int(r), p) for r, p in zip(norm_df["row"], norm_df["prompt"])])
    settings = {**_common_settings("laion", det, steps, guidance, seed, flipd_probes, flipd_timestep, procs),
                "generations": generations, "memorized": mem_origin, "memorized_filters": list(memorized_filters),
                "normal": norm_origin, "limit": limit, "nemo_reference": reference.description,
                "unit": "image (each generated image inherits its prompt's label); prompt rows: mean over the K",
                "carlini_generations": carlini_generations, "carlini_neighbours": carlini_neighbours,
                "carlini": {"grid": 4, "neighbours": carlini_neighbours, "generations": carlini_generations},
                "intervals": {"bootstrap": "percentile, stratified, whole prompts", "replicates": n_boot,
                              "level": 0.95}}
    check_settings(output, settings, procs.main)
    ctx = Context(det, output, Clock(a.device), steps, guidance, flipd_probes, seed, flipd_timestep)
    done = read_journals(_journals(output))
    todo = [it for it in items if done.get(it.key, {}).get("prompt") != it.prompt]
    procs.wait()  # every process has read the same records before any adds to them: the shares do not overlap
    mine = todo[procs.rank::procs.world]
    with Journal(output / "records" / f"records-{procs.rank}.jsonl") as journal:
        for n, item in enumerate(mine, 1):
            journal.append([_laion_prompt(ctx, item, generations, carlini_generations, carlini_neighbours)])
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
                               **{m: v[j] for m, v in rec["image_scores"].items()}, "nemo": float(nemo_score)})
        prompt_rows.append({**row, **{m: float(np.mean(v)) for m, v in rec["image_scores"].items()},
                            "nemo": float(nemo_score)})
    cols = ["key", "source", "row", "prompt", "label", "n_images"]
    per_image = pd.DataFrame(image_rows)[[*cols, "image", "seed", *LAION_METHODS]]
    per_prompt = pd.DataFrame(prompt_rows)[[*cols, *LAION_METHODS]]
    n_images = sum(r["n_images"] for r in recs)
    seconds = {m: sum(r["seconds"][m] for r in recs) / n_images for m in LAION_METHODS if m != "nemo"}
    seconds["nemo"] = float(nemo_sec.sum()) / n_images
    seconds = {m: seconds[m] for m in LAION_METHODS}
    timing = _timing(ctx, a.device, f"batch = the {generations} generations of one prompt", generations)
    timing["carlini"] = (f"the generation of all {carlini_generations} generations of the prompt ({ctx.steps} steps, "
                         f"guidance {ctx.guidance:g}) + tiled L2 (4x4 tiles) among them, per scored image")
    notes = _notes(ctx)
    notes["nemo"] = f"reference: {reference.description}; a prompt-level score, each image carries its prompt's"
    notes["carlini"] = (f"{carlini_neighbours}-th nearest of {carlini_generations} generations per prompt (Carlini et "
                        f"al.: a clique of >= 10 among 500 generations)")
    per_image.to_csv(output / "scores.csv", index=False)
    per_prompt.to_csv(output / "prompts.csv", index=False)
    units = [("image", per_image, per_image["key"].to_numpy()), ("prompt", per_prompt, None)]
    result.update(_write_tables(output, units, seconds, timing, notes, n_boot,
                                f"bench laion: {det.name}, {len(items)} prompts x {generations} generations, "
                                f"per image"))
    result["scores"], result["prompts"] = per_image, per_prompt
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
    methods["ross_flipd"] = lambda: _ross(ctx, images, None)  # prompt-free: the null class
    if cond is not None:
        methods["ross_flipd_cond"] = lambda: _ross(ctx, images, cond)
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


def label_rule(memorized_at: float | None, generalized_below: float | None,
               default: LabelRule = LabelRule()) -> LabelRule:
    """The labelling rule of ``--memorized-at`` / ``--generalized-below`` (None: the labeller's ``default``),
    checked (a one-line UsageError)."""
    memorized_at = default.memorized_at if memorized_at is None else memorized_at
    generalized_below = default.generalized_below if generalized_below is None else generalized_below
    if not generalized_below <= memorized_at:
        raise UsageError(f"--generalized-below ({generalized_below}) must not exceed --memorized-at ({memorized_at})")
    return LabelRule(memorized_at=memorized_at, generalized_below=generalized_below)


def nearest_in(labeller: Labeller, samples: torch.Tensor,
               batches: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The labeller's nearest training image over training images that arrive in batches: (similarity [N],
    index [N], counting across the batches in order). The pixel labeller takes the batches itself (its sample
    windows are cut once); a labeller with ``embed`` (SSCD) embeds the samples once and each batch once; any other
    labeller is asked batch by batch."""
    if isinstance(labeller, PixelLabeller):
        m = nearest_match(samples, batches, max_shift=labeller.max_shift, flip=labeller.flip,
                          colour=labeller.colour)
        return m.similarity, m.index
    embed = getattr(labeller, "embed", None)
    s = embed(samples) if embed is not None else None
    best = RunningBest(samples.shape[0])
    start = 0
    for batch in batches:
        if s is not None:
            sim, idx = (s @ embed(batch).T).max(dim=1)
        else:
            sim, idx = labeller.nearest(samples, batch)
        best.update(sim.float().cpu(), idx.cpu(), start)
        start += batch.shape[0]
    return best.similarity, best.index


def label_samples(paths: Sequence[Path], train_dir: str | Path, resolution: int, rule: LabelRule,
                  labeller: Labeller | None = None) -> pd.DataFrame:
    """Nearest training image of each generated image (``labeller``, default the flip-, shift- and
    colour-cast-invariant pixel correlation, at ``resolution``) and its label under ``rule``."""
    labeller = labeller or make_labeller("pixel-cast")
    files = discover([train_dir])
    if not files:
        raise InputError(f"no training images under {train_dir}")
    samples = torch.from_numpy(np.stack([load_image(p, resolution) for p in paths]))
    skipped: list[int] = []
    sim, idx = nearest_in(labeller, samples, train_batches(files, resolution, skipped=skipped))
    if len(skipped) == len(files):
        raise InputError(f"none of the {len(files)} files under {train_dir} could be read as an image")
    if skipped:
        log.warning("%d unreadable files under %s were skipped", len(skipped), train_dir)
    unread = set(skipped)
    readable = [f for i, f in enumerate(files) if i not in unread]  # the batches count these only
    return pd.DataFrame({"similarity": sim.numpy(), "nearest_train": [str(readable[int(i)]) for i in idx],
                         "label": [rule.label(float(s)) for s in sim]})


def public_checkpoint_warning(bench: str, model: str, model_path: str | None) -> str | None:
    """The warning ``bench imagenet | cifar10`` gives before loading and generating with a preset's public
    checkpoint (None with ``--model-path`` or a local model)."""
    from ..models.presets import PRESETS

    preset = PRESETS.get(model)
    if model_path or preset is None or Path(preset.source).exists():
        return None
    return (f"{preset.source} is a public checkpoint trained on the full {bench} training set: such models rarely "
            f"memorize, so few or no generations may be labelled memorized (the paper's rows come from models "
            f"trained on a small subset with duplicates). For a model trained the paper's way, pass --model-path; "
            f"benchmarks/train_ground_truth.py {'dit' if bench == 'imagenet' else 'edm'} trains one on CIFAR-10 "
            f"with graded duplicates (raise its --time-budget for a larger one)")


def run_samples(bench: str, output: str | Path, *, model: str, train_dir: str | Path, model_path: str | None = None,
                num_samples: int = 1000, batch_size: int | None = None, steps: int | None = None,
                guidance: float | None = None, classes: Sequence[int] | None = None, rule: LabelRule | None = None,
                labeller: Labeller | None = None, label_resolution: int | None = None, device: str = "auto",
                dtype: str = "auto", seed: int = 0, flipd_probes: int = 1, flipd_timestep: int | None = None,
                carlini_neighbours: int = 1, min_memorized: int = MIN_MEMORIZED, n_boot: int = 1000,
                progress: Progress | None = None, warn: Callable[[str], None] | None = None) -> dict:
    """``bench imagenet`` (class-conditional: DiT) / ``bench cifar10`` (unconditional: pixel DDPM, EDM): generate,
    label by nearest training image, score, tabulate (module docstring). ``classes`` and ``guidance`` (default
    ``CLASS_GUIDANCE``) apply to class-conditional models only. ``labeller``: ``labels.make_labeller``'s (default
    pixel-cast); ``rule``: default the labeller's. ``warn``: where the public-checkpoint warning goes before generating
    (default: the log). Fewer than ``min_memorized`` memorized samples: an InputError saying what to do (the
    generations stay in ``output`` for a rerun)."""
    output = Path(output)
    if bench not in ("imagenet", "cifar10"):
        raise UsageError(f"unknown benchmark {bench!r}; choose imagenet or cifar10")
    if num_samples < 2:
        raise UsageError(f"--num-samples must be at least 2, got {num_samples}")
    if not 1 <= carlini_neighbours < num_samples:
        raise UsageError(f"carlini neighbours must be in [1, {num_samples - 1}], got {carlini_neighbours}")
    if flipd_probes < 1:
        raise UsageError(f"--flipd-probes must be at least 1, got {flipd_probes}")
    if n_boot < 20:
        raise UsageError(f"--bootstrap must be at least 20 replicates, got {n_boot}")
    if min_memorized < 1:
        raise UsageError(f"--min-memorized must be at least 1, got {min_memorized}")
    if not Path(train_dir).is_dir():
        raise FileNotFoundError(f"--train-dir {train_dir} is not a folder")
    labeller = labeller or make_labeller("pixel-cast")
    rule = rule or labeller.rule
    check_settings(output, {"bench": bench, "steps": steps, "seed": seed, "flipd_probes": flipd_probes}, write=False)
    procs = processes()
    warning = public_checkpoint_warning(bench, model, model_path)
    if warning and procs.main:
        (warn or log.warning)(warning)
    det = _load(model, model_path, bench, procs, device, dtype)
    a = det.adapter
    flipd_timestep = _flipd_timestep(det, flipd_timestep)
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
    similarity = {"pixel": "flip- and shift-invariant pixel correlation to the nearest training image",
                  "pixel-cast": "flip-, shift- and colour-cast-invariant pixel correlation to the nearest training "
                                "image",
                  "sscd": "cosine similarity of SSCD descriptors to the nearest training image"}.get(labeller.name,
                                                                                                   labeller.name)
    settings = {**_common_settings(bench, det, steps, guidance, seed, flipd_probes, flipd_timestep, procs),
                "num_samples": num_samples, "classes": classes if conditional else None, "batch_size": bs,
                "labels": {"labeller": labeller.name, "similarity": similarity, "resolution": res,
                           "memorized_at": rule.memorized_at, "generalized_below": rule.generalized_below,
                           "train_dir": str(train_dir)},
                "unit": "image", "min_memorized": min_memorized,
                "carlini": {"grid": 4, "neighbours": carlini_neighbours, "pool": "all generated samples"},
                "intervals": {"bootstrap": "percentile, stratified", "replicates": n_boot, "level": 0.95}}
    check_settings(output, settings, procs.main)
    ctx = Context(det, output, Clock(a.device), steps, guidance, flipd_probes, seed, flipd_timestep)
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
    methods = [*OURS, *(["wen_first_step", "wen_all_steps"] if conditional else []), "ross_flipd",
               *(["ross_flipd_cond"] if conditional else []), "carlini"]
    carlini, carlini_sec = ctx.clock(lambda: baselines.carlini_density(images, neighbours=carlini_neighbours).numpy())
    labels = label_samples(paths, train_dir, res, rule, labeller)
    per_sample = pd.DataFrame([{"key": r["key"], "seed": r["seed"], "class": r["class"], "image": r["image"],
                                **r["scores"]} for r in recs])
    per_sample["carlini"] = carlini
    per_sample = pd.concat([per_sample, labels], axis=1)
    seconds = {m: sum(r["seconds"][m] for r in recs) / len(recs) for m in methods if m != "carlini"}
    generation_sec = sum(r["generation_seconds"] for r in recs) / len(recs)
    seconds["carlini"] = carlini_sec / len(recs) + generation_sec  # the pool is its generations
    seconds = {m: seconds[m] for m in methods}
    per_sample.to_csv(output / "scores.csv", index=False)
    lab = per_sample[per_sample["label"].isin(["memorized", "generalized"])]
    n_mem, n_gen = int((lab["label"] == "memorized").sum()), int((lab["label"] == "generalized").sum())
    if n_mem < min_memorized or n_gen == 0:
        why = (f"found {n_mem} memorized and {n_gen} generalized of {num_samples} samples ({labeller.name} "
               f"similarity to the nearest training image, memorized >= {rule.memorized_at}, generalized < "
               f"{rule.generalized_below}); the table needs at least {min_memorized} memorized and 1 generalized")
        hint = ("pass --model-path with a model trained the paper's way (benchmarks/train_ground_truth.py), "
                "or raise --num-samples" if warning else "raise --num-samples or check the thresholds")
        raise InputError(f"{why}: {hint}; the {len(recs)} generations stay in {output / 'images'} (scores.csv "
                         f"is written) and a rerun into the same --output reuses them")
    timing = _timing(ctx, a.device, f"batch = {bs} samples", 1)
    timing["carlini"] = (f"the generation of the pool ({ctx.steps} steps, {a.sampler}) + tiled L2 over the pool of "
                         f"{len(recs)} generations, {carlini_neighbours} neighbour(s); per generated image")
    notes = _notes(ctx)
    notes["carlini"] = (f"{carlini_neighbours}-th nearest of the {len(recs)} generated samples (Carlini et al.: a "
                        f"clique of >= 10 among 500 generations)")
    lab = lab[["key", "seed", "class", "image", "similarity", "nearest_train", "label", *methods]].reset_index(drop=True)
    lab = lab.assign(label=(lab["label"] == "memorized").astype(int))
    result.update(_write_tables(output, [("image", lab, None)], seconds, timing, notes, n_boot,
                                f"bench {bench}: {det.name}, {len(lab)} labelled of {num_samples} samples"))
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
    # the baselines run full forwards, generation and decoding: the whole model stays (prune=False)
    det = Detector.from_pretrained(model, model_path, device=device, dtype=dtype, prune=False)
    from ..speed.runtime import one_thread_for_small_models

    # a tiny model's operations are too small for threads: on a busy machine they cost many times what they save
    one_thread_for_small_models(det.adapter.networks(), det.adapter.device)
    require(det.adapter, Generation, f"bench {bench}")  # it generates its images
    need, have = BENCH_CONDITIONING[bench], det.adapter.conditioning
    if have != need:
        raise UsageError(f"bench {bench} needs a model that is {CONDITIONING[need]}; {det.name} is a "
                         f"{det.adapter.family} model, {CONDITIONING[have]}")
    if need is not None:
        require(det.adapter, Conditioning, f"bench {bench}")
    return det


def _flipd_timestep(det: Detector, flipd_timestep: int | None) -> int:
    t = det.timestep if flipd_timestep is None else int(flipd_timestep)
    n = det.adapter.num_train_timesteps
    if not 0 <= t < n:
        raise UsageError(f"--flipd-timestep must be in [0, {n}), got {t}")
    return t


def _common_settings(bench: str, det: Detector, steps: int, guidance: float, seed: int, flipd_probes: int,
                     flipd_timestep: int, procs: Processes) -> dict:
    st = asdict(det.settings)
    return {"bench": bench, "family": st["family"], "source": st["source"], "model": st["model"],
            "layer": st["layer"], "timestep": st["timestep"], "dtype": st["dtype"], "device": st["device"],
            "winograd": st["winograd"], "steps": steps, "sampler": det.adapter.sampler, "guidance": guidance,
            "seed": seed, "flipd_probes": flipd_probes, "flipd_timestep": flipd_timestep,
            "flipd_condition": {"ross_flipd": "none (empty prompt / null class)",
                                "ross_flipd_cond": "the prompt / class"},
            "processes": procs.world, "memdetect": __version__, "torch": torch.__version__}


def _timing(ctx: Context, device: torch.device, batch: str, per: int) -> dict[str, str]:
    base = f"scoring only (generation excluded), {device}, {batch}, after an untimed warm-up"
    t = {m: f"{base}; one early-exit forward per image, shared by the four metrics" for m in OURS}
    t["wen_first_step"] = f"{base}; text/class encoding + one conditional and one unconditional call per image"
    t["wen_all_steps"] = (f"the generation itself ({ctx.steps} steps with guidance {ctx.guidance:g}): the norms are "
                          f"recorded while sampling")
    t["nemo"] = (f"scoring only, {device}, one prompt at a time (text encoder + value layers), divided by its {per} "
                 f"images; statistics read or fitted once, not timed")
    t["ross_flipd"] = (f"{base}; FLIPD with {ctx.flipd_probes} Hutchinson probe(s) at t={ctx.flipd_timestep}, "
                       f"null condition")
    t["ross_flipd_cond"] = (f"{base}; condition encoding + FLIPD with {ctx.flipd_probes} Hutchinson probe(s) at "
                            f"t={ctx.flipd_timestep}")
    return t


def _notes(ctx: Context) -> dict[str, str]:
    n = {m: "the generated image alone (no prompt), as memdetect scan" for m in OURS}
    n["ross_flipd"] = f"prompt-free (empty prompt / null class), t={ctx.flipd_timestep}"
    n["ross_flipd_cond"] = f"conditioned on the prompt / class, t={ctx.flipd_timestep}"
    return n


def results_rows(frame: pd.DataFrame, methods: Sequence[str], seconds: dict, unit: str, timing: dict, notes: dict,
                 groups=None, n_boot: int = 1000) -> list[dict]:
    """One ``RESULT_COLUMNS`` row per method over ``frame`` (a ``label`` column: 1 memorized, 0 generalized, and a
    score column per method), with bootstrap intervals (``groups``: resample whole groups). A method with a NaN or
    infinite score gets NaN metrics and a warning instead of stopping the table."""
    labels = frame["label"].to_numpy(dtype=int)
    rows = []
    for m in methods:
        scores = frame[m].to_numpy(dtype=np.float64)
        if np.isfinite(scores).all():
            b = bootstrap_metrics(labels, scores, n_boot=n_boot, groups=groups)
            vals = {"auroc": b["auroc"].value, "auroc_lo": b["auroc"].lo, "auroc_hi": b["auroc"].hi,
                    "tpr_at_1pct_fpr": b["tpr"].value, "tpr_lo": b["tpr"].lo, "tpr_hi": b["tpr"].hi}
        else:
            log.warning("%s: %d of %d scores are NaN or infinite; its AUROC is left empty", m,
                        int((~np.isfinite(scores)).sum()), len(scores))
            vals = dict.fromkeys(("auroc", "auroc_lo", "auroc_hi", "tpr_at_1pct_fpr", "tpr_lo", "tpr_hi"), np.nan)
        rows.append({"method": m, "unit": unit, **vals, "seconds_per_sample": seconds[m],
                     "n_memorized": int(labels.sum()), "n_generalized": int((1 - labels).sum()),
                     "timing": timing.get(m, ""), "note": notes.get(m, "")})
    return rows


def difference_rows(frame: pd.DataFrame, methods: Sequence[str], unit: str, groups=None,
                    n_boot: int = 1000) -> list[dict]:
    """Ours (each metric) minus each baseline over the same samples, paired bootstrap (``DIFFERENCE_COLUMNS``)."""
    labels = frame["label"].to_numpy(dtype=int)
    finite = {m: np.isfinite(frame[m].to_numpy(dtype=np.float64)).all() for m in methods}
    rows = []
    for o in [m for m in methods if m in OURS and finite[m]]:
        for b in [m for m in methods if m not in OURS and finite[m]]:
            d = paired_difference(labels, frame[o].to_numpy(dtype=np.float64), frame[b].to_numpy(dtype=np.float64),
                                  n_boot=n_boot, groups=groups)
            rows.append({"ours": o, "baseline": b, "unit": unit, "d_auroc": d["auroc"].value,
                         "d_auroc_lo": d["auroc"].lo, "d_auroc_hi": d["auroc"].hi, "d_tpr": d["tpr"].value,
                         "d_tpr_lo": d["tpr"].lo, "d_tpr_hi": d["tpr"].hi, "ahead": ahead(d["auroc"])})
    return rows


def _write_tables(output: Path, units: Sequence[tuple[str, pd.DataFrame, Any]], seconds: dict, timing: dict,
                  notes: dict, n_boot: int, title: str) -> dict:
    """results.csv, differences.csv and roc.png (of the first unit) from ``units``: (unit, frame, groups)."""
    methods = list(seconds)
    results, differences = [], []
    for unit, frame, groups in units:
        results += results_rows(frame, methods, seconds, unit, timing, notes, groups, n_boot)
        differences += difference_rows(frame, methods, unit, groups, n_boot)
    results = pd.DataFrame(results, columns=RESULT_COLUMNS)
    differences = pd.DataFrame(differences, columns=DIFFERENCE_COLUMNS)
    for name, table in (("results.csv", results), ("differences.csv", differences)):
        tmp = output / f"{name}.part"
        table.to_csv(tmp, index=False)
        tmp.replace(output / name)
    frame = units[0][1]
    plot_roc(frame, methods, frame["label"].to_numpy(dtype=int), output / "roc.png", title)
    return {"results": results, "differences": differences}
