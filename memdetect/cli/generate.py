"""``memdetect generate``: images from a diffusers pipeline, optionally guarded in-generation."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import UsageError
from .common import _load_pipeline, progress_bar
from .exits import EXIT_FLAGGED, _outputs, _written, handle_errors
from .options import (Classes, Device, Dtype, GenerationSeed, GuardImages, GuardSteps, Guidance, Layer, Metric, Model,
                      ModelPath, PromptFile, Prompts, StepT, _conditions, _given)
from .render import _p, err, render_generated
from .ux import require_model


@handle_errors
def generate(
    ctx: typer.Context,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the images and report.csv.")],
    model: Model = None, model_path: ModelPath = None,
    prompts: Prompts = None, classes: Classes = None, prompt_file: PromptFile = None,
    num_images: GuardImages = 8, steps: GuardSteps = None, guidance: Guidance = None,
    guard: Annotated[bool, typer.Option("--guard", help="Score every image in-generation (no extra forward pass "
                                                        "with classifier-free guidance) and flag it.")] = False,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="memdetect.toml with a \\[guard] table "
                                                   "(`memdetect calibrate --guard`): threshold, layer, step.")] = None,
    threshold: Annotated[Optional[float], typer.Option("--threshold", help="Guard threshold (instead of "
                                                       "--config's).")] = None,
    metric: Metric = "std", layer: Layer = None, step_t: StepT = 50,
    on_memorized: Annotated[str, typer.Option("--on-memorized", help="flag or regenerate (fresh seeds).")] = "flag",
    max_retries: Annotated[int, typer.Option("--max-retries", min=0, help="Regeneration rounds.")] = 2,
    seed: GenerationSeed = 0,
    device: Device = "auto", dtype: Dtype = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No sampler line or progress (the table and files "
                                                              "are still written).")] = False,
):
    """Generate images with a diffusers pipeline, optionally guarded: writes DIR/*.png and DIR/report.csv.
    Exit 1 when a returned image is flagged. --guard without --config or --threshold uses the model's shipped guard
    calibration (demo, demo-sd).

    Example: memdetect generate --model demo -n 8 --guard --output generated"""
    from ..workflows.guarding import Guard, generate as run, write_generated
    from ..store.io import display_path

    if on_memorized not in ("flag", "regenerate"):
        raise UsageError(f"--on-memorized must be flag or regenerate, got {_p(on_memorized)}")
    if (config or threshold is not None) and not guard:
        raise UsageError("--config and --threshold apply to --guard")
    conditions = _conditions(prompts, classes, prompt_file)
    _outputs(output=output)
    if guard and config is None and threshold is None:
        # the model's shipped guard calibration where one exists, else a refusal naming the command that makes one
        from .ux import no_guard_threshold, shipped_guard

        config = shipped_guard(require_model(model), model_path)
        if config is None:
            raise no_guard_threshold(model, model_path)
    normalise = None
    if guard and config:
        from ..config import load_config
        from ..workflows.guarding import guard_settings

        cfg = load_config(config)
        gs = guard_settings(cfg)  # its [guard] table, else its scan configuration (e.g. from --select-layer)
        if gs["threshold"] is None and threshold is None:
            raise UsageError(f"{_p(config)} has no [guard] table; write one with `memdetect calibrate --guard "
                             f"--config {_p(config)}` (it keeps the file's layer, timestep, metric, normalisation)")
        if cfg.model != model and "model" in _given(ctx):
            raise UsageError(f"--model {_p(model)} differs from model = {_p(cfg.model)} in {_p(config)}")
        model = cfg.model
        model_path = model_path or (Path(cfg.model_path) if cfg.model_path else None)
        given = _given(ctx)  # the command line wins; a calibrated setting changes only with its own --threshold
        for key, value in (("metric", metric), ("layer", layer), ("step_t", step_t)):
            if key in given and gs[key] is not None and value != gs[key] and threshold is None:
                raise UsageError(f"--{key.replace('_', '-')} {_p(value)} differs from {key} = {gs[key]!r} in "
                                 f"[guard] of {_p(config)}, which the threshold was calibrated for; drop the flag, "
                                 f"give --threshold too, or recalibrate")
        metric = metric if "metric" in given else gs["metric"]
        layer = layer if "layer" in given else gs["layer"] or layer
        step_t = step_t if "step_t" in given else gs["step_t"]
        steps = steps or gs["steps"]
        guidance = gs["guidance"] if guidance is None else guidance
        threshold = gs["threshold"] if threshold is None else threshold
        normalise = gs["normalise"] if not {"layer", "step_t"} & given else None  # statistics of that layer
    if guard and on_memorized == "regenerate" and threshold is None:
        raise UsageError("--on-memorized regenerate needs a threshold (--config or --threshold)")
    require_model(model)
    from ..models import adapter_class
    from .ux import count_steps, sampler

    pipe, spec = _load_pipeline(model, model_path, device, dtype)
    family = adapter_class(spec.family)
    steps, eta, how = sampler(family.sampling_steps, family.sampling_eta, steps)
    if not quiet:
        err.print(f"sampler: {how}" + (f"; guard calibration: {_p(display_path(config))}" if guard and config
                                       else ""), soft_wrap=True)
    target = pipe
    if guard:
        target = Guard(pipe, threshold=threshold, layer=layer or spec.layer, step_t=step_t, metric=metric,
                       on_memorized=on_memorized, max_retries=max_retries, seed=seed, normalise=normalise)
    bar, progress = progress_bar("generating", quiet=quiet, unit="steps")
    with bar, count_steps(pipe, lambda k: progress(min(k, steps), steps)):
        gen = run(target, conditions, num_images, steps=steps, guidance=guidance, seed=seed, eta=eta)
    report = write_generated(gen, output)
    _written(report)
    render_generated(gen, output=output, metric=metric, report=report)
    if gen.result is not None and gen.result.flagged.any():
        raise typer.Exit(EXIT_FLAGGED)
