"""`memdetect bench demo` on the shipped demo model: a quick stratified subset, end to end through the CLI."""

import pandas as pd
from typer.testing import CliRunner

from memdetect.bench.demo import RESULT_COLUMNS, load_demo_set, subset
from memdetect.cli import app


def test_demo_set_and_stratified_subset():
    data = load_demo_set()
    labels = data.labels
    assert labels.sum() >= 100 and (1 - labels).sum() >= 100  # the shipped manifest labels both classes
    small = subset(data, 40)
    assert len(small.labelled) == 40 and 0 < small.labels.sum() < 40
    assert set(small.labelled) <= set(data.labelled)
    assert subset(data, 40).labelled.tolist() == small.labelled.tolist()  # seeded


def test_bench_demo_cli_subset_with_sweep(tmp_path):
    out = tmp_path / "bench"
    res = CliRunner().invoke(app, ["bench", "demo", "--limit", "48", "--sweep-layers", "--sweep-timesteps", "50",
                                   "--batch-size", "24", "--output", str(out)])
    assert res.exit_code == 0, res.output
    results = pd.read_csv(out / "results.csv")
    assert list(results.columns) == RESULT_COLUMNS
    assert set(results["method"]) == {"ours_std", "ours_l4l2", "ours_entropy", "ours_maxmin", "denoising_loss",
                                      "flipd", "nearest_generation"}
    assert (results["n_memorized"] + results["n_generalized"] == 48).all()
    std = results.set_index("method").loc["ours_std"]
    assert std["auroc"] >= 0.9  # the shipped model memorizes its duplicated images: a real regression check
    for name in ("roc.png", "scores.csv", "sweep.csv", "sweep.png"):
        assert (out / name).stat().st_size > 0
    sweep = pd.read_csv(out / "sweep.csv")
    assert "up_blocks.0.resnets.2.conv2:in" in set(sweep["layer"])  # the default layer is swept too
    assert (sweep["inverted"] == (sweep["auroc_select"] < 0.5)).all()
    assert "default layer" in res.output


def test_bench_demo_rejects_bad_sweep_timesteps(tmp_path):
    res = CliRunner().invoke(app, ["bench", "demo", "--sweep-timesteps", "a,b", "--output", str(tmp_path)])
    assert res.exit_code == 2 and "comma-separated integers" in res.output
