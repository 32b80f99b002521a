"""Decisions a reviewer can act on: p-values in scan/audit reports, --fpr, calibrate's intervals and warning, the
evidence of flagged images (channels, maps, copy search), the HTML page's bounds, and the page in a real browser."""

import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from memdetect.cli import app
from memdetect.config import load_config, tomllib
from memdetect.errors import UsageError

from .conftest import REPO, write_images

runner = CliRunner()


def invoke(*args, **kw):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"}, **kw)


@pytest.fixture
def calibrated(tiny_ddpm, tmp_path):
    ref = tmp_path / "ref"
    write_images(ref, 12, seed=3)
    mem = tmp_path / "mem"
    write_images(mem, 4, seed=4)
    cfg = tmp_path / "memdetect.toml"
    res = invoke("calibrate", ref, "--model", "ddpm", "--model-path", tiny_ddpm, "--fpr", "0.1", "--memorized", mem,
                 "-o", cfg, "--workers", 0)
    assert res.exit_code == 0, res.output
    return ref, mem, cfg, res.output


def test_calibrate_keeps_the_reference_and_reports_intervals(calibrated):
    ref, mem, cfg, output = calibrated
    assert "95% Clopper-Pearson interval" in output and "TPR at that threshold" in output
    assert "warning: 12 reference images are too few for FPR 0.1" in output and "below 30 images" in output
    doc = tomllib.loads(cfg.read_text())
    cal = doc["calibration"]
    scores = cal["reference_scores"]
    assert scores["n"] == 12 and all(len(scores[m]) == 12 for m in ("std", "l4l2", "entropy", "maxmin"))
    assert scores["std"] == sorted(scores["std"], reverse=True)
    lo, hi = cal["fpr_interval"]["std"]
    assert 0 < lo < 1 / 12 < hi < 1  # one of 12 flagged
    assert len(cal["tpr_interval"]["std"]) == 2
    assert len(cal["channels"]["mean"]) == len(cal["channels"]["std"]) == 16  # the tiny UNet's up_blocks.0 width
    loaded = load_config(cfg)
    assert loaded.reference_for("std").n == 12 and loaded.channels is not None


def test_scan_with_a_config_writes_p_values_and_fpr_thresholds(calibrated, tmp_path):
    ref, mem, cfg, _ = calibrated
    out = tmp_path / "r.csv"
    res = invoke("scan", ref, "--config", cfg, "-o", out, "--workers", 0)
    assert res.exit_code == 1, res.output
    df = pd.read_csv(out)
    assert list(df.columns[:4]) == ["path", "score", "p_value", "percentile"] and "p-value" in res.output
    ref_scores = df["score"].to_numpy()
    brute = [(1 + (ref_scores >= s).sum()) / 13 for s in ref_scores]  # the reference rescanned: same scores
    np.testing.assert_allclose(df["p_value"], brute)
    assert df["memorized"].sum() == 1  # floor(0.1 * 12) = 1
    # --fpr 0.25 flags floor(0.25 * 12) = 3 of the reference images
    res = invoke("scan", ref, "--config", cfg, "--fpr", "0.25", "-o", out, "--workers", 0)
    assert res.exit_code == 1 and pd.read_csv(out)["memorized"].sum() == 3, res.output
    res = invoke("scan", ref, "--config", cfg, "--fpr", "0.25", "--threshold", "1")
    assert res.exit_code == 2 and "not both" in res.output
    res = invoke("scan", ref, "--model", "ddpm", "--fpr", "0.25")
    assert res.exit_code == 2 and "--fpr needs a calibrated reference" in res.output
    # audit: the summary's flagged images carry their p-values
    res = invoke("audit", ref, "--config", cfg, "--summary-json", tmp_path / "s.json", "-o", tmp_path / "a.csv",
                 "--workers", 0, "--annotations", "none")
    # the highest reference image counts itself: (1 + 1) / 13
    assert res.exit_code == 1 and "p = 0.154" in res.output, res.output
    flagged = json.loads((tmp_path / "s.json").read_text())["flagged_images"]
    assert flagged[0]["p_value"] == pytest.approx(2 / 13) and flagged[0]["percentile"] == pytest.approx(100 * 11 / 12)


