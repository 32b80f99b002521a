"""The typer app: the root options (--version, --verbose), the commands in the order ``--help`` lists them, and the
console script's ``main``."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from .._version import __version__
from ..text import printable
from . import audit, bench, calibrate, generate, merge, models, scan
from .exits import _CONSOLE
from .render import out

app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Detect memorized images from diffusion models (one partial forward pass per image).\n\n"
                       "Exit codes: 0 nothing flagged, 1 something flagged (needs a threshold; audit: or an input "
                       "not checked), 2 error.")


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

for command in (scan.scan, merge.merge, calibrate.calibrate, generate.generate, audit.audit, models.models,
                models.layers):
    app.command()(command)
app.add_typer(bench.bench_app, name="bench")


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the exit code."""
    _CONSOLE["script"] = True
    try:
        app(args=argv, prog_name="memdetect", standalone_mode=True)
    except SystemExit as e:
        return int(e.code or 0)
    return 0
