"""``memdetect.workflows.select`` and ``memdetect calibrate --select-layer``: the selection finds a planted layer, refuses too
few examples, never scores an image with a choice made on it, and its memdetect.toml round-trips and drives scan and
audit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from memdetect.cli import app
from memdetect.config import combine as merge
from memdetect.config import load_config
from memdetect.detector import Detector
from memdetect.errors import UsageError
from memdetect.models import Preset, register_adapter, register_preset
from memdetect.models.base import Adapter, to_unit_range
from memdetect.workflows.select import (CROSSFIT_FOLDS, MIN_MEMORIZED, MIN_NOVEL, Candidate, candidate_layers, choose,
                                        needed_message, nested_evaluation, provenance, select_configuration,
                                        select_from_images)

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


# -- a toy family whose memorized images light up one planted layer ---------------------------------------------------
class PlantedNet(nn.Module):
    """``stem`` and ``mix`` see only the grey level of the input (the channel mean), so they cannot tell a red square
    from a green or blue one of the same grey level; ``planted`` (a 1x1 convolution of the colour input) has one
    channel that fires on red: memorized images (red squares) are spiky there and only there."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.stem = nn.Conv2d(2, 8, 3, padding=1)
        self.mix = nn.Conv2d(8, 8, 3, padding=1)
        self.planted = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(16, 3, 1)
        with torch.no_grad():
            for m in (self.stem, self.mix, self.head):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.3)
                m.bias.zero_()
            w = torch.randn(8, 3, 1, 1, generator=g) * 0.05
            w[0, :, 0, 0] = torch.tensor([8.0, -8.0, -8.0])  # red minus green minus blue
            self.planted.weight.copy_(w)
            self.planted.bias.zero_()

    def forward(self, x, t):
        level = torch.full_like(x[:, :1], float(t) / 1000.0)
        h = torch.relu(self.mix(torch.relu(self.stem(torch.cat([x.mean(1, keepdim=True), level], 1)))))
        p = self.planted(x)
        return self.head(torch.cat([h, p], 1))


class PlantedAdapter(Adapter):
    family = "planted"
    pooling = "spatial-max"

    @classmethod
    def load(cls, source, *, device, dtype, **options):
        from diffusers import DDPMScheduler

        return cls(PlantedNet().to(device, dtype), DDPMScheduler(num_train_timesteps=1000), resolution=16,
                   device=device, dtype=dtype, source=str(source))

    def default_layer(self) -> str:
        return "mix"

    def selection_layers(self) -> list[str]:
        return ["stem", "mix", "planted"]

    def encode(self, images):
        return to_unit_range(images).to(self.device, self.dtype)

    def predict_noise(self, x_t, t, cond=None):
        return self.denoiser(x_t, int(t))


@pytest.fixture
def planted(tmp_path):
    register_adapter(PlantedAdapter)
    folder = tmp_path / "planted-model"
    folder.mkdir()
    register_preset(Preset("planted-demo", "planted", str(folder), note="memorized images light up `planted`"))
    return folder