def test_config_reference_is_checked(tmp_path):
    base = 'model = "demo"\nthreshold = 1\n[calibration.reference_scores]\n'
    bad = {base + 'n = 3\nstd = [1.0, 2.0, 0.5]\n': "sorted",
           base + 'n = 3\nstd = [2.0, "x", 0.5]\n': "must be a list of numbers",
           base + 'n = 0\nstd = [1.0]\n': "positive integer",
           base + 'n = 2\nstd = [3.0, 2.0, 1.0]\n': "reference_scores.std",
           'model = "demo"\nthreshold = 1\n[calibration.channels]\nmean = [1.0]\nstd = [1.0, 2.0]\n': "a mean and"}
    for i, (text, needle) in enumerate(bad.items()):
        p = tmp_path / f"b{i}.toml"
        p.write_text(text)
        with pytest.raises(UsageError, match=needle):
            load_config(p)


def test_dit_maps_come_from_the_token_grid():
    from memdetect.models.base import Adapter
    from memdetect.models.dit import DiTAdapter

    tokens = torch.arange(2 * 16 * 3, dtype=torch.float32).reshape(2, 16, 3)  # [B, T=4x4, C]
    grid = DiTAdapter.activation_grid(object.__new__(DiTAdapter), tokens)
    assert grid.shape == (2, 3, 4, 4)
    assert torch.equal(grid[1, 2, 1, 3], tokens[1, 1 * 4 + 3, 2])  # token (row 1, col 3), channel 2
    assert torch.equal(grid.flatten(2).amax(2), tokens.amax(1))  # max over the grid = token-max pooling
    unet = torch.randn(2, 5, 3, 3)
    assert Adapter.activation_grid(object.__new__(DiTAdapter), unet) is unet


def test_evidence_and_copy_search(tiny_ddpm, tmp_path):
    from memdetect import Detector
    from memdetect.workflows.scan import scan

    imgs = tmp_path / "imgs"
    paths = write_images(imgs, 6, size=(16, 16), seed=7)
    train = tmp_path / "train"
    write_images(train, 8, size=(16, 16), seed=8)
    mirrored = np.asarray(Image.open(paths[2]).convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT), float)
    tinted = mirrored * np.array([0.6, 0.8, 0.5]) + np.array([20, 30, 90])  # a colour cast, no clipping
    Image.fromarray(tinted.round().astype(np.uint8)).save(train / "copy_of_2.png")
    det = Detector.from_pretrained("ddpm", str(tiny_ddpm), device="cpu", threshold=-1.0)
    res = scan(det, [imgs], html=tmp_path / "r.html", evidence_json=tmp_path / "e.json", evidence_top=5,
               reference_dir=train, num_workers=0)
    doc = json.loads((tmp_path / "e.json").read_text())
    assert doc == res.evidence and doc["selected"] == "flagged" and len(doc["images"]) == 5  # the top 5 of 6
    scores = [ev["score"] for ev in doc["images"]]
    assert scores == sorted(res.frame["score"], reverse=True)[:5]
    for ev in doc["images"]:
        assert ev["score_recomputed"] == pytest.approx(ev["score"], rel=1e-4)  # the same forward as the scan
        vals = [c["value"] for c in ev["channels"]]
        assert len(vals) == 8 and vals == sorted(vals, reverse=True)
        assert len(ev["map"]["values"]) == ev["map"]["shape"][0] and "reference_mean" not in ev["channels"][0]
    assert doc["reference_dir"]["images"] == 9
    for ev in doc["images"]:
        near = ev["nearest"]
        assert len(near["features"]) == 3 and -1 <= near["pixels"]["similarity"] <= 1
        if Path(ev["path"]).name == "img_002.png":  # its mirrored, tinted copy is found, whatever the features say
            assert near["pixels"]["path"].endswith("copy_of_2.png") and near["pixels"]["flipped"]
            assert near["pixels"]["similarity"] > 0.99  # uint8 rounding of the tint only
        else:
            assert near["pixels"]["similarity"] < 0.9
    # the copy is found from the evidence when its original is among the top 5
    assert ("img_002.png" in {Path(ev["path"]).name for ev in doc["images"]}) == (
        res.frame.set_index("path")["score"].rank(ascending=False)[str(paths[2])] <= 5)
    text = (tmp_path / "r.html").read_text()
    assert text.count("class='card'") == 5 and "nearest by pixels" in text and "<b>" not in text


