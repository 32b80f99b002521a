"""What several commands do around their one library call: load the detector or pipeline (a status line while it
loads), the progress bar the library reports to, and the run's context for the HTML report."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text

from .exits import check_signals
from .render import _p, err


def _run_context(paths, config) -> dict:
    """The HTML report's run context (``memdetect.workflows.run_context``): command line, time, config and its hash, commit."""
    from ..workflows.run_context import run_context

    return run_context([p for p in paths if isinstance(p, Path)], config=config)


def speed_settings(device: str) -> None:
    """The process-wide setting a command-line scan opts into: freed memory kept for reuse on a CPU."""
    from ..speed import runtime
    from ..detector import resolve_device

    if resolve_device(device).type == "cpu":
        runtime.retain_freed_memory()


def load_detector(model, model_path, *, metric="std", batch_size=None, device="auto", dtype="auto",
                  num_workers=None, **kwargs):
    from ..detector import Detector, check_options, resolve_device, resolve_dtype

    # a typo or an out-of-range number in a flag must not cost a model load
    check_options(metric=metric, batch_size=batch_size, num_workers=num_workers,
                  **{k: kwargs[k] for k in ("threshold", "seed", "timestep", "sigma", "draws") if k in kwargs})
    resolve_dtype(dtype, resolve_device(device))
    speed_settings(device)
    with err.status(Text(f"loading {_p(model)}{' from ' + _p(model_path) if model_path else ''} ...")):
        return Detector.from_pretrained(model, str(model_path) if model_path else None, metric=metric,
                                        batch_size=batch_size, device=device, dtype=dtype, **kwargs)


def progress_bar(what: str, *, quiet: bool = False, unit: str = "images", counted: bool = True):
    """Progress on stderr and the (done, total) callback the library reports to: a rich bar with its total in a
    terminal, plain lines every few seconds in a log (``memdetect.progress``); ``quiet``: nothing."""
    from ..progress import Progress

    progress = Progress(what, console=err, unit=unit, quiet=quiet, on_update=check_signals, counted=counted)
    return progress, progress


def _load_pipeline(model, model_path, device, dtype):
    from ..workflows.guarding import load_guardable

    with err.status(Text(f"loading {_p(model)} ...")):
        return load_guardable(model, str(model_path) if model_path else None, device=device, dtype=dtype)
