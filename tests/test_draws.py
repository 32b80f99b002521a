"""``--draws K``: the score is the mean over K seeded noise draws per image (issue 29, point 2)."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from memdetect import Detector
from memdetect.core.capture import Trace, pool
from memdetect.cli import app
from memdetect.config import combine as merge
from memdetect.config import load_config
from memdetect.errors import UsageError
from memdetect.store.io import draw_seed, image_seed
from memdetect.store.journal import fingerprint
from memdetect.core.scores import compute_all

from .conftest import write_images

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


@pytest.fixture(scope="module")
def ddpm(tiny_ddpm):
    return str(tiny_ddpm)


def pixels(n: int, r: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, r, r), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def one_draw(det: Detector, images: torch.Tensor, seeds) -> torch.Tensor:
    """The one-draw path written out by hand (encode, noise with the given seeds, hooked forward, pool)."""
    a = det.adapter
    with torch.inference_mode():
        x_t = a.noise(a.encode(images), det.timestep, list(seeds))
        with Trace(a.denoiser, [det.layer], stop=True) as tr:
            a.forward(x_t, det.timestep)
        return pool(tr[det.layer], a.pooling).float().cpu()


def test_one_draw_is_the_one_noise_sample_score_exactly(ddpm):
    det = Detector.from_pretrained("ddpm", ddpm)
    assert det.draws == 1 and det.settings.draws == 1
    x = pixels(4, det.adapter.resolution)
    seeds = [image_seed(v, det.seed) for v in x.numpy()]
    want = {k: v.numpy() for k, v in compute_all(one_draw(det, x, seeds)).items()}
    got = det.score_tensor(x)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    assert torch.equal(det.features(x), one_draw(det, x, seeds))
    # and the key of a one-draw scan is the key it had before draws existed
    settings = det.settings.__dict__.copy()
    settings.pop("draws")
    assert det.fingerprint == fingerprint(settings)


def test_k_draws_are_the_mean_of_k_seeded_scores(ddpm):
    det = Detector.from_pretrained("ddpm", ddpm, draws=3)
    x = pixels(2, det.adapter.resolution, seed=1)
    seeds = [image_seed(v, det.seed) for v in x.numpy()]
    per_draw = [compute_all(one_draw(det, x, [draw_seed(s, k) for s in seeds]))["std"] for k in range(3)]
    want = torch.stack(per_draw).mean(dim=0).numpy()
    np.testing.assert_allclose(det.score_tensor(x)["std"], want, rtol=1e-5, atol=1e-6)
    drawn = det.draw_features(x)
    assert drawn.shape[:2] == (2, 3)
    assert not torch.allclose(drawn[:, 0], drawn[:, 1])  # other draws, other noise
    assert len({draw_seed(seeds[0], k) for k in range(64)}) == 64 and draw_seed(seeds[0], 0) == seeds[0]
    np.testing.assert_array_equal(det.score_tensor(x)["std"], det.score_tensor(x)["std"])  # deterministic


def test_draws_do_not_depend_on_batch_position_or_batch_size(ddpm):
    det = Detector.from_pretrained("ddpm", ddpm, draws=4, batch_size=16)
    x = pixels(6, det.adapter.resolution, seed=2)
    together = det.draw_features(x)
    for i in (0, 3, 5):
        torch.testing.assert_close(det.draw_features(x[i:i + 1])[0], together[i], rtol=1e-4, atol=1e-5)
    det.batch_size = 3  # an image's draws split over two forward passes
    torch.testing.assert_close(det.draw_features(x), together, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("draws,batch_size", [(4, 4), (3, 8), (8, 3)])
def test_the_k_noised_copies_stay_within_the_batch_size(ddpm, monkeypatch, draws, batch_size):
    det = Detector.from_pretrained("ddpm", ddpm, draws=draws, batch_size=batch_size)
    forward, sizes = det.adapter.forward, []

    def counted(x_t, t):
        sizes.append(x_t.shape[0])
        return forward(x_t, t)

    monkeypatch.setattr(det.adapter, "forward", counted)
    x = pixels(batch_size, det.adapter.resolution, seed=3)  # what a scan hands over: one batch of images
    assert det.draw_features(x).shape[:2] == (batch_size, draws)
    assert max(sizes) <= batch_size and sum(sizes) == batch_size * draws


def test_more_draws_change_settings_key_and_report(ddpm, tmp_path):
    from memdetect.workflows.scan import scan

    folder = tmp_path / "imgs"
    write_images(folder, 3)
    one = Detector.from_pretrained("ddpm", ddpm)
    four = Detector.from_pretrained("ddpm", ddpm, draws=4)
    assert four.settings.draws == 4 and one.fingerprint != four.fingerprint
    out = tmp_path / "r.json"
    first = scan(one, [folder], output=out)
    again = scan(four, [folder], output=out)  # resumable journal: a four-draw scan reuses no one-draw row
    assert again.resumed == 0 and again.computed == 3
    assert not np.allclose(first.frame["std"], again.frame["std"])
    assert json.loads(out.read_text())["settings"]["draws"] == 4
    csv = tmp_path / "r.csv"
    scan(four, [folder], output=csv)
    assert set(__import__("pandas").read_csv(csv)["draws"]) == {4}


@pytest.mark.parametrize("bad", ["0", "-2", "65", str(10**30)])
@pytest.mark.parametrize("command", ["scan", "audit", "calibrate"])
def test_a_bad_draws_is_one_line_and_exit_2(command, bad, tmp_path):
    extra = ["--threshold", "0.5"] if command == "audit" else []  # audit first asks for a threshold
    res = CliRunner().invoke(app, [command, str(tmp_path), "--draws", bad, "--model", "demo", *extra])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip() and "MEMDETECT_DEBUG" not in ln]
    assert len(lines) == 1 and "--draws must be an integer from 1 to 64" in lines[0], res.output
    assert "Traceback" not in res.output


def test_config_draws_round_trip_and_pin(ddpm, tmp_path):
    folder = tmp_path / "ref"
    write_images(folder, 4)
    cfg = tmp_path / "memdetect.toml"
    res = CliRunner().invoke(app, ["calibrate", str(folder), "--model", "ddpm", "--model-path", ddpm, "--draws", "2",
                                   "-o", str(cfg), "-q", "--workers", "0"])
    assert res.exit_code == 0, res.output
    c = load_config(cfg)
    assert c.draws == 2
    assert merge(c, {"draws": 1}, set())["draws"] == 2  # the config's draws, unless a flag says otherwise
    with pytest.raises(UsageError, match="--draws 4 differs from draws = 2"):
        merge(c, {"draws": 4}, {"draws"})
    # a one-draw calibration writes no key and reads back as one draw
    res = CliRunner().invoke(app, ["calibrate", str(folder), "--model", "ddpm", "--model-path", ddpm,
                                   "-o", str(tmp_path / "one.toml"), "-q", "--workers", "0"])
    assert res.exit_code == 0 and "draws" not in tomllib.loads((tmp_path / "one.toml").read_text())
    assert load_config(tmp_path / "one.toml").draws == 1
    # a scan with the config scores with its two draws, and says so
    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["scan", str(folder), "-c", str(cfg), "-o", str(out), "-q", "--workers", "0"])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["settings"]["draws"] == 2
    for bad in ("0", "65", "1.5", '"4"'):
        cfg.write_text(f'model = "demo"\nthreshold = 0.5\ndraws = {bad}\n')
        with pytest.raises(UsageError, match="draws in"):
            load_config(cfg)


def test_out_of_memory_halves_the_noised_copies_per_pass(ddpm, monkeypatch):
    det = Detector.from_pretrained("ddpm", ddpm, draws=4, batch_size=8)
    x = pixels(4, det.adapter.resolution, seed=4)
    want = det.draw_features(x)
    forward, sizes = det.adapter.forward, []

    def small_only(x_t, t):
        sizes.append(x_t.shape[0])
        if x_t.shape[0] > 2:
            raise torch.OutOfMemoryError("simulated")
        return forward(x_t, t)

    monkeypatch.setattr(det.adapter, "forward", small_only)
    got = det.draw_features(x)
    assert sizes[:3] == [8, 4, 2] and set(sizes[3:]) == {2} and det.batch_size == 2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_evidence_recomputes_the_score_the_scan_gave(ddpm, tmp_path):
    """Evidence maps are one draw's raw activations; the recomputed score must still be the scan's (K draws and a
    reference normalisation included), or every flagged image would be noted as changed since the scan."""
    from memdetect.workflows.scan import scan

    write_images(tmp_path / "imgs", 4, size=(16, 16), seed=7)
    det = Detector.from_pretrained("ddpm", ddpm, threshold=-1e9, draws=3)
    raw = det.features(pixels(8, det.adapter.resolution, seed=9))
    det.normalise = {"mean": raw.mean(0).tolist(), "std": (raw.std(0) + 0.05).tolist()}
    res = scan(det, [tmp_path / "imgs"], evidence_json=tmp_path / "e.json", evidence_top=4, num_workers=0)
    assert len(res.evidence["images"]) == 4
    for ev in res.evidence["images"]:
        assert ev["score_recomputed"] == pytest.approx(ev["score"], rel=1e-4) and "note" not in ev