def test_html_stays_bounded_and_fast_on_10000_rows(tmp_path):
    """10,000 rows with 200 flagged: the page embeds evidence for the chosen top only and is written in < 30 s."""
    from memdetect.workflows.html_report import write_html
    from memdetect.store.report import make_row, rows_to_frame

    img = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(img)
    rng = np.random.default_rng(1)
    rows = [make_row(f"gen/{i:05d}.png", {m: float(v) for m in ("std", "l4l2", "entropy", "maxmin")}, metric="std",
                     threshold=2.0) for i, v in enumerate(rng.normal(size=10_000))]
    for i in range(200):
        rows[i * 50] = make_row(f"gen/{i * 50:05d}.png", {m: 3.0 + i / 100 for m in ("std", "l4l2", "entropy",
                                                                                       "maxmin")},
                                metric="std", threshold=2.0)
    df = rows_to_frame(rows)
    grid = rng.random((8, 8)).tolist()
    ev = {"selected": "flagged", "reference": {"n": 1000, "edges": list(np.linspace(-3, 3, 31)), "counts": [33] * 30},
          "channel_reference": False, "images": [
              {"path": p, "score": float(s), "channels": [{"channel": 1, "value": 2.0}],
               "map": {"shape": [8, 8], "channels": [1], "values": grid}, "p_value": 0.001, "percentile": 99.9}
              for p, s in zip(df.sort_values("score", ascending=False)["path"][:20],
                              df.sort_values("score", ascending=False)["score"][:20])]}
    files = {p: img for p in df["path"]}
    start = time.perf_counter()
    path = write_html(df, tmp_path / "big.html", {"metric": "std", "threshold": 2.0, "resolution": 64},
                      files=files, evidence=ev)
    took = time.perf_counter() - start
    text = path.read_text()
    assert took < 30, took
    assert text.count("<tr class='row") == 10_000 and text.count("class='card'") == 20
    assert text.count("data:image/") == 1 + 20 * 3  # histogram; per card: image, map, and the map in the table
    assert path.stat().st_size < 4_000_000, path.stat().st_size


# -- the demo, calibrated and audited; its page in headless Chromium ------------------------------------------------
CHROMIUM = next((shutil.which(c) for c in ("chromium", "chromium-browser", "google-chrome") if shutil.which(c)), None)


@pytest.fixture(scope="module")
def demo_audit(tmp_path_factory):
    """examples/demo calibrated on examples/demo-reference, audited with the HTML page and evidence."""
    from memdetect import Detector
    from memdetect.workflows.calibrate import calibrate_paths
    from memdetect.workflows.ci import audit
    from memdetect.config import load_config

    tmp = tmp_path_factory.mktemp("demo")
    det = Detector.from_pretrained("demo", device="cpu")
    calibrate_paths(det, [REPO / "examples" / "demo-reference"], fpr=0.01, output=tmp / "memdetect.toml",
                    num_workers=0)
    cfg = load_config(tmp / "memdetect.toml")
    det.threshold = cfg.threshold
    done = audit(det, [REPO / "examples" / "demo"], output=tmp / "report.csv", html=tmp / "report.html",
                 evidence_json=tmp / "evidence.json", reference=cfg.reference_for("std"), channels=cfg.channels,
                 annotations="none", num_workers=0, state_dir=tmp / "state")
    return tmp, done


def test_demo_audit_every_memorized_example_has_p_at_most_001(demo_audit):
    tmp, done = demo_audit
    df = pd.read_csv(tmp / "report.csv")
    mem = df["path"].str.contains("mem_")
    assert mem.sum() == 20 and (df.loc[mem, "p_value"] <= 0.01).all(), df.loc[mem, ["path", "p_value"]]
    assert (df.loc[~mem, "p_value"] > 0.01).all()
    assert done.exit_code == 1 and done.summary["flagged"] == 20
    ev = json.loads((tmp / "evidence.json").read_text())
    assert len(ev["images"]) == 20 and ev["channel_reference"] and ev["reference"]["n"] == 100
    top = ev["images"][0]["channels"][0]
    assert top["z"] > 5  # the spike is far outside the novel images' spread of that channel


