"""The ``memdetect`` command line: options in, one library call, rendering out.

Each command parses its options, calls the library (``memdetect.scan``, ``memdetect.calibrate``, ``memdetect.ci``,
``Detector.layers``, ``memdetect.bench``) and renders what it returns. Options that several commands share are
declared once, as ``Annotated`` aliases.

Exit codes (every command):
  0    the scan finished and nothing was flagged
  1    at least one image was flagged memorized (only possible with a threshold); for ``audit``, also when an input
       could not be checked (an error row), unless ``--allow-errors``
  2    an error stopped the command: one line on stderr. A usage, config, model, input or system error says what to
       fix; anything else is reported as an internal error (a bug in memdetect). MEMDETECT_DEBUG=1 adds the
       traceback. SIGTERM also ends a command with 2 (after stopping its decoding workers; the journal keeps
       every batch scored so far).
  130  interrupted by SIGINT (Ctrl-C), after the same clean-up (after the report was written, the line says so).
`audit --allow-empty` exits 0 when the paths hold no image file. User errors are one line; only internal errors add
the MEMDETECT_DEBUG hint. An OSError writing an output names the option and the fix (``memdetect.ux.output_error``).

Everything printed is plain text: the consoles parse no rich markup and no emoji codes, and every name taken from a
file, a flag or a config (paths, model names, layer names, error messages) goes through ``memdetect.text.printable``
(control characters escaped), so a file name can neither style the output nor add a line of its own. Styled parts
are ``rich.text.Text``; log lines are escaped by the log formatter.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Annotated, List, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ._version import __version__
from .errors import MemdetectError, UsageError
from .scores import SCORES
from .text import printable
from .progress import plural
from .ux import require_model

EXIT_OK, EXIT_FLAGGED, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130

app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Detect memorized images from diffusion models (one partial forward pass per image).\n\n"
                       "Exit codes: 0 nothing flagged, 1 something flagged (needs a threshold; audit: or an input "
                       "not checked), 2 error.")
# no markup, no emoji codes, no highlighting: what is printed is the text given (names escaped with ``_p``)
err = Console(stderr=True, markup=False, emoji=False, highlight=False)
out = Console(markup=False, emoji=False, highlight=False)


def _p(value) -> str:
    """A name from a file, a flag or a config as plain one-line text (``memdetect.text.printable``)."""
    return printable(str(value))


# -- errors --------------------------------------------------------------------------------------------------------

def _debug() -> bool:
    return bool(os.environ.get("MEMDETECT_DEBUG"))


def _fail(kind: str, message: str, hint: str, code: int = EXIT_ERROR) -> None:
    """One line on stderr (the traceback too with MEMDETECT_DEBUG=1), then exit ``code`` (2)."""
    if _debug():
        err.print(traceback.format_exc())
    # the message is plain text: a "[/x]" in a name is not markup, a newline or ESC in one is escaped
    err.print(Text.assemble((f"memdetect: {kind}:", "bold red"), " ", printable(message)), soft_wrap=True)
    if not _debug() and hint is not None:
        err.print(Text(f"({hint}set MEMDETECT_DEBUG=1 for the full traceback)", style="dim"))
    raise typer.Exit(code)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread. A ``BaseException`` (like Ctrl-C's KeyboardInterrupt), so no library
    ``except Exception`` swallows it: it unwinds the scan, which stops its decoding workers and closes its
    journal on the way out."""


#: Signals received while a command runs. Python raises a signal handler's exception wherever the main thread
#: happens to be, and one raised inside a finalizer (``__del__``, a weakref callback) is printed and ignored; the
#: record lets the next batch boundary raise it again, so a Ctrl-C or SIGTERM is never lost.
_SIGNALS: list[int] = []


def _raise_for(signum: int) -> None:
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def check_signals() -> None:
    """Raise for a signal received earlier whose exception was swallowed (see ``_SIGNALS``)."""
    if _SIGNALS:
        _raise_for(_SIGNALS[0])


@contextlib.contextmanager
def _terminate_cleanly():
    """While a command runs: SIGTERM raises ``Terminated`` and SIGINT ``KeyboardInterrupt``, once each (a repeat
    during the clean-up is ignored; SIGKILL still works), and both are recorded so that ``check_signals`` raises
    again at the next batch if the first exception was swallowed. Without this a SIGTERM kills the process on the
    spot, and its DataLoader workers, blocked writing to a pipe nobody reads, outlive it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum, frame):
        signal.signal(signum, signal.SIG_IGN)
        _SIGNALS.append(signum)
        _raise_for(signum)

    def unraisable(info):
        # an interrupt raised inside a finalizer (filelock's weakref callback, a __del__) is recorded in _SIGNALS
        # and raised again at the next batch: not worth Python's 12-line "Exception ignored in ..." report
        if info.exc_type is not None and issubclass(info.exc_type, KeyboardInterrupt):
            return
        previous_hook(info)

    _SIGNALS.clear()
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    previous_hook, sys.unraisablehook = sys.unraisablehook, unraisable
    try:
        yield
        check_signals()  # a signal whose exception was swallowed after the last batch still ends the command
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        sys.unraisablehook = previous_hook
        _SIGNALS.clear()


#: The running command's outputs by option (``{"--output": path}``), so that an error writing one names the option
#: and the fix (``memdetect.ux.output_error``), and the files it has finished writing (an interrupt after the report
#: was written says so).
_OUTPUTS: dict[str, object] = {}
_WRITTEN: list[str] = []


def _outputs(**by_option) -> None:
    """Record the command's outputs: ``_outputs(output=path, html=path)`` for --output, --html, ..."""
    _OUTPUTS.update({f"--{k.replace('_', '-')}": v for k, v in by_option.items() if v is not None})


def _written(*paths) -> None:
    _WRITTEN.extend(_p(p) for p in paths if p is not None)


