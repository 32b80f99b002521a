"""``memdetect scan``: score every image and write a report (one process, one part of a sharded scan, one rank
under torchrun, or a Ray Data pool)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import UsageError
from .common import _run_context, load_detector, progress_bar
from .exits import EXIT_FLAGGED, EXIT_OK, _outputs, _written, handle_errors
from .options import (AllowRemote, BatchSize, Config, Device, Draws, Dtype, Engine, EvidenceJson, EvidenceTop, Fpr,
                      Html, Inputs, Layer, Metric, Model, ModelPath, Quiet, RayAddress, ReferenceDir, Resume, Seed,
                      Shard, ShardKeyFile, Sigma, StateDirOption, Threshold, Timestep, Workers, scan_settings)
from .render import render_scan
from .ux import require_model


@handle_errors
def scan(
    ctx: typer.Context,
    paths: Inputs,
    config: Config = None,
    model: Model = None, model_path: ModelPath = None,
    layer: Layer = None, timestep: Timestep = None, sigma: Sigma = None,
    metric: Metric = "std",
    threshold: Threshold = None,
    batch_size: BatchSize = None,
    device: Device = "auto", dtype: Dtype = "auto",
    seed: Seed = 0,
    draws: Draws = 1,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Report file: .csv, .json or .parquet (a "
                                                                         "path or an fsspec URL).")] = None,
    top: Annotated[int, typer.Option("--top", help="Rows in the terminal table of highest scores (0: none).")] = 10,
    workers: Workers = None,
    no_early_exit: Annotated[bool, typer.Option("--no-early-exit", help="Run the full forward pass (for "
                                                                        "checking).")] = False,
    resume: Resume = True,
    state_dir: StateDirOption = None,
    html: Html = None,
    fpr: Fpr = None,
    evidence_top: EvidenceTop = 20,
    evidence_json: EvidenceJson = None,
    reference_dir: ReferenceDir = None,
    shard: Shard = None,
    shard_key_file: ShardKeyFile = None,
    engine: Engine = "local",
    ray_address: RayAddress = None,
    allow_remote: AllowRemote = False,
    quiet: Quiet = False,
):
    """Score every image for memorization and write a report.

    Example: memdetect scan examples/demo --model demo --output report.csv"""
    from ..integrations.torchrun import rank_device, world
    from ..store.io import check_destinations, check_report_path
    from ..workflows.scan import scan as run_scan
    from ..store.sources import is_url, parse_shard

    s = scan_settings(ctx, config, model=model, model_path=model_path, layer=layer, timestep=timestep, sigma=sigma,
                      metric=metric, threshold=threshold, seed=seed, fpr=fpr, allow_remote=allow_remote,
                      draws=draws)
    require_model(s.model)
    if engine not in ("local", "ray"):
        raise UsageError(f"unknown engine {engine!r}; choose local or ray")
    part = parse_shard(shard) if shard is not None else None
    if shard_key_file is not None and part is None:
        raise UsageError("--shard-key-file signs a shard's report: it needs --shard I/N")
    from ..workflows.merge import load_shard_key

    shard_key = load_shard_key(shard_key_file) if part is not None else None
    if ray_address is not None and engine != "ray":
        raise UsageError("--ray-address needs --engine ray")
    paths = [p if is_url(p) else Path(p) for p in paths]  # URLs stay strings (Path would fold their "//")
    _outputs(output=output, html=html, evidence_json=evidence_json)
    remote = output is not None and is_url(str(output))
    # named by their options, the fix is the user's (before the model load, too); a folder given as --output says so
    check_destinations({"--output": None if remote or output is None else Path(output), "--html": html,
                        "--evidence-json": evidence_json})
    if output is not None:
        check_report_path(output)
        output = output if remote else Path(output)
    from ..store.state import StateDir

    StateDir(state_dir).check_outside(paths)
    w = world()
    if w is not None and (part is not None or engine == "ray"):
        raise UsageError("under torchrun / accelerate launch each rank already scores its own part: drop "
                         f"{'--shard' if part is not None else '--engine ray'}")
    if (w is not None or engine == "ray") and (evidence_json is not None or reference_dir is not None):
        raise UsageError("--evidence-json and --reference-dir need a scan in one process (evidence reads the flagged "
                         "images again): scan the flagged images again without torchrun / --engine ray")
    if w is not None:
        device = rank_device(device, w)
        quiet = quiet or w.rank != 0  # one progress bar and one table, rank 0's
    det = load_detector(s.model, s.model_path, batch_size=batch_size, device=device, dtype=dtype,
                        early_exit=not no_early_exit, num_workers=workers, **s.detector_options())
    det.configuration = s.configuration
    from ..config import check_weights

    check_weights(det, s.weights, StateDir(state_dir), config)
    bar, progress = progress_bar("scanning", quiet=quiet)
    with bar:
        ray_options = dict(model=s.model, model_path=str(s.model_path) if s.model_path else None,
                           batch_size=batch_size, device=device, dtype=dtype, early_exit=not no_early_exit,
                           **s.detector_options())
        result = run_scan(det, paths, engine="torchrun" if w is not None else engine, world=w, output=output,
                          resume=resume, html=html, on_batch=progress, num_workers=workers, state_dir=state_dir,
                          reference=s.reference, channels=s.channels, evidence_top=evidence_top,
                          evidence_json=evidence_json, reference_dir=reference_dir, shard=part, shard_key=shard_key,
                          allow_remote=s.allow_remote, context=_run_context(paths, config),
                          ray_address=ray_address, detector_options=ray_options if engine == "ray" else None)
    _written(result.output, html)
    if w is not None and w.rank != 0:
        raise typer.Exit(EXIT_OK)  # rank 0 reports, and its exit code says whether anything was flagged
    if not quiet:
        render_scan(result, det, top=top)
    raise typer.Exit(EXIT_FLAGGED if result.flagged else EXIT_OK)
