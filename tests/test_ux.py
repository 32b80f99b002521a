"""The first hour of a new user and the CI log (issue 32): no silent model, progress in a terminal and in logs,
audit --allow-empty, output errors that name their option, one-line user errors, help texts, the guard's shipped
calibration and fast sampler, Ctrl-C."""

from __future__ import annotations

import re

import errno
import inspect
import io
import json
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console
from typer.testing import CliRunner

from memdetect import cli
from memdetect.cli import app
from memdetect.models import PRESETS
from memdetect.progress import Progress, status_line
from memdetect.cli.ux import output_error, sampler


runner = CliRunner()


def invoke(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("memdetect:")]


# -- 1. no silent model ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["scan", "IMAGES"],
    ["calibrate", "IMAGES"],
    ["generate", "--output", "OUT"],
    ["layers"],
    ["audit", "IMAGES", "--threshold", "1"],
])
def test_no_model_is_one_line_listing_the_presets(args, images_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./memdetect.toml
    from memdetect.detector import Detector

    monkeypatch.setattr(Detector, "from_pretrained", lambda *a, **k: pytest.fail("a model was loaded"))
    res = invoke(*[images_dir if a == "IMAGES" else tmp_path / "g" if a == "OUT" else a for a in args])
    assert res.exit_code == 2, res.output
    lines = error_lines(res.output)
    assert len(lines) == 1 and "Traceback" not in res.output
    line = lines[0]
    assert line.startswith("memdetect: error: no model given: pass --model NAME")
    for name in PRESETS:  # every preset, by name
        assert name in line
    assert "memdetect models" in line and "MEMDETECT_DEBUG" not in res.output
    assert not (tmp_path / "g").exists() and not (tmp_path / "memdetect.toml").exists()


def test_a_config_that_names_the_model_is_enough(tiny_ddpm, images_dir, tmp_path):
    cfg = tmp_path / "memdetect.toml"
    cfg.write_text(f'model = "ddpm"\nmodel_path = "{tiny_ddpm}"\nthreshold = 1e9\n')
    res = invoke("scan", images_dir, "--config", cfg, "--workers", 0, "--quiet")
    assert res.exit_code == 0, res.output
    cfg.write_text("threshold = 1e9\n")  # a config that names no model is refused too, in one line
    res = invoke("scan", images_dir, "--config", cfg, "--workers", 0)
    assert res.exit_code == 2 and "has no 'model'" in error_lines(res.output)[0]


# -- 2. progress ---------------------------------------------------------------------------------------------------------

def test_progress_in_a_log_is_plain_lines_with_total_rate_and_eta(tiny_ddpm, images_dir, tmp_path):
    base = ["scan", images_dir, "--model", "ddpm", "--model-path", tiny_ddpm, "--workers", 0, "-b", 2]
    res = invoke(*base, "-o", tmp_path / "r.csv")  # CliRunner's streams are no terminal: a CI log
    assert res.exit_code == 0, res.output
    assert "scanning: 0/5 images (0%)" in res.output  # the total is known before the first batch
    final = [line for line in res.output.splitlines() if line.startswith("scanning: 5/5 images (100%)")]
    assert final and "images/s" in final[0] and "elapsed" in final[0]
    assert "/?" not in res.output
    quiet = invoke(*base, "-o", tmp_path / "q.csv", "--quiet")
    assert quiet.exit_code == 0 and "scanning" not in quiet.output


def test_progress_lines_keep_coming_while_nothing_finishes():
    buf = io.StringIO()
    with Progress("bench demo", console=Console(file=buf, width=200), interval=0.05, terminal=False,
                  counted=False) as p:
        time.sleep(0.4)
    lines = buf.getvalue().splitlines()
    assert len(lines) >= 4 and all(line.startswith("bench demo: working") for line in lines), lines
    assert p.lines == len(lines)


def test_progress_line_text():
    assert status_line("scanning", 120, 1000, 35.0) == ("scanning: 120/1,000 images (12%), 3.43 images/s, "
                                                        "ETA 4m 17s, 35s elapsed")
    assert status_line("scanning", 1, 1, 0.5).startswith("scanning: 1/1 image (100%)")
    assert status_line("x", 0, None, 3.0) == "x: working, 3s elapsed"


def test_progress_in_a_terminal_is_a_bar_with_its_total():
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=120)
    with Progress("scanning", console=console, terminal=True) as p:
        p(0, 40)
        p(12, 40)
        assert p._bar.tasks[0].total == 40 and p._bar.tasks[0].completed == 12
        p._bar.refresh()
    assert "12/40" in buf.getvalue() and "/?" not in buf.getvalue()