def handle_errors(fn):
    """Map exceptions to one line on stderr and exit code 2 (the CLI_ERROR_MAPPINGS idea).

    Known errors: memdetect's own (``memdetect.errors``: usage, config, model, input) and the operating system's
    (a missing path, an unwritable folder, a full disk). Anything else is a bug, reported as an internal error and
    never as the user's mistake; it still exits 2, never 1 (which means "flagged"). SIGTERM is exit 2 and Ctrl-C
    exit 130, once the scan has stopped its workers.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _OUTPUTS.clear()
        _WRITTEN.clear()
        try:
            with _terminate_cleanly():
                return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except Terminated:
            if _WRITTEN:
                _interrupted("error", f"terminated (SIGTERM) after the report was written ({', '.join(_WRITTEN)})",
                             EXIT_ERROR)
            _interrupted("error", "terminated (SIGTERM); batches already scored are kept in the journal (with "
                                  "--output): rerun the command to continue", EXIT_ERROR)
        except KeyboardInterrupt:
            if _WRITTEN:
                _interrupted("interrupted", f"stopped by Ctrl-C (SIGINT) after the report was written "
                                            f"({', '.join(_WRITTEN)}); only the summary was cut short",
                             EXIT_INTERRUPTED)
            _interrupted("interrupted", "stopped by Ctrl-C (SIGINT); batches already scored are kept in the journal "
                                        "(with --output): rerun the command to continue", EXIT_INTERRUPTED)
        except MemdetectError as e:
            _fail("error", str(e) or type(e).__name__, None)
        except OSError as e:
            from .ux import output_error

            _fail("error", output_error(e, _OUTPUTS) or str(e) or type(e).__name__, None)
        except Exception as e:
            _fail("internal error", f"{type(e).__name__}: {e}".rstrip(": "),
                  "a bug in memdetect, please report it; ")

    return wrapper


#: Set by ``main`` (the console script): this process is the command, and may end without interpreter teardown.
_CONSOLE = {"script": False}


def _interrupted(kind: str, message: str, code: int) -> None:
    """The interrupt's one line, then exit ``code``. The scan has already stopped its workers and closed its journal
    and nothing else is open, so the console script ends at once (``os._exit`` after flushing): tearing down torch
    and diffusers takes seconds, and whoever sent the signal is waiting (docker stop, CI runners: SIGKILL after a
    grace period). Called in-process (tests, ``CliRunner``) it raises ``typer.Exit`` as usual."""
    try:
        _fail(kind, message, None, code)
    except typer.Exit:
        if _CONSOLE["script"]:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            logging.shutdown()
            os._exit(code)
        raise


class _PrintableFormatter(logging.Formatter):
    """Log lines with the message escaped (``memdetect.text.printable``): a file name cannot forge a line."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message)
        return super().formatMessage(record)


def _version(value: bool):
    if value:
        out.print(f"memdetect {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the version.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log diagnostics to stderr.")] = False,
):
    handler = logging.StreamHandler()
    handler.setFormatter(_PrintableFormatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler])
    if not verbose:
        for name in ("diffusers", "transformers", "huggingface_hub"):
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            from diffusers.utils import logging as dlog

            dlog.set_verbosity_error()
            dlog.disable_progress_bar()
        except Exception:  # pragma: no cover
            pass


# -- options shared by several commands (declared once, as huggingface_hub's CLI does) ------------------------------

Paths = Annotated[List[Path], typer.Argument(help="Image files and/or folders (searched recursively).",
                                             show_default=False)]
Model = Annotated[Optional[str], typer.Option("--model", "-m", help="Required: a preset (see `memdetect models`), "
                                              "family (with --model-path), hub id or local diffusers folder (or a "
                                              "--config that names one).", show_default=False)]
ModelPath = Annotated[Optional[Path], typer.Option("--model-path", help="Local weights for the preset or family (a "
                                                                        "diffusers folder, or an EDM checkpoint).")]
# help texts are rich markup: "\\[" is a literal bracket ("[@CALL]" alone would be read as a tag and vanish)
Layer = Annotated[Optional[str], typer.Option("--layer", help="NAME[:in]\\[@CALL]; default: the model's paper "
                                                               "layer.")]
Timestep = Annotated[Optional[int], typer.Option("--timestep", "-t", help="DDPM timestep to noise to (default: 50).")]
Sigma = Annotated[Optional[float], typer.Option("--sigma", help="EDM, SD3, Flux: noise level sigma instead of the "
                                                                "--timestep's (EDM: t=50 is 0.176; flow models: s in "
                                                                "(0, 1), see `memdetect models`).")]
Metric = Annotated[str, typer.Option("--metric", help=f"Score column: {', '.join(SCORES)}.")]
Threshold = Annotated[Optional[float], typer.Option("--threshold", help="Flag images whose score is >= this.")]
Seed = Annotated[int, typer.Option("--seed", help="Noise seed (an image's noise depends on this and its pixels).")]
Draws = Annotated[int, typer.Option("--draws", help="Noise draws per image: the score is the mean over this many "
                                    "seeded draws (1 to 64; each costs one more denoiser pass per image).")]
BatchSize = Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Images per forward pass (default: per "
                                                                             "model and device).")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N (meta: shapes only, for `layers` "
                                                      "of sdxl/sd3/flux/pixart configs without weights).")]
Dtype = Annotated[str, typer.Option("--dtype", help="auto (float32 on CPU, bfloat16 on GPU), float32, float16, "
                                                    "bfloat16.")]
Workers = Annotated[Optional[int], typer.Option("--workers", help="Image-decoding worker processes.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar, table or summary (files are still "
                                                           "written).")]
Config = Annotated[Optional[Path], typer.Option("--config", "-c", help="memdetect.toml from `memdetect calibrate`: "
                                                "model, layer, timestep, seed, metric and threshold (flags may not "
                                                "contradict it; --threshold, --metric and --model-path may override).")]
Resume = Annotated[bool, typer.Option("--resume/--no-resume", help="Continue from the report's journal "
                                      "(<output>.journal.jsonl): images already scored with the same settings and "
                                      "weights are not scored again (only rows signed with this state directory's "
                                      "secret are trusted).")]
StateDirOption = Annotated[Optional[Path], typer.Option("--state-dir", envvar="MEMDETECT_STATE_DIR",
                           help="memdetect's private state: the journal secret, audit journals, weight hashes "
                                "(default: $XDG_CACHE_HOME/memdetect/state or ~/.cache/memdetect/state).")]
Inputs = Annotated[List[str], typer.Argument(help="Image files, folders (searched recursively), fsspec URLs (s3://, "
                                             "gs://, hf://, memory://, file://), .tar shards (one row per image "
                                             "member) and .csv / .parquet manifests (a path or url column).",
                                             show_default=False)]
AllowRemote = Annotated[bool, typer.Option("--allow-remote", help="Read inputs and manifest rows that are URLs other "
                        "than file:// (s3://, gs://, hf://, http://, ftp:// ...; off: such a manifest row is an error "
                        "row, such an input a usage error). Config key: allow_remote.")]
Html = Annotated[Optional[Path], typer.Option("--html", help="Also write a self-contained HTML report (histogram, "
                                                             "evidence for the top flagged images, a sortable table "
                                                             "of every image, settings).")]
Fpr = Annotated[Optional[float], typer.Option("--fpr", help="Instead of a threshold: flag at most this fraction of "
                                              "the config's reference images (needs --config).")]
EvidenceTop = Annotated[int, typer.Option("--evidence-top", min=0, help="Flagged images (highest score first) that "
                                          "get evidence in the HTML report and --evidence-json: top channels, "
                                          "activation map, place among the reference scores.")]
EvidenceJson = Annotated[Optional[Path], typer.Option("--evidence-json", help="Write the evidence of the top "
                                                      "flagged images as JSON.")]
ReferenceDir = Annotated[Optional[Path], typer.Option("--reference-dir", help="Copy search: a folder of images (e.g. "
                         "a sample of the training set); each image with evidence gets its nearest ones by the "
                         "model's features and by pixels.")]


