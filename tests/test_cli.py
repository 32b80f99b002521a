"""The CLI end to end: typer's CliRunner in-process, and the installed console script in a subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from memdetect.cli import app

from .conftest import write_images

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("family", ["sd", "dit", "ddpm"])
@pytest.mark.parametrize("suffix", [".csv", ".json", ".parquet"])
def test_scan_writes_report(family, suffix, tiny_sd, tiny_dit, tiny_ddpm, images_dir, tmp_path):
    path = {"sd": tiny_sd, "dit": tiny_dit, "ddpm": tiny_ddpm}[family]
    out = tmp_path / f"r{suffix}"
    res = invoke("scan", images_dir, "--model", family, "--model-path", path, "--output", out, "--workers", 0)
    assert res.exit_code == 0, res.output
    if suffix == ".csv":
        df = pd.read_csv(out)
    elif suffix == ".json":
        doc = json.loads(out.read_text())
        assert doc["settings"]["family"] == family and doc["settings"]["timestep"] == 50
        df = pd.DataFrame(doc["rows"])
    else:
        df = pd.read_parquet(out)
    assert len(df) == 5
    for c in ["path", "score", "std", "l4l2", "entropy", "maxmin", "memorized", "error"]:
        assert c in df.columns
    assert df[["score", "std", "l4l2", "entropy", "maxmin"]].notna().all().all()
    assert (df["score"] == df["std"]).all()
    assert df["memorized"].isna().all()  # no threshold, no flag
    assert list(df["path"]) == sorted(df["path"])


def test_exit_codes_follow_the_threshold(tiny_ddpm, images_dir, tmp_path):
    base = ["scan", images_dir, "--model", "ddpm", "--model-path", tiny_ddpm, "--workers", 0]
    res = invoke(*base, "--threshold", "-1", "--output", tmp_path / "all.csv")
    assert res.exit_code == 1, res.output
    assert pd.read_csv(tmp_path / "all.csv")["memorized"].all()
    assert "5 flagged memorized" in res.output
    res = invoke(*base, "--threshold", "1e9", "--metric", "maxmin")
    assert res.exit_code == 0, res.output
    assert "0 flagged" in res.output


def test_bad_files_become_error_rows(tiny_ddpm, images_dir, tmp_path):
    (images_dir / "broken.png").write_bytes(b"this is not a png")
    (images_dir / "empty.jpg").write_bytes(b"")
    out = tmp_path / "r.csv"
    res = invoke("scan", images_dir, "--model", "ddpm", "--model-path", tiny_ddpm, "-o", out, "--workers", 0)
    assert res.exit_code == 0, res.output
    df = pd.read_csv(out)
    assert len(df) == 7
    errs = df.set_index(df["path"].map(os.path.basename))["error"]
    assert errs["broken.png"] == "not a recognised image format"
    assert errs["empty.jpg"] == "empty file (0 bytes)"
    assert "5 scored, 2 errored" in res.output


@pytest.mark.parametrize("args,needle", [
    (["--metric", "nope"], "unknown metric 'nope'"),
    (["--timestep", "5000"], "timestep 5000"),
    (["--layer", "no.such.layer"], "not a module"),
    (["--output", "r.txt"], "report format '.txt'"),
    (["--dtype", "float8"], "unknown dtype"),
    (["--batch-size", "0"], "batch size"),
])
def test_bad_flags_exit_2_with_one_line(args, needle, tiny_ddpm, images_dir):
    res = invoke("scan", images_dir, "--model", "ddpm", "--model-path", tiny_ddpm, *args)
    assert res.exit_code == 2, res.output
    assert needle in res.output
    assert "Traceback" not in res.output


def test_missing_model_and_paths_exit_2(images_dir, tmp_path):
    res = invoke("scan", images_dir, "--model", "sd14", "--model-path", tmp_path / "missing")
    assert res.exit_code == 2 and "does not exist" in res.output and "Traceback" not in res.output
    res = invoke("scan", tmp_path / "no-such-dir", "--model", "sd14", "--model-path", tmp_path / "missing")
    assert res.exit_code == 2
    res = invoke("scan", images_dir, "--model", "nope")
    assert res.exit_code == 2 and "unknown model" in res.output


def test_no_images_exit_2(tiny_ddpm, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    res = invoke("scan", empty, "--model", "ddpm", "--model-path", tiny_ddpm)
    assert res.exit_code == 2 and "no image files" in res.output


def test_models_and_layers(tiny_sd, tiny_ddpm):
    res = runner.invoke(app, ["models"], env={"COLUMNS": "250"})
    assert res.exit_code == 0 and "sd14" in res.output and "demo" in res.output
    # sigma at the default timestep, per schedule: computed, and what the loaded weights' scheduler gives
    from memdetect import Detector
    from memdetect.models.presets import LINEAR, SCALED_LINEAR, schedule_sigma

    sd = Detector.from_pretrained("sd", str(tiny_sd), device="cpu", dtype="float32").adapter  # scaled-linear
    ddpm = Detector.from_pretrained("ddpm", str(tiny_ddpm), device="cpu", dtype="float32").adapter  # linear
    assert schedule_sigma(SCALED_LINEAR, 50) == pytest.approx(sd.sigma(50), rel=1e-6)
    assert schedule_sigma(LINEAR, 50) == pytest.approx(ddpm.sigma(50), rel=1e-6)
    assert round(sd.sigma(50), 3) == 0.226 and round(ddpm.sigma(50), 3) == 0.176
    rows = {line.split()[1]: line for line in res.output.splitlines() if line.startswith("│ ")}
    assert "0.226 (scaled_linear)" in rows["sd14"] and "0.176 (linear)" in rows["dit"]
    res = runner.invoke(app, ["layers", "--model", "sd", "--model-path", str(tiny_sd), "--filter",
                              "up_blocks.0.resnets.2"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "up_blocks.0.resnets.2.nonlinearity@2" in res.output
    assert "up_blocks.0.resnets.2.nonlinearity@1" in res.output  # the time-embedding call


def test_console_script_subprocess(tiny_ddpm, tmp_path):
    write_images(tmp_path / "imgs", 3)
    out = tmp_path / "r.csv"
    cmd = [sys.executable, "-m", "memdetect", "scan", str(tmp_path / "imgs"), "--model", "ddpm", "--model-path",
           str(tiny_ddpm), "--output", str(out), "--threshold", "-1", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert len(pd.read_csv(out)) == 3
    proc = subprocess.run([sys.executable, "-m", "memdetect", "scan", str(tmp_path), "--metric", "bad"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.count("memdetect: error:") == 1 and "Traceback" not in proc.stderr


def test_an_unexpected_exception_is_an_internal_error_and_never_exit_1(tiny_ddpm, images_dir, monkeypatch):
    from memdetect.workflows import scan as scan_mod
    def bug(*args, **kwargs):
        raise ValueError("an index was off by one")  # a bug raising ValueError is not the user's mistake

    monkeypatch.setattr(scan_mod, "scan", bug)
    args = ["scan", images_dir, "--model", "ddpm", "--model-path", tiny_ddpm, "--workers", 0]
    res = invoke(*args)
    assert res.exit_code == 2, res.output
    assert "memdetect: internal error: ValueError: an index was off by one" in res.output
    assert "a bug in memdetect" in res.output and "MEMDETECT_DEBUG=1" in res.output and "Traceback" not in res.output
    monkeypatch.setenv("MEMDETECT_DEBUG", "1")
    res = invoke(*args)
    assert res.exit_code == 2 and "Traceback" in res.output and "off by one" in res.output
    # a known error with MEMDETECT_DEBUG=1: the traceback too, and still exit 2 (1 means "flagged")
    res = invoke("scan", images_dir, "--model", "nope")
    assert res.exit_code == 2 and "Traceback" in res.output and "memdetect: error: unknown model" in res.output


def test_commands_pass_their_options_to_the_library(tiny_ddpm, images_dir, tmp_path, monkeypatch):
    """The CLI parses and calls one library function; its keyword arguments are the options."""
    from memdetect.workflows import calibrate as calibrate_mod
    from memdetect.workflows import ci
    from memdetect.workflows import scan as scan_mod
    from memdetect.errors import InputError

    calls = {}

    def record(name):
        def fn(det, paths, **kwargs):
            calls[name] = (det, list(paths), kwargs)
            raise InputError("stop here")
        return fn

    monkeypatch.setattr(scan_mod, "scan", record("scan"))
    monkeypatch.setattr(calibrate_mod, "calibrate_paths", record("calibrate"))
    monkeypatch.setattr(ci, "audit", record("audit"))
    base = ["--model", "ddpm", "--model-path", tiny_ddpm, "--workers", 1]
    assert invoke("scan", images_dir, *base, "--output", tmp_path / "r.json", "--no-resume", "--html",
                  tmp_path / "r.html", "--seed", 3, "--threshold", 0.5).exit_code == 2
    det, paths, kw = calls["scan"]
    assert paths == [images_dir] and det.seed == 3 and det.threshold == 0.5
    assert kw["output"] == tmp_path / "r.json" and kw["resume"] is False and kw["html"] == tmp_path / "r.html"
    assert kw["num_workers"] == 1 and callable(kw["on_batch"])
    assert kw["state_dir"] == Path(os.environ["MEMDETECT_STATE_DIR"])  # --state-dir's environment variable
    assert invoke("calibrate", images_dir, *base, "--fpr", 0.05, "--memorized", images_dir, "-o",
                  tmp_path / "c.toml").exit_code == 2
    det, paths, kw = calls["calibrate"]
    assert paths == [images_dir] and kw["fpr"] == 0.05 and kw["memorized"] == [images_dir]
    assert kw["output"] == tmp_path / "c.toml" and kw["model"] == "ddpm" and kw["model_path"] == tiny_ddpm
    monkeypatch.chdir(tmp_path)
    assert invoke("audit", images_dir, *base, "--threshold", 1, "--junit", "j.xml", "--annotations", "none",
                  "--metric", "maxmin").exit_code == 2
    det, paths, kw = calls["audit"]
    assert det.metric == "maxmin" and det.threshold == 1
    assert kw["junit"] == Path("j.xml") and kw["annotations"] == "none" and kw["output"] == Path(".memdetect/report.csv")
    assert kw["resume"] is False  # an audit resumes only when asked to
    assert invoke("audit", images_dir, *base, "--threshold", 1, "--resume", "--state-dir", tmp_path / "st").exit_code == 2
    # the state directory checked before the model load (memdetect.store.state.StateDir.check_trusted) and handed on
    assert calls["audit"][2]["resume"] is True and calls["audit"][2]["state_dir"].path == tmp_path / "st"
