"""``memdetect audit``: the CI entry point (a scan with a calibrated threshold, the report and the CI outputs)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import UsageError
from .common import load_detector, progress_bar
from .exits import _outputs, _written, handle_errors
from .options import (AllowRemote, Annotations, BatchSize, Device, Draws, Dtype, EvidenceJson, EvidenceTop, Fpr, Html,
                      Junit, Layer, Metric, Model, ModelPath, Paths, Quiet, ReferenceDir, Seed, Sigma, StateDirOption,
                      SummaryJson, Timestep, Workers, scan_settings)
from .render import err, render_audit
from .ux import require_model


@handle_errors
def audit(
    ctx: typer.Context,
    paths: Paths,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="memdetect.toml from `memdetect calibrate` "
                                                   "(read only when given: in CI, take it from the base branch, "
                                                   "not from the pull request).")] = None,
    config_sha256: Annotated[Optional[str], typer.Option("--config-sha256", help="Refuse the --config file unless "
                                                         "its SHA-256 is this (64 hex digits; `sha256sum "
                                                         "memdetect.toml`).")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Report file (.csv, .json, or "
                                         ".parquet).")] = Path(".memdetect/report.csv"),
    junit: Junit = None,
    summary_json: SummaryJson = None,
    html: Html = None,
    annotations: Annotations = "auto",
    threshold: Annotated[Optional[float], typer.Option("--threshold", help="Flag images whose score is >= this "
                                                       "(overrides the config's).")] = None,
    metric: Metric = "std",
    model: Model = None, model_path: ModelPath = None,
    layer: Layer = None, timestep: Timestep = None, sigma: Sigma = None,
    seed: Seed = 0,
    draws: Draws = 1,
    batch_size: BatchSize = None,
    device: Device = "auto", dtype: Dtype = "auto",
    workers: Workers = None,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Continue an interrupted audit from its "
                                         "journal in the state directory (keyed by the settings, the weights' "
                                         "content hash and the report path; only rows signed with the state "
                                         "directory's secret are trusted). Off by default: every image is "
                                         "scored.")] = False,
    state_dir: StateDirOption = None,
    top: Annotated[int, typer.Option("--top", help="Flagged images listed in the summary (0: none).")] = 50,
    allow_empty: Annotated[bool, typer.Option("--allow-empty", help="Pass (exit 0, empty report and CI outputs) when "
                                              "the paths hold no image file, e.g. a pull request that adds none "
                                              "(default: exit 2).")] = False,
    fpr: Fpr = None,
    evidence_top: EvidenceTop = 20,
    evidence_json: EvidenceJson = None,
    reference_dir: ReferenceDir = None,
    allow_errors: Annotated[bool, typer.Option("--allow-errors", help="Report inputs that could not be checked "
                            "(unreadable, too large, not an image, too many frames) as skipped instead of failing "
                            "the audit (exit 1). Config key: allow_errors.")] = False,
    suffix_only: Annotated[bool, typer.Option("--suffix-only", help="Search folders and tar shards for image "
                           "suffixes only (default: also any file whose first bytes are an image signature, e.g. "
                           "a PNG committed as x.bin; its row says found_by content).")] = False,
    any_file: Annotated[bool, typer.Option("--any-file", help="The paths are files of any kind, named one by one "
                        "(what a pre-commit hook passes: every staged file): audit the images among them (by suffix "
                        "or content) and tar shards, skip the rest; none left exits 0 without loading the model "
                        "(implies --allow-empty).")] = False,
    allow_remote: AllowRemote = False,
    quiet: Quiet = False,
):
    """CI entry point: scan with a calibrated threshold, write the report and CI outputs, exit 0 / 1 / 2 (1: an image
    was flagged, or could not be checked).

    Example: memdetect audit generated/ --config memdetect.toml --junit junit.xml --allow-empty"""
    from ..workflows import ci
    from ..store.io import check_destinations, check_report_path

    ci.check_annotations(annotations)
    if any_file:
        from ..store.sources import files_to_audit

        kept, skipped = files_to_audit(paths)
        paths, allow_empty = [Path(k) for k in kept], True
    s = scan_settings(ctx, config, config_sha256=config_sha256, model=model, model_path=model_path, layer=layer,
                      timestep=timestep, sigma=sigma, metric=metric, threshold=threshold, seed=seed, fpr=fpr,
                      allow_errors=allow_errors, allow_remote=allow_remote, draws=draws)
    if s.threshold is None and config is None and Path("memdetect.toml").is_file():
        raise UsageError("audit needs a threshold: --config memdetect.toml or --threshold X (./memdetect.toml is not "
                         "read unless given with --config)")
    require_model(s.model, config_hint="--config memdetect.toml")
    ci.check_threshold(s.threshold)
    if any_file and not paths:  # a commit without images: the config is checked, the model is not loaded
        if not quiet:
            typer.echo(f"memdetect audit: no image among the {len(skipped)} files: nothing to audit")
        raise typer.Exit(0)
    _outputs(output=output, html=html, junit=junit, summary_json=summary_json, evidence_json=evidence_json)
    check_destinations({"--output": output, "--html": html, "--junit": junit, "--summary-json": summary_json,
                        "--evidence-json": evidence_json})  # named by their options: the fix is the user's
    check_report_path(output)
    ci.check_report_folder(output)
    from ..store.state import StateDir

    state = StateDir(state_dir)  # checked before the model load, as the destinations are
    state.check_outside(paths)
    if resume:
        state.check_trusted(paths)
    det = load_detector(s.model, s.model_path, batch_size=batch_size, device=device, dtype=dtype,
                        num_workers=workers, **s.detector_options())
    det.configuration = s.configuration
    from ..config import check_weights

    check_weights(det, s.weights, state, config)
    bar, progress = progress_bar("scanning", quiet=quiet)
    with bar:
        done = ci.audit(det, paths, output=output, resume=resume, html=html, config=config, junit=junit,
                        summary_json=summary_json, annotations=annotations, on_batch=progress, num_workers=workers,
                        state_dir=state, reference=s.reference, channels=s.channels,
                        evidence_top=evidence_top, evidence_json=evidence_json, reference_dir=reference_dir,
                        allow_errors=s.allow_errors, allow_remote=s.allow_remote, allow_empty=allow_empty,
                        suffix_only=suffix_only)
    _written(output, junit, summary_json, html)
    if not quiet:
        render_audit(done.summary, top=top)
        if done.summary["images"] == 0:
            err.print("no image files under the paths: nothing to audit, passing (--allow-empty)")
    raise typer.Exit(done.exit_code)