ShardKeyFile = Annotated[Optional[Path], typer.Option("--shard-key-file", help="A shared secret (default: "
                         "$MEMDETECT_SHARD_KEY): `scan --shard` signs its report with it (HMAC-SHA256) and `merge` "
                         "refuses a shard whose MAC is missing or does not verify.")]


Prompts = Annotated[Optional[List[str]], typer.Option("--prompt", "-p", help="A prompt (text models; repeatable).")]
Classes = Annotated[Optional[str], typer.Option("--class", help="Class indices, comma-separated (class models).")]
PromptFile = Annotated[Optional[Path], typer.Option("--prompt-file", help="Prompts, one per line (or csv/json/jsonl).")]
GuardImages = Annotated[int, typer.Option("--num-images", "-n", min=1, help="Images per prompt or class (or in all, "
                                                                             "unconditional).")]
GuardSteps = Annotated[Optional[int], typer.Option("--steps", min=1, help="Sampling steps (default: the family's).")]
Guidance = Annotated[Optional[float], typer.Option("--guidance", help="Classifier-free guidance scale (SD 7.5, "
                                                                      "DiT 4).")]
StepT = Annotated[int, typer.Option("--step-t", min=0, help="Guard at the sampling step whose timestep is nearest "
                                                            "this.")]


def _given(ctx: typer.Context) -> set[str]:
    """The options typed on the command line (not defaults): a config fills in only the others.

    Compared by name: recent typer versions vendor their own click, with their own ``ParameterSource`` enum.
    """
    return {n for n in ctx.params
            if getattr(ctx.get_parameter_source(n), "name", None) in ("COMMANDLINE", "ENVIRONMENT")}


def scan_settings(ctx: typer.Context, config: Optional[Path], *, config_sha256: Optional[str] = None,
                  **flags) -> dict:
    """Model, layer, timestep, sigma, seed, draws, metric, threshold, model_path: flags merged with ``--config`` (read only
    when given; ``config_sha256``: its pinned SHA-256). The command line wins over the file."""
    from .config import check_sha256, load_config, merge

    if config_sha256 is not None:
        check_sha256(config_sha256)
        if not config:
            raise UsageError("--config-sha256 needs --config: it pins the config file's bytes")
    return merge(load_config(config, sha256=config_sha256) if config else None, flags, _given(ctx))


def _reference_stats(settings: dict) -> dict | None:
    """The config's reference channel statistics when it says ``normalise = "reference"`` (else None)."""
    return settings.get("channels") if settings.get("normalise") == "reference" else None


def _run_context(paths, config) -> dict:
    """The HTML report's run context (``memdetect.run_context``): command line, time, config and its hash, commit."""
    from .run_context import run_context

    return run_context([p for p in paths if isinstance(p, Path)], config=config)


def speed_settings(device: str) -> None:
    """The process-wide setting a command-line scan opts into: freed memory kept for reuse on a CPU."""
    from . import runtime
    from .detector import resolve_device

    if resolve_device(device).type == "cpu":
        runtime.retain_freed_memory()


def load_detector(model, model_path, *, metric="std", batch_size=None, device="auto", dtype="auto",
                  num_workers=None, **kwargs):
    from .detector import Detector, check_options, resolve_device, resolve_dtype

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
    from .progress import Progress

    progress = Progress(what, console=err, unit=unit, quiet=quiet, on_update=check_signals, counted=counted)
    return progress, progress


# -- scan ------------------------------------------------------------------------------------------------------------

@app.command()
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
    shard: Annotated[Optional[str], typer.Option("--shard", help="I/N: score only the I-th of N contiguous parts of "
                                                 "the inputs (Slurm arrays, indexed jobs); join the reports with "
                                                 "`memdetect merge`.")] = None,
    shard_key_file: ShardKeyFile = None,
    engine: Annotated[str, typer.Option("--engine", help="local (this process; under torchrun or accelerate launch, "
                                        "one part per rank) or ray (a Ray Data actor pool).")] = "local",
    ray_address: Annotated[Optional[str], typer.Option("--ray-address", help="--engine ray: the cluster to join "
                                                       "(default: RAY_ADDRESS, else a local Ray).")] = None,
    allow_remote: AllowRemote = False,
    quiet: Quiet = False,
):
    """Score every image for memorization and write a report.

    Example: memdetect scan examples/demo --model demo --output report.csv"""
    from .distributed import rank_device, scan_distributed, world
    from .io import check_destinations, check_report_path
    from .scan import scan as run_scan
    from .sources import is_url, parse_shard

    s = scan_settings(ctx, config, model=model, model_path=model_path, layer=layer, timestep=timestep, sigma=sigma,
                      metric=metric, threshold=threshold, seed=seed, fpr=fpr, allow_remote=allow_remote,
                      draws=draws)
    require_model(s["model"])
    if engine not in ("local", "ray"):
        raise UsageError(f"unknown engine {engine!r}; choose local or ray")
    part = parse_shard(shard) if shard is not None else None
    if shard_key_file is not None and part is None:
        raise UsageError("--shard-key-file signs a shard's report: it needs --shard I/N")
    from .merge import load_shard_key

    shard_key = load_shard_key(shard_key_file) if part is not None else None
    if ray_address is not None and engine != "ray":
        raise UsageError("--ray-address needs --engine ray")
    paths = [p if is_url(p) else Path(p) for p in paths]  # URLs stay strings (Path would fold their "//")
    _outputs(output=output, html=html, evidence_json=evidence_json)
    if output is not None:
        check_report_path(output)
        output = output if is_url(output) else Path(output)
    remote = output is not None and is_url(str(output))
    check_destinations({"report": None if remote else output, "HTML report": html,
                        "evidence JSON": evidence_json})  # before the model load, too
    from .state import StateDir

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
    det = load_detector(s["model"], s["model_path"], layer=s["layer"], timestep=s["timestep"], metric=s["metric"],
                        threshold=s["threshold"], seed=s["seed"], batch_size=batch_size, device=device, dtype=dtype,
                        early_exit=not no_early_exit, sigma=s["sigma"], num_workers=workers, draws=s["draws"],
                        normalise=_reference_stats(s))
    det.configuration = s.get("configuration")
    from .config import check_weights

    check_weights(det, s.get("weights"), StateDir(state_dir), config)
    bar, progress = progress_bar("scanning", quiet=quiet)
    with bar:
        if engine == "ray":
            from .integrations.ray import scan_with_ray

            result = scan_with_ray(det, paths, output=output, html=html, shard=part, address=ray_address,
                                   model=s["model"], model_path=str(s["model_path"]) if s["model_path"] else None,
                                   on_batch=progress, reference=s.get("reference"), layer=s["layer"],
                                   timestep=s["timestep"], metric=s["metric"], threshold=s["threshold"],
                                   seed=s["seed"], batch_size=batch_size, device=device, dtype=dtype,
                                   early_exit=not no_early_exit, sigma=s["sigma"], shard_key=shard_key,
                                   allow_remote=s["allow_remote"], draws=s["draws"],
                                   normalise=_reference_stats(s))
        elif w is not None:
            result = scan_distributed(det, paths, output=output, w=w, html=html, resume=resume, on_batch=progress,
                                      num_workers=workers, state_dir=state_dir, reference=s.get("reference"),
                                      allow_remote=s["allow_remote"])
        else:
            result = run_scan(det, paths, output=output, resume=resume, html=html, on_batch=progress,
                              num_workers=workers, state_dir=state_dir, reference=s.get("reference"),
                              channels=s.get("channels"), evidence_top=evidence_top, evidence_json=evidence_json,
                              reference_dir=reference_dir, shard=part, shard_key=shard_key,
                              allow_remote=s["allow_remote"], context=_run_context(paths, config))
    _written(result.output, html)
    if w is not None and w.rank != 0:
        raise typer.Exit(EXIT_OK)  # rank 0 reports, and its exit code says whether anything was flagged
    if not quiet:
        render_scan(result, det, top=top)
    raise typer.Exit(EXIT_FLAGGED if result.flagged else EXIT_OK)


