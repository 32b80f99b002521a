"""The error and exit table of every command: which exception ends a command with which exit code and one line.

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
the MEMDETECT_DEBUG hint. An OSError writing an output names the option and the fix (``memdetect.cli.ux.output_error``).

``handle_errors`` wraps each command: it installs the signal handling (``_terminate_cleanly``) and maps what the
command raises:

  =====================================  ====  ==========================================================
  exception                              exit  line on stderr
  =====================================  ====  ==========================================================
  ``typer.Exit`` / ``typer.Abort``       its   (passed through: the command chose its code)
  ``Terminated`` (SIGTERM)               2     ``memdetect: error: terminated (SIGTERM) ...``
  ``KeyboardInterrupt`` (Ctrl-C)         130   ``memdetect: interrupted: stopped by Ctrl-C (SIGINT) ...``
  ``memdetect.errors.MemdetectError``    2     ``memdetect: error: <message>``
  ``OSError``                            2     ``memdetect: error: <the option and the fix, or the message>``
  any other ``Exception``                2     ``memdetect: internal error: <type>: <message>`` + debug hint
  =====================================  ====  ==========================================================
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

import typer
from rich.text import Text

from ..errors import MemdetectError
from ..text import printable
from .render import _p, err

EXIT_OK, EXIT_FLAGGED, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130


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
#: and the fix (``memdetect.cli.ux.output_error``), and the files it has finished writing (an interrupt after the report
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

