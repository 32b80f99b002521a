"""Baselines and ROC metrics checked against hand-computed values on toy models."""

import numpy as np
import pytest
import torch
from torch import nn

from memdetect.bench import baselines
from memdetect.bench.labels import LabelRule, nearest_neighbours
from memdetect.bench.metrics import roc_metrics, tpr_at_fpr
from memdetect.models.base import Adapter, to_unit_range


class LinearEps(Adapter):
    """Pixel adapter whose noise prediction is eps_hat(y) = w * y (a per-channel scale): closed forms exist."""

    family = "toy"

    def __init__(self, w):
        from diffusers import DDPMScheduler

        conv = nn.Conv2d(3, 3, 1, bias=False)
        with torch.no_grad():
            conv.weight.zero_()
            for c in range(3):
                conv.weight[c, c] = w[c]
        super().__init__(conv, DDPMScheduler(), resolution=4, device=torch.device("cpu"), dtype=torch.float32)

    @classmethod
    def load(cls, source, **kw):  # pragma: no cover - built in memory, never loaded
        raise TypeError("the toy adapter is built in memory")

    def encode(self, images):
        return to_unit_range(images)

    def forward(self, x_t, t):
        self.denoiser(x_t)

    def predict_noise(self, x_t, t):
        return self.denoiser(x_t)

    def default_layer(self):
        return ""


W = [0.5, -1.0, 2.0]
IMAGES = torch.randint(0, 256, (3, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_flipd_closed_form():
    adapter = LinearEps(W)
    t = 50
    a_bar = float(adapter.scheduler.alphas_cumprod[t])
    a, s = a_bar**0.5, (1 - a_bar) ** 0.5
    x0 = to_unit_range(IMAGES)
    d = x0[0].numel()
    trace = sum(W) * 16  # tr of the per-pixel diagonal Jacobian: 16 pixels per channel
    y = a * x0
    eps = torch.stack([y[:, c] * W[c] for c in range(3)], 1)
    expected = d - s * trace + eps.pow(2).flatten(1).sum(1)
    # Rademacher probes give the exact trace of a diagonal Jacobian, so even one probe is exact
    got = baselines.flipd(adapter, IMAGES, t, seeds=[1, 2, 3], probes=1)
    torch.testing.assert_close(got, -expected, rtol=1e-5, atol=1e-4)


def test_denoising_loss_closed_form():
    adapter = LinearEps([0.0, 0.0, 0.0])  # predicts zero noise: loss = mean(eps^2)
    seeds = [5, 6, 7]
    got = baselines.denoising_loss(adapter, IMAGES, 50, seeds)
    eps = torch.stack([torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(s)) for s in seeds])
    torch.testing.assert_close(got, -eps.pow(2).flatten(1).mean(1))


def test_nearest_generation_hand_computed():
    imgs = torch.zeros(3, 1, 1, 4, dtype=torch.uint8)
    imgs[1] += 255  # far from the others
    imgs[2, 0, 0, 0] = 51  # 0.2 away from image 0 in one of 4 pixels: rms = 0.2 / 2 = 0.1
    got = baselines.nearest_generation(imgs)
    torch.testing.assert_close(got, torch.tensor([-0.1, -(0.8**2 * 1 + 1 * 3) ** 0.5 / 2, -0.1]))


def test_roc_metrics_hand_computed():
    labels = [0, 0, 0, 0, 1, 1]
    scores = [0.1, 0.2, 0.3, 0.9, 0.8, 0.95]
    m = roc_metrics(labels, scores)
    assert m["auroc"] == pytest.approx(7 / 8)  # 7 of 8 (memorized, generalized) pairs ordered right
    assert m["tpr_at_1pct_fpr"] == pytest.approx(0.5)  # only 0.95 can be flagged before any false positive
    assert tpr_at_fpr(labels, scores, 0.25) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="both"):
        roc_metrics([1, 1], [0.1, 0.2])


def test_nearest_neighbour_labels():
    train = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    copy = train[17:18].clone()
    brighter = (train[3:4].int() // 2 + 60).to(torch.uint8)  # affine change: same correlation
    noise = torch.randint(0, 256, (1, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(9))
    sim, idx = nearest_neighbours(torch.cat([copy, brighter, noise]), train, chunk=16)
    assert idx[0] == 17 and sim[0] == pytest.approx(1.0, abs=1e-5)
    assert idx[1] == 3 and sim[1] > 0.99
    assert sim[2] < 0.5
    rule = LabelRule()
    assert [rule.label(float(s)) for s in sim] == ["memorized", "memorized", "generalized"]
    with pytest.raises(ValueError):
        LabelRule(memorized_at=0.5, generalized_below=0.9)


class LinearEpsVE(LinearEps):
    """The same linear noise prediction under EDM's variance-exploding noising: x_t = x0 + sigma eps."""

    SIGMA = 0.3

    def apply_noise(self, x0, t, eps):
        return x0.float() + self.SIGMA * eps.float()

    def noise_std(self, t):
        return self.SIGMA


def test_baselines_follow_the_adapters_noising():
    adapter = LinearEpsVE(W)
    x0 = to_unit_range(IMAGES)
    trace = sum(W) * 16
    eps_hat = torch.stack([x0[:, c] * W[c] for c in range(3)], 1)  # at y = x0: no signal scaling
    expected = x0[0].numel() - adapter.SIGMA * trace + eps_hat.pow(2).flatten(1).sum(1)
    torch.testing.assert_close(baselines.flipd(adapter, IMAGES, 50, seeds=[1, 2, 3]), -expected, rtol=1e-5, atol=1e-4)
    # denoising loss: eps_hat(x0 + s eps) - eps = w (x0 + s eps) - eps, per channel
    seeds = [5, 6, 7]
    eps = torch.stack([torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(s)) for s in seeds])
    w = torch.tensor(W).view(1, 3, 1, 1)
    err = (w * (x0 + adapter.SIGMA * eps) - eps).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(baselines.denoising_loss(adapter, IMAGES, 50, seeds), -err, rtol=1e-5, atol=1e-6)