@app.command()
@handle_errors
def merge(
    reports: Annotated[List[str], typer.Argument(help="The shards' reports (paths or fsspec URLs), from `memdetect "
                                                 "scan --shard I/N`.", show_default=False)],
    output: Annotated[str, typer.Option("--output", "-o", help="The joined report: .csv, .json or .parquet (a path "
                                        "or an fsspec URL).")],
    shard_key_file: ShardKeyFile = None,
    quiet: Quiet = False,
):
    """Join the reports of a sharded scan into the report one process would have written (refuses parts of
    different scans or settings, missing or duplicate shards, and edited marks; flags are recomputed from the
    scores; with a shard key, every shard's MAC must verify).

    Example: memdetect merge part-*.parquet --output report.parquet"""
    from .merge import KEY_ENV, load_shard_key, merge_reports

    _outputs(output=output)
    res = merge_reports(reports, output, key=load_shard_key(shard_key_file))
    if not res.verified:  # said even with --quiet: what the merged report rests on
        err.print(f"note: no shard key ({KEY_ENV} or --shard-key-file): the shards are trusted as given (their rows "
                  f"are checked against each other, not authenticated)", soft_wrap=True)
    if not quiet:
        c = res.counts
        out.print(f"merged {res.parts} shards: {plural(c['images'], 'images')}: {c['scored']} scored, "
                  f"{c['errored']} errored, {c['flagged']} flagged memorized; report: {_p(res.output)}"
                  + ("; every shard's MAC verified" if res.verified else ""), soft_wrap=True)
    raise typer.Exit(EXIT_FLAGGED if res.flagged else EXIT_OK)


def render_scan(result, det, *, top: int) -> None:
    df, s = result.frame, result.counts
    scored = df[df["error"].isna()].sort_values("score", ascending=False)
    if top and len(scored):
        t = Table(title=f"highest {det.metric} scores ({_p(det.name)}, {_p(det.layer)}, t={det.timestep})",
                  title_justify="left")
        t.add_column("path", overflow="fold")
        for c in ("score", *SCORES):
            t.add_column(c, justify="right")
        has_p = "p_value" in df.columns
        if has_p:
            t.add_column("p-value", justify="right")
        if det.threshold is not None:
            t.add_column("memorized")
        for _, r in scored.head(top).iterrows():
            cells = [_p(r["path"]), *(f"{r[c]:.4g}" for c in ("score", *SCORES))]
            if has_p:
                cells.append(f"{r['p_value']:.3g}")
            if det.threshold is not None:
                cells.append(Text("yes", style="bold red") if r["memorized"] else "no")
            t.add_row(*cells)
        out.print(t)
    errors = df[df["error"].notna()]
    for _, r in errors.head(5).iterrows():
        err.print(Text.assemble(("skipped", "yellow"), f" {_p(r['path'])}: {_p(r['error'])}"), soft_wrap=True)
    if len(errors) > 5:
        err.print(Text(f"... and {len(errors) - 5} more errors (see the report's error column)", style="yellow"))
    thr = f" at {det.metric} >= {det.threshold:g}" if det.threshold is not None else " (no threshold: nothing flagged)"
    dest = f"; report: {_p(result.output)}" if result.output else ""
    dest += f" ({result.resumed} rows reused from its journal)" if result.resumed else ""
    if result.rejected:
        dest += f"; {result.rejected} journal rows failed verification and were dropped"
    out.print(f"{plural(s['images'], 'images')}: {s['scored']} scored, {s['errored']} errored, "
              f"{s['flagged']} flagged memorized{thr}{dest}", soft_wrap=True)


# -- calibrate -------------------------------------------------------------------------------------------------------

@app.command()
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
    from .calibrate import calibrate_paths, check_fpr, check_output

    check_fpr(fpr)
    if config is not None:  # --guard --config: the guard reads the file's scan configuration (memdetect.guarding)
        from .config import load_config
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
        from .guarding import Guard, calibrate_guard, guard as memdetect_guard

        from .models import adapter_class
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
        t = Table(title=f"guard thresholds at FPR <= {fpr:g} on {cal.n_reference} reference generations "
                        f"({_p(model)}, {_p(g.layer)}, step t={cal.document['guard']['timestep']})",
                  title_justify="left")
        for c in ("metric", "threshold", "reference flagged"):
            t.add_column(c, justify="left" if c == "metric" else "right")
        for _, r in cal.table.iterrows():
            t.add_row(r["metric"], f"{r['threshold']:.6g}", f"{r['flagged_reference']}/{r['n_reference']}")
        _written(cal.path)
        out.print(t)
        from .io import display_path
        out.print(f"wrote {_p(display_path(cal.path))}", soft_wrap=True)
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
    """``calibrate --select-layer``: choose the configuration (``memdetect.select``), then calibrate it."""
    from .select import calibrate_selected, parse_timesteps, training_duplicate_examples

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
    ev = sel.evidence
    iv = lambda v: f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"  # noqa: E731
    dv = lambda v: f"{v[0]:+.3f} [{v[1]:+.3f}, {v[2]:+.3f}]"  # noqa: E731
    t = Table(title=f"--select-layer: {ev.n_candidates} candidates, {ev.n_memorized} memorized / {ev.n_novel} novel "
                    f"images, {ev.folds}-fold out-of-sample (95% bootstrap intervals)", title_justify="left")
    for c in ("configuration", "AUROC", "TPR@1%FPR"):
        t.add_column(c, justify="left" if c == "configuration" else "right")
    t.add_row(Text(f"selection procedure (now: {sel.best})"), iv(ev.selected_auroc), iv(ev.selected_tpr))
    t.add_row(Text(f"family default ({sel.default})"), iv(ev.default_auroc), iv(ev.default_tpr))
    t.add_row("difference (paired)", dv(ev.difference_auroc), dv(ev.difference_tpr))
    out.print(t)
    out.print(Text(f"chosen: {sel.chosen}: {sel.reason}"), soft_wrap=True)
    render_calibration(cal, cal_detector(det, sel.chosen))