def square_images(n: int, colours: list[tuple[int, int, int]], seed: int) -> np.ndarray:
    """uint8 [n, 16, 16, 3]: a grey background of random level and a 6x6 square of one of ``colours`` (all the same
    grey level, 85) at a random place."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, 16, 16, 3), np.uint8)
    for i in range(n):
        out[i] = rng.integers(40, 200)
        y, x = rng.integers(0, 10, 2)
        out[i, y:y + 6, x:x + 6] = colours[rng.integers(len(colours))]
    return out


RED = [(255, 0, 0)]
OTHERS = [(0, 255, 0), (0, 0, 255)]


def labelled_set(n_mem: int = 30, n_novel: int = 110, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    imgs = np.concatenate([square_images(n_mem, RED, seed), square_images(n_novel, OTHERS, seed + 1)])
    return torch.from_numpy(imgs.transpose(0, 3, 1, 2).copy()), np.r_[np.ones(n_mem, int), np.zeros(n_novel, int)]


def bench_folder(tmp_path) -> tuple:
    """A ``bench demo`` data folder (samples.npz, manifest.csv) of ``labelled_set(60, 220, seed=3)``: the folder, the
    images and the labels."""
    import pandas as pd

    images, labels = labelled_set(60, 220, seed=3)
    folder = tmp_path / "bench"
    folder.mkdir()
    np.savez(folder / "samples.npz", samples=images.numpy())
    pd.DataFrame({"similarity": np.where(labels == 1, 0.99, 0.5), "nearest_grade": np.where(labels == 1, "exact-64",
                                                                                             "unique")}
                 ).to_csv(folder / "manifest.csv", index=False)
    return folder, images, labels


def write_pngs(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(images):
        Image.fromarray(a).save(folder / f"img_{i:03d}.png")
    return folder


def planted_detector() -> Detector:
    adapter = PlantedAdapter.load("planted", device=torch.device("cpu"), dtype=torch.float32)
    return Detector(adapter, timestep=50, prune=False)


# -- tests ----------------------------------------------------------------------------------------------------------
def test_the_selection_finds_the_planted_layer_and_beats_the_default():
    det = planted_detector()
    assert candidate_layers(det) == ["mix", "stem", "planted"]  # the default first, then the adapter's proposal
    images, labels = labelled_set()
    sel, cands, scores = select_from_images(det, images, labels, timesteps=(10, 50), n_boot=200)
    assert len(cands) == 3 * 2 * 4 * 2 and scores.shape == (len(cands), len(labels))  # raw and normalised
    assert sum(c.normalise == "reference" for c in cands) == 3 * 2 * 4 and sel.normalisation_considered
    assert sel.best.layer == "planted" and sel.chosen == sel.best and not sel.kept_default
    ev = sel.evidence
    assert ev.selected_auroc[0] >= 0.99 and ev.selected_tpr[0] >= 0.9
    assert ev.default_auroc[0] < 0.8  # the grey-level layers cannot see the colour
    assert ev.difference_auroc[1] > 0 and ev.clearly_better
    assert all(c.startswith("planted @") for c in ev.fold_choices)
    assert sel.default == Candidate("mix", 50, "std")


def test_the_default_is_kept_when_the_choice_is_not_clearly_better():
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(40, int), np.zeros(160, int)]
    base = labels * 3.0 + rng.normal(size=200)
    # the default separates as well as the alternative, up to noise: the alternative is not clearly better
    scores = np.stack([base, base + rng.normal(scale=0.01, size=200)])
    cands = [Candidate("a", 50, "std"), Candidate("b", 50, "std")]
    sel = select_configuration(scores, labels, cands, cands[0], n_boot=200)
    assert sel.chosen == cands[0] and sel.kept_default
    assert "kept the default" in sel.reason or "picks the family default" in sel.reason
    assert sel.record()["decision"] == "kept default"


def test_a_layer_where_memorized_images_are_less_spiky_is_never_chosen():
    labels = np.r_[np.ones(30, int), np.zeros(120, int)]
    rng = np.random.default_rng(1)
    scores = np.stack([labels + rng.normal(scale=0.8, size=150), -labels * 5.0 + rng.normal(scale=0.1, size=150)])
    cands = [Candidate("weak", 50, "std"), Candidate("inverted", 50, "std")]
    sel = select_configuration(scores, labels, cands, cands[0], n_boot=100)
    assert sel.best.layer == "weak" and sel.inverted == 1 and sel.chosen.sign == 1


def test_too_few_examples_are_refused_with_the_numbers():
    labels = np.r_[np.ones(MIN_MEMORIZED - 1, int), np.zeros(MIN_NOVEL, int)]
    scores = np.random.default_rng(0).normal(size=(2, len(labels)))
    cands = [Candidate("a", 50, "std"), Candidate("b", 50, "std")]
    with pytest.raises(UsageError, match=rf"at least {MIN_MEMORIZED} memorized and {MIN_NOVEL} novel images, got "
                                         rf"{MIN_MEMORIZED - 1} memorized and {MIN_NOVEL} novel.*interval 0\.\d+ wide"):
        select_configuration(scores, labels, cands, cands[0])
    assert needed_message(MIN_MEMORIZED, MIN_NOVEL) is None
    assert needed_message(MIN_MEMORIZED, MIN_NOVEL - 1) is not None


def test_no_image_is_scored_by_a_choice_made_on_it():
    """A spy for the rule: every call sees only its rows (the other columns are NaN), and the images left out of the
    calls of the k-fold partition the set: each image is scored out of fold exactly once, by a choice made without
    it; the final choice (the last call) sees every image."""
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(25, int), np.zeros(100, int)]
    scores = np.stack([labels * s + rng.normal(size=125) for s in (0.5, 1.0, 2.0, 4.0)])
    cands = [Candidate(f"l{i}", 50, "std") for i in range(4)]
    calls: list[np.ndarray] = []

    def spy(s, y, rows, default):
        calls.append(np.asarray(rows).copy())
        masked = np.full_like(s, np.nan)
        masked[:, rows] = s[:, rows]
        return choose(masked, y, rows, default)

    sel = select_configuration(scores, labels, cands, cands[0], folds=5, n_boot=100, chooser=spy)
    assert len(calls) == 6
    left_out = [np.setdiff1d(np.arange(125), rows) for rows in calls[:5]]
    assert sorted(np.concatenate(left_out).tolist()) == list(range(125))  # a partition: each image once
    for rows, out in zip(calls[:5], left_out):
        assert len(np.intersect1d(rows, out)) == 0 and 20 <= len(out) <= 30
        assert labels[out].sum() == 5  # stratified
    assert sorted(calls[5].tolist()) == list(range(125))
    assert sel.best.layer == "l3"


def test_nested_evaluation_standardises_each_fold_on_its_choosing_part_only():
    """Scores on the left-out fold are shifted by a constant per image: a fold's standardisation must use the
    choosing part's novel images, so the shift of the left-out images changes the out-of-sample AUROC."""
    labels = np.r_[np.ones(25, int), np.zeros(100, int)]
    rng = np.random.default_rng(2)
    scores = np.stack([labels * 2.0 + rng.normal(size=125)])
    cands = [Candidate("a", 50, "std")]
    ev = nested_evaluation(scores, labels, cands, 0, n_boot=100)
    assert ev.fold_choices == ["a @ t=50, std"] * 5
    assert ev.selected_auroc == ev.default_auroc and ev.difference_auroc[0] == 0


