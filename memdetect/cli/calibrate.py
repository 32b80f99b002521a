"""``memdetect calibrate``: thresholds from known-novel images (optionally choosing layer, timestep and metric from
known-memorized ones), or the in-generation guard's threshold from generated references."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer
from rich.text import Text

from ..errors import UsageError
from .common import _load_pipeline, load_detector, progress_bar
from .exits import _outputs, _written, handle_errors
from .options import (BatchSize, Classes, Device, Draws, Dtype, GuardImages, GuardSteps, Guidance, Layer, Model,
                      ModelPath, PromptFile, Prompts, Quiet, Seed, Sigma, StepT, Timestep, Workers, _conditions,
                      _given)
from .render import (_p, cal_detector, err, render_calibration, render_guard_calibration, render_selection)
from .ux import require_model


@handle_errors
def calibrate(
    ctx: typer.Context,
    reference: Annotated[Optional[List[Path]], typer.Argument(help="Images known to be novel (files, folders, quoted "
                                                              "globs); none with --guard.", show_default=False)] = None,
    fpr: Annotated[float, typer.Option("--fpr", help="Largest fraction of the reference images the threshold may "
                                                     "flag.")] = 0.01,
    memorized: Annotated[Optional[List[Path]], typer.Option("--memorized", help="Images known to be memorized (a "
                         "file, folder or quoted glob; repeatable): report the threshold's ROC point.")] = None,
    select_layer: Annotated[bool, typer.Option("--select-layer", help="Choose layer, timestep and metric from the "
                            "--memorized and reference images (nested k-fold, out-of-sample evidence in the config); "
                            "the model's default is kept unless the choice is clearly better.")] = False,
    layers: Annotated[Optional[List[str]], typer.Option("--layers", help="--select-layer: try the hookable layers "
                      "matching this glob (repeatable; see `memdetect layers`) instead of the family's "
                      "candidates.")] = None,
    timesteps: Annotated[str, typer.Option("--timesteps", help="--select-layer: comma-separated timesteps to "
                                           "try.")] = "10,50,200",
    training_duplicates: Annotated[Optional[Path], typer.Option("--training-duplicates", help="--select-layer "
                                   "without labelled copies: a folder of training images; those present many times "
                                   "(near-duplicates) are the memorized examples, unique ones join the novel "
                                   "references.")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Config file to write.")] = Path("memdetect.toml"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing config file.")] = False,
    model: Model = None, model_path: ModelPath = None,
    layer: Layer = None, timestep: Timestep = None, sigma: Sigma = None,
    metric: Annotated[str, typer.Option("--metric", help="The metric the config flags with (thresholds are written "
                                                         "for every metric).")] = "std",
    seed: Seed = 0,
    draws: Draws = 1,
    normalise: Annotated[str, typer.Option("--normalise", help="none, or reference: score the pooled activations "
                         "standardised per channel with statistics of half the reference images (the other half "
                         "sets the threshold; needs 200 or more).")] = "none",
    batch_size: BatchSize = None,
    device: Device = "auto", dtype: Dtype = "auto",
    workers: Workers = None,
    quiet: Quiet = False,
    guard: Annotated[bool, typer.Option("--guard", help="Calibrate the in-generation guard instead: generate "
                                                        "-n reference images per --prompt / --class (normal ones) and "
                                                        "store a \\[guard] threshold.")] = False,
    prompts: Prompts = None, classes: Classes = None, prompt_file: PromptFile = None,
    num_images: GuardImages = 8, steps: GuardSteps = None, guidance: Guidance = None, step_t: StepT = 50,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="--guard: the memdetect.toml (e.g. from "
                      "--select-layer) whose layer, timestep, metric and normalisation the guard uses; --output gets "
                      "it with a \\[guard] table added.")] = None,
):
    """Choose thresholds that flag at most --fpr of known-novel images and write them to memdetect.toml.

    Example: memdetect calibrate examples/demo-reference --model demo --fpr 0.01"""
    from ..workflows.calibrate import calibrate_paths, check_fpr, check_output

    check_fpr(fpr)
    if config is not None:  # --guard --config: the guard reads the file's scan configuration (memdetect.guarding)
        from ..config import load_config

        base = load_config(config)
        clash = [f"--{k.replace('_', '-')}" for k in ("model", "layer", "step_t", "metric") if k in _given(ctx)]
        if not guard or clash:
            raise UsageError("--config applies to --guard, whose model, layer, step and metric it then gives"
                             + (f" (drop {', '.join(clash)})" if clash else ""))
        model, model_path = base.model, model_path or (Path(base.model_path) if base.model_path else None)
    require_model(model, config_hint=None)
    _outputs(output=output)
    check_output(output, force)
    if normalise not in ("none", "reference"):
        raise UsageError(f"--normalise must be none or reference, got {_p(normalise)}")
    if guard:
        if reference or memorized:
            raise UsageError("--guard generates its reference images: give --prompt/--prompt-file/--class and -n, "
                             "not image paths")
        from ..workflows.guarding import Guard, calibrate_guard, guard as memdetect_guard

        from ..models import adapter_class
        from .ux import count_steps, sampler

        pipe, spec = _load_pipeline(model, model_path, device, dtype)
        family = adapter_class(spec.family)
        steps, eta, how = sampler(family.sampling_steps, family.sampling_eta, steps)
        if not quiet:
            err.print(f"sampler: {how}", soft_wrap=True)
        g = (memdetect_guard(pipe, threshold=None, config=config, seed=seed) if config else
             Guard(pipe, threshold=None, layer=layer or spec.layer, step_t=step_t, metric=metric, seed=seed))
        conditions = _conditions(prompts, classes, prompt_file)
        bar, progress = progress_bar("generating the reference images", quiet=quiet, unit="steps")
        with bar, count_steps(pipe, lambda k: progress(min(k, steps), steps)):
            cal = calibrate_guard(g, conditions, num_images, fpr=fpr, steps=steps, guidance=guidance, seed=seed,
                                  output=output, force=force, model=model,
                                  model_path=str(model_path.resolve()) if model_path else None, eta=eta,
                                  base=config)
        _written(cal.path)
        render_guard_calibration(cal, fpr=fpr, model=model, layer=g.layer)
        return
    if not reference:
        raise UsageError("give the reference images (known novel), or --guard to calibrate the in-generation guard")
    if select_layer or layers or training_duplicates:
        if normalise != "none" or draws != 1:
            raise UsageError("--select-layer chooses with one noise draw and tries every candidate raw and "
                             "reference-normalised itself: drop --draws and --normalise (or calibrate them without "
                             "--select-layer)")
        return _calibrate_select(reference=reference, memorized=memorized, layers=layers, timesteps=timesteps,
                                 training_duplicates=training_duplicates, fpr=fpr, output=output, force=force,
                                 model=model, model_path=model_path, layer=layer, timestep=timestep, sigma=sigma,
                                 metric=metric, seed=seed, batch_size=batch_size, device=device, dtype=dtype,
                                 workers=workers, quiet=quiet, select_layer=select_layer)
    det = load_detector(model, model_path, layer=layer, timestep=timestep, metric=metric, seed=seed,
                        batch_size=batch_size, device=device, dtype=dtype, sigma=sigma, draws=draws)
    bar, progress = progress_bar("scanning", quiet=quiet)
    with bar:
        cal = calibrate_paths(det, reference, fpr=fpr, memorized=memorized or (), output=output, force=force,
                              model=model, model_path=model_path, sigma=sigma, on_batch=progress,
                              num_workers=workers, normalise=normalise)
    _written(cal.path)
    render_calibration(cal, det)


def _calibrate_select(*, reference, memorized, layers, timesteps, training_duplicates, fpr, output, force, model,
                      model_path, layer, timestep, sigma, metric, seed, batch_size, device, dtype, workers, quiet,
                      select_layer) -> None:
    """``calibrate --select-layer``: choose the configuration (``memdetect.workflows.select``), then calibrate it."""
    from ..workflows.select import calibrate_selected, parse_timesteps, training_duplicate_examples

    if not select_layer:
        raise UsageError("--layers and --training-duplicates apply to --select-layer")
    if training_duplicates is not None and memorized:
        raise UsageError("give --memorized or --training-duplicates, not both")
    if training_duplicates is None and not memorized:
        raise UsageError("--select-layer needs known-memorized images: --memorized PATH (or --training-duplicates DIR "
                         "for a model's training images)")
    steps = parse_timesteps(timesteps)
    det = load_detector(model, model_path, layer=layer, timestep=timestep, metric=metric, seed=seed,
                        batch_size=batch_size, device=device, dtype=dtype, sigma=sigma, prune=False)
    positives, source, extra_novel = None, "labelled images (--memorized, reference)", []
    if training_duplicates is not None:
        with err.status(Text("finding near-duplicates among the training images ...")):
            positives, extra_novel, found = training_duplicate_examples(training_duplicates, det.adapter.resolution)
        source = f"training duplicates ({found})"
    bar, progress = progress_bar("choosing", quiet=quiet)
    with bar:
        cal, sel = calibrate_selected(det, list(reference) + extra_novel, memorized or (), fpr=fpr, layers=None,
                                      patterns=layers, timesteps=steps, output=output, force=force, model=model,
                                      model_path=model_path, sigma=sigma, on_batch=progress, num_workers=workers,
                                      positives=positives, source=source)
    render_selection(sel)
    render_calibration(cal, cal_detector(det, sel.chosen))
