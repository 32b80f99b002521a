"""``calibrate --normalise reference``: scores of the pooled vector standardised with novel images' channel
statistics (issue 29, point 3), fitted and thresholded on disjoint halves of the reference."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from memdetect import Detector
from memdetect.workflows.calibrate import MIN_NORMALISE, split_reference
from memdetect.cli import app
from memdetect.config import load_config, tomllib
from memdetect.errors import UsageError
from memdetect.core.scores import standardise, std

from .conftest import write_images


def test_the_detector_scores_standardised_activations_and_keys_them(tiny_ddpm):
    det = Detector.from_pretrained("ddpm", str(tiny_ddpm))
    r = det.adapter.resolution
    x = torch.randint(0, 256, (4, 3, r, r), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    raw = det.features(x)
    plain_key = det.fingerprint
    stats = {"mean": raw.mean(0).tolist(), "std": (raw.std(0) + 0.1).tolist()}
    det.normalise = stats
    want = std(standardise(raw, torch.tensor(stats["mean"]), torch.tensor(stats["std"]))).numpy()
    np.testing.assert_allclose(det.score_tensor(x)["std"], want, rtol=1e-5)
    assert torch.equal(det.features(x), raw)  # features stay raw (evidence, channel statistics)
    assert det.settings.normalise.startswith("reference:") and det.fingerprint != plain_key
    det.normalise = {"mean": stats["mean"][:-1], "std": stats["std"][:-1]}
    with pytest.raises(UsageError, match="channels"):
        det.score_tensor(x)
    with pytest.raises(UsageError, match="non-negative"):
        det.normalise = {"mean": [0.0, 1.0], "std": [1.0, -1.0]}
    det.normalise = None
    assert det.fingerprint == plain_key


def test_the_reference_halves_are_seeded_disjoint_and_whole(tmp_path, monkeypatch):
    monkeypatch.setattr("memdetect.workflows.calibrate.MIN_NORMALISE", 20)  # the real floor is 200 images
    files = write_images(tmp_path / "ref", 25)
    a, b = split_reference([tmp_path / "ref"])
    assert (a, b) == split_reference([tmp_path / "ref"])
    assert not set(a) & set(b) and sorted(a + b) == sorted(files) and len(a) == 12
    with pytest.raises(UsageError, match="at least 20 reference images"):
        split_reference(files[:19])
    assert MIN_NORMALISE == 200


def test_calibrate_normalise_reference_end_to_end(tiny_ddpm, tmp_path, monkeypatch):
    monkeypatch.setattr("memdetect.workflows.calibrate.MIN_NORMALISE", 20)  # the real floor is 200 images
    write_images(tmp_path / "ref", 24)
    cfg = tmp_path / "memdetect.toml"
    res = CliRunner().invoke(app, ["calibrate", str(tmp_path / "ref"), "--model", "ddpm", "--model-path",
                                   str(tiny_ddpm), "--normalise", "reference", "-o", str(cfg), "-q",
                                   "--workers", "0"])
    assert res.exit_code == 0, res.output
    c = load_config(cfg)
    assert c.normalise == "reference" and c.channels is not None
    doc = tomllib.loads(cfg.read_text())
    assert doc["calibration"]["n_normalise"] == 12 and doc["calibration"]["n_reference"] == 12
    # the statistics are those of the fitting half, and the reference scores those of the other half under them
    fit, rest = split_reference([tmp_path / "ref"])
    det = Detector.from_pretrained("ddpm", str(tiny_ddpm))
    raw = det.scan(fit)
    assert raw["error"].isna().all()
    det.normalise = {"mean": c.channels["mean"], "std": c.channels["std"]}
    scored = det.scan(rest)
    np.testing.assert_allclose(sorted(scored["std"], reverse=True), c.references["std"].scores, rtol=1e-6)
    # a scan with the config scores the same way and says so
    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["scan", *map(str, rest[:3]), "-c", str(cfg), "-o", str(out), "-q",
                                   "--workers", "0"])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["settings"]["normalise"] == det.settings.normalise
    np.testing.assert_allclose([r["std"] for r in doc["rows"]], scored["std"][:3], rtol=1e-6)


@pytest.mark.parametrize("text,match", [('normalise = "zscore"', "must be one of none, reference"),
                                        ('normalise = "reference"', r"needs the reference statistics")])
def test_config_normalise_is_checked(tmp_path, text, match):
    cfg = tmp_path / "memdetect.toml"
    cfg.write_text(f'model = "demo"\nthreshold = 0.5\n{text}\n')
    with pytest.raises(UsageError, match=match):
        load_config(cfg)


def test_too_few_or_unknown_is_one_line_and_exit_2(tmp_path):
    write_images(tmp_path / "ref", 5)
    for extra in (["--normalise", "reference"], ["--normalise", "pool"]):
        res = CliRunner().invoke(app, ["calibrate", str(tmp_path / "ref"), "--model", "demo", "-o",
                                       str(tmp_path / "c.toml"), *extra])
        assert res.exit_code == 2, res.output
        lines = [ln for ln in res.output.splitlines() if ln.strip() and "MEMDETECT_DEBUG" not in ln]
        assert len(lines) == 1 and "normalise" in lines[0], res.output