def test_calibrate_select_layer_writes_a_toml_that_drives_scan_and_audit(planted, tmp_path):
    mem = write_pngs(tmp_path / "memorized", square_images(24, RED, 5))
    novel = write_pngs(tmp_path / "novel", square_images(110, OTHERS, 6))
    toml = tmp_path / "memdetect.toml"
    res = invoke("calibrate", novel, "--memorized", mem, "--model", "planted-demo", "--select-layer", "--timesteps",
                 "10,50", "--output", toml, "--device", "cpu", "--quiet")
    assert res.exit_code == 0, res.output
    assert "planted @ t=" in res.output and "beats the default" in res.output
    cfg = load_config(toml)  # round trip: the chosen configuration and its evidence come back
    assert cfg.layer == "planted" and cfg.timestep in (10, 50) and cfg.metric in ("std", "l4l2", "entropy", "maxmin")
    sel = cfg.selection
    assert sel["decision"] == "selected" and sel["chosen"]["layer"] == "planted" and sel["chosen"]["sign"] == 1
    assert sel["default"] == {"layer": "mix", "timestep": 50, "metric": "std", "sign": 1, "normalise": "none"}
    assert sel["n_memorized"] == 24 and sel["n_novel"] == 110 and sel["n_candidates"] == 3 * 2 * 4
    assert len(sel["selected_auroc"]) == 3 and sel["selected_auroc"][0] >= 0.99
    assert len(sel["fold_choices"]) == 5
    merged = merge(cfg, {"model": "demo", "layer": None, "timestep": None, "sigma": None, "seed": 0,
                         "metric": "std", "threshold": None, "model_path": None}, set())
    assert merged["layer"] == "planted" and merged["configuration"].startswith("selected by")
    # scan --config uses the file's layer, timestep and metric, and flags the new red squares only
    new_mem = write_pngs(tmp_path / "scan" / "memorized", square_images(5, RED, 7))
    write_pngs(tmp_path / "scan" / "novel", square_images(5, OTHERS, 8))
    report = tmp_path / "report.csv"
    res = invoke("scan", tmp_path / "scan", "--config", toml, "--output", report, "--device", "cpu", "--quiet",
                 "--no-resume")
    assert res.exit_code == 1, res.output
    import pandas as pd

    df = pd.read_csv(report)
    assert set(df["layer"]) == {"planted"} and set(df["timestep"]) == {cfg.timestep} and set(df["metric"]) == {
        cfg.metric}
    flagged = df.loc[df["memorized"], "path"].tolist()
    assert len(flagged) == 5 and all(str(new_mem.name) in p for p in flagged)
    # audit: the summary JSON and the HTML page say where the configuration came from
    summary, html = tmp_path / "summary.json", tmp_path / "report.html"
    res = invoke("audit", tmp_path / "scan", "--config", toml, "--output", tmp_path / "out" / "r.csv",
                 "--summary-json", summary, "--html", html, "--device", "cpu", "--quiet", "--annotations", "none")
    assert res.exit_code == 1, res.output
    doc = json.loads(summary.read_text())
    assert doc["settings"]["layer"] == "planted"
    assert doc["settings"]["configuration"].startswith("selected by `memdetect calibrate --select-layer`")
    assert "calibrate --select-layer" in html.read_text()
    assert provenance(None).startswith("calibrated config")


