"""`memdetect bench demo` on the shipped demo model: a quick stratified subset, end to end through the CLI."""

import json

import pandas as pd
from typer.testing import CliRunner

from memdetect.bench.demo import DEMO_COLUMNS, load_demo_set, subset
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
                                   "--batch-size", "24", "--bootstrap", "100", "--output", str(out)])
    assert res.exit_code == 0, res.output
    results = pd.read_csv(out / "results.csv")
    assert list(results.columns) == [*DEMO_COLUMNS, "timing"]
    ours = {"ours_std", "ours_l4l2", "ours_entropy", "ours_maxmin", "ours_l4l2_centred", "ours_entropy_centred",
            "ours_l4l2_standardised", "ours_entropy_standardised", "ours_std_2", "ours_std_4"}
    # the demo model is unconditional: no conditional FLIPD, Wen or NeMo
    assert set(results["method"]) == ours | {"denoising_loss", "flipd", "nearest_generation"}
    assert (results["auroc_lo"] <= results["auroc"]).all() and (results["auroc"] <= results["auroc_hi"]).all()
    assert (results["tpr_lo"] <= results["tpr_at_1pct_fpr"]).all()
    assert (results["tpr_at_1pct_fpr"] <= results["tpr_hi"]).all()
    recall = pd.read_csv(out / "recall_by_grade.csv")
    assert set(recall["method"]) == set(results["method"])
    # recall per grade at the method's own threshold: the memorized samples' grades, plus the generalized FPR row
    std_rows = recall[recall["method"] == "ours_std"].set_index("grade")
    assert std_rows.loc["generalized (FPR)", "recall"] <= 0.01 + 1e-9
    n_mem = int(results.set_index("method").loc["ours_std", "n_memorized"])
    assert std_rows.drop("generalized (FPR)")["n"].sum() == n_mem
    pairs = pd.read_csv(out / "pairs.csv")
    assert set(pairs["versus"]) == set(results["method"]) - {"ours_std"}
    assert ((pairs["auroc_verdict"] == "ahead") == (pairs["d_auroc_lo"] > 0)).all()
    proof = json.loads((out / "layer_proof.json").read_text())
    assert proof["default"]["layer"] == "up_blocks.0.resnets.2.conv2:in" and proof["default"]["timestep"] == 50
    assert proof["split"]["selection"] + proof["split"]["heldout"] == 48
    assert (results["n_memorized"] + results["n_generalized"] == 48).all()
    std = results.set_index("method").loc["ours_std"]
    assert std["auroc"] >= 0.9  # the shipped model memorizes its duplicated images: a real regression check
    by = results.set_index("method")
    # K draws cost K forward passes: the K = 4 row is timed slower than the one-draw score
    assert by.loc["ours_std_4", "seconds_per_sample"] > by.loc["ours_std", "seconds_per_sample"]
    assert "4 seeded noise draws" in by.loc["ours_std_4", "timing"]
    for name in ("roc.png", "scores.csv", "sweep.csv", "sweep.png"):
        assert (out / name).stat().st_size > 0
    sweep = pd.read_csv(out / "sweep.csv")
    assert "up_blocks.0.resnets.2.conv2:in" in set(sweep["layer"])  # the default layer is swept too
    assert (sweep["inverted"] == (sweep["auroc_select"] < 0.5)).all()
    assert "default layer" in res.output


def test_bench_demo_rejects_bad_sweep_timesteps(tmp_path):
    res = CliRunner().invoke(app, ["bench", "demo", "--sweep-timesteps", "a,b", "--output", str(tmp_path)])
    assert res.exit_code == 2 and "comma-separated integers" in res.output


def test_bench_demo_rejects_an_unshipped_model(tmp_path):
    res = CliRunner().invoke(app, ["bench", "demo", "--model", "sd14", "--output", str(tmp_path)])
    assert res.exit_code == 2 and "demo-sd" in res.output
