"""The adapter's capabilities (``memdetect.models.capabilities``): a family that implements only the scan (a
``ScanAdapter``) scans like a full ``Adapter`` over the same weights, and every other feature (generation, the guard,
``memdetect generate``, NeMo, the benchmarks) refuses it with one message that names the feature, the family and
what it lacks; the protocols are structural."""

from __future__ import annotations

import importlib
import re
import types

import pytest
from typer.testing import CliRunner

from memdetect.bench.generate import generate
from memdetect.cli import app
from memdetect.detector import Detector
from memdetect.errors import UnsupportedModelError
from memdetect.models import ADAPTERS, Adapter, ScanAdapter, register_adapter, require
from memdetect.models.capabilities import Conditioning, CrossAttention, Generation, Guarding, Scanning
from memdetect.workflows.guarding import adapter_for_pipeline, load_guardable

from .conftest import write_images


def _scan_only_class():
    toy = importlib.import_module(f"{__package__}.toy_family")

    class ScanOnlyToy(ScanAdapter):
        """The toy family's model (its methods), on the scan capability alone."""

        family = "toyscan"
        pipeline_classes = ("ToyScanPipeline",)
        load = classmethod(toy.ToyAdapter.load.__func__)
        default_layer = toy.ToyAdapter.default_layer
        encode = toy.ToyAdapter.encode
        predict_noise = toy.ToyAdapter.predict_noise

    return toy, register_adapter(ScanOnlyToy)


@pytest.fixture
def scan_only(tmp_path):
    """(the toy family's module, the scan-only class, a saved toy model folder); conftest restores ADAPTERS."""
    toy = importlib.reload(importlib.import_module(f"{__package__}.toy_family"))
    _, cls = _scan_only_class()
    return toy, cls, toy.save_toy(tmp_path / "model")


def test_a_family_with_only_the_scan_capability_scans(scan_only, tmp_path):
    toy, cls, folder = scan_only
    assert ADAPTERS["toyscan"] is cls and not issubclass(cls, Adapter)
    det = Detector.from_pretrained("toyscan", str(folder), device="cpu")
    full = Detector.from_pretrained("toy", str(folder), device="cpu")  # the full Adapter over the same weights
    assert isinstance(det.adapter, Scanning) and str(det.layer) == str(full.layer) == "body.3"
    write_images(tmp_path / "images", 4, size=(16, 16))
    frame = det.scan([tmp_path / "images"], num_workers=0)
    assert frame["error"].isna().all() and len(frame) == 4
    assert frame["std"].tolist() == pytest.approx(full.scan([tmp_path / "images"], num_workers=0)["std"].tolist())
    res = CliRunner().invoke(app, ["layers", "--model", "toyscan", "--model-path", str(folder), "--device", "cpu"],
                             env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "body.3" in res.output and "<- default" in res.output, res.output
    res = CliRunner().invoke(app, ["scan", str(tmp_path / "images"), "--model", "toyscan", "--model-path",
                                   str(folder), "--device", "cpu", "--workers", "0", "--output",
                                   str(tmp_path / "r.csv")])
    assert res.exit_code == 0, res.output


def test_every_other_feature_names_the_capability_a_scan_only_family_lacks(scan_only, tmp_path):
    _, cls, folder = scan_only
    adapter = Detector.from_pretrained("toyscan", str(folder), device="cpu", prune=False).adapter
    lacks = re.escape("does not support toyscan models (ScanOnlyToy): the adapter has no")
    with pytest.raises(UnsupportedModelError, match=rf"^generation {lacks} generation \(sample, decode\)$"):
        generate(adapter, [1, 2])
    with pytest.raises(UnsupportedModelError, match=rf"^memdetect.guard {lacks} diffusers pipelines"):
        adapter_for_pipeline(type("ToyScanPipeline", (), {})())
    with pytest.raises(UnsupportedModelError, match=rf"^memdetect generate {lacks} diffusers pipelines"):
        load_guardable("toyscan", str(folder), device="cpu")
    with pytest.raises(UnsupportedModelError, match=rf"^NeMo {lacks} text cross-attention value layers"):
        require(adapter, CrossAttention, "NeMo")
    with pytest.raises(UnsupportedModelError, match=rf"^x {lacks} conditions \(encode_condition\)"):
        require(cls, Conditioning, "x")  # a class is checked as well as an instance
    with pytest.raises(UnsupportedModelError, match=r"^the Detector does not support a object: .* no scanning"):
        Detector(object())
    # the command line: one line, exit code 2 (an error), no traceback
    train = tmp_path / "train"
    write_images(train, 2, size=(16, 16))
    res = CliRunner().invoke(app, ["bench", "cifar10", "--model", "toyscan", "--model-path", str(folder),
                                   "--train-dir", str(train), "--num-samples", "2", "--device", "cpu", "--output",
                                   str(tmp_path / "bench")], env={"COLUMNS": "200"})
    assert res.exit_code == 2 and "bench cifar10 does not support toyscan models" in res.output, res.output
    assert "Traceback" not in res.output


def test_full_adapters_keep_their_own_refusals(tiny_ddpm):
    """``Adapter`` has every capability; where a family does not implement one, its default refuses as before."""
    det = Detector.from_pretrained("ddpm", str(tiny_ddpm), device="cpu", prune=False)
    for capability in (Scanning, Conditioning, CrossAttention, Guarding, Generation):
        assert require(det.adapter, capability, "x") is det.adapter
        assert require(type(det.adapter), capability, "x") is type(det.adapter)
    with pytest.raises(UnsupportedModelError, match="ddpm models have no text cross-attention"):
        require(det.adapter, CrossAttention, "NeMo").cross_attention_values()


def test_the_protocols_are_structural():
    """A class with the members passes without inheriting the mixins; one member missing fails."""
    members = dict(sampling_steps=10, sampler="mine", sample=lambda self, seeds, **kw: None,
                   decode=lambda self, x0: x0)
    assert isinstance(type("Mine", (), members)(), Generation)
    assert not isinstance(type("Half", (), {k: v for k, v in members.items() if k != "decode"})(), Generation)
    assert isinstance(types.SimpleNamespace(cross_attention_values=dict), CrossAttention)
