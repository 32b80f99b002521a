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
    err.print(f"[bold red]memdetect: error:[/] {message}", highlight=False, soft_wrap=True)
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
        except (MemdetectError, FileNotFoundError, NotADirectoryError) as e:
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


def run_scan(det, paths: list[Path], *, output: Optional[Path], quiet: bool, top: int, num_workers=None):
    """Scan with a progress bar, write the report, print the table and summary; return the frame."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .detector import rows_to_frame
    from .io import check_report_path, discover, write_report

    if output is not None:
        check_report_path(output)
    files = discover(paths)
    if not files:
        raise MemdetectError(f"no image files found under {', '.join(str(p) for p in paths)}")
    rows: list[dict] = []
    with Progress(TextColumn("scanning"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=err, disable=quiet, transient=True) as progress:
        task = progress.add_task("scan", total=len(files))
        for batch in det.iter_files(files, num_workers=num_workers,
                                    on_batch=lambda n: progress.advance(task, n)):
            rows.extend(batch)
    df = rows_to_frame(rows)
    settings = vars(det.settings)
    if output is not None:
        write_report(df.assign(**{k: settings[k] for k in ("model", "layer", "timestep", "seed", "metric")}),
                     output, settings=settings)
    if not quiet:
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
            cells = [r["path"], *(f"{r[c]:.4g}" for c in ("score", "std", "l4l2", "entropy", "maxmin"))]
            if det.threshold is not None:
                cells.append("[bold red]yes[/]" if r["memorized"] else "no")
            t.add_row(*cells)
        out.print(t)
    errors = df[df["error"].notna()]
    for _, r in errors.head(5).iterrows():
        err.print(f"[yellow]skipped[/] {r['path']}: {r['error']}", highlight=False, soft_wrap=True)
    if len(errors) > 5:
        err.print(f"[yellow]... and {len(errors) - 5} more errors (see the report's error column)[/]")
    thr = f" at {det.metric} >= {det.threshold:g}" if det.threshold is not None else " (no threshold: nothing flagged)"
    dest = f"; report: {output}" if output else ""
    out.print(f"{s['images']} images: {s['scored']} scored, {s['errored']} errored, "
              f"{s['flagged']} flagged memorized{thr}{dest}", highlight=False)


@app.command()
@handle_errors
def scan(
    paths: List[Path] = typer.Argument(..., help="Image files and/or folders (searched recursively).",
                                       show_default=False),
    model: str = ModelOpt,
    model_path: Optional[Path] = ModelPathOpt,
    layer: Optional[str] = typer.Option(None, "--layer", help="NAME[:in][@CALL]; default: the model's paper layer."),
    timestep: Optional[int] = typer.Option(None, "--timestep", "-t", help="DDPM timestep to noise to [default: 50]."),
    sigma: Optional[float] = typer.Option(None, "--sigma", help="EDM only: noise level sigma, instead of the "
                                                                 "--timestep's (t=50 is sigma 0.176)."),
    metric: str = typer.Option("std", "--metric", help="Score column: std, l4l2, entropy, maxmin."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Flag images whose score is >= this."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Images per forward pass "
                                                                               "[default: per model and device]."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    seed: int = typer.Option(0, "--seed", help="Noise seed (an image's noise depends on this and its pixels)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Report file: .csv, .json or .parquet."),
    top: int = typer.Option(10, "--top", help="Rows in the terminal table of highest scores (0: none)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Image-decoding worker processes."),
    no_early_exit: bool = typer.Option(False, "--no-early-exit", help="Run the full forward pass (for checking)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar, table or summary."),
):
    """Score every image for memorization and write a report."""
    det = load_detector(model, model_path, layer=layer, timestep=timestep, metric=metric, threshold=threshold,
                        seed=seed, batch_size=batch_size, device=device, dtype=dtype, early_exit=not no_early_exit,
                        sigma=sigma)
    df = run_scan(det, paths, output=output, quiet=quiet, top=top, num_workers=workers)
    flagged = bool(df["memorized"].fillna(False).any())
    raise typer.Exit(EXIT_FLAGGED if flagged else EXIT_OK)


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


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the exit code."""
    try:
        app(args=argv, prog_name="memdetect", standalone_mode=True)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
