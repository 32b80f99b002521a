"""The ``memdetect`` command line: a thin layer over ``memdetect.detector``.

Exit codes (every command):
  0  the scan finished and nothing was flagged
  1  at least one image was flagged memorized (only possible with a threshold)
  2  a usage, model or input error stopped the command (one line on stderr; MEMDETECT_DEBUG=1 for a traceback)
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__
from .errors import MemdetectError

EXIT_OK, EXIT_FLAGGED, EXIT_ERROR = 0, 1, 2

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Detect memorized images from diffusion models (one partial forward pass per image).\n\n"
                       "Exit codes: 0 nothing flagged, 1 something flagged (needs a threshold), 2 error.")
err = Console(stderr=True)
out = Console()


def _fail(message: str) -> None:
    from rich.text import Text  # the message is plain text: a "[/x]" in a name is not markup

    err.print(Text.assemble(("memdetect: error:", "bold red"), " ", message), highlight=False, soft_wrap=True)
    if not os.environ.get("MEMDETECT_DEBUG"):
        err.print("[dim](set MEMDETECT_DEBUG=1 for the full traceback)[/]")
    raise typer.Exit(EXIT_ERROR)


def handle_errors(fn):
    """Map the library's user-facing errors to one line on stderr and exit code 2 (the CLI_ERROR_MAPPINGS idea)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except (MemdetectError, OSError) as e:  # OSError: a path that is missing, unwritable, a full disk...
            if os.environ.get("MEMDETECT_DEBUG"):
                raise
            _fail(str(e) or type(e).__name__)
        except ValueError as e:  # bad option values detected in the library (formats, ranges)
            if os.environ.get("MEMDETECT_DEBUG"):
                raise
            _fail(str(e))
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130)

    return wrapper


def _version(value: bool):
    if value:
        out.print(f"memdetect {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log diagnostics to stderr."),
):
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        for name in ("diffusers", "transformers", "huggingface_hub"):
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            from diffusers.utils import logging as dlog

            dlog.set_verbosity_error()
            dlog.disable_progress_bar()
        except Exception:  # pragma: no cover
            pass


# Options shared by the commands that load a model (aliases reused, as huggingface_hub's CLI does).
ModelOpt = typer.Option("demo", "--model", "-m", help="Preset (see `memdetect models`), family (with --model-path), "
                                                       "hub id or local diffusers folder.")
ModelPathOpt = typer.Option(None, "--model-path", help="Local weights for the preset or family (a diffusers folder).")
DeviceOpt = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N.")
DtypeOpt = typer.Option("auto", "--dtype", help="auto (float32 on CPU, bfloat16 on GPU), float32, float16, bfloat16.")
ConfigOpt = typer.Option(None, "--config", "-c", help="memdetect.toml from `memdetect calibrate`: model, layer, "
                                                      "timestep, seed, metric and threshold (flags may not contradict "
                                                      "it; --threshold, --metric and --model-path may override).")
ResumeOpt = typer.Option(True, "--resume/--no-resume", help="Continue from the report's journal "
                                                             "(<output>.journal.jsonl): images already scored with the "
                                                             "same settings are not scored again.")
HtmlOpt = typer.Option(None, "--html", help="Also write a self-contained HTML report (histogram, top images, "
                                             "settings).")


def _given(ctx: typer.Context) -> set[str]:
    """The options typed on the command line (not defaults): a config fills in only the others.

    Compared by name: recent typer versions vendor their own click, with their own ``ParameterSource`` enum.
    """
    return {n for n in ctx.params
            if getattr(ctx.get_parameter_source(n), "name", None) in ("COMMANDLINE", "ENVIRONMENT")}


def scan_settings(ctx: typer.Context, config: Optional[Path], **flags) -> dict:
    """Model, layer, timestep, sigma, seed, metric, threshold, model_path: flags merged with ``--config``."""
    from .config import load_config, merge

    return merge(load_config(config) if config else None, flags, _given(ctx))


def load_detector(model, model_path, *, layer=None, timestep=None, metric="std", threshold=None, seed=0,
                  batch_size=None, device="auto", dtype="auto", early_exit=True, sigma=None):
    from .detector import Detector, resolve_device, resolve_dtype
    from .errors import UsageError
    from .scores import SCORES

    # cheap checks first: a typo in a flag must not cost a model load
    if metric not in SCORES:
        raise UsageError(f"unknown metric {metric!r}; choose one of {', '.join(SCORES)}")
    if batch_size is not None and batch_size < 1:
        raise UsageError("batch size must be at least 1")
    resolve_dtype(dtype, resolve_device(device))
    with err.status(f"loading {model}{' from ' + str(model_path) if model_path else ''} ..."):
        return Detector.from_pretrained(model, str(model_path) if model_path else None, layer=layer,
                                        timestep=timestep, metric=metric, threshold=threshold, seed=seed,
                                        batch_size=batch_size, device=device, dtype=dtype, early_exit=early_exit,
                                        sigma=sigma)


