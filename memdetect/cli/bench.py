"""``memdetect bench``: the benchmarks with ground-truth labels (demo, laion, imagenet, cifar10)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer
from rich.text import Text

from ..errors import UsageError
from ..text import printable
from .common import progress_bar, speed_settings
from .exits import handle_errors
from .options import (Bootstrap, BenchOutput, Device, Dtype, FlipdProbes, FlipdTimestep, GeneralizedBelow,
                      GenerationBatch, GenerationSeed, LabelResolution, MemorizedAt, ModelPath, NumSamples, Quiet,
                      Steps, TrainDir, _parse_classes)
from .render import _p, err
from .render_bench import render_bench_demo, render_paper

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks with ground-truth labels (AUROC, TPR@1%FPR, cost).")


@bench_app.command("demo")
@handle_errors
def bench_demo(
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for results.csv, recall_by_grade.csv, "
                                                                "pairs.csv, scores.csv, roc.png (and sweep.*, "
                                                                "layer_proof.json).")] = Path("bench-demo"),
    model: Annotated[str, typer.Option("--model", "-m", help="A shipped ground-truth model: demo, demo-sd, demo-dit, "
                                                             "demo-edm or demo-sd3.")] = "demo",
    sweep_layers: Annotated[bool, typer.Option("--sweep-layers", help="Also: std AUROC at every layer and a few "
                                               "timesteps (selection / held-out halves), layer_proof.json.")] = False,
    device: Device = "auto",
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Samples per scoring batch.")] = None,
    flipd_probes: FlipdProbes = 1,
    model_path: Annotated[Optional[Path], typer.Option("--model-path", help="Another copy of the model.")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=4, help="Score a stratified, seeded subset of this "
                                                 "many labelled samples (quick check).")] = None,
    sweep_timesteps: Annotated[str, typer.Option("--sweep-timesteps", help="Comma-separated timesteps for "
                                                 "--sweep-layers.")] = "10,25,50,100,200,400",
    bootstrap: Bootstrap = 1000,
    select: Annotated[bool, typer.Option("--select/--no-select", help="Add the ours_selected row: the configuration "
                                         "`calibrate --select-layer` chooses on the selection half, measured on the "
                                         "held-out half (selection.json).")] = True,
    quiet: Quiet = False,
):
    """Ground truth: score a shipped memorizing model's labelled generations with every method that applies.

    Example: memdetect bench demo --model demo --limit 100"""
    from ..bench.demo import DEMO_MODELS, run_demo

    if model not in DEMO_MODELS:
        raise UsageError(f"--model must be one of {', '.join(DEMO_MODELS)} (the shipped ground-truth models), got "
                         f"{model!r}")
    try:
        steps = tuple(int(v) for v in sweep_timesteps.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"--sweep-timesteps takes comma-separated integers, got {sweep_timesteps!r}") from None
    speed_settings(device)
    bar, _ = progress_bar(f"bench demo ({model}): scoring its labelled generations with every method", counted=False,
                          quiet=quiet)
    with bar:  # no count from run_demo: in a log, a line every few seconds with the time elapsed
        res = run_demo(output, model=model, device=device, batch_size=batch_size, flipd_probes=flipd_probes,
                       sweep=sweep_layers, model_path=str(model_path) if model_path else None, limit=limit,
                       sweep_timesteps=steps, n_boot=bootstrap, select=select)
    if not quiet:
        render_bench_demo(res, model=model, output=output, sweep_layers=sweep_layers)


@bench_app.command("laion")
@handle_errors
def bench_laion(
    model: Annotated[str, typer.Option("--model", "-m", help="A text-conditional (Stable Diffusion) preset, family or "
                                                             "folder.")] = "sd14",
    model_path: ModelPath = None,
    memorized: Annotated[Optional[Path], typer.Option("--memorized", help="Memorized prompts (jsonl, json, csv or "
                         "txt) (default: Wen et al.'s sdv1_500_memorized.jsonl, downloaded once).")] = None,
    normal: Annotated[Optional[Path], typer.Option("--normal", help="Normal prompts (default: NeMo's "
                      "unmemorized_laion_prompts.csv, downloaded once).")] = None,
    memorized_filter: Annotated[Optional[List[str]], typer.Option("--memorized-filter", help="Keep memorized prompts "
                                "matching COLUMN=VALUE[,VALUE] or COLUMN>=NUMBER, e.g. type=VM (repeatable; the "
                                "default list then is NeMo's copy of the same 500, with type and SSCD "
                                "columns).")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="The first N prompts of each list.")] = None,
    generations: Annotated[int, typer.Option("--generations", "-k", min=2, help="Generations per prompt.")] = 4,
    steps: Annotated[int, typer.Option("--steps", min=1, help="DDIM steps.")] = 50,
    guidance: Annotated[float, typer.Option("--guidance", help="Classifier-free guidance scale.")] = 7.5,
    nemo_stats: Annotated[Optional[Path], typer.Option("--nemo-stats", help="NeMo's neuron statistics file (NeMo's "
                          "format, e.g. statistics_additional_laion_prompts_v1_4.pt; works offline) (default for "
                          "sd14: NeMo's published file, downloaded once and checked; otherwise leave-one-out).")] = None,
    nemo_reference: Annotated[Optional[Path], typer.Option("--nemo-reference", help="Prompts to fit NeMo's statistics "
                              "on instead (leave-one-out for those also scored).")] = None,
    flipd_probes: FlipdProbes = 1,
    flipd_timestep: FlipdTimestep = None,
    carlini_generations: Annotated[Optional[int], typer.Option("--carlini-generations", min=2, help="Generations per "
                                   "prompt for Carlini et al.'s criterion, the scored ones included; its time counts "
                                   "them all (default: --generations; Carlini et al. used 500).")] = None,
    carlini_neighbours: Annotated[Optional[int], typer.Option("--carlini-neighbours", min=1, help="Near-copies a "
                                  "generation needs among them (default: min(10, generations - 1)).")] = None,
    bootstrap: Bootstrap = 1000,
    output: BenchOutput = None,
    device: Device = "auto", dtype: Dtype = "auto",
    seed: GenerationSeed = 0,
    quiet: Quiet = False,
):
    """Table-1-style LAION: memorized vs normal prompts on Stable Diffusion, per generated image (and per prompt),
    ours against Wen, NeMo, Ross, Carlini, with 95% intervals.

    Example: memdetect bench laion --model sd14 --limit 20"""
    from ..bench.paper import run_laion

    output = output or Path("bench-laion")
    speed_settings(device)
    bar, progress = progress_bar("generating and scoring prompts", unit="prompts", quiet=quiet)
    with bar:
        res = run_laion(output, model=model, model_path=str(model_path) if model_path else None, memorized=memorized,
                        normal=normal, memorized_filters=memorized_filter or (), limit=limit, generations=generations,
                        steps=steps, guidance=guidance, device=device, dtype=dtype, seed=seed,
                        flipd_probes=flipd_probes, flipd_timestep=flipd_timestep, nemo_reference=nemo_reference,
                        nemo_stats=nemo_stats, carlini_generations=carlini_generations,
                        carlini_neighbours=carlini_neighbours, n_boot=bootstrap, progress=progress)
    if quiet:
        return
    extra = f"; NeMo: {res['settings']['nemo_reference']}"
    render_paper(res, f"bench laion: {_p(model)}, {generations} generations per prompt (unit image: each "
                      f"generation scored alone; unit prompt: mean over its {generations})", output, extra,
                 "scores.csv (per image), prompts.csv")


def _samples_bench(bench: str, *, model: str, model_help: str, doc: str) -> None:
    """Register ``bench imagenet`` / ``bench cifar10``: one command, two benchmarks (their defaults differ)."""

    @handle_errors
    def command(
        train_dir: TrainDir,
        model: str = typer.Option(model, "--model", "-m", help=model_help),
        model_path: ModelPath = None,
        num_samples: NumSamples = 1000,
        classes: Annotated[Optional[str], typer.Option("--classes", help="Class-conditional models: classes to "
                                                       "generate, cycled (e.g. 0-9,207) (default: all).")] = None,
        guidance: Annotated[Optional[float], typer.Option("--guidance", help="Class-conditional models: "
                                                          "classifier-free guidance scale (default: 4.0, "
                                                          "DiTPipeline's).")] = None,
        steps: Steps = None,
        batch_size: GenerationBatch = None,
        memorized_at: MemorizedAt = None,
        generalized_below: GeneralizedBelow = None,
        labeller: Annotated[str, typer.Option("--labeller", help="pixel-cast (flip-, shift- and colour-"
                                              "cast-invariant pixel correlation, as the shipped ground truth), pixel "
                                              "(the same without the colour cast) or sscd (the paper's; needs "
                                              "--sscd-weights).")] = "pixel-cast",
        sscd_weights: Annotated[Optional[Path], typer.Option("--sscd-weights", help="SSCD's TorchScript weights "
                                                             "(facebookresearch/sscd-copy-detection).")] = None,
        label_resolution: LabelResolution = None,
        min_memorized: Annotated[int, typer.Option("--min-memorized", min=1, help="Stop with exit 2 (keeping the "
                                                   "generations) when fewer memorized samples are found.")] = 10,
        flipd_probes: FlipdProbes = 1,
        flipd_timestep: FlipdTimestep = None,
        carlini_neighbours: Annotated[int, typer.Option("--carlini-neighbours", min=1, help="Near-copies a sample "
                                      "needs in the pool of generations (Carlini et al.'s criterion).")] = 1,
        bootstrap: Bootstrap = 1000,
        output: BenchOutput = None,
        device: Device = "auto",
        dtype: Dtype = "auto",
        seed: GenerationSeed = 0,
        quiet: Quiet = False,
    ):
        from ..bench.labels import make_labeller
        from ..bench.paper import label_rule, run_samples

        lab_fn = make_labeller(labeller, sscd_weights=sscd_weights)
        rule = label_rule(memorized_at, generalized_below, lab_fn.rule)
        output = output or Path(f"bench-{bench}")
        speed_settings(device)
        bar, progress = progress_bar("generating and scoring samples", unit="samples", quiet=quiet)
        with bar:
            res = run_samples(bench, output, model=model, model_path=str(model_path) if model_path else None,
                              train_dir=train_dir, num_samples=num_samples, classes=_parse_classes(classes),
                              guidance=guidance, steps=steps, batch_size=batch_size, rule=rule, labeller=lab_fn,
                              label_resolution=label_resolution, flipd_probes=flipd_probes,
                              flipd_timestep=flipd_timestep, carlini_neighbours=carlini_neighbours,
                              min_memorized=min_memorized, n_boot=bootstrap, device=device, dtype=dtype, seed=seed, progress=progress,
                              warn=lambda text: err.print(Text(f"warning: {printable(text)}", style="yellow"),
                                                          soft_wrap=True))
        if quiet:
            return
        lab = res["settings"]["labels"]
        render_paper(res, f"bench {bench}: {_p(model)}, {num_samples} samples, per image", output,
                     f"; labels: {lab['labeller']} similarity at {lab['resolution']} px, memorized >= "
                     f"{lab['memorized_at']}, generalized < {lab['generalized_below']}", "scores.csv")

    command.__doc__ = doc
    bench_app.command(bench)(command)


_samples_bench("imagenet", model="dit", model_help="A class-conditional (DiT) preset, family or folder.",
               doc="Table-1-style ImageNet: class-conditional samples labelled by their nearest training image; ours "
                   "against the baselines. The public DiT-XL/2 was trained on full data and rarely memorizes: pass "
                   "--model-path for a model trained the paper's way.\n\nExample: memdetect bench imagenet "
                   "--model-path DIT_DIR --train-dir TRAIN_IMAGES -n 1000")
_samples_bench("cifar10", model="edm-cifar10", model_help="An unconditional preset (edm-cifar10, ddpm-cifar10), or a "
                                                          "family with --model-path.",
               doc="Table-1-style CIFAR-10: unconditional samples labelled by their nearest training image. The "
                   "public checkpoints were trained on full data and rarely memorize: pass --model-path for a model "
                   "trained the paper's way.\n\nExample: memdetect bench cifar10 --model edm-cifar10 --train-dir "
                   "CIFAR10_TRAIN -n 1000")
