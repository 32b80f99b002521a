"""Portable configs (issue 32): a committed memdetect.toml names presets by name, local model folders by their path
relative to the config file, and the weights by their content hash; it holds no absolute path of the machine, and it
still drives `scan --config` after the config and its model folder move together."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from memdetect.cli import app
from memdetect.config import load_config

from .conftest import write_images

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def strings(doc) -> list[str]:
    """Every string value of a parsed TOML document."""
    if isinstance(doc, dict):
        return [s for v in doc.values() for s in strings(v)]
    if isinstance(doc, list):
        return [s for v in doc for s in strings(v)]
    return [doc] if isinstance(doc, str) else []


def assert_portable(toml: Path, *machine_paths: Path) -> dict:
    text = toml.read_text()
    doc = tomllib.loads(text)
    absolute = [s for s in strings(doc) if os.path.isabs(s) or s.startswith("~")]
    assert not absolute, absolute
    for p in machine_paths:
        assert str(p) not in text
    return doc


@pytest.mark.parametrize("how", ["model-path", "model-dir"])
def test_config_moved_with_its_model_folder_still_drives_scan(tiny_ddpm, tmp_path, monkeypatch, how):
    a = tmp_path / "project-a"
    shutil.copytree(tiny_ddpm, a / "weights" / "ddpm")
    write_images(a / "reference", 12, size=(32, 32))
    write_images(tmp_path / "new", 3, size=(32, 32), seed=1)
    monkeypatch.chdir(tmp_path)  # the model is given relative to the working directory, not to the config
    model = (["--model", "ddpm", "--model-path", "project-a/weights/ddpm"] if how == "model-path"
             else ["--model", "project-a/weights/ddpm"])
    res = invoke("calibrate", "project-a/reference", *model, "--fpr", "0.1", "--output", a / "memdetect.toml",
                 "--workers", 0, "--quiet")
    assert res.exit_code == 0, res.output
    doc = assert_portable(a / "memdetect.toml", tmp_path, tiny_ddpm)
    assert doc["model"] == "ddpm" and doc["model_path"] == "weights/ddpm"  # the family, the folder beside the file
    assert doc["calibration"]["source"] == "weights/ddpm"
    assert doc["calibration"]["weights"].startswith("files:")

    b = tmp_path / "elsewhere" / "project-b"
    b.parent.mkdir()
    shutil.move(a, b)  # the config and its model folder move together (a clone on another machine)
    assert load_config(b / "memdetect.toml").model_path == str((b / "weights" / "ddpm").resolve())
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    res = invoke("scan", tmp_path / "new", "--config", b / "memdetect.toml", "--output", tmp_path / "r.csv",
                 "--workers", 0, "--quiet", "--state-dir", tmp_path / "state")
    assert res.exit_code in (0, 1), res.output
    report = pd.read_csv(tmp_path / "r.csv")
    assert len(report) == 3 and report["error"].isna().all() and report["memorized"].notna().all()

    # identity: other weights under the same folder name are refused, with the fix
    toml = b / "memdetect.toml"
    toml.write_text(toml.read_text().replace(doc["calibration"]["weights"], "files:" + "0" * 64))
    res = invoke("scan", tmp_path / "new", "--config", toml, "--workers", 0, "--quiet", "--state-dir",
                 tmp_path / "state")
    assert res.exit_code == 2 and "not the ones" in res.output and "recalibrate" in res.output, res.output


def test_preset_config_names_the_preset(tmp_path):
    write_images(tmp_path / "reference", 12, size=(32, 32))
    res = invoke("calibrate", tmp_path / "reference", "--model", "demo", "--fpr", "0.1", "--output",
                 tmp_path / "cfg" / "memdetect.toml", "--workers", 0, "--quiet")
    assert res.exit_code == 0, res.output
    import memdetect

    doc = assert_portable(tmp_path / "cfg" / "memdetect.toml", tmp_path, Path(memdetect.__file__).parent)
    assert doc["model"] == "demo" and "model_path" not in doc and doc["calibration"]["source"] == "preset demo"
    assert doc["calibration"]["reference"] == ["../reference"]
