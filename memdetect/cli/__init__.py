"""The ``memdetect`` command line: options in, one library call, rendering out.

Each command parses its options, calls the library (``memdetect.workflows.scan``, ``memdetect.workflows.calibrate``,
``memdetect.workflows.ci``, ``Detector.layers``, ``memdetect.bench``) and renders what it returns. The package:

  app.py        the typer app, the root options and ``main`` (the console script ``memdetect``)
  options.py    the options several commands share (``Annotated`` aliases) and their parsing
  exits.py      the exit codes and the error table: which exception ends a command with which code and line;
                SIGTERM and Ctrl-C
  render.py     the consoles and the renderers (tables, summaries); render_bench.py: the benches' tables
  common.py     loading the detector or pipeline, the progress bar
  ux.py         messages and choices (missing model, output errors, shipped guard calibrations, the sampler)
  scan.py, merge.py, calibrate.py, generate.py, audit.py, models.py (models, layers), bench.py: one command group each
"""

from __future__ import annotations

from .app import app, main
from .exits import EXIT_ERROR, EXIT_FLAGGED, EXIT_INTERRUPTED, EXIT_OK, _terminate_cleanly

__all__ = ["app", "main", "EXIT_OK", "EXIT_FLAGGED", "EXIT_ERROR", "EXIT_INTERRUPTED", "_terminate_cleanly"]