def test_bench_demo_is_not_silent_in_a_log(monkeypatch):
    from memdetect.bench import demo
    from memdetect.errors import UsageError

    def slow(*a, **k):
        time.sleep(0.5)
        raise UsageError("stop here")

    monkeypatch.setattr(demo, "run_demo", slow)
    res = invoke("bench", "demo", "--model", "demo", env={"MEMDETECT_PROGRESS_INTERVAL": "0.1"})
    assert res.exit_code == 2
    beats = [line for line in res.output.splitlines() if line.startswith("bench demo (demo)")]
    assert len(beats) >= 3 and "elapsed" in beats[-1], res.output


# -- 3. audit --allow-empty ------------------------------------------------------------------------------------------

def test_audit_allow_empty(tiny_ddpm, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("memdetect.toml").write_text(f'model = "ddpm"\nmodel_path = "{tiny_ddpm}"\nthreshold = 1\n')
    Path("empty").mkdir()
    res = invoke("audit", "empty", "--config", "memdetect.toml", "--workers", 0)
    assert res.exit_code == 2 and "no image files found under empty" in error_lines(res.output)[0]
    assert "--allow-empty" in error_lines(res.output)[0]  # the error says how to let it pass
    res = invoke("audit", "empty", "--config", "memdetect.toml", "--allow-empty", "--summary-json", "s.json", "--junit", "j.xml", "--workers", 0)
    assert res.exit_code == 0, res.output
    doc = json.loads(Path("s.json").read_text())
    assert (doc["exit_code"], doc["images"], doc["flagged"]) == (0, 0, 0)
    assert 'tests="0"' in Path("j.xml").read_text() and len(pd.read_csv(".memdetect/report.csv")) == 0
    assert "nothing to audit" in res.output


# -- 4. errors -------------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc (a folder that takes no new files)")
def test_a_write_failure_names_the_option_and_the_fix(tiny_ddpm, images_dir):
    res = invoke("scan", images_dir, "--model", "ddpm", "--model-path", tiny_ddpm, "-o", "/proc/report.csv",
                 "--workers", 0)
    assert res.exit_code == 2
    (line,) = error_lines(res.output)
    assert line.startswith("memdetect: error: cannot write --output /proc/report.csv:")
    assert "give --output a path in a folder" in line and "journal" not in line and "Errno" not in line
    assert "MEMDETECT_DEBUG" not in res.output


def test_output_error_never_names_internal_files():
    outputs = {"--output": "/x/report.csv", "--html": "/y/r.html"}
    e = OSError(errno.EACCES, "Permission denied", "/x/.report.csv.k2j3.tmp")
    assert output_error(e, outputs) == ("cannot write --output /x/report.csv: permission denied; give --output a "
                                        "path in a folder you can write to")
    e = OSError(errno.ENOSPC, "No space left on device", "/y/r.html")
    assert output_error(e, outputs).startswith("cannot write --html /y/r.html: no space left on device; free space")
    e = OSError(errno.ENOENT, "No such file or directory", "/y")  # the folder above it
    assert "--html" in output_error(e, outputs)
    assert output_error(OSError(errno.ENOENT, "No such file or directory", "/z/input.png"), outputs) is None


def test_user_errors_are_one_line_without_the_debug_hint(tiny_ddpm, images_dir):
    res = invoke("scan", images_dir, "--model", "ddpm", "--model-path", tiny_ddpm, "--metric", "nope")
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
    assert "MEMDETECT_DEBUG" not in res.output


def test_one_image_is_singular(tiny_ddpm, images_dir):
    res = invoke("scan", images_dir / "img_000.png", "--model", "ddpm", "--model-path", tiny_ddpm, "--workers", 0)
    assert res.exit_code == 0 and "1 image: 1 scored" in res.output
    assert not re.search(r"(?<![\d.])1 images", res.output)  # "36.1 images/s" is a rate, not a count


def test_json_reports_are_strict(tiny_ddpm, images_dir, tmp_path):
    (images_dir / "broken.png").write_bytes(b"not a png")  # an error row: NaN scores
    res = invoke("scan", images_dir, "--model", "ddpm", "--model-path", tiny_ddpm, "-o", tmp_path / "r.json",
                 "--workers", 0, "--quiet")
    assert res.exit_code == 0, res.output

    def refuse(name):
        raise ValueError(name)

    doc = json.loads((tmp_path / "r.json").read_text(), parse_constant=refuse)
    assert any(r["error"] for r in doc["rows"])


# -- 7. help ------------------------------------------------------------------------------------------------------------

COMMANDS = [["scan"], ["merge"], ["calibrate"], ["generate"], ["audit"], ["models"], ["layers"], ["bench", "demo"],
            ["bench", "laion"], ["bench", "imagenet"], ["bench", "cifar10"]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_help_has_an_example(command):
    res = invoke(*command, "--help", env={"COLUMNS": "120"})
    assert res.exit_code == 0 and "Example: memdetect " + " ".join(command) in " ".join(res.output.split())


def test_help_keeps_bracketed_words():
    for command in (["generate"], ["calibrate"]):
        res = invoke(*command, "--help", env={"COLUMNS": "200"})
        assert "[guard]" in res.output, command


def test_models_reads_at_80_columns():
    res = invoke("models", env={"COLUMNS": "80"})
    lines = res.output.splitlines()
    assert res.exit_code == 0 and max(map(len, lines)) <= 80
    for name in PRESETS:  # each preset starts its own block, its name whole
        assert any(line.startswith(f"{name}: ") for line in lines), name
    assert len(lines) < 8 * len(PRESETS)  # a few lines a preset (was ~180 broken lines for 10 presets)


def test_layers_marks_the_default_layer():
    res = invoke("layers", "--model", "demo", "--device", "cpu", "--filter", "up_blocks.0.resnets.2.conv2")
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "up_blocks.0.resnets.2.conv2:in" in text and "<- default" in text  # an input layer, listed without --inputs



def test_layers_keeps_names_whole_at_80_columns():
    """A layer's name is what --layer takes: at 80 columns it is not folded inside a table cell (it was
    "up_blocks.0.resn" / "ets.0.norm1"), each name is a whole line, the default marked on its own line."""
    args = ("layers", "--model", "demo", "--device", "cpu", "--filter", "up_blocks.0.resnets.2")
    res = invoke(*args, env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    for name in ("up_blocks.0.resnets.2.norm1", "up_blocks.0.resnets.2.nonlinearity@2",
                 "up_blocks.0.resnets.2.time_emb_proj"):
        assert name in lines, res.output
    assert "up_blocks.0.resnets.2.conv2:in  <- default" in lines
    assert "    SiLU, 1x128, 3 calls/forward" in lines  # module, shape and calls under the name
    assert max(map(len, lines)) <= 80
    wide = invoke(*args, env={"COLUMNS": "200"})  # room for the table: still a table, names whole in their cells
    row = next(line for line in wide.output.splitlines() if "up_blocks.0.resnets.2.conv2:in " in line)
    assert row.startswith("│ ") and "<- default" in row and "1x128x8x8" in row


@pytest.mark.parametrize("bench,library,args", [
    ("demo", "memdetect.bench.demo.run_demo", ["--limit", "8"]),
    ("laion", "memdetect.bench.paper.run_laion", ["--limit", "2"]),
    ("cifar10", "memdetect.bench.paper.run_samples", ["--train-dir", "TRAIN", "-n", "4"]),
    ("imagenet", "memdetect.bench.paper.run_samples", ["--train-dir", "TRAIN", "-n", "4"]),
])
def test_bench_quiet_prints_nothing_and_runs_the_same_bench(bench, library, args, tmp_path, monkeypatch):
    """`bench ... --quiet`: no progress and no table, and the library gets the very same call (so the results files
    are the same); without it, progress lines come."""
    calls = []

    def fake(*a, **k):
        progress = k.pop("progress", None)
        if progress is not None:
            progress(1, 2)
        time.sleep(0.3)  # long enough for a heartbeat line in a log
        calls.append((a, {key: "a function" if inspect.isfunction(v) else repr(v) for key, v in k.items()}))
        return {}  # no results: a quiet run renders nothing; a loud demo bench fails rendering it (exit 2)

    monkeypatch.setattr(library, fake)
    argv = ["bench", bench, *[tmp_path if a == "TRAIN" else a for a in args], "--output", tmp_path / "out",
            "--device", "cpu"]
    env = {"MEMDETECT_PROGRESS_INTERVAL": "0.05"}
    quiet = invoke(*argv, "--quiet", env=env)
    assert quiet.exit_code == 0 and quiet.output == "", quiet.output
    loud = invoke(*argv, env=env)
    assert loud.output.strip() and "memdetect: error:" not in loud.output
    assert calls[0] == calls[1]


# -- 8. generate: the shipped guard calibration, the fast sampler, progress -------------------------------------

def test_sampler_choice():
    assert sampler(1000, 1.0, None) == (50, 0.0, "DDIM, 50 steps (the pipeline's own default is 1000 ancestral "
                                                  "DDPM steps; --steps 1000 for it)")
    assert sampler(1000, 1.0, 1000) == (1000, 1.0, "ancestral DDPM, 1000 steps")
    assert sampler(1000, 1.0, 20)[:2] == (20, 0.0)  # fewer steps: DDIM, as the shipped guard calibrations sampled
    assert sampler(50, 0.0, None) == (50, 0.0, "DDIM, 50 steps")
    assert sampler(18, 0.0, 40) == (40, 0.0, "DDIM, 40 steps")


def test_generate_guard_uses_the_shipped_calibration(tmp_path):
    res = invoke("generate", "--model", "demo", "-n", 2, "--guard", "--output", tmp_path / "g", "--device", "cpu")
    assert res.exit_code in (0, 1), res.output
    assert "sampler: DDIM, 20 steps (" in res.output and "guard calibration: " in res.output
    assert "demo_guard" in res.output
    assert "generating: 20/20 steps (100%)" in res.output  # progress, in a log
    assert "no threshold" not in res.output and "flagged at std >= 0.659346" in res.output
    assert len(pd.read_csv(tmp_path / "g" / "report.csv")) == 2


def test_generate_guard_without_a_calibration_refuses_with_the_command(tiny_ddpm, tmp_path):
    res = invoke("generate", "--model", "ddpm", "--model-path", tiny_ddpm, "--guard", "--output", tmp_path / "g")
    assert res.exit_code == 2 and not (tmp_path / "g").exists()
    (line,) = error_lines(res.output)
    assert "memdetect calibrate --guard --model ddpm" in line and "--config memdetect.toml" in line


def test_generate_defaults_to_a_fast_sampler_and_says_so(tiny_ddpm, tmp_path):
    res = invoke("generate", "--model", "ddpm", "--model-path", tiny_ddpm, "-n", 1, "--output", tmp_path / "g")
    assert res.exit_code == 0, res.output
    assert "sampler: DDIM, 50 steps (the pipeline's own default is 1000 ancestral DDPM steps" in res.output
    assert "generating: 50/50 steps (100%)" in res.output


# -- 9. Ctrl-C -----------------------------------------------------------------------------------------------------------

class _Finalizer:
    def __init__(self, exc):
        self.exc = exc

    def __del__(self):
        raise self.exc


def test_an_interrupt_in_a_finalizer_prints_nothing(monkeypatch):
    """filelock's weakref callback interrupted by Ctrl-C: Python reports it through sys.unraisablehook as 12 lines
    of "Exception ignored in functools.partial(...)"; during a command the interrupt is recorded and raised at the
    next batch instead, and nothing is printed."""
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", lambda info: reported.append(info.exc_type))
    _Finalizer(KeyboardInterrupt())  # outside a command: reported (the control)
    assert reported == [KeyboardInterrupt]
    with cli._terminate_cleanly():
        _Finalizer(KeyboardInterrupt())  # swallowed
        _Finalizer(ValueError("a real bug"))  # still reported
    assert reported == [KeyboardInterrupt, ValueError]
    _Finalizer(KeyboardInterrupt())  # the command's hook is gone afterwards
    assert reported == [KeyboardInterrupt, ValueError, KeyboardInterrupt]


def test_ctrl_c_after_the_report_says_it_was_written(tiny_ddpm, images_dir, tmp_path, monkeypatch):
    from memdetect.cli import scan as cli

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "render_scan", interrupted)
    out = tmp_path / "r.csv"
    res = invoke("scan", images_dir, "--model", "ddpm", "--model-path", tiny_ddpm, "-o", out, "--workers", 0)
    assert res.exit_code == 130
    (line,) = error_lines(res.output)
    assert "after the report was written" in line and str(out) in line and len(pd.read_csv(out)) == 5


# -- shell completion --------------------------------------------------------------------------------------------------

def test_shell_completion_script_and_completions(tmp_path):
    """``--show-completion`` prints the completion script for the console script's name (for the shell it runs under),
    and the completion protocol the script calls (``_MEMDETECT_COMPLETE``) completes commands and a command's
    options."""
    import os
    import subprocess

    import shlex
    import shutil

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # the script itself, whatever the parent process (click's protocol, what --show-completion prints)
    res = subprocess.run([sys.executable, "-m", "memdetect"], capture_output=True, text=True, timeout=120,
                         env={**env, "_MEMDETECT_COMPLETE": "source_bash"})
    assert res.returncode == 0, res.stderr
    assert "_MEMDETECT_COMPLETE=complete_bash" in res.stdout and "complete -o default -F" in res.stdout
    if shutil.which("bash"):  # --show-completion detects the shell it runs under (here bash; "; true": no exec)
        cmd = f"{shlex.quote(sys.executable)} -m memdetect --show-completion; true"
        shown = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120, env=env)
        assert shown.stdout.strip() == res.stdout.strip(), shown.stderr

    def complete(words: str, cword: int) -> list[str]:
        r = subprocess.run([sys.executable, "-m", "memdetect"], capture_output=True, text=True, timeout=120,
                           env={**env, "_MEMDETECT_COMPLETE": "complete_bash", "COMP_WORDS": words,
                                "COMP_CWORD": str(cword)})
        assert r.returncode == 0, r.stderr
        return r.stdout.split()

    assert complete("memdetect sc", 1) == ["scan"]
    assert {"calibrate", "audit", "generate", "bench"} <= set(complete("memdetect ", 1))
    assert "--model" in complete("memdetect scan --mo", 2)
    assert "--install-completion" in invoke("--help").output
