"""Every family end to end on tiny random-weight models loaded through the real from_pretrained path."""

import numpy as np
import pytest
import torch

from memdetect import Detector
from memdetect.errors import LayerError, ModelNotFoundError, UnsupportedModelError, UsageError
from memdetect.models import detect_family, resolve_model


@pytest.fixture(params=["sd", "dit", "ddpm"])
def family_path(request, tiny_sd, tiny_dit, tiny_ddpm):
    return request.param, {"sd": tiny_sd, "dit": tiny_dit, "ddpm": tiny_ddpm}[request.param]


def test_family_detection(tiny_sd, tiny_dit, tiny_ddpm):
    assert detect_family(str(tiny_sd)) == "sd"
    assert detect_family(str(tiny_dit)) == "dit"
    assert detect_family(str(tiny_ddpm)) == "ddpm"


def test_features_and_scores(family_path):
    family, path = family_path
    det = Detector.from_pretrained(family, str(path))
    r = det.adapter.resolution
    images = torch.randint(0, 256, (3, 3, r, r), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    feats = det.features(images)
    assert feats.ndim == 2 and feats.shape[0] == 3 and torch.isfinite(feats).all()
    s = det.score_tensor(images)
    assert set(s) == {"std", "l4l2", "entropy", "maxmin"}
    assert all(np.isfinite(v).all() for v in s.values())
    # a folder passed as --model is detected too
    assert Detector.from_pretrained(str(path)).adapter.family == family


def test_early_exit_equals_full_forward(family_path):
    """The default detector (early exit, pruned to what runs) against the whole model's full forward."""
    family, path = family_path
    det = Detector.from_pretrained(family, str(path))
    assert det.pruned
    r = det.adapter.resolution
    images = torch.randint(0, 256, (2, 3, r, r), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    early = det.features(images)
    whole = Detector.from_pretrained(family, str(path), prune=False)
    assert not whole.pruned
    whole.early_exit = False
    assert torch.equal(early, whole.features(images))
    with pytest.raises(UsageError, match="prune=False"):
        det.early_exit = False


def test_noise_depends_on_image_not_batch(family_path):
    family, path = family_path
    det = Detector.from_pretrained(family, str(path))
    r = det.adapter.resolution
    batch = torch.randint(0, 256, (16, 3, r, r), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    together = det.features(batch)
    for i in (0, 7, 15):
        alone = det.features(batch[i : i + 1])
        torch.testing.assert_close(alone[0], together[i], rtol=1e-4, atol=1e-5)
    # another seed gives other noise, hence other features
    det.seed = 1
    assert not torch.allclose(det.features(batch[:1])[0], together[0])


def test_sd_default_layer_is_post_norm2_silu(tiny_sd):
    det = Detector.from_pretrained("sd", str(tiny_sd))
    assert str(det.layer) == "up_blocks.0.resnets.2.conv2:in"
    r = det.adapter.resolution
    images = torch.randint(0, 256, (2, 3, r, r), dtype=torch.uint8)
    a = det.features(images)
    det.layer = type(det.layer).parse("up_blocks.0.resnets.2.nonlinearity@2")
    assert torch.equal(a, det.features(images))
    # the empty-prompt condition is computed once and kept
    assert det.adapter.cond.shape[:2] == (1, 77)


def test_dit_readings(tiny_dit):
    mlp = Detector.from_pretrained("dit", str(tiny_dit))
    assert str(mlp.layer) == "transformer_blocks.1.ff.net.0"  # 4 blocks: index 4/2-1
    from memdetect.models import ModelSpec, load_adapter

    adaln = load_adapter(ModelSpec("dit", str(tiny_dit), "dit", options={"reading": "adaln"}),
                         torch.device("cpu"), torch.float32)
    assert adaln.default_layer() == "transformer_blocks.1.norm1.silu"
    r = mlp.adapter.resolution
    images = torch.randint(0, 256, (2, 3, r, r), dtype=torch.uint8)
    assert mlp.features(images).shape == (2, 4 * 8)  # 4 x hidden (2 heads x 4)
    d2 = Detector(adaln)
    f = d2.features(images)
    assert f.shape == (2, 8)
    assert torch.allclose(f[0], f[1])  # the adaLN SiLU never sees the image: identical for any two images


def test_usage_errors(tiny_ddpm):
    with pytest.raises(UsageError, match="metric"):
        Detector.from_pretrained("ddpm", str(tiny_ddpm), metric="nope")
    with pytest.raises(UsageError, match="timestep"):
        Detector.from_pretrained("ddpm", str(tiny_ddpm), timestep=5000)
    with pytest.raises(LayerError, match="not a module"):
        Detector.from_pretrained("ddpm", str(tiny_ddpm), layer="up_blocks.9.x")
    with pytest.raises(UsageError, match="--model-path"):
        resolve_model("sd")
    with pytest.raises(UsageError, match="unknown model"):
        resolve_model("not-a-model")


def test_missing_models_give_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        Detector.from_pretrained("sd14", str(tmp_path / "nowhere"))
    with pytest.raises(ModelNotFoundError, match="offline mode is set") as e:
        Detector.from_pretrained("sd14", model_path=None)
    assert "\n" not in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match="cannot load"):
        Detector.from_pretrained("ddpm", str(empty))
    with pytest.raises(UnsupportedModelError, match="cannot tell"):
        detect_family(str(empty))


def test_the_preset_table_is_read_strictly():
    """memdetect/data/presets.json: every row's keys are Preset fields; a misspelt key or schedule is refused."""
    import json

    from memdetect.models.presets import PRESETS, read_table

    row = {"name": "x", "family": "sd", "source": "a/b", "schedule": "SCALED_LINEAR", "note": "n"}
    assert read_table(json.dumps([row]))["x"].schedule["beta_schedule"] == "scaled_linear"
    for bad in ({**row, "layr": "up_blocks.0"}, {**row, "schedule": "COSINE"}):
        with pytest.raises(ValueError, match="preset row 'x'"):
            read_table(json.dumps([bad]))
    assert PRESETS["demo"].source.endswith("demo") and PRESETS["sd14"].nemo_published
