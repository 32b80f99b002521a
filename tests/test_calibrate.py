"""Calibration: the FPR rule (ties, tiny sets), the ROC point, memdetect.toml, and `scan/audit --config`."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from memdetect.workflows.calibrate import allowed_flags, calibrate, fpr_threshold, roc_point
from memdetect.cli import app
from memdetect.config import Config, load_config, to_toml, tomllib
from memdetect.config import combine as merge
from memdetect.errors import InputError, UsageError

from .conftest import REPO, write_images

runner = CliRunner()


def invoke(*args, **kw):
    return runner.invoke(app, [str(a) for a in args], **kw)


# -- the rule ----------------------------------------------------------------------------------------------------
def test_fpr_threshold_examples():
    s = np.arange(1.0, 101.0)
    t = fpr_threshold(s, 0.05)
    assert 95 < t < 95.0001 and (s >= t).sum() == 5
    assert (s >= fpr_threshold(s, 0.0)).sum() == 0 and fpr_threshold(s, 0.0) > 100
    assert (s >= fpr_threshold(s, 0.29)).sum() == 29  # 0.29 * 100 = 28.999... in binary
    assert allowed_flags(50, 0.01) == 0
    # ties at the cut stay unflagged, even if that flags fewer than allowed
    tied = np.array([1.0, 2.0, 3.0, 3.0, 3.0, 3.0])
    assert (tied >= fpr_threshold(tied, 0.5)).sum() == 0
    assert (tied >= fpr_threshold(tied, 0.7)).sum() == 4  # m = 4: the tie is below the cut
    with pytest.raises(UsageError, match="fpr"):
        fpr_threshold(s, 1.0)
    with pytest.raises(InputError):
        fpr_threshold([], 0.1)


@pytest.mark.parametrize("seed", range(20))
def test_fpr_threshold_is_the_smallest_that_keeps_the_rate(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    s = rng.integers(0, 8, n).astype(np.float64) / 4  # many ties
    fpr = float(rng.uniform(0, 0.99))
    t = fpr_threshold(s, fpr)
    m = math.floor(fpr * n + 1e-9)
    assert (s >= t).sum() <= m  # at most fpr of the reference flagged
    assert (s >= np.nextafter(t, -np.inf)).sum() > m  # any smaller threshold flags too many


def test_roc_point_matches_the_rates_at_the_threshold():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    neg, pos = rng.normal(0, 1, 300), rng.normal(1.5, 1, 80)
    t = fpr_threshold(neg, 0.1)
    p = roc_point(neg, pos, t)
    assert p["roc_fpr"] == pytest.approx((neg >= t).mean()) and p["roc_fpr"] <= 0.1
    assert p["tpr"] == pytest.approx((pos >= t).mean())
    assert p["auroc"] == pytest.approx(roc_auc_score(np.r_[np.zeros(300), np.ones(80)], np.r_[neg, pos]))
    table = calibrate(pd.DataFrame({m: neg for m in ("std", "l4l2", "entropy", "maxmin")}), 0.1,
                      pd.DataFrame({m: pos for m in ("std", "l4l2", "entropy", "maxmin")}))
    assert list(table["metric"]) == ["std", "l4l2", "entropy", "maxmin"]
    assert (table["fpr_reference"] <= 0.1).all() and table["tpr"].iloc[0] == pytest.approx(p["tpr"])


# -- the config file ---------------------------------------------------------------------------------------------
def test_toml_writer_round_trips_awkward_values():
    doc = {"a": 'quote " back \\ tab \t nl \n del \x7f bell \x07 ünï 🙂', "b": 0.1, "c": 1e-300, "d": -3, "e": True,
           "f": ["x", "y"], "g": float("inf"), "t": {"sub key": 1.5, "inner": {"z": "w"}}, "skip": None}
    back = tomllib.loads(to_toml(doc, "header\nline two"))
    assert back == {k: v for k, v in doc.items() if k != "skip"}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_load_config_validates_with_one_line_errors(tmp_path):
    ok = _write(tmp_path / "ok.toml", 'model = "demo"\nthreshold = 1\nmodel_path = "w"\n'
                                      '[calibration.thresholds]\nl4l2 = 0.25\n')
    cfg = load_config(ok)
    assert cfg.threshold == 1.0 and cfg.metric == "std" and cfg.seed == 0 and cfg.layer is None
    assert cfg.model_path == str(tmp_path.resolve() / "w")  # relative to the config file
    assert cfg.threshold_for("l4l2") == 0.25
    with pytest.raises(UsageError, match="no threshold for metric 'maxmin'"):
        cfg.threshold_for("maxmin")
    bad = {
        'model = "demo"\ntreshold = 1\n': "unknown key 'treshold'",
        'model = "demo"\n': "has no 'threshold'",
        'threshold = 1.0\n': "has no 'model'",
        'model = "demo"\nthreshold = "high"\n': "threshold in .* must be a number",
        'model = "demo"\nthreshold = 1\ntimestep = 5.5\n': "timestep in .* must be an integer",
        'model = "demo"\nthreshold = 1\nmetric = "l3"\n': "unknown metric 'l3'",
        'model = "demo"\nthreshold = 1\nversion = 7\n': "config version 7",
        'model = "demo\n': "not valid TOML",
    }
    for i, (text, needle) in enumerate(bad.items()):
        with pytest.raises(UsageError, match=needle):
            load_config(_write(tmp_path / f"b{i}.toml", text))
    with pytest.raises(UsageError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_merge_pins_the_calibrated_settings():
    cfg = Config(model="demo", threshold=0.6, layer="up_blocks.0.resnets.2.conv2:in", timestep=50, seed=0,
                 thresholds={"maxmin": 3.5}, path=Path("memdetect.toml"))
    flags = dict(model="demo", model_path=None, layer=None, timestep=None, sigma=None, metric="std", threshold=None,
                 seed=0)
    s = merge(cfg, flags, set())
    assert (s["model"], s["layer"], s["timestep"], s["threshold"], s["metric"]) == (
        "demo", "up_blocks.0.resnets.2.conv2:in", 50, 0.6, "std")
    assert merge(cfg, dict(flags, metric="maxmin"), {"metric"})["threshold"] == 3.5
    assert merge(cfg, dict(flags, threshold=0.9), {"threshold"})["threshold"] == 0.9
    assert merge(cfg, dict(flags, model_path="/w"), {"model_path"})["model_path"] == "/w"
    assert merge(cfg, dict(flags, timestep=50), {"timestep"})["timestep"] == 50  # the same value is fine
    for key, value in [("layer", "down_blocks.0"), ("timestep", 100), ("seed", 3), ("model", "sd14")]:
        with pytest.raises(UsageError, match=f"--{key} .* differs from {key} = .* in memdetect.toml"):
            merge(cfg, dict(flags, **{key: value}), {key})
    assert merge(None, flags, set()) == flags


# -- the commands ------------------------------------------------------------------------------------------------
def test_calibrate_writes_a_config_that_scan_uses(tiny_ddpm, tmp_path):
    ref = tmp_path / "ref"
    write_images(ref, 10, seed=3)
    (ref / "broken.png").write_bytes(b"")
    mem = tmp_path / "mem"
    write_images(mem, 4, seed=4)
    cfg = tmp_path / "memdetect.toml"
    res = invoke("calibrate", ref, "--model", "ddpm", "--model-path", tiny_ddpm, "--fpr", "0.2", "--memorized", mem,
                 "-o", cfg, "--workers", 0)
    assert res.exit_code == 0, res.output
    assert "ROC point of std" in res.output and "wrote" in res.output
    doc = tomllib.loads(cfg.read_text())
    assert doc["model"] == "ddpm" and not Path(doc["model_path"]).is_absolute()  # relative to the config file
    assert (cfg.parent / doc["model_path"]).resolve() == Path(tiny_ddpm).resolve()
    assert doc["layer"] == "up_blocks.0.resnets.2.conv2:in" and doc["timestep"] == 50 and doc["seed"] == 0
    cal = doc["calibration"]
    assert cal["n_reference"] == 10 and cal["n_errored"] == 1 and cal["fpr"] == 0.2 and cal["n_memorized"] == 4
    assert set(cal["thresholds"]) == set(cal["tpr"]) == set(cal["auroc"]) == {"std", "l4l2", "entropy", "maxmin"}
    assert doc["threshold"] == cal["thresholds"]["std"] and doc["versions"]["memdetect"]

    # rescanning the reference with the config flags floor(0.2 * 10) = 2 of its 10 images
    out = tmp_path / "r.csv"
    res = invoke("scan", ref, "--config", cfg, "-o", out, "--workers", 0)
    assert res.exit_code == 1, res.output
    df = pd.read_csv(out)
    assert df["memorized"].sum() == 2 and df["error"].notna().sum() == 1
    # --metric picks that metric's calibrated threshold
    res = invoke("scan", ref, "--config", cfg, "--metric", "maxmin", "-o", out, "--workers", 0)
    assert pd.read_csv(out)["memorized"].sum() == 2 and "maxmin >=" in res.output

    # a flag that contradicts the calibrated settings is refused before any image is read
    res = invoke("scan", ref, "--config", cfg, "--timestep", "10")
    assert res.exit_code == 2 and "differs from timestep = 50" in res.output
    # an existing config is not overwritten by accident
    res = invoke("calibrate", ref, "--model", "ddpm", "--model-path", tiny_ddpm, "-o", cfg)
    assert res.exit_code == 2 and "--force" in res.output


def test_calibrate_usage_errors(tiny_ddpm, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_text("not an image")
    res = invoke("calibrate", bad, "--model", "ddpm", "--model-path", tiny_ddpm, "-o", tmp_path / "c.toml")
    assert res.exit_code == 2 and "none of the reference images could be scored" in res.output
    res = invoke("calibrate", bad, "--fpr", "1.5", "-o", tmp_path / "c.toml")
    assert res.exit_code == 2 and "--fpr must be in [0, 1)" in res.output
    assert not (tmp_path / "c.toml").exists()


def test_audit_on_the_demo_examples_flags_the_memorized_ones(tmp_path, monkeypatch):
    """The issue's acceptance test: calibrate on held-out novel generations, audit the examples, exit 1, names."""
    monkeypatch.chdir(tmp_path)
    res = invoke("calibrate", REPO / "examples" / "demo-reference", "--model", "demo", "--fpr", "0.01",
                 "--workers", 0)
    assert res.exit_code == 0, res.output
    res = invoke("audit", REPO / "examples" / "demo", "--config", "memdetect.toml", "--junit", "junit.xml",
                 "--summary-json", "summary.json", "--workers", 0, env={"GITHUB_ACTIONS": "false"})
    assert res.exit_code == 1, res.output
    memorized = sorted(p.name for p in (REPO / "examples" / "demo").glob("mem_*.png"))
    flagged = re.findall(r"flagged: \S*/(\S+\.png)", res.output)
    assert sorted(flagged) == memorized and len(memorized) == 20  # every memorized image named, no generalized one
    doc = json.loads(Path("summary.json").read_text())
    assert doc["exit_code"] == 1 and doc["flagged"] == 20 and doc["scored"] == 40 and doc["config"] == "memdetect.toml"
    assert sorted(Path(f["path"]).name for f in doc["flagged_images"]) == memorized
    assert Path(".memdetect/report.csv").exists() and Path(".memdetect/.gitignore").exists()
    assert 'failures="20"' in Path("junit.xml").read_text()
