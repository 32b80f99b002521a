"""The in-generation guard uses a memdetect.toml's configuration (issue 29): the layer, timestep, metric and reference
normalisation that ``calibrate`` / ``calibrate --select-layer`` wrote, through ``memdetect.guard(config=...)``,
``calibrate --guard --config`` and ``generate --guard --config``; on the tiny DDPM."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import memdetect
from memdetect.core.capture import Trace, pool
from memdetect.cli import app
from memdetect.config import load_config, to_toml, tomllib
from memdetect.errors import UsageError
from memdetect.core.scores import SCORES, standardise

LAYER = "down_blocks.0.resnets.1"  # not the family default (an up-block input): the file must be what is read
STEP = 200


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def selected_toml(path, model_path, channels: int = 8, normalise: bool = True) -> dict:
    """A scan configuration as ``calibrate --select-layer`` writes one: a non-default layer, t=200, maxmin, reference
    normalised with [calibration.channels] (statistics of the test's own making)."""
    rng = np.random.default_rng(0)
    doc = {"version": 1, "model": "ddpm", "model_path": str(model_path), "layer": LAYER, "timestep": STEP,
           "seed": 0, "metric": "maxmin", "threshold": 3.0,
           "calibration": {"thresholds": {"maxmin": 3.0}},
           "selection": {"decision": "selected", "chosen": {"layer": LAYER, "timestep": STEP, "metric": "maxmin",
                                                            "sign": 1, "normalise": "reference"}}}
    stats = {"mean": rng.normal(0, 0.1, channels).tolist(), "std": rng.uniform(0.5, 2.0, channels).tolist()}
    if normalise:
        doc["normalise"] = "reference"
        doc["calibration"]["channels"] = stats
    path.write_text(to_toml(doc), encoding="utf-8")
    return stats


class Spy:
    def __init__(self, module):
        self.calls, self.module = [], module

    def __enter__(self):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["sample"]
            t = args[1] if len(args) > 1 else kwargs["timestep"]
            self.calls.append((x.detach().clone(), int(torch.as_tensor(t).reshape(-1)[0])))

        self.handle = self.module.register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_the_guard_reads_the_files_layer_step_metric_and_normalisation(ddpm_pipe, tiny_ddpm, tmp_path):
    toml = tmp_path / "memdetect.toml"
    stats = selected_toml(toml, tiny_ddpm)
    g = memdetect.guard(ddpm_pipe, config=toml)
    assert str(g.layer) == LAYER and g.step_t == STEP and g.metric == "maxmin"
    assert g.threshold is None  # a scan threshold is not an in-generation one
    with Spy(ddpm_pipe.unet) as spy:
        out = g(batch_size=3, num_inference_steps=10, generator=torch.Generator().manual_seed(0), output_type="np")
    r = out.guard
    assert r.layer == LAYER and r.metric == "maxmin" and r.normalise == "reference"
    assert r.timestep == min((t for _, t in spy.calls), key=lambda t: abs(t - STEP))
    # independent reference: the layer at that step, pooled, z-scored with the file's statistics, then maxmin
    x = next(x for x, t in spy.calls if t == r.timestep)
    with torch.no_grad(), Trace(g.adapter.denoiser, [LAYER]) as tr:
        g.adapter.forward(x, r.timestep)
    v = pool(tr[LAYER], g.adapter.pooling).double()
    mean, std = (torch.tensor(stats[k], dtype=torch.float64) for k in ("mean", "std"))
    z = standardise(v, mean, std)
    np.testing.assert_allclose(r.scores["maxmin"], SCORES["maxmin"](z).numpy(), rtol=1e-5)
    assert not np.allclose(r.scores["maxmin"], SCORES["maxmin"](v).numpy(), rtol=1e-3)  # raw would differ
    # an explicit setting that contradicts the file needs its own threshold
    with pytest.raises(UsageError, match="differs from layer"):
        memdetect.guard(ddpm_pipe, config=toml, layer="mid_block")
    with pytest.raises(UsageError, match="no in-generation threshold"):
        memdetect.guard(ddpm_pipe, config=toml, on_memorized="regenerate")
    with pytest.raises(UsageError, match="needs threshold="):
        memdetect.guard(ddpm_pipe)


def test_statistics_of_another_layer_are_refused(ddpm_pipe, tiny_ddpm, tmp_path):
    toml = tmp_path / "memdetect.toml"
    selected_toml(toml, tiny_ddpm, channels=5)
    g = memdetect.guard(ddpm_pipe, config=toml)
    with pytest.raises(UsageError, match="hold 5 channels"):
        g(batch_size=1, num_inference_steps=4, output_type="np")


def test_cli_calibrate_guard_with_config_keeps_the_scan_configuration_and_generate_uses_it(tiny_ddpm, tmp_path):
    sel = tmp_path / "selected.toml"
    stats = selected_toml(sel, tiny_ddpm)
    # a file without [guard]: generate says which command writes one
    res = invoke("generate", "-n", 2, "--guard", "--config", sel, "--device", "cpu", "-o", tmp_path / "g0")
    assert res.exit_code == 2 and "calibrate --guard --config" in " ".join(res.output.split()), res.output
    res = invoke("calibrate", "--config", sel, "--model", "ddpm", "--output", tmp_path / "x.toml")
    assert res.exit_code == 2 and "--config applies to --guard" in " ".join(res.output.split()), res.output
    res = invoke("calibrate", "--guard", "--config", sel, "--layer", "mid_block", "-n", 2, "--output",
                 tmp_path / "x.toml")
    assert res.exit_code == 2 and "drop --layer" in " ".join(res.output.split()), res.output

    both = tmp_path / "both.toml"
    res = invoke("calibrate", "--guard", "--config", sel, "-n", 4, "--steps", 10, "--device", "cpu", "-o", both)
    assert res.exit_code == 0, res.output
    doc = tomllib.loads(both.read_text())
    assert doc["guard"]["layer"] == LAYER and doc["guard"]["step_t"] == STEP and doc["guard"]["metric"] == "maxmin"
    assert doc["guard"]["normalise"] == "reference" and doc["guard"]["base"] == "selected.toml"
    cfg = load_config(both)  # the scan configuration is kept: one file drives scan, audit and the guard
    assert (cfg.layer, cfg.timestep, cfg.metric, cfg.normalise, cfg.threshold) == (LAYER, STEP, "maxmin",
                                                                                     "reference", 3.0)
    assert np.allclose(cfg.channels["std"], stats["std"]) and cfg.selection["decision"] == "selected"
    # the threshold: just above the largest of the reference generations' normalised maxmin scores
    ref = memdetect.guard(memdetect.workflows.guarding.load_guardable("ddpm", str(tiny_ddpm), device="cpu")[0], config=sel)
    again = memdetect.workflows.guarding.generate(ref, None, 4, steps=10, seed=0, eta=doc["guard"]["eta"])
    assert again.result.normalise == "reference"
    assert cfg.guard["threshold"] == pytest.approx(float(np.nextafter(again.result.scores["maxmin"].max(), np.inf)),
                                                   rel=1e-5)

    out = tmp_path / "gen"
    res = invoke("generate", "-n", 3, "--guard", "--config", both, "--device", "cpu", "--seed", 1, "-o", out)
    assert res.exit_code in (0, 1), res.output
    assert f"guard: {LAYER} at timestep" in " ".join(res.output.split())
    report = pd.read_csv(out / "report.csv")
    assert (report["flagged"] == (report["maxmin"] >= cfg.guard["threshold"])).all()
    # the same scores as the library's guard built from the file (normalised, at that layer and step)
    lib = memdetect.workflows.guarding.generate(
        memdetect.guard(memdetect.workflows.guarding.load_guardable("ddpm", str(tiny_ddpm), device="cpu")[0], config=both),
        None, 3, steps=10, seed=1, eta=doc["guard"]["eta"])
    np.testing.assert_allclose(report["maxmin"].to_numpy(), lib.result.scores["maxmin"], rtol=1e-5)
    assert lib.result.threshold == cfg.guard["threshold"]