def run_scan(det, paths: list[Path], *, output: Optional[Path], quiet: bool, top: int, num_workers=None,
             resume: bool = True, html: Optional[Path] = None, render: bool = True):
    """Scan with a progress bar, write the report (and HTML), print the table and summary; return the frame.

    With an ``output``, rows are journaled batch by batch next to it and a rerun continues where a killed one
    stopped (``memdetect.journal``); ``df.attrs["resumed"]`` counts the rows taken from the journal.
    """
    from contextlib import nullcontext

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .detector import rows_to_frame
    from .io import check_report_path, discover, display_path, write_report
    from .journal import Journal, journal_path, scan_files

    if output is not None:
        check_report_path(output)
    files = discover(paths)
    if not files:
        raise MemdetectError(f"no image files found under {', '.join(str(p) for p in paths)}")
    journal = Journal(journal_path(output), fresh=not resume) if output is not None else nullcontext()
    with journal, Progress(TextColumn("scanning"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                           TimeRemainingColumn(), console=err, disable=quiet, transient=True) as progress:
        task = progress.add_task("scan", total=len(files))
        result = scan_files(det, files, journal if output is not None else None, num_workers=num_workers,
                            on_batch=lambda n: progress.advance(task, n))
    df = rows_to_frame(result.rows)
    df.attrs["resumed"] = result.resumed
    settings = vars(det.settings)
    if output is not None:
        write_report(df.assign(**{k: settings[k] for k in ("model", "layer", "timestep", "seed", "metric")}),
                     output, settings=settings)
    if html is not None:
        from .html_report import write_html

        write_html(df, html, settings, files={display_path(f): f for f in files})
    if render and not quiet:
        render_scan(df, det, top=top, output=output)
    return df


def render_scan(df, det, *, top: int, output: Optional[Path]) -> None:
    from .detector import scan_summary

    s = scan_summary(df)
    scored = df[df["error"].isna()].sort_values("score", ascending=False)
    if top and len(scored):
        t = Table(title=f"highest {det.metric} scores ({det.name}, {det.layer}, t={det.timestep})",
                  title_justify="left")
        t.add_column("path", overflow="fold")
        for c in ("score", "std", "l4l2", "entropy", "maxmin"):
            t.add_column(c, justify="right")
        if det.threshold is not None:
            t.add_column("memorized")
        for _, r in scored.head(top).iterrows():
            cells = [escape(r["path"]), *(f"{r[c]:.4g}" for c in ("score", "std", "l4l2", "entropy", "maxmin"))]
            if det.threshold is not None:
                cells.append("[bold red]yes[/]" if r["memorized"] else "no")
            t.add_row(*cells)
        out.print(t)
    errors = df[df["error"].notna()]
    for _, r in errors.head(5).iterrows():
        err.print(f"[yellow]skipped[/] {escape(r['path'])}: {escape(r['error'])}", highlight=False, soft_wrap=True)
    if len(errors) > 5:
        err.print(f"[yellow]... and {len(errors) - 5} more errors (see the report's error column)[/]")
    thr = f" at {det.metric} >= {det.threshold:g}" if det.threshold is not None else " (no threshold: nothing flagged)"
    dest = f"; report: {escape(str(output))}" if output else ""
    resumed = df.attrs.get("resumed", 0)
    dest += f" ({resumed} rows reused from its journal)" if resumed else ""
    out.print(f"{s['images']} images: {s['scored']} scored, {s['errored']} errored, "
              f"{s['flagged']} flagged memorized{thr}{dest}", highlight=False)


@app.command()
@handle_errors
def scan(
    ctx: typer.Context,
    paths: List[Path] = typer.Argument(..., help="Image files and/or folders (searched recursively).",
                                       show_default=False),
    config: Optional[Path] = ConfigOpt,
    model: str = ModelOpt,
    model_path: Optional[Path] = ModelPathOpt,
    layer: Optional[str] = typer.Option(None, "--layer", help="NAME[:in][@CALL]; default: the model's paper layer."),
    timestep: Optional[int] = typer.Option(None, "--timestep", "-t", help="DDPM timestep to noise to (default: 50)."),
    sigma: Optional[float] = typer.Option(None, "--sigma", help="EDM only: noise level sigma, instead of the "
                                                                 "--timestep's (t=50 is sigma 0.176)."),
    metric: str = typer.Option("std", "--metric", help="Score column: std, l4l2, entropy, maxmin."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Flag images whose score is >= this."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Images per forward pass "
                                                                               "(default: per model and device)."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    seed: int = typer.Option(0, "--seed", help="Noise seed (an image's noise depends on this and its pixels)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Report file: .csv, .json or .parquet."),
    top: int = typer.Option(10, "--top", help="Rows in the terminal table of highest scores (0: none)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Image-decoding worker processes."),
    no_early_exit: bool = typer.Option(False, "--no-early-exit", help="Run the full forward pass (for checking)."),
    resume: bool = ResumeOpt,
    html: Optional[Path] = HtmlOpt,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar, table or summary."),
):
    """Score every image for memorization and write a report."""
    s = scan_settings(ctx, config, model=model, model_path=model_path, layer=layer, timestep=timestep, sigma=sigma,
                      metric=metric, threshold=threshold, seed=seed)
    det = load_detector(s["model"], s["model_path"], layer=s["layer"], timestep=s["timestep"], metric=s["metric"],
                        threshold=s["threshold"], seed=s["seed"], batch_size=batch_size, device=device, dtype=dtype,
                        early_exit=not no_early_exit, sigma=s["sigma"])
    df = run_scan(det, paths, output=output, quiet=quiet, top=top, num_workers=workers, resume=resume, html=html)
    flagged = bool(df["memorized"].fillna(False).any())
    raise typer.Exit(EXIT_FLAGGED if flagged else EXIT_OK)


def _expand(paths: list[Path]) -> list[Path]:
    """Expand quoted glob patterns (``--memorized 'dir/mem_*.png'``): a repeatable option cannot take the many
    arguments an unquoted shell glob expands to, and Windows shells do not expand globs at all."""
    import glob

    out: list[Path] = []
    for p in paths:
        if not p.exists() and any(c in str(p) for c in "*?["):
            matches = sorted(glob.glob(str(p), recursive=True))
            if not matches:
                raise FileNotFoundError(f"no file matches {p}")
            out.extend(Path(m) for m in matches)
        else:
            out.append(p)
    return out


def _shorten(items: list[str], keep: int = 10) -> list[str]:
    """A shell glob can expand to thousands of files: the config records the first few and a count."""
    return items if len(items) <= keep else [*items[:keep], f"... and {len(items) - keep} more"]


@app.command()
@handle_errors
def calibrate(
    ctx: typer.Context,
    reference: List[Path] = typer.Argument(..., help="Images known to be novel (files, folders, quoted globs).",
                                           show_default=False),
    fpr: float = typer.Option(0.01, "--fpr", help="Largest fraction of the reference images the threshold may flag."),
    memorized: Optional[List[Path]] = typer.Option(None, "--memorized", help="Images known to be memorized (a file, "
                                                   "folder or quoted glob; repeatable): report the threshold's ROC "
                                                   "point."),
    output: Path = typer.Option(Path("memdetect.toml"), "--output", "-o", help="Config file to write."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing config file."),
    model: str = ModelOpt,
    model_path: Optional[Path] = ModelPathOpt,
    layer: Optional[str] = typer.Option(None, "--layer", help="NAME[:in][@CALL]; default: the model's paper layer."),
    timestep: Optional[int] = typer.Option(None, "--timestep", "-t", help="DDPM timestep to noise to (default: 50)."),
    sigma: Optional[float] = typer.Option(None, "--sigma", help="EDM only: noise level sigma."),
    metric: str = typer.Option("std", "--metric", help="The metric the config flags with (thresholds are written "
                                                       "for every metric)."),
    seed: int = typer.Option(0, "--seed", help="Noise seed."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Images per forward pass."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    workers: Optional[int] = typer.Option(None, "--workers", help="Image-decoding worker processes."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or table."),
):
    """Choose thresholds that flag at most --fpr of known-novel images and write them to memdetect.toml."""
    from .calibrate import allowed_flags, calibrate as calibrate_scores, config_document
    from .config import to_toml
    from .errors import InputError, UsageError
    from .io import _atomic_write, display_path

    if not 0.0 <= fpr < 1.0:
        raise UsageError(f"--fpr must be in [0, 1), got {fpr}")
    if output.exists() and not force:
        raise UsageError(f"{display_path(output)} exists; pass --force to overwrite it")
    reference, memorized = _expand(reference), _expand(memorized or [])
    det = load_detector(model, model_path, layer=layer, timestep=timestep, metric=metric, seed=seed,
                        batch_size=batch_size, device=device, dtype=dtype, sigma=sigma)
    ref = run_scan(det, reference, output=None, quiet=quiet, top=0, num_workers=workers, render=False)
    novel = ref[ref["error"].isna()]
    if not len(novel):
        raise InputError("none of the reference images could be scored (see the errors above)")
    mem = None
    if memorized:
        scored = run_scan(det, memorized, output=None, quiet=quiet, top=0, num_workers=workers, render=False)
        mem = scored[scored["error"].isna()]
    table = calibrate_scores(novel, fpr, mem)
    doc = config_document(vars(det.settings), table, metric=metric, fpr=fpr,
                          reference=_shorten([display_path(p) for p in reference]),
                          memorized=_shorten([display_path(p) for p in memorized]) if memorized else None,
                          n_errored=int(ref["error"].notna().sum()), model=model,
                          model_path=str(model_path.resolve()) if model_path else None, sigma=sigma)
    header = (f"memdetect calibration ({len(novel)} novel reference images, target FPR {fpr:g}).\n"
              f"Use: memdetect audit PATH... --config {output.name}   (or: memdetect scan PATH... --config ...)")
    _atomic_write(output, lambda tmp: Path(tmp).write_text(to_toml(doc, header), encoding="utf-8"))

    t = Table(title=f"thresholds at FPR <= {fpr:g} on {len(novel)} reference images ({det.name}, {det.layer}, "
                    f"t={det.timestep})", title_justify="left")
    cols = ["metric", "threshold", "reference flagged"] + (["TPR", "AUROC"] if mem is not None else [])
    for c in cols:
        t.add_column(c, justify="left" if c == "metric" else "right")
    for _, r in table.iterrows():
        name = f"[bold]{r['metric']}[/] (config)" if r["metric"] == metric else r["metric"]
        cells = [name, f"{r['threshold']:.6g}", f"{r['flagged_reference']}/{r['n_reference']} "
                                               f"({r['fpr_reference']:.3g})"]
        if mem is not None:
            cells += [f"{r['tpr']:.3f}", f"{r['auroc']:.3f}" + (" (inverted)" if r["auroc"] < 0.5 else "")]
        t.add_row(*cells)
    out.print(t)
    if allowed_flags(len(novel), fpr) == 0:
        out.print(f"note: {fpr:g} x {len(novel)} reference images < 1, so no reference image may be flagged: each "
                  f"threshold sits just above the largest reference score. More reference images give a threshold "
                  f"that really has FPR {fpr:g}.", highlight=False)
    if mem is not None:
        row = table.set_index("metric").loc[metric]
        out.print(f"ROC point of {metric} >= {row['threshold']:.6g}: FPR {row['roc_fpr']:.3g}, TPR {row['tpr']:.3g} "
                  f"({len(mem)} memorized, {len(novel)} novel); AUROC {row['auroc']:.3f}", highlight=False)
    out.print(f"wrote {escape(display_path(output))}", highlight=False)


@app.command()
@handle_errors
def audit(
    ctx: typer.Context,
    paths: List[Path] = typer.Argument(..., help="Image files and/or folders (searched recursively).",
                                       show_default=False),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="memdetect.toml from `memdetect calibrate` "
                                          "(default: ./memdetect.toml if it exists)."),
    output: Path = typer.Option(Path(".memdetect/report.csv"), "--output", "-o", help="Report file (.csv, .json, "
                                "or .parquet); its journal makes a rerun continue."),
    junit: Optional[Path] = typer.Option(None, "--junit", help="Write JUnit XML: one test case per image, a failure "
                                         "per flagged image, unreadable files skipped."),
    summary_json: Optional[Path] = typer.Option(None, "--summary-json", help="Write a JSON summary: counts, exit "
                                                "code, flagged images, errors, settings."),
    html: Optional[Path] = HtmlOpt,
    annotations: str = typer.Option("auto", "--annotations", help="GitHub workflow annotations on stdout: auto (when "
                                    "GITHUB_ACTIONS=true), github, none."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Flag images whose score is >= this "
                                              "(overrides the config's)."),
    metric: str = typer.Option("std", "--metric", help="Score column: std, l4l2, entropy, maxmin."),
    model: str = ModelOpt,
    model_path: Optional[Path] = ModelPathOpt,
    layer: Optional[str] = typer.Option(None, "--layer", help="NAME[:in][@CALL] (without a config)."),
    timestep: Optional[int] = typer.Option(None, "--timestep", "-t", help="DDPM timestep (without a config)."),
    sigma: Optional[float] = typer.Option(None, "--sigma", help="EDM only: noise level sigma (without a config)."),
    seed: int = typer.Option(0, "--seed", help="Noise seed (without a config)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Images per forward pass."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    workers: Optional[int] = typer.Option(None, "--workers", help="Image-decoding worker processes."),
    resume: bool = ResumeOpt,
    top: int = typer.Option(50, "--top", help="Flagged images listed in the summary (0: none)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary (files are still written)."),
):
    """CI entry point: scan with a calibrated threshold, write the report and CI outputs, exit 0 / 1 / 2."""
    from . import ci
    from .errors import UsageError

    if annotations not in ("auto", "github", "none"):
        raise UsageError(f"--annotations must be auto, github or none, got {annotations!r}")
    if config is None and Path("memdetect.toml").is_file():
        config = Path("memdetect.toml")
    s = scan_settings(ctx, config, model=model, model_path=model_path, layer=layer, timestep=timestep, sigma=sigma,
                      metric=metric, threshold=threshold, seed=seed)
    if s["threshold"] is None:
        raise UsageError("audit needs a threshold: --config memdetect.toml (write one with `memdetect calibrate`) "
                         "or --threshold X")
    det = load_detector(s["model"], s["model_path"], layer=s["layer"], timestep=s["timestep"], metric=s["metric"],
                        threshold=s["threshold"], seed=s["seed"], batch_size=batch_size, device=device, dtype=dtype,
                        sigma=s["sigma"])
    if output == Path(".memdetect/report.csv") and not Path(".memdetect/.gitignore").exists():
        Path(".memdetect").mkdir(exist_ok=True)
        Path(".memdetect/.gitignore").write_text("# written by memdetect audit: keep its reports out of git\n*\n")
    df = run_scan(det, paths, output=output, quiet=quiet, top=0, num_workers=workers, resume=resume, html=html,
                  render=False)
    code = EXIT_FLAGGED if bool(df["memorized"].fillna(False).any()) else EXIT_OK
    settings = vars(det.settings)
    doc = ci.summary(df, exit_code=code, settings=settings, config=str(config) if config else None,
                     report=str(output), resumed=df.attrs.get("resumed", 0))
    if summary_json is not None:
        ci.write_json(doc, summary_json)
    if junit is not None:
        ci.write_junit(df, junit, settings)
    if annotations == "github" or (annotations == "auto" and ci.running_on_github()):
        sys.stdout.write("".join(line + "\n" for line in ci.github_annotations(df, settings)))
        sys.stdout.flush()
        if os.environ.get("GITHUB_STEP_SUMMARY"):
            with open(os.environ["GITHUB_STEP_SUMMARY"], "a", encoding="utf-8") as f:
                f.write(ci.step_summary_markdown(doc))
    if not quiet:
        render_audit(doc, top=top)
    raise typer.Exit(code)


def render_audit(doc: dict, *, top: int) -> None:
    """The audit's short summary: counts, then the flagged images by name (paths printed verbatim, never wrapped)."""
    say = functools.partial(out.print, markup=False, highlight=False, soft_wrap=True)
    cfg = f", config {doc['config']}" if doc["config"] else ""
    say(f"memdetect audit: {doc['images']} images: {doc['scored']} scored, {doc['errored']} errored, "
        f"{doc['flagged']} flagged memorized ({doc['metric']} >= {doc['threshold']:.6g}{cfg})")
    for f in doc["flagged_images"][:top]:
        say(f"  flagged: {f['path']}  ({doc['metric']} {f['score']:.4g})")
    if len(doc["flagged_images"]) > top:
        say(f"  ... and {len(doc['flagged_images']) - top} more flagged (see the report)")
    for e in doc["errors"][:5]:
        err.print(f"  not scored: {e['path']}: {e['error']}", markup=False, highlight=False, soft_wrap=True)
    if len(doc["errors"]) > 5:
        err.print(f"  ... and {len(doc['errors']) - 5} more not scored (see the report's error column)", markup=False)
    resumed = f" ({doc['resumed']} rows reused from its journal)" if doc["resumed"] else ""
    say(f"report: {doc['report']}{resumed}")


@app.command()
@handle_errors
def models():
    """List the model presets: family, weights, default layer and timestep."""
    from .models import ADAPTERS, PRESETS

    t = Table(title="presets (use with --model; --model-path overrides the weights)", title_justify="left")
    for c in ("preset", "family", "weights", "layer", "t", "note"):
        t.add_column(c, overflow="fold")
    for p in PRESETS.values():
        layer = p.layer or ("middle block: " + p.options.get("reading", "") if p.family == "dit"
                            else "up_blocks.0.resnets.<last>.conv2:in")
        t.add_row(p.name, p.family, p.source, layer, str(p.timestep), p.note)
    out.print(t)
    out.print(f"families (with --model-path DIR): {', '.join(sorted(ADAPTERS))}")


@app.command()
@handle_errors
def layers(
    model: str = ModelOpt,
    model_path: Optional[Path] = ModelPathOpt,
    contains: Optional[str] = typer.Option(None, "--filter", help="Only names containing this text."),
    inputs: bool = typer.Option(False, "--inputs", help="Also list module inputs (NAME:in)."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
):
    """List hookable layers with their output shape on a probe input and how often each fires per forward."""
    import torch

    from .capture import probe_layers

    det = load_detector(model, model_path, device=device, dtype=dtype)
    a = det.adapter
    x0 = torch.randn(1, *a.latent_shape(), generator=torch.Generator().manual_seed(0)).to(a.device, a.dtype)
    x_t = a.noise(x0, det.timestep, [0])
    with torch.inference_mode(), err.status("probing one forward pass ..."):
        infos = probe_layers(a.denoiser, lambda: a.forward(x_t, det.timestep), include_inputs=inputs)
    t = Table(title=f"{det.name}: hookable layers in forward order (batch 1; default: {det.layer})",
              title_justify="left")
    for c in ("layer", "module", "shape", "calls/forward"):
        t.add_column(c, overflow="fold")
    default = str(det.layer)
    for info in infos:
        if contains and contains not in info.spec:
            continue
        mark = "[bold green] <- default[/]" if info.spec == default else ""
        t.add_row(info.spec + mark, info.module_type, "x".join(map(str, info.shape)) or "-", str(info.calls))
    out.print(t)


bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks with ground-truth labels (AUROC, TPR@1%FPR, cost).")
app.add_typer(bench_app, name="bench")


def render_results(results, title: str) -> None:
    t = Table(title=title, title_justify="left")
    for c in ("method", "AUROC", "TPR@1%FPR", "s/sample", "memorized", "generalized"):
        t.add_column(c, justify="left" if c == "method" else "right")
    for _, r in results.iterrows():
        t.add_row(r["method"], f"{r['auroc']:.3f}", f"{r['tpr_at_1pct_fpr']:.3f}", f"{r['seconds_per_sample']:.4f}",
                  str(r["n_memorized"]), str(r["n_generalized"]))
    out.print(t)


@bench_app.command("demo")
@handle_errors
def bench_demo(
    output: Path = typer.Option(Path("bench-demo"), "--output", "-o", help="Folder for results.csv, scores.csv, "
                                                                          "roc.png (and sweep.*)."),
    sweep_layers: bool = typer.Option(False, "--sweep-layers", help="Also: std AUROC at every layer and a few "
                                                                    "timesteps (selection / held-out halves)."),
    device: str = DeviceOpt,
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b"),
    flipd_probes: int = typer.Option(1, "--flipd-probes", help="Hutchinson probes for the FLIPD baseline."),
    model_path: Optional[Path] = typer.Option(None, "--model-path", help="Another copy of the demo model."),
    limit: Optional[int] = typer.Option(None, "--limit", min=4, help="Score a stratified, seeded subset of this "
                                                                    "many labelled samples (quick check)."),
    sweep_timesteps: str = typer.Option("10,25,50,100,200,400", "--sweep-timesteps",
                                        help="Comma-separated timesteps for --sweep-layers."),
):
    """Ground truth: score the shipped demo model's labelled generations with every method."""
    from .bench.demo import run_demo
    from .errors import UsageError

    try:
        steps = tuple(int(v) for v in sweep_timesteps.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"--sweep-timesteps takes comma-separated integers, got {sweep_timesteps!r}") from None

    with err.status("benchmarking on the demo model's labelled generations ..."):
        res = run_demo(output, device=device, batch_size=batch_size, flipd_probes=flipd_probes, sweep=sweep_layers,
                       model_path=str(model_path) if model_path else None, limit=limit, sweep_timesteps=steps)
    st = res["settings"]
    render_results(res["results"], f"bench demo: {st.layer}, t={st.timestep}, device {st.device}, "
                                   f"batch {res['batch_size']}")
    if "sweep" in res:
        sw = res["sweep"]
        best = sw.sort_values("auroc_select", ascending=False).iloc[0]
        default = sw[(sw["layer"] == st.layer) & (sw["timestep"] == st.timestep)]
        out.print(f"sweep: {sw['layer'].nunique()} layers x {sw['timestep'].nunique()} timesteps; "
                  f"{int(sw['inverted'].sum())} (layer, t) pairs inverted (AUROC < 0.5)")
        out.print(f"best on the selection half: {best['layer']} at t={best['timestep']}: AUROC "
                  f"{best['auroc_select']:.3f} (selection), {best['auroc_heldout']:.3f} (held-out)")
        if len(default):
            d = default.iloc[0]
            out.print(f"default layer {st.layer} at t={st.timestep}: AUROC {d['auroc_select']:.3f} (selection), "
                      f"{d['auroc_heldout']:.3f} (held-out)")
    out.print(f"wrote {output}/results.csv, scores.csv, roc.png" + (", sweep.csv, sweep.png" if sweep_layers else ""))


def _bench_progress(what: str):
    """A progress bar on stderr and the (done, total) callback the paper benchmarks report to."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err,
                   transient=True)
    task = bar.add_task(what, total=None)
    return bar, lambda done, total: bar.update(task, completed=done, total=total)


def _render_paper(res: dict, title: str, output: Path, extra: str) -> None:
    if "results" not in res:  # a non-main process under accelerate: the main one writes the tables
        return
    render_results(res["results"], title)
    st = res["settings"]
    out.print(f"generated {res['generated']}, reused {res['skipped']} from earlier runs; {st['sampler']}, "
              f"{st['steps']} steps; FLIPD {st['flipd_probes']} probe(s) at t={st['flipd_timestep']}{extra}",
              highlight=False)
    out.print("seconds/sample: scoring time per generated image on one device, generation excluded except for "
              "wen_all_steps (see the timing column)", highlight=False)
    out.print(f"wrote {output}/results.csv, scores.csv, roc.png, settings.json", highlight=False)


FlipdProbesOpt = typer.Option(1, "--flipd-probes", min=1, help="Hutchinson probes for Ross et al.'s FLIPD.")
GenerationSeedOpt = typer.Option(0, "--seed", help="Generation seed.")


@bench_app.command("laion")
@handle_errors
def bench_laion(
    model: str = typer.Option("sd14", "--model", "-m", help="A Stable Diffusion preset, family or folder."),
    model_path: Optional[Path] = ModelPathOpt,
    memorized: Optional[Path] = typer.Option(None, "--memorized", help="Memorized prompts (jsonl, json, csv or txt) "
                                             "(default: Wen et al.'s sdv1_500_memorized.jsonl, downloaded once)."),
    normal: Optional[Path] = typer.Option(None, "--normal", help="Normal prompts (default: NeMo's "
                                          "unmemorized_laion_prompts.csv, downloaded once)."),
    memorized_filter: Optional[List[str]] = typer.Option(None, "--memorized-filter", help="Keep memorized prompts "
                                                         "matching COLUMN=VALUE[,VALUE] or COLUMN>=NUMBER, e.g. "
                                                         "type=VM (repeatable; the default list then is NeMo's copy "
                                                         "of the same 500, with type and SSCD columns)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="The first N prompts of each list."),
    generations: int = typer.Option(4, "--generations", "-k", min=2, help="Generations per prompt."),
    steps: int = typer.Option(50, "--steps", min=1, help="DDIM steps."),
    guidance: float = typer.Option(7.5, "--guidance", help="Classifier-free guidance scale."),
    nemo_reference: Optional[Path] = typer.Option(None, "--nemo-reference", help="Prompts for NeMo's activation "
                                                  "statistics (default: the normal prompts, leave-one-out)."),
    flipd_probes: int = FlipdProbesOpt,
    output: Path = typer.Option(Path("bench-laion"), "--output", "-o", help="Results folder (a rerun resumes it)."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    seed: int = GenerationSeedOpt,
):
    """Paper Table 1, LAION: memorized vs normal prompts on Stable Diffusion, ours against Wen, NeMo, Ross, Carlini."""
    from .bench.paper import run_laion

    bar, progress = _bench_progress("generating and scoring prompts")
    with bar:
        res = run_laion(output, model=model, model_path=str(model_path) if model_path else None, memorized=memorized,
                        normal=normal, memorized_filters=memorized_filter or (), limit=limit, generations=generations,
                        steps=steps, guidance=guidance, device=device, dtype=dtype, seed=seed,
                        flipd_probes=flipd_probes, nemo_reference=nemo_reference, progress=progress)
    extra = f"; NeMo statistics from {res['settings']['nemo_reference']}"
    _render_paper(res, f"bench laion: {model}, {generations} generations per prompt (prompt score = mean)", output,
                  extra)


def _parse_classes(text: Optional[str]) -> Optional[list[int]]:
    from .errors import UsageError

    if text is None:
        return None
    classes: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        lo, sep, hi = part.partition("-")
        if not (lo.isdigit() and (not sep or hi.isdigit())):
            raise UsageError(f"--classes takes comma-separated class indices or ranges (0-9), got {text!r}")
        classes.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    return classes


def _bench_samples(bench: str, *, train_dir: Path, model_path: Optional[Path], output: Path, memorized_at: float,
                   generalized_below: float, **kwargs) -> None:
    from .bench.labels import LabelRule
    from .bench.paper import run_samples

    rule = LabelRule(memorized_at=memorized_at, generalized_below=generalized_below)
    bar, progress = _bench_progress("generating and scoring samples")
    with bar:
        res = run_samples(bench, output, train_dir=train_dir, model_path=str(model_path) if model_path else None,
                          rule=rule, progress=progress, **kwargs)
    lab = res["settings"]["labels"]
    _render_paper(res, f"bench {bench}: {kwargs['model']}, {kwargs['num_samples']} samples", output,
                  f"; labels: pixel correlation at {lab['resolution']} px, memorized >= {lab['memorized_at']}, "
                  f"generalized < {lab['generalized_below']}")


TrainDirOpt = typer.Option(..., "--train-dir", help="The model's training images (a folder, searched recursively), "
                                                   "for nearest-neighbour labels.")
NumSamplesOpt = typer.Option(1000, "--num-samples", "-n", min=2, help="Samples to generate.")
MemorizedAtOpt = typer.Option(0.95, "--memorized-at", help="Memorized at nearest-neighbour pixel correlation >= this.")
GeneralizedBelowOpt = typer.Option(0.80, "--generalized-below", help="Generalized below this (between: excluded).")
LabelResolutionOpt = typer.Option(None, "--label-resolution", min=4, help="Resolution of the nearest-neighbour "
                                                                          "comparison (default: min(model, 64)).")
StepsOpt = typer.Option(None, "--steps", min=1, help="Sampling steps (default: DiT 50 DDIM, pixel DDPM 1000 "
                                                     "ancestral, EDM 18 Heun).")
GenerationBatchOpt = typer.Option(None, "--batch-size", "-b", min=1, help="Samples per generation and scoring "
                                                                          "batch (default: the model's batch size).")


@bench_app.command("imagenet")
@handle_errors
def bench_imagenet(
    train_dir: Path = TrainDirOpt,
    model: str = typer.Option("dit", "--model", "-m", help="A DiT preset, family or folder."),
    model_path: Optional[Path] = ModelPathOpt,
    num_samples: int = NumSamplesOpt,
    classes: Optional[str] = typer.Option(None, "--classes", help="Classes to generate, cycled (e.g. 0-9,207) "
                                                                  "(default: all)."),
    guidance: float = typer.Option(4.0, "--guidance", help="Classifier-free guidance scale (DiTPipeline's default)."),
    steps: Optional[int] = StepsOpt,
    batch_size: Optional[int] = GenerationBatchOpt,
    memorized_at: float = MemorizedAtOpt,
    generalized_below: float = GeneralizedBelowOpt,
    label_resolution: Optional[int] = LabelResolutionOpt,
    flipd_probes: int = FlipdProbesOpt,
    output: Path = typer.Option(Path("bench-imagenet"), "--output", "-o", help="Results folder (a rerun resumes it)."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    seed: int = GenerationSeedOpt,
):
    """Paper Table 1, ImageNet: DiT samples labelled by their nearest training image; ours against the baselines."""
    _bench_samples("imagenet", train_dir=train_dir, model_path=model_path, output=output, memorized_at=memorized_at,
                   generalized_below=generalized_below, model=model, num_samples=num_samples,
                   classes=_parse_classes(classes), guidance=guidance, steps=steps, batch_size=batch_size,
                   label_resolution=label_resolution, flipd_probes=flipd_probes, device=device, dtype=dtype,
                   seed=seed)


@bench_app.command("cifar10")
@handle_errors
def bench_cifar10(
    train_dir: Path = TrainDirOpt,
    model: str = typer.Option("edm-cifar10", "--model", "-m", help="edm-cifar10, ddpm-cifar10, or an edm / ddpm "
                                                                   "family with --model-path."),
    model_path: Optional[Path] = ModelPathOpt,
    num_samples: int = NumSamplesOpt,
    steps: Optional[int] = StepsOpt,
    batch_size: Optional[int] = GenerationBatchOpt,
    memorized_at: float = MemorizedAtOpt,
    generalized_below: float = GeneralizedBelowOpt,
    label_resolution: Optional[int] = LabelResolutionOpt,
    flipd_probes: int = FlipdProbesOpt,
    output: Path = typer.Option(Path("bench-cifar10"), "--output", "-o", help="Results folder (a rerun resumes it)."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    seed: int = GenerationSeedOpt,
):
    """Paper Table 1, CIFAR-10: unconditional samples labelled by their nearest training image."""
    _bench_samples("cifar10", train_dir=train_dir, model_path=model_path, output=output, memorized_at=memorized_at,
                   generalized_below=generalized_below, model=model, num_samples=num_samples, steps=steps,
                   batch_size=batch_size, label_resolution=label_resolution, flipd_probes=flipd_probes,
                   device=device, dtype=dtype, seed=seed)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the exit code."""
    try:
        app(args=argv, prog_name="memdetect", standalone_mode=True)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
