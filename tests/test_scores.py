import math

import numpy as np
import pytest
import torch

from memdetect.core import scores
def ref(v: np.ndarray) -> dict[str, np.ndarray]:
    """Independent numpy reference implementations (float64)."""
    v = v.astype(np.float64)
    out = {"std": v.std(axis=1)}
    l2 = np.sqrt((v**2).sum(1))
    out["l4l2"] = np.where(l2 > 0, ((v**4).sum(1)) ** 0.25 / np.where(l2 > 0, l2, 1), 0)
    a = np.abs(v)
    p = a / np.where(a.sum(1, keepdims=True) > 0, a.sum(1, keepdims=True), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0).sum(1)
    out["entropy"] = np.where(a.sum(1) > 0, 1 - h / math.log(v.shape[1]), 0)
    out["maxmin"] = v.max(1) - v.min(1)
    return out


@pytest.mark.parametrize("shape", [(1, 2), (3, 7), (8, 1280)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_scores_match_reference(shape, dtype):
    v = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    expected = ref(v.double().numpy())
    tol = 1e-5 if dtype in (torch.float32, torch.float64) else 1e-3
    for name, fn in scores.SCORES.items():
        got = fn(v)
        assert got.shape == (shape[0],)
        np.testing.assert_allclose(got.double().numpy(), expected[name], rtol=tol, atol=tol, err_msg=name)


def test_known_values():
    one_hot = torch.zeros(1, 16)
    one_hot[0, 3] = 5.0
    flat = torch.ones(1, 16)
    assert scores.l4l2(one_hot).item() == pytest.approx(1.0)
    assert scores.entropy(one_hot).item() == pytest.approx(1.0)
    assert scores.l4l2(flat).item() == pytest.approx(16 ** -0.25)
    assert scores.entropy(flat).item() == pytest.approx(0.0, abs=1e-6)
    assert scores.std(flat).item() == 0.0
    assert scores.maxmin(one_hot).item() == 5.0
    zero = torch.zeros(2, 4)
    for fn in scores.SCORES.values():
        assert torch.all(fn(zero) == 0)


def test_every_score_ranks_spiky_above_balanced():
    g = torch.Generator().manual_seed(0)
    balanced = torch.rand(64, 256, generator=g) + 1.0
    spiky = balanced.clone()
    spiky[:, :4] += 20.0
    for name, fn in scores.SCORES.items():
        assert torch.all(fn(spiky) > fn(balanced)), name


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match=r"\[B, C\]"):
        scores.std(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="at least 2 channels"):
        scores.std(torch.zeros(2, 1))


def test_centre_and_standardise_against_a_reference():
    from memdetect.core.scores import centre, standardise

    g = torch.Generator().manual_seed(0)
    v = torch.randn(5, 7, generator=g) * 3 + 2
    c = centre(v)
    assert torch.allclose(c.mean(dim=1), torch.zeros(5), atol=1e-6)
    S = scores.SCORES
    assert torch.allclose(S["std"](c), S["std"](v)) and torch.allclose(S["maxmin"](c), S["maxmin"](v))
    mu, sd = v.mean(dim=0), v.std(dim=0)
    z = standardise(v, mu, sd)
    assert torch.allclose(z, (v - mu) / sd) and torch.allclose(z.mean(dim=0), torch.zeros(7), atol=1e-5)
    assert torch.isfinite(standardise(v, mu, torch.zeros(7))).all()  # a constant channel does not divide by zero
    with pytest.raises(ValueError, match="per-channel statistics"):
        standardise(v, mu[:3], sd)