def test_calibrate_select_layer_refuses_too_few_images_with_exit_2(planted, tmp_path):
    mem = write_pngs(tmp_path / "memorized", square_images(5, RED, 5))
    novel = write_pngs(tmp_path / "novel", square_images(30, OTHERS, 6))
    res = invoke("calibrate", novel, "--memorized", mem, "--model", "planted-demo", "--select-layer", "--output",
                 tmp_path / "m.toml", "--device", "cpu", "--quiet")
    assert res.exit_code == 2
    assert f"needs at least {MIN_MEMORIZED} memorized and {MIN_NOVEL} novel images, got 5 memorized and 30 novel" \
        in " ".join(res.output.split())
    assert not (tmp_path / "m.toml").exists()


def test_select_layer_needs_memorized_examples(planted, tmp_path):
    novel = write_pngs(tmp_path / "novel", square_images(3, OTHERS, 6))
    res = invoke("calibrate", novel, "--model", "planted-demo", "--select-layer", "--output", tmp_path / "m.toml",
                 "--device", "cpu")
    assert res.exit_code == 2 and "--memorized" in res.output


def test_training_duplicates_give_memorized_and_novel_examples(planted, tmp_path):
    from memdetect.workflows.select import training_duplicate_examples

    train = tmp_path / "train"
    reds = square_images(22, RED, 9)
    copies = np.concatenate([np.repeat(reds, 12, axis=0)])  # 22 images, 12 copies each
    unique = square_images(40, OTHERS, 10)
    write_pngs(train, np.concatenate([copies, unique]))
    pos, uniq, found = training_duplicate_examples(train, 16, min_copies=10)
    # red images that happen to look alike (same place, similar grey) fall into one group
    assert 15 <= len(pos) <= 22 and f"{len(pos)} groups" in found
    red = (pos[:, 0] == 255) & (pos[:, 1] == 0) & (pos[:, 2] == 0)
    assert red.flatten(1).any(dim=1).all()  # every memorized example is one of the duplicated red images
    assert 30 <= len(uniq) <= 40 and all(Path(p).is_file() for p in uniq)


@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_dit", "tiny_ddpm"])
def test_every_family_proposes_hookable_candidates_that_include_its_default(fixture, request):
    family = {"tiny_sd": "sd", "tiny_dit": "dit", "tiny_ddpm": "ddpm"}[fixture]
    det = Detector.from_pretrained(family, str(request.getfixturevalue(fixture)), device="cpu", prune=False)
    layers = candidate_layers(det)
    assert layers[0] == str(det.layer) and len(layers) > 2 and len(set(layers)) == len(layers)
    images = torch.randint(0, 256, (2, 3, det.adapter.resolution, det.adapter.resolution), dtype=torch.uint8)
    from memdetect.workflows.select import capture_features

    feats = capture_features(det, images, layers=layers, timesteps=(10, 50))
    assert set(feats) == {(s, t) for s in layers for t in (10, 50)}
    assert all(v.ndim == 2 and v.shape[0] == 2 for v in feats.values())  # pooled vectors only
    # the default layer's pooled vector is the scan's
    torch.testing.assert_close(feats[(str(det.layer), 50)], det.features(images), rtol=1e-4, atol=1e-5)
    if family == "dit":
        assert "transformer_blocks.0" in layers and any(s.endswith(".ff.net.0") for s in layers)
    else:
        assert any(s.startswith("up_blocks.0.resnets") for s in layers) and any("mid_block" in s for s in layers)