def cal_detector(det, chosen):
    """A stand-in with the chosen configuration's name, layer and timestep for ``render_calibration``'s title."""
    from types import SimpleNamespace

    return SimpleNamespace(name=det.name, layer=chosen.layer, timestep=chosen.timestep)


def render_calibration(cal, det) -> None:
    from .io import display_path

    labelled = cal.n_memorized is not None
    t = Table(title=f"thresholds at FPR <= {cal.fpr:g} on {cal.n_reference} reference images ({_p(det.name)}, "
                    f"{_p(det.layer)}, t={det.timestep})", title_justify="left")
    cols = ["metric", "threshold", "reference flagged"] + (["TPR", "AUROC"] if labelled else [])
    cols.insert(3, "FPR 95% CI")
    if labelled:
        cols.insert(5, "TPR 95% CI")
    for c in cols:
        t.add_column(c, justify="left" if c == "metric" else "right")
    for _, r in cal.table.iterrows():
        name = Text.assemble((r["metric"], "bold"), " (config)") if r["metric"] == cal.metric else r["metric"]
        cells = [name, f"{r['threshold']:.6g}", f"{r['flagged_reference']}/{r['n_reference']} "
                                               f"({r['fpr_reference']:.3g})",
                 f"[{r['fpr_low']:.3g}, {r['fpr_high']:.3g}]"]
        if labelled:
            cells += [f"{r['tpr']:.3f}", f"[{r['tpr_low']:.3g}, {r['tpr_high']:.3g}]",
                      f"{r['auroc']:.3f}" + (" (inverted)" if r["auroc"] < 0.5 else "")]
        t.add_row(*cells)
    out.print(t)
    row = cal.table.set_index("metric").loc[cal.metric]
    out.print(f"threshold {cal.metric} >= {row['threshold']:.6g}: flags {int(row['flagged_reference'])} of "
              f"{int(row['n_reference'])} reference images, FPR {row['fpr_reference']:.3g} (95% Clopper-Pearson "
              f"interval {row['fpr_low']:.3g} to {row['fpr_high']:.3g})", highlight=False)
    if labelled:
        out.print(f"TPR at that threshold: {int(row['flagged_memorized'])} of {cal.n_memorized} memorized images, "
                  f"{row['tpr']:.3g} (95% interval {row['tpr_low']:.3g} to {row['tpr_high']:.3g})", highlight=False)
    if cal.too_small:
        err.print(Text(f"warning: {cal.n_reference} reference images are too few for FPR {cal.fpr:g}: even with none "
                       f"flagged, the FPR's 95% upper bound stays above {cal.fpr:g} below {cal.min_reference} images "
                       f"(rule of three: 3/n). Add reference images for a threshold you can trust at this FPR.",
                       style="yellow"), soft_wrap=True)
    if cal.strict:
        out.print(f"note: {cal.fpr:g} x {cal.n_reference} reference images < 1, so no reference image may be flagged: "
                  f"each threshold sits just above the largest reference score. More reference images give a "
                  f"threshold that really has FPR {cal.fpr:g}.", highlight=False)
    if labelled:
        row = cal.table.set_index("metric").loc[cal.metric]
        out.print(f"ROC point of {cal.metric} >= {row['threshold']:.6g}: FPR {row['roc_fpr']:.3g}, TPR "
                  f"{row['tpr']:.3g} ({cal.n_memorized} memorized, {cal.n_reference} novel); AUROC "
                  f"{row['auroc']:.3f}", highlight=False)
    out.print(f"wrote {_p(display_path(cal.path))}", soft_wrap=True)


# -- generate (with the in-generation guard) -------------------------------------------------------------------------

def _load_pipeline(model, model_path, device, dtype):
    from .guarding import load_guardable

    with err.status(Text(f"loading {_p(model)} ...")):
        return load_guardable(model, str(model_path) if model_path else None, device=device, dtype=dtype)


def _conditions(prompts, classes, prompt_file):
    conditions = list(prompts or [])
    if prompt_file:
        from .bench.prompts import read_prompts
        conditions += [str(p) for p in read_prompts(prompt_file)["prompt"]]
    if classes:
        if conditions:
            raise UsageError("give prompts or classes, not both")
        conditions = _parse_classes(classes)
    return conditions or None


@app.command()
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
    from .guarding import Guard, generate as run, write_generated
    from .io import display_path

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
        from .config import load_config
        from .guarding import guard_settings
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
    from .models import adapter_class
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
    t = Table(title=f"{plural(len(gen.rows), 'images')} in {gen.seconds:.1f} s -> {_p(output)}", title_justify="left")
    cols = ["file", "condition", "seed"] + ([metric, "flagged", "regenerated"] if gen.result else [])
    for c in cols:
        t.add_column(c)
    for r in gen.rows[:50]:
        cells = [f"{r['index']:05d}.png", _p(r["condition"]) if r["condition"] is not None else "-", str(r["seed"])]
        if gen.result:
            cells += [f"{r[metric]:.5g}", "FLAGGED" if r["flagged"] else "", str(r["regenerated"] or "")]
        t.add_row(*cells)
    out.print(t)
    if gen.result:
        res = gen.result
        how = ("one extra null-condition forward at that step (" + res.note + ")" if res.extra_forward
               else "read from the pipeline's own forward, no extra pass")
        out.print(f"guard: {res.layer} at timestep {res.timestep} (nearest {res.step_t}), {how}; "
                  f"{int(res.flagged.sum())} flagged" + (f" at {metric} >= {res.threshold:.6g}" if res.threshold
                                                           is not None else " (no threshold)")
                  + (f"; {len(res.retries)} regeneration round(s)" if res.retries else ""), soft_wrap=True)
    out.print(f"wrote {_p(report)}", soft_wrap=True)
    if gen.result is not None and gen.result.flagged.any():
        raise typer.Exit(EXIT_FLAGGED)


# -- audit -----------------------------------------------------------------------------------------------------------