BROWSER_CHECK = """<!doctype html><meta charset=utf-8><body><pre id=out>pending</pre>
<iframe id=f src="report.html" style="width:1280px;height:900px"></iframe>
<script>
document.getElementById('f').addEventListener('load', function () {
  var d = this.contentDocument, rows = d.querySelectorAll('#rows tbody tr');
  var flagged = d.querySelectorAll('#rows tbody tr.flagged');
  var withEvidence = 0, loaded = 0, cards = d.querySelectorAll('section.card');
  flagged.forEach(function (r) {
    var a = r.querySelector('a[href^="#ev-"]'), thumb = r.querySelector('img.ev-thumb');
    var card = a && d.querySelector(a.getAttribute('href'));
    if (a && thumb && thumb.naturalWidth > 0 && card && card.querySelector('img.ev-map').naturalWidth > 0
        && card.querySelector('img.ev-image').naturalWidth > 0) withEvidence++;
  });
  d.querySelectorAll('img').forEach(function (i) { if (i.naturalWidth > 0) loaded++; });
  d.querySelector('.filters button[data-filter=flagged]').click();
  var visibleFlagged = Array.prototype.filter.call(rows, function (r) { return r.offsetParent !== null; }).length;
  d.querySelector('.filters button[data-filter=all]').click();
  var th = d.querySelectorAll('#rows th')[2]; th.click();
  var first = d.querySelector('#rows tbody tr').cells[2].dataset.v;
  var max = Math.max.apply(null, Array.prototype.map.call(rows, function (r) { return +r.cells[2].dataset.v; }));
  document.getElementById('out').textContent = JSON.stringify({rows: rows.length, flagged: flagged.length,
    withEvidence: withEvidence, cards: cards.length, images: d.images.length, loaded: loaded,
    visibleFlagged: visibleFlagged, sortedFirst: +first, max: max, shown: d.getElementById('shown').textContent});
});
</script>"""


def _chromium(*args, cwd=None, timeout=120):
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--no-first-run", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


@pytest.mark.slow  # three browser starts: ~5 s alone, ~25 s on a busy 2-core machine
@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (Debian: apt-get install chromium; .ci/run "
                                             "installs it)")
def test_demo_report_in_headless_chromium(demo_audit):
    tmp, done = demo_audit
    (tmp / "check.html").write_text(BROWSER_CHECK)
    run = _chromium("--allow-file-access-from-files", "--virtual-time-budget=10000", "--dump-dom",
                    (tmp / "check.html").as_uri())
    dom = run.stdout
    start = dom.index("<pre id=\"out\">") + len("<pre id=\"out\">")
    got = json.loads(dom[start:dom.index("</pre>", start)].replace("&quot;", '"'))
    assert got["rows"] == 40 and got["flagged"] == 20 and got["cards"] == 20, got
    assert got["withEvidence"] == 20, got  # each flagged row links to its card; the pictures decode
    assert got["loaded"] == got["images"], got  # no broken image
    assert got["visibleFlagged"] == 20 and got["shown"] == "40", got  # the filter hid the others, then showed all
    assert got["sortedFirst"] == got["max"], got  # the score header sorts, highest first
    for width in (1280, 390):
        shot = tmp / f"report-{width}.png"
        _chromium(f"--window-size={width},1800", f"--screenshot={shot}", (tmp / "report.html").as_uri())
        with Image.open(shot) as im:
            assert im.size == (width, 1800)
            # readable: nothing wider than the window (the page scrolls only down); the right edge is background
            assert np.asarray(im.convert("L"))[:, -3:].min() > 200


@pytest.mark.parametrize("family", ["dit", "ddpm"])
def test_activation_maps_pool_to_the_scans_features(family, request):
    """The evidence map is the captured layer on its grid (DiT: the token grid): max-pooling it over the grid gives
    exactly the features the scan scores."""
    from memdetect import Detector

    folder = request.getfixturevalue(f"tiny_{family}")
    det = Detector.from_pretrained(family, str(folder), device="cpu")
    r = det.adapter.resolution
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, r, r), dtype=np.uint8))
    grid = det.activation_maps(images, [1, 2])
    assert grid.ndim == 4 and grid.shape[2] == grid.shape[3] > 1
    torch.testing.assert_close(grid.flatten(2).amax(2), det.features(images, [1, 2]))
