"""Adding a model family: one adapter file (``tests/toy_family.py``) plus one preset row, registered at test time,
and every command works with it; the ``memdetect.adapters`` entry-point group; the protocol's family table."""

from __future__ import annotations

import importlib
import importlib.metadata
import shutil

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from memdetect import models
from memdetect.cli import app
from memdetect.detector import Detector
from memdetect.errors import UnsupportedModelError
from memdetect.models import ADAPTERS, PRESETS, Preset, register_adapter, register_preset
from memdetect.workflows.scan import scan

from .conftest import write_images

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


@pytest.fixture
def toy_family():
    """The toy family's adapter file, imported (its decorator registers the family, as any adapter file's does);
    the autouse fixture of conftest takes it out of the table again after the test."""
    return importlib.reload(importlib.import_module(f"{__package__}.toy_family"))


@pytest.fixture
def toy(toy_family, tmp_path):
    """The toy family registered and its preset row added; returns the model folder."""
    folder = toy_family.save_toy(tmp_path / "toy-model")
    register_preset(Preset("toy-demo", "toy", str(folder), note="a family added at test time"))
    return folder


@pytest.fixture(autouse=True)
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_new_family_scans_lists_and_benchmarks_with_no_other_change(toy, toy_family, tmp_path):
    assert ADAPTERS["toy"] is toy_family.ToyAdapter and "toy-demo" in PRESETS
    # models and layers
    res = invoke("models")
    assert res.exit_code == 0 and "toy-demo" in res.output and "toy" in res.output.split("families")[-1]
    res = invoke("layers", "--model", "toy-demo", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert "body.3" in res.output and "<- default" in res.output
    # scan: the library and the command line, by preset and by family + folder
    images = tmp_path / "images"
    write_images(images, 5, size=(16, 16))
    result = scan(Detector.from_pretrained("toy-demo", device="cpu"), [images], output=tmp_path / "r.csv")
    assert result.settings.family == "toy" and result.counts == {"images": 5, "scored": 5, "errored": 0,
                                                                  "flagged": 0}
    res = invoke("scan", images, "--model", "toy", "--model-path", toy, "--threshold", "-1", "--output",
                 tmp_path / "cli.csv", "--workers", "0", "--device", "cpu")
    assert res.exit_code == 1, res.output  # every image flagged at threshold -1
    assert pd.read_csv(tmp_path / "cli.csv")["std"].tolist() == pytest.approx(result.frame["std"].tolist())
    # a benchmark (unconditional: cifar10): generate with the protocol's sampler, label, score, tabulate
    train = tmp_path / "train"
    write_images(train, 3, size=(16, 16))
    out = tmp_path / "bench"
    args = ["bench", "cifar10", "--model", "toy-demo", "--train-dir", train, "--num-samples", "4", "--batch-size", "2",
            "--steps", "3", "--device", "cpu", "--output", out, "--min-memorized", "1"]
    res = invoke(*args)
    assert res.exit_code == 2 and "0 memorized" in res.output, res.output  # random training images: none memorized
    shutil.copy(out / "images" / "sample-000002.png", train / "copy.png")
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    results = pd.read_csv(out / "results.csv")
    assert "ours_std" in set(results["method"]) and (results["n_memorized"] == 1).all()
    # the class-conditional benchmark refuses it, by the protocol's conditioning, not by its name
    res = invoke("bench", "imagenet", "--model", "toy-demo", "--train-dir", train, "--output", tmp_path / "o",
                 "--device", "cpu")
    assert res.exit_code == 2 and "needs a model that is class-conditional" in res.output


def test_the_family_table_comes_back_after_a_test():
    assert "toy" not in ADAPTERS and "toy-demo" not in PRESETS  # the autouse fixture restored both tables


def test_entry_point_group_registers_third_party_adapters(monkeypatch, caplog):
    eps = [importlib.metadata.EntryPoint(name="toy", value="tests.toy_family:ToyAdapter", group="memdetect.adapters"),
           importlib.metadata.EntryPoint(name="broken", value="tests.toy_family:save_toy", group="memdetect.adapters")]
    monkeypatch.setattr(models, "entry_points", lambda group: [e for e in eps if e.group == group])
    assert models.load_entry_points() == ["toy"]  # the broken one is skipped with a warning
    assert ADAPTERS["toy"].__name__ == "ToyAdapter" and "broken" in caplog.text


def test_unknown_family_names_itself_and_registration_checks_the_class():
    with pytest.raises(UnsupportedModelError, match="no adapter for family 'nope'.*ddpm"):
        models.adapter_class("nope")
    with pytest.raises(TypeError, match="not an Adapter subclass"):
        register_adapter(dict)


def test_family_detection_reads_the_adapters_pipeline_classes(toy_family, tmp_path):
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text('{"_class_name": "ToyPipeline"}')
    with pytest.raises(UnsupportedModelError, match="ToyPipeline"):
        models.detect_family(str(tmp_path / "pipe"))
    toy_family.ToyAdapter.pipeline_classes = ("ToyPipeline",)
    try:
        assert models.detect_family(str(tmp_path / "pipe")) == "toy"
    finally:
        toy_family.ToyAdapter.pipeline_classes = ()