@app.command()
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
    junit: Annotated[Optional[Path], typer.Option("--junit", help="Write JUnit XML: one test case per image, a "
                                                  "failure per flagged image, unreadable files skipped.")] = None,
    summary_json: Annotated[Optional[Path], typer.Option("--summary-json", help="Write a JSON summary: counts, exit "
                                                         "code, flagged images, errors, settings.")] = None,
    html: Html = None,
    annotations: Annotated[str, typer.Option("--annotations", help="GitHub workflow annotations on stdout: auto "
                                             "(when GITHUB_ACTIONS=true), github, none.")] = "auto",
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
    allow_remote: AllowRemote = False,
    quiet: Quiet = False,
):
    """CI entry point: scan with a calibrated threshold, write the report and CI outputs, exit 0 / 1 / 2 (1: an image
    was flagged, or could not be checked).

    Example: memdetect audit generated/ --config memdetect.toml --junit junit.xml --allow-empty"""
    from . import ci
    from .io import check_destinations, check_report_path

    ci.check_annotations(annotations)
    s = scan_settings(ctx, config, config_sha256=config_sha256, model=model, model_path=model_path, layer=layer,
                      timestep=timestep, sigma=sigma, metric=metric, threshold=threshold, seed=seed, fpr=fpr,
                      allow_errors=allow_errors, allow_remote=allow_remote, draws=draws)
    if s["threshold"] is None and config is None and Path("memdetect.toml").is_file():
        raise UsageError("audit needs a threshold: --config memdetect.toml or --threshold X (./memdetect.toml is not "
                         "read unless given with --config)")
    require_model(s["model"], config_hint="--config memdetect.toml")
    ci.check_threshold(s["threshold"])
    _outputs(output=output, html=html, junit=junit, summary_json=summary_json, evidence_json=evidence_json)
    check_report_path(output)
    ci.check_report_folder(output)
    check_destinations({"report": output, "HTML report": html, "JUnit XML": junit, "summary JSON": summary_json,
                        "evidence JSON": evidence_json})
    from .state import StateDir

    state = StateDir(state_dir)  # checked before the model load, as the destinations are
    state.check_outside(paths)
    if resume:
        state.check_trusted(paths)
    det = load_detector(s["model"], s["model_path"], layer=s["layer"], timestep=s["timestep"], metric=s["metric"],
                        threshold=s["threshold"], seed=s["seed"], batch_size=batch_size, device=device, dtype=dtype,
                        sigma=s["sigma"], num_workers=workers, draws=s["draws"], normalise=_reference_stats(s))
    det.configuration = s.get("configuration")
    from .config import check_weights

    check_weights(det, s.get("weights"), state, config)
    bar, progress = progress_bar("scanning", quiet=quiet)
    with bar:
        done = ci.audit(det, paths, output=output, resume=resume, html=html, config=config, junit=junit,
                        summary_json=summary_json, annotations=annotations, on_batch=progress, num_workers=workers,
                        state_dir=state, reference=s.get("reference"), channels=s.get("channels"),
                        evidence_top=evidence_top, evidence_json=evidence_json, reference_dir=reference_dir,
                        allow_errors=s["allow_errors"], allow_remote=s["allow_remote"], allow_empty=allow_empty,
                        suffix_only=suffix_only)
    _written(output, junit, summary_json, html)
    if not quiet:
        render_audit(done.summary, top=top)
        if done.summary["images"] == 0:
            err.print("no image files under the paths: nothing to audit, passing (--allow-empty)")
    raise typer.Exit(done.exit_code)


def render_audit(doc: dict, *, top: int) -> None:
    """The audit's short summary: counts, then the flagged images by name (paths printed escaped, never wrapped)."""
    say = functools.partial(out.print, soft_wrap=True)
    cfg = f", config {_p(doc['config'])}" if doc["config"] else ""
    say(f"memdetect audit: {plural(doc['images'], 'images')}: {doc['scored']} scored, {doc['errored']} errored, "
        f"{doc['flagged']} flagged memorized ({doc['metric']} >= {doc['threshold']:.6g}{cfg})")
    for f in doc["flagged_images"][:top]:
        p = f"; p = {f['p_value']:.3g}" if "p_value" in f else ""
        say(f"  flagged: {_p(f['path'])}  ({doc['metric']} {f['score']:.4g}{p})")
    if len(doc["flagged_images"]) > top:
        say(f"  ... and {len(doc['flagged_images']) - top} more flagged (see the report)")
    what = "not scored" if doc.get("allow_errors") else "not checked"
    for e in doc["errors"][:5]:
        err.print(f"  {what}: {_p(e['path'])}: {_p(e['error'])}", soft_wrap=True)
    if len(doc["errors"]) > 5:
        err.print(f"  ... and {len(doc['errors']) - 5} more {what} (see the report's error column)")
    if doc.get("not_checked"):
        err.print(f"  {len(doc['not_checked'])} images not checked: the audit fails (exit 1); --allow-errors reports "
                  f"them without failing", soft_wrap=True)
    if doc.get("resume"):
        resumed = f" ({doc['resumed']} rows reused from its journal)" if doc["resumed"] else " (nothing reused)"
    else:
        resumed = " (no journal read: every image scored)"
    if doc.get("journal_rows_rejected"):
        resumed += f"; {doc['journal_rows_rejected']} journal rows failed verification and were dropped"
    say(f"report: {_p(doc['report'])}{resumed}")


# -- models, layers --------------------------------------------------------------------------------------------------

@app.command()
@handle_errors
def models():
    """List the model presets: family, weights, default layer and timestep, and the timestep's noise level sigma
    under the preset's schedule.

    Example: memdetect models"""
    from .models import ADAPTERS, PRESETS
    from .models.presets import schedule_sigma

    title = "presets (use with --model; --model-path overrides the weights)"
    t = Table(title=title, title_justify="left")
    for c in ("preset", "family", "weights", "layer", "t", "sigma (schedule)", "note"):
        t.add_column(c, overflow="fold")
    rows = []
    for p in PRESETS.values():
        cls = ADAPTERS.get(p.family)
        layer = p.layer or (cls.layer_hint(p.options) if cls else "(family not installed)")
        schedule = p.noise_schedule()
        sigma = (f"{schedule_sigma(schedule, p.timestep):.3f} ({schedule.get('beta_schedule', '?')})" if schedule
                 else "-")
        rows.append(tuple(map(_p, (p.name, p.family, p.source, layer, p.timestep, sigma, p.note))))
        t.add_row(*rows[-1])
    if out.width >= 140:
        out.print(t)
    else:  # a table of seven columns folds into unreadable slivers: one block per preset instead
        from .text_blocks import preset_blocks

        out.print(preset_blocks(title, rows, out.width), soft_wrap=True)
    out.print(f"families (with --model-path DIR): {', '.join(map(_p, sorted(ADAPTERS)))}")


@app.command()
@handle_errors
def layers(
    model: Model = None, model_path: ModelPath = None,
    contains: Annotated[Optional[str], typer.Option("--filter", help="Only names containing this text.")] = None,
    inputs: Annotated[bool, typer.Option("--inputs", help="Also list module inputs (NAME:in).")] = False,
    device: Device = "auto", dtype: Dtype = "auto",
):
    """List hookable layers with their output shape on a probe input and how often each fires per forward.

    Example: memdetect layers --model demo --filter up_blocks.0"""
    require_model(model, config_hint=None)
    det = load_detector(model, model_path, device=device, dtype=dtype, prune=False)  # the full forward
    default = str(det.layer)
    with err.status("probing one forward pass ..."):
        # inputs too: the default layer is often a module input (NAME:in), and is listed, marked, without --inputs
        infos = [i for i in det.layers(include_inputs=True) if inputs or ":in" not in i.spec or i.spec == default]
    t = Table(title=f"{_p(det.name)}: hookable layers in forward order (batch 1; default: {_p(det.layer)})",
              title_justify="left")
    for c in ("layer", "module", "shape", "calls/forward"):
        t.add_column(c, overflow="fold")
    t.add_column("", no_wrap=True)  # the default layer's mark, apart: the layer's name stays whole
    for info in infos:
        if contains and contains not in info.spec:
            continue
        mark = Text("<- default", style="bold green") if info.spec == default else ""
        t.add_row(_p(info.spec), _p(info.module_type), "x".join(map(str, info.shape)) or "-", str(info.calls), mark)
    out.print(t)