def test_a_malformed_selection_record_is_refused_or_shown_as_unknown(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('model = "demo"\nthreshold = 0.5\nselection = 3\n')
    with pytest.raises(UsageError, match=r"\[selection\] in .* must be a table"):
        load_config(bad)
    odd = tmp_path / "odd.toml"
    odd.write_text('model = "demo"\nthreshold = 0.5\n[selection]\ndecision = "selected"\nselected_auroc = "x"\n'
                   'chosen = 1\nlabels = "a\\u001b[31m"\n')
    line = provenance(load_config(odd).selection)
    assert line.startswith("selected by") and "AUROC ?" in line and "\x1b" not in line


def test_bench_demo_adds_ours_selected_chosen_on_the_selection_half_only(planted, tmp_path, monkeypatch):
    """``bench demo``'s ``ours_selected``: the library's selection on the selection half, measured on the held-out
    half, in results.csv, recall_by_grade.csv and pairs.csv; a spy checks that the selection saw no held-out image."""
    import pandas as pd

    import memdetect.workflows.select as select_module
    from memdetect.bench.demo import run_demo, split_halves

    folder, images, labels = bench_folder(tmp_path)
    seen = []
    real = select_module.select_from_images

    def spy(det, imgs, y, **kw):
        seen.append(imgs.clone())
        return real(det, imgs, y, **kw)

    monkeypatch.setattr(select_module, "select_from_images", spy)
    out = tmp_path / "out"
    res = run_demo(out, model="planted-demo", data_folder=folder, device="cpu", n_boot=100)
    sel, held = split_halves(labels, 0.5, 0)
    assert len(seen) == 1 and torch.equal(seen[0], images[sel])  # exactly the selection half
    results = pd.read_csv(out / "results.csv").set_index("method")
    row = results.loc["ours_selected"]
    assert row["n_memorized"] == labels[held].sum() and row["n_generalized"] == (1 - labels[held]).sum()
    assert row["auroc"] >= 0.99 and "held-out half only" in row["timing"]
    assert json.loads((out / "selection.json").read_text())["chosen"]["layer"] == "planted"
    assert res["selection"]["decision"] == "selected"
    pairs = pd.read_csv(out / "pairs.csv")
    mine = pairs[pairs["method"] == "ours_selected"]
    assert set(mine["samples"]) == {"held-out half"} and {"ours_std", "denoising_loss", "flipd"} <= set(mine["versus"])
    assert set(pairs.loc[pairs["method"] == "ours_std", "samples"]) == {"all labelled"}
    recall = pd.read_csv(out / "recall_by_grade.csv")
    assert set(recall.loc[recall["method"] == "ours_selected", "grade"]) == {"exact-64", "generalized (FPR)"}
    scores = pd.read_csv(out / "scores.csv")
    picked = scores["ours_selected"]
    assert picked.isna().to_numpy()[sel].all() and picked.notna().to_numpy()[held].all()


def test_bench_demo_scores_a_normalised_pick_with_the_selection_halfs_novel_statistics(planted, tmp_path,
                                                                                         monkeypatch):
    """A reference-normalised pick in ``bench demo``: the held-out half is scored with channel statistics fitted on
    the selection half's novel images only (a spy on ``reference_statistics`` sees exactly their features), the
    scores those of a Detector that normalises with them."""
    import dataclasses

    import pandas as pd

    import memdetect.workflows.select as select_module
    from memdetect.bench.demo import run_demo, split_halves

    folder, images, labels = bench_folder(tmp_path)
    real, real_stats = select_module.select_from_images, select_module.reference_statistics
    fitted = []

    def forced(det, imgs, y, **kw):  # whatever the rule picks, make it the normalised planted layer
        sel, cands, scores = real(det, imgs, y, **kw)
        fitted.clear()  # the selection's own fold-local fits: what follows is the held-out scoring's
        pick = Candidate("planted", 10, "std", normalise="reference")
        return dataclasses.replace(sel, chosen=pick, kept_default=False), cands, scores

    def spy(feats):
        fitted.append(feats.clone())
        return real_stats(feats)

    monkeypatch.setattr(select_module, "select_from_images", forced)
    monkeypatch.setattr(select_module, "reference_statistics", spy)
    out = tmp_path / "out"
    run_demo(out, model="planted-demo", data_folder=folder, device="cpu", n_boot=100)
    sel, held = split_halves(labels, 0.5, 0)
    novel_sel = sel[labels[sel] == 0]
    det = Detector(planted_detector().adapter, layer="planted", timestep=10, prune=False)
    expected = det.features(images[novel_sel])
    assert len(fitted) == 1 and torch.allclose(fitted[0], expected)  # the selection half's novel images, no other
    det.normalise = real_stats(expected)
    want = det.score_tensor(images[held])["std"]
    got = pd.read_csv(out / "scores.csv")["ours_selected"].to_numpy()[held]
    assert np.allclose(got, want, rtol=1e-5, atol=1e-6)
    raw = Detector(planted_detector().adapter, layer="planted", timestep=10, prune=False).score_tensor(images[held])
    assert not np.allclose(got, raw["std"], rtol=1e-3)
    assert json.loads((out / "selection.json").read_text())["chosen"]["normalise"] == "reference"


# -- normalisation as part of the configuration -------------------------------------------------------------------
def nuisance_features(n_mem: int = 40, n_novel: int = 200, seed: int = 0) -> tuple[dict, np.ndarray]:
    """Pooled vectors [N, 16] at one layer: channel 0 a high-variance nuisance (sd 40, unrelated to the label), the
    others N(0, 1); memorized vectors have channel 1 raised by 6 sd. Raw, the nuisance dominates every spikiness
    score; z-scored per channel with novel statistics, the raised channel makes memorized vectors spiky."""
    rng = np.random.default_rng(seed)
    labels = np.r_[np.ones(n_mem, int), np.zeros(n_novel, int)]
    v = rng.normal(size=(len(labels), 16)) + 3.0
    v[:, 0] = 5.0 + rng.normal(scale=40.0, size=len(labels))
    v[labels == 1, 1] += 6.0
    return {("a", 50): torch.from_numpy(v).float()}, labels


def test_the_selection_picks_normalised_where_the_signal_separates_only_after_z_scoring():
    from memdetect.workflows.select import FeatureScores

    feats, labels = nuisance_features()
    scorer = FeatureScores(feats)
    cands = scorer.candidates
    assert len(cands) == 8 and sum(c.normalise == "reference" for c in cands) == 4
    default = Candidate("a", 50, "std")
    sel = select_configuration(scorer, labels, cands, default, n_boot=200)
    ev = sel.evidence
    assert ev.default_auroc[0] < 0.7  # raw std: the nuisance channel hides the signal
    assert sel.chosen.normalise == "reference" and not sel.kept_default and sel.chosen.layer == "a"
    assert ev.selected_auroc[0] >= 0.97 and ev.clearly_better
    assert all(c.endswith("reference-normalised") for c in ev.fold_choices)
    rec = sel.record()
    assert rec["normalise"] == "reference" and rec["normalisation_considered"] is True
    assert rec["chosen"]["normalise"] == "reference" and rec["default"]["normalise"] == "none"
    # without normalised candidates, the same data keeps the raw default
    raw = FeatureScores(feats, normalise=False)
    sel_raw = select_configuration(raw, labels, raw.candidates, default, n_boot=200)
    assert sel_raw.chosen.normalise == "none" and sel_raw.record()["normalisation_considered"] is False


def test_normalisation_statistics_are_fitted_on_the_choosing_parts_novel_images_only():
    """Spies on the score matrix (which novel images fit the statistics) and on the rule (which images it chooses
    on): in every fold the statistics come from exactly the novel images of the choosing part, never from the fold
    being scored; a fold's out-of-sample scores use those fold-local statistics."""
    from memdetect.workflows.select import FeatureScores

    feats, labels = nuisance_features(30, 150, seed=1)
    references: list[np.ndarray] = []
    rows_seen: list[np.ndarray] = []

    class Spy(FeatureScores):
        def __call__(self, reference):
            references.append(np.asarray(reference).copy())
            return super().__call__(reference)

    marks: list[int] = []

    def rule(s, y, rows, default):
        rows_seen.append(np.asarray(rows).copy())
        marks.append(len(references))
        return choose(s, y, rows, default)

    scorer = Spy(feats)
    select_configuration(scorer, labels, scorer.candidates, Candidate("a", 50, "std"), n_boot=100, chooser=rule)
    assert len(rows_seen) == 6
    # per choice: the choosing part's statistics, then the cross-fitted ranking's (CROSSFIT_FOLDS subsets of them)
    per_choice = [references[start:end] for start, end in zip([0, *marks[:-1]], marks)]
    assert [len(refs) for refs in per_choice] == [1 + CROSSFIT_FOLDS] * 6
    everyone = np.arange(len(labels))
    for refs, rows in zip(per_choice[:5], rows_seen[:5]):
        scored = np.setdiff1d(everyone, rows)
        novel = np.sort(rows[labels[rows] == 0])
        assert np.array_equal(np.sort(refs[0]), novel)  # the choosing part's novel images
        for ref in refs:
            assert len(np.intersect1d(ref, scored)) == 0  # no image of the scored fold fits any statistics
            assert (labels[ref] == 0).all() and len(np.setdiff1d(ref, novel)) == 0
    final = per_choice[5]
    assert np.array_equal(np.sort(final[0]), np.flatnonzero(labels == 0))  # the final pick: every novel image
    # the statistics really are fold-local: a fold's normalised scores change with the choosing part
    a, b = scorer(per_choice[0][0]), scorer(per_choice[1][0])
    assert np.allclose(a[:4], b[:4]) and not np.allclose(a[4:], b[4:])


def test_the_ranking_never_scores_an_image_with_statistics_it_helped_fit():
    """``FeatureScores.cross_fitted``: every normalised score of an image comes from statistics fitted without it
    (each novel image is left out of exactly one of the fits, and its score is that fit's); raw rows are unchanged."""
    from memdetect.workflows.select import FeatureScores

    feats, labels = nuisance_features(30, 150, seed=4)
    references: list[np.ndarray] = []

    class Spy(FeatureScores):
        def __call__(self, reference):
            references.append(np.asarray(reference).copy())
            return super().__call__(reference)

    scorer = Spy(feats)
    rows = np.arange(10, 180)
    out = scorer.cross_fitted(rows, labels)
    fits = list(references)
    assert len(fits) == CROSSFIT_FOLDS and out.shape == (len(scorer.candidates), len(rows))
    assert np.allclose(out[:scorer.n_raw], scorer.raw[:, rows])
    novel = rows[labels[rows] == 0]
    for j, image in enumerate(rows):
        without = [ref for ref in fits if image not in ref]
        assert len(without) == 1 or labels[image] == 1
        assert any(np.allclose(out[scorer.n_raw:, j], scorer(ref)[scorer.n_raw:, image]) for ref in without)
    assert all(np.isin(ref, novel).all() for ref in fits)


def test_cross_fitting_keeps_pure_noise_normalised_candidates_from_winning():
    """Two thousand channels of pure noise and 120 novel images: z-scored with statistics fitted on those same novel
    images, the noise's spikiness scores separate memorized from novel in sample (AUROC about 0.8, above the real
    signal), only because the novel images fitted the statistics. The cross-fitted ranking sees through it and picks
    the layer with the signal."""
    from memdetect.workflows.select import FeatureScores, _aurocs

    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(30, int), np.zeros(120, int)]
    signal = rng.normal(size=(150, 16))
    signal[labels == 1, 0] += 2.0  # one channel raised: memorized vectors are (somewhat) spikier
    feats = {("noise", 50): torch.from_numpy(rng.normal(size=(150, 2000))).float(),
             ("signal", 50): torch.from_numpy(signal).float()}
    scorer = FeatureScores(feats)
    cands = scorer.candidates
    in_sample = _aurocs(scorer(np.flatnonzero(labels == 0)), labels)
    noise_norm = [i for i, c in enumerate(cands) if c.layer == "noise" and c.normalise == "reference"]
    assert in_sample[noise_norm].max() > in_sample[[i for i, c in enumerate(cands) if c.layer == "signal"]].max()
    sel = select_configuration(scorer, labels, cands, Candidate("signal", 50, "l4l2"), n_boot=200)
    assert sel.best.layer == "signal"
    assert all(c.startswith("signal @") for c in sel.evidence.fold_choices)


class NuisanceNet(PlantedNet):
    """``planted`` with a weak red channel (0) and a strong grey-level channel (1, large offset and gain): raw, the
    grey level of the background dominates every score; z-scored with novel statistics, red squares stand out."""

    def __init__(self):
        super().__init__()
        with torch.no_grad():
            self.planted.weight[0, :, 0, 0] = torch.tensor([0.5, -0.5, -0.5])
            self.planted.weight[1, :, 0, 0] = torch.tensor([15.0, 15.0, 15.0])
            self.planted.bias[1] = 20.0


class NuisanceAdapter(PlantedAdapter):
    family = "nuisance"

    @classmethod
    def load(cls, source, *, device, dtype, **options):
        from diffusers import DDPMScheduler

        return cls(NuisanceNet().to(device, dtype), DDPMScheduler(num_train_timesteps=1000), resolution=16,
                   device=device, dtype=dtype, source=str(source))


def test_calibrate_select_layer_writes_a_normalised_pick_that_scan_honours(tmp_path):
    """A normalised pick: memdetect.toml says ``normalise = "reference"`` with [calibration.channels] fitted on the
    reference's statistics half (``calibrate.split_reference``, as ``--normalise reference``), [selection] records
    it, the file round-trips, and ``scan --config`` scores with those statistics (not raw)."""
    import pandas as pd

    import tomllib

    from memdetect.workflows.calibrate import split_reference
    from memdetect.workflows.select import read_images, reference_statistics

    register_adapter(NuisanceAdapter)
    (tmp_path / "nuisance-model").mkdir()
    register_preset(Preset("nuisance-demo", "nuisance", str(tmp_path / "nuisance-model"), note="test"))
    mem = write_pngs(tmp_path / "memorized", square_images(30, RED, 5))
    novel = write_pngs(tmp_path / "novel", square_images(220, OTHERS, 6))
    toml = tmp_path / "memdetect.toml"
    res = invoke("calibrate", novel, "--memorized", mem, "--model", "nuisance-demo", "--select-layer", "--timesteps",
                 "10,50", "--output", toml, "--device", "cpu", "--quiet")
    assert res.exit_code == 0, res.output
    cfg = load_config(toml)  # round trip
    assert cfg.normalise == "reference" and cfg.layer == "planted" and cfg.channels is not None
    sel = cfg.selection
    assert sel["normalise"] == "reference" and sel["normalisation_considered"] is True
    assert sel["chosen"]["normalise"] == "reference" and sel["decision"] == "selected"
    assert sel["n_candidates"] == 3 * 2 * 4 * 2 and "t=" in provenance(sel) and "reference-normalised" in provenance(sel)
    fit_half, threshold_half = split_reference([novel])
    assert len(fit_half) == 110
    doc = tomllib.loads(toml.read_text())
    assert doc["calibration"]["n_normalise"] == 110 and doc["calibration"]["n_reference"] == 110
    det = Detector(NuisanceAdapter.load("x", device=torch.device("cpu"), dtype=torch.float32), layer=cfg.layer,
                   timestep=cfg.timestep, prune=False)
    px, _, _ = read_images(fit_half, 16)
    stats = reference_statistics(det.features(px))
    assert np.allclose(cfg.channels["mean"], stats["mean"], rtol=1e-4, atol=1e-5)
    assert np.allclose(cfg.channels["std"], stats["std"], rtol=1e-3, atol=1e-5)
    # scan --config: scores with the file's statistics, flags the new red squares only
    new_mem = write_pngs(tmp_path / "scan" / "memorized", square_images(5, RED, 7))
    write_pngs(tmp_path / "scan" / "novel", square_images(5, OTHERS, 8))
    report = tmp_path / "report.csv"
    res = invoke("scan", tmp_path / "scan", "--config", toml, "--output", report, "--device", "cpu", "--quiet",
                 "--no-resume")
    assert res.exit_code == 1, res.output
    df = pd.read_csv(report).sort_values("path")
    flagged = df.loc[df["memorized"], "path"].tolist()
    assert len(flagged) == 5 and all(str(new_mem.name) in p for p in flagged)
    scan_px, names, _ = read_images([tmp_path / "scan"], 16)
    order = np.argsort(names)
    det.normalise = {k: list(v) for k, v in cfg.channels.items()}
    want = det.score_tensor(scan_px)[cfg.metric][order]
    assert np.allclose(df["score"].to_numpy(), want, rtol=1e-4, atol=1e-5)
    det.normalise = None
    assert not np.allclose(df["score"].to_numpy(), det.score_tensor(scan_px)[cfg.metric][order], rtol=1e-2)
    # audit --config: the same normalised scores and flags
    summary = tmp_path / "summary.json"
    res = invoke("audit", tmp_path / "scan", "--config", toml, "--output", tmp_path / "audit" / "r.csv",
                 "--summary-json", summary, "--device", "cpu", "--quiet", "--annotations", "none")
    assert res.exit_code == 1, res.output
    settings = json.loads(summary.read_text())["settings"]
    assert settings["layer"] == "planted" and settings["normalise"].startswith("reference:")
    audited = pd.read_csv(tmp_path / "audit" / "r.csv").sort_values("path")
    assert np.allclose(audited["score"].to_numpy(), df["score"].to_numpy(), rtol=1e-5)
    assert audited["memorized"].tolist() == df["memorized"].tolist()


def test_select_layer_refuses_normalise_because_it_tries_both_itself(planted, tmp_path):
    novel = write_pngs(tmp_path / "novel", square_images(3, OTHERS, 6))
    res = invoke("calibrate", novel, "--memorized", novel, "--model", "planted-demo", "--select-layer",
                 "--normalise", "reference", "--output", tmp_path / "m.toml", "--device", "cpu")
    assert res.exit_code == 2 and "raw and reference-normalised itself" in " ".join(res.output.split()), res.output