# -- bench -----------------------------------------------------------------------------------------------------------

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks with ground-truth labels (AUROC, TPR@1%FPR, cost).")
app.add_typer(bench_app, name="bench")

FlipdProbes = Annotated[int, typer.Option("--flipd-probes", min=1, help="Hutchinson probes for Ross et al.'s "
                                                                        "FLIPD.")]
GenerationSeed = Annotated[int, typer.Option("--seed", help="Generation seed.")]
GenerationBatch = Annotated[Optional[int], typer.Option("--batch-size", "-b", min=1, help="Samples per generation "
                                                        "and scoring batch (default: the model's batch size).")]
BenchOutput = Annotated[Optional[Path], typer.Option("--output", "-o", help="Results folder (a rerun resumes it; "
                                                                            "default: bench-<name>).")]
TrainDir = Annotated[Path, typer.Option("--train-dir", help="The model's training images (a folder, searched "
                                                            "recursively), for nearest-neighbour labels.")]
NumSamples = Annotated[int, typer.Option("--num-samples", "-n", min=2, help="Samples to generate.")]
MemorizedAt = Annotated[Optional[float], typer.Option("--memorized-at", help="Memorized at nearest-neighbour "
                                                   "similarity >= this (default: the labeller's: pixel 0.95, sscd "
                                                   "0.9).")]
GeneralizedBelow = Annotated[Optional[float], typer.Option("--generalized-below", help="Generalized below this "
                                                           "(between: excluded) (default: pixel 0.80, sscd 0.5).")]
Bootstrap = Annotated[int, typer.Option("--bootstrap", min=20, help="Bootstrap replicates of the 95% intervals.")]
FlipdTimestep = Annotated[Optional[int], typer.Option("--flipd-timestep", min=0, help="Timestep of Ross et al.'s "
                                                      "FLIPD (default: the detector's).")]
LabelResolution = Annotated[Optional[int], typer.Option("--label-resolution", min=4, help="Resolution of the "
                                                        "nearest-neighbour comparison (default: min(model, 64)).")]
Steps = Annotated[Optional[int], typer.Option("--steps", min=1, help="Sampling steps (default: the family's: DiT 50 "
                                              "DDIM, pixel DDPM 1000 ancestral, EDM 18 Heun).")]


def render_results(results, title: str) -> None:
    t = Table(title=title, title_justify="left")
    for c in ("method", "AUROC", "TPR@1%FPR", "s/sample", "memorized", "generalized"):
        t.add_column(c, justify="left" if c == "method" else "right")
    for _, r in results.iterrows():
        t.add_row(_p(r["method"]), f"{r['auroc']:.3f}", f"{r['tpr_at_1pct_fpr']:.3f}", f"{r['seconds_per_sample']:.4f}",
                  str(r["n_memorized"]), str(r["n_generalized"]))
    out.print(t)


def _interval(r, value: str, lo: str, hi: str) -> str:
    return f"{r[value]:.3f} [{r[lo]:.3f}, {r[hi]:.3f}]" if r[value] == r[value] else "-"


@bench_app.command("demo")
@handle_errors
def bench_demo(
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for results.csv, recall_by_grade.csv, "
                                                                "pairs.csv, scores.csv, roc.png (and sweep.*, "
                                                                "layer_proof.json).")] = Path("bench-demo"),
    model: Annotated[str, typer.Option("--model", "-m", help="A shipped ground-truth model: demo, demo-sd, demo-dit "
                                                             "or demo-edm.")] = "demo",
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
):
    """Ground truth: score a shipped memorizing model's labelled generations with every method that applies.

    Example: memdetect bench demo --model demo --limit 100"""
    from .bench.demo import DEMO_MODELS, run_demo

    if model not in DEMO_MODELS:
        raise UsageError(f"--model must be one of {', '.join(DEMO_MODELS)} (the shipped ground-truth models), got "
                         f"{model!r}")
    try:
        steps = tuple(int(v) for v in sweep_timesteps.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"--sweep-timesteps takes comma-separated integers, got {sweep_timesteps!r}") from None
    speed_settings(device)
    bar, _ = progress_bar(f"bench demo ({model}): scoring its labelled generations with every method", counted=False)
    with bar:  # no count from run_demo: in a log, a line every few seconds with the time elapsed
        res = run_demo(output, model=model, device=device, batch_size=batch_size, flipd_probes=flipd_probes,
                       sweep=sweep_layers, model_path=str(model_path) if model_path else None, limit=limit,
                       sweep_timesteps=steps, n_boot=bootstrap, select=select)
    st = res["settings"]
    t = Table(title=f"bench demo --model {model}: {_p(st.layer)}, t={st.timestep}, device {st.device}, batch "
                    f"{res['batch_size']} (95% bootstrap intervals)", title_justify="left")
    for c in ("method", "AUROC", "TPR@1%FPR", "s/sample", "memorized", "generalized"):
        t.add_column(c, justify="left" if c == "method" else "right")
    for _, r in res["results"].iterrows():
        t.add_row(_p(r["method"]), _interval(r, "auroc", "auroc_lo", "auroc_hi"),
                  _interval(r, "tpr_at_1pct_fpr", "tpr_lo", "tpr_hi"), f"{r['seconds_per_sample']:.4f}",
                  str(r["n_memorized"]), str(r["n_generalized"]))
    out.print(t)
    pairs = res["pairs"]
    if len(pairs):
        ahead = pairs.loc[pairs["auroc_verdict"] == "ahead", "versus"].tolist()
        behind = pairs.loc[pairs["auroc_verdict"] == "behind", "versus"].tolist()
        out.print(f"ours_std AUROC, paired bootstrap: ahead of {', '.join(map(_p, ahead)) or 'none'}; behind "
                  f"{', '.join(map(_p, behind)) or 'none'}; the rest within noise", soft_wrap=True)
    if "selection" in res:
        c, sel = res["selection"]["chosen"], res["selection"]
        out.print(f"ours_selected (chosen on the selection half, measured on the held-out half): {_p(c['layer'])} at "
                  f"t={c['timestep']}, {c['metric']}; {_p(sel['reason'])}", soft_wrap=True)
    if "sweep" in res:
        sw, proof = res["sweep"], res["proof"]
        out.print(f"sweep: {sw['layer'].nunique()} layers x {sw['timestep'].nunique()} timesteps; "
                  f"{int(sw['inverted'].sum())} (layer, t) pairs inverted (AUROC < 0.5)")
        b = proof["selected"]
        out.print(f"best on the selection half: {_p(b['layer'])} at t={b['timestep']}: AUROC "
                  f"{b['select']['auroc']} (selection), {b['heldout']['auroc']} (held-out)", soft_wrap=True)
        if "default" in proof:
            d = proof["default"]
            out.print(f"default layer {_p(d['layer'])} at t={d['timestep']}: held-out AUROC {d['heldout']['auroc']}, "
                      f"TPR@1%FPR {d['heldout']['tpr_at_1pct_fpr']}; meets >= 0.98 / 0.90: "
                      f"{'yes' if d['meets_bar_heldout'] else 'no'}", soft_wrap=True)
    files = "results.csv, recall_by_grade.csv, pairs.csv, scores.csv, roc.png" + \
        (", selection.json" if "selection" in res else "")
    out.print(f"wrote {_p(output)}/{files}" + (", sweep.csv, sweep.png, layer_proof.json" if sweep_layers else ""),
              soft_wrap=True)


def render_paper_results(results, differences, title: str, metric: str = "std") -> None:
    """The paper benches' table: per unit and method, AUROC and TPR@1%FPR with their 95% intervals; then ours
    (``metric``) minus each baseline, with a paired interval, "ahead" only where it excludes 0."""
    t = Table(title=title, title_justify="left")
    for c in ("method", "unit", "AUROC [95% CI]", "TPR@1%FPR [95% CI]", "s/sample", "mem", "gen"):
        t.add_column(c, justify="left" if c in ("method", "unit") else "right")
    for _, r in results.iterrows():
        t.add_row(_p(r["method"]), _p(r["unit"]), f"{r['auroc']:.3f} [{r['auroc_lo']:.3f}, {r['auroc_hi']:.3f}]",
                  f"{r['tpr_at_1pct_fpr']:.3f} [{r['tpr_lo']:.3f}, {r['tpr_hi']:.3f}]",
                  f"{r['seconds_per_sample']:.4f}", str(r["n_memorized"]), str(r["n_generalized"]))
    out.print(t)
    d = differences[differences["ours"] == f"ours_{metric}"]
    if len(d):
        t = Table(title=f"ours_{metric} minus each baseline (paired bootstrap, 95%)", title_justify="left")
        for c in ("baseline", "unit", "dAUROC [95% CI]", "dTPR@1%FPR [95% CI]", "ahead (CI > 0)"):
            t.add_column(c, justify="left" if c in ("baseline", "unit") else "right")
        for _, r in d.iterrows():
            t.add_row(_p(r["baseline"]), _p(r["unit"]), f"{r['d_auroc']:+.3f} [{r['d_auroc_lo']:+.3f}, "
                      f"{r['d_auroc_hi']:+.3f}]", f"{r['d_tpr']:+.3f} [{r['d_tpr_lo']:+.3f}, {r['d_tpr_hi']:+.3f}]",
                      "yes" if r["ahead"] else "no")
        out.print(t)


def _render_paper(res: dict, title: str, output: Path, extra: str, files: str) -> None:
    if "results" not in res:  # a non-main process under accelerate: the main one writes the tables
        return
    render_paper_results(res["results"], res["differences"], title)
    st = res["settings"]
    out.print(f"generated {res['generated']}, reused {res['skipped']} from earlier runs; {_p(st['sampler'])}, "
              f"{st['steps']} steps; FLIPD {st['flipd_probes']} probe(s) at t={st['flipd_timestep']}{_p(extra)}",
              soft_wrap=True)
    out.print("seconds/sample: time per generated image on one device, generation excluded except for "
              "wen_all_steps and carlini, whose criteria need it (see the timing column)")
    out.print(f"wrote {_p(output)}/results.csv, differences.csv, {files}, roc.png, settings.json", soft_wrap=True)


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
):
    """Table-1-style LAION: memorized vs normal prompts on Stable Diffusion, per generated image (and per prompt),
    ours against Wen, NeMo, Ross, Carlini, with 95% intervals.

    Example: memdetect bench laion --model sd14 --limit 20"""
    from .bench.paper import run_laion

    output = output or Path("bench-laion")
    speed_settings(device)
    bar, progress = progress_bar("generating and scoring prompts", unit="prompts")
    with bar:
        res = run_laion(output, model=model, model_path=str(model_path) if model_path else None, memorized=memorized,
                        normal=normal, memorized_filters=memorized_filter or (), limit=limit, generations=generations,
                        steps=steps, guidance=guidance, device=device, dtype=dtype, seed=seed,
                        flipd_probes=flipd_probes, flipd_timestep=flipd_timestep, nemo_reference=nemo_reference,
                        nemo_stats=nemo_stats, carlini_generations=carlini_generations,
                        carlini_neighbours=carlini_neighbours, n_boot=bootstrap, progress=progress)
    extra = f"; NeMo: {res['settings']['nemo_reference']}"
    _render_paper(res, f"bench laion: {_p(model)}, {generations} generations per prompt (unit image: each "
                       f"generation scored alone; unit prompt: mean over its {generations})", output, extra,
                  "scores.csv (per image), prompts.csv")


def _parse_classes(text: Optional[str]) -> Optional[list[int]]:
    if text is None:
        return None
    classes: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        lo, sep, hi = part.partition("-")
        if not (lo.isdigit() and (not sep or hi.isdigit())):
            raise UsageError(f"--classes takes comma-separated class indices or ranges (0-9), got {text!r}")
        classes.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    return classes


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
    ):
        from .bench.labels import make_labeller
        from .bench.paper import label_rule, run_samples

        lab_fn = make_labeller(labeller, sscd_weights=sscd_weights)
        rule = label_rule(memorized_at, generalized_below, lab_fn.rule)
        output = output or Path(f"bench-{bench}")
        speed_settings(device)
        bar, progress = progress_bar("generating and scoring samples", unit="samples")
        with bar:
            res = run_samples(bench, output, model=model, model_path=str(model_path) if model_path else None,
                              train_dir=train_dir, num_samples=num_samples, classes=_parse_classes(classes),
                              guidance=guidance, steps=steps, batch_size=batch_size, rule=rule, labeller=lab_fn,
                              label_resolution=label_resolution, flipd_probes=flipd_probes,
                              flipd_timestep=flipd_timestep, carlini_neighbours=carlini_neighbours,
                              min_memorized=min_memorized, n_boot=bootstrap, device=device, dtype=dtype, seed=seed, progress=progress,
                              warn=lambda text: err.print(Text(f"warning: {printable(text)}", style="yellow"),
                                                          soft_wrap=True))
        lab = res["settings"]["labels"]
        _render_paper(res, f"bench {bench}: {_p(model)}, {num_samples} samples, per image", output,
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


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the exit code."""
    _CONSOLE["script"] = True
    try:
        app(args=argv, prog_name="memdetect", standalone_mode=True)
    except SystemExit as e:
        return int(e.code or 0)
    return 0
