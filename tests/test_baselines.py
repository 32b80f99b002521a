"""Baselines and ROC metrics checked against hand-computed values on toy models."""

import pytest
import torch
from torch import nn

from memdetect.bench import baselines
from memdetect.bench.labels import LabelRule, nearest_neighbours
from memdetect.core.metrics import roc_metrics, tpr_at_fpr
from memdetect.errors import UnsupportedModelError
from memdetect.models.base import Adapter, to_unit_range
from memdetect.models.sd import cross_attention_values


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

    def predict_noise(self, x_t, t, cond=None):
        self._unconditional(cond)
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


# -- Wen et al., NeMo, Carlini et al.: closed forms and orderings on toy models ------------------------------------


class BiasedLinearEps(LinearEps):
    """eps_hat(y, c) = w * y + c: the condition adds a fixed vector, so ||eps(y, c) - eps(y, null)|| = ||c|| at every
    point y, hence at every step of any sampling trajectory."""

    conditioning = "class"

    def predict_noise(self, x_t, t, cond=None):
        out = self.denoiser(x_t)
        return out if cond is None else out + cond


def test_wen_first_and_all_steps_closed_form():
    adapter = BiasedLinearEps([0.1, -0.2, 0.3])
    cond = torch.zeros(3, 3, 4, 4)
    cond[0, 0, 0, 0] = 3.0  # norm 3
    cond[1] = 0.5  # norm 0.5 * sqrt(48)
    cond[2, 2] = -1.0  # norm sqrt(16) = 4
    expected = torch.tensor([3.0, 0.5 * 48 ** 0.5, 4.0])
    x_T = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(baselines.wen_first_step(adapter, x_T, 981, cond), expected)
    sample = adapter.sample([1, 2, 3], cond=cond, steps=4, guidance=7.5)  # the protocol's DDIM sampler
    x_T2, first_t, norms = sample.x_T, sample.first_t, sample.noise_difference
    assert norms.shape == (4, 3) and first_t == 750  # 1000 training steps, 4 with "leading" spacing: 750, 500, ...
    torch.testing.assert_close(baselines.wen_all_steps(norms), expected)
    # the sampler's first recorded norm is the stand-alone first-step score at its x_T
    torch.testing.assert_close(norms[0], baselines.wen_first_step(adapter, x_T2, first_t, cond))
    # from seeds, in the family's own terms (Adapter.first_step_difference): DDIM's first step, the same norm
    assert adapter.first_sampling_step(4) == 750
    torch.testing.assert_close(baselines.wen_first_step_of(adapter, [1, 2, 3], cond, 4), norms[0])


class _Block(nn.Module):
    def __init__(self, to_v: nn.Linear, cross: bool = True):
        super().__init__()
        attn = nn.Module()
        attn.is_cross_attention = cross  # as diffusers' Attention says
        attn.to_v = to_v
        block = nn.Module()
        if cross:
            block.attn2 = attn
        else:
            block.attn1 = attn
        self.transformer_blocks = nn.ModuleList([block])


def _linear(weight) -> nn.Linear:
    w = torch.tensor(weight, dtype=torch.float32)
    layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    return layer


def test_nemo_value_neurons_hand_computed():
    unet = nn.Module()
    down = nn.Module()
    down.attentions = nn.ModuleList([_Block(_linear([[1.0, 0.0], [0.0, -2.0]])),
                                     _Block(_linear([[9.0, 9.0]]), cross=False)])  # self-attention: not NeMo's
    unet.down_blocks = nn.ModuleList([down])
    unet.mid_block = nn.Module()
    unet.mid_block.attentions = nn.ModuleList([_Block(_linear([[1.0, 1.0]]))])
    up = nn.Module()
    up.attentions = nn.ModuleList([_Block(_linear([[5.0, 5.0]]))])  # up blocks: not NeMo's
    unet.up_blocks = nn.ModuleList([up])
    values = cross_attention_values(unet)  # found from the module tree: down and mid blocks, cross-attention only
    assert list(values) == ["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v",
                            "mid_block.attentions.0.transformer_blocks.0.attn2.to_v"]
    # two tokens per prompt; a neuron's activation is |to_v(token)| averaged over the tokens
    emb = torch.tensor([[[1.0, 1.0], [-3.0, 0.0]],   # neurons: (|1|+|-3|)/2=2, (|-2|+0)/2=1, (|2|+|-3|)/2=2.5
                        [[0.0, 2.0], [1.0, 1.0]],    # 0.5, 3, 2
                        [[2.0, -2.0], [0.0, 0.0]]])  # 1, 2, 0
    acts = baselines.nemo_activations(values.values(), emb)
    torch.testing.assert_close(acts, torch.tensor([[2.0, 1.0, 2.5], [0.5, 3.0, 2.0], [1.0, 2.0, 0.0]]))
    stats = baselines.NemoStatistics.fit(acts[:2])  # reference: the first two prompts
    torch.testing.assert_close(stats.mean, torch.tensor([1.25, 2.0, 2.25]))
    torch.testing.assert_close(stats.std, torch.tensor([0.75, 1.0, 0.25]) * 2 ** 0.5)  # unbiased, n = 2
    z = torch.tensor([0.25 / 0.75, 0.0, 2.25 / 0.25]) / 2 ** 0.5  # the third prompt's |a - mean| / std
    torch.testing.assert_close(stats.zscores(acts[2:]), z[None])
    torch.testing.assert_close(stats.score(acts), torch.tensor([2 ** -0.5, 2 ** -0.5, 9 / 2 ** 0.5]))
    # leaving the third prompt out of statistics over all three gives the statistics of the first two
    loo = baselines.NemoStatistics.fit(acts).without(acts[2])
    assert loo.count == 2
    torch.testing.assert_close(loo.mean, stats.mean)
    torch.testing.assert_close(loo.std, stats.std)
    with pytest.raises(ValueError, match="at least 3"):
        stats.without(acts[0])
    with pytest.raises(UnsupportedModelError, match="value layers"):
        cross_attention_values(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(UnsupportedModelError, match="no text cross-attention"):
        LinearEps(W).cross_attention_values()  # the protocol's answer for a family without text conditioning


def test_tiled_l2_needs_every_tile_to_match():
    a = torch.zeros(1, 1, 4, 4)
    one_tile = a.clone()
    one_tile[..., :2, :2] = 0.5  # one of four 2x2 tiles off by 0.5: global RMS 0.25
    everywhere = a + 0.3  # every pixel off by 0.3: global RMS 0.3
    torch.testing.assert_close(baselines.tiled_l2(a, torch.cat([one_tile, everywhere]), grid=2),
                               torch.tensor([[0.5, 0.3]]))
    torch.testing.assert_close(baselines.tiled_l2(a, torch.cat([one_tile, everywhere]), grid=1),
                               torch.tensor([[0.25, 0.3]]))  # the global distance orders them the other way
    u8 = torch.full((1, 3, 4, 4), 255, dtype=torch.uint8)
    torch.testing.assert_close(baselines.tiled_l2(u8, torch.zeros_like(u8)), torch.ones(1, 1))  # uint8 -> [0, 1]
    with pytest.raises(ValueError, match="multiples"):
        baselines.tiled_l2(torch.zeros(1, 1, 6, 6), torch.zeros(1, 1, 6, 6), grid=4)


def test_carlini_density_hand_computed():
    imgs = torch.zeros(4, 1, 4, 4)
    imgs[1] += 0.1  # near-copies of image 0
    imgs[2] += 0.2
    imgs[3] += 0.9  # an outlier
    # pairwise (constant offsets): d01=.1 d02=.2 d03=.9 d12=.1 d13=.8 d23=.7
    torch.testing.assert_close(baselines.carlini_density(imgs, neighbours=1), -torch.tensor([0.1, 0.1, 0.1, 0.7]))
    torch.testing.assert_close(baselines.carlini_density(imgs, neighbours=2), -torch.tensor([0.2, 0.1, 0.2, 0.8]))
    torch.testing.assert_close(baselines.carlini_density(imgs, neighbours=3), -torch.tensor([0.9, 0.8, 0.7, 0.9]))
    # the demo's nearest-generation criterion is the one-tile, one-neighbour case
    torch.testing.assert_close(baselines.nearest_generation((imgs * 255).round().to(torch.uint8)),
                               baselines.carlini_density(imgs, neighbours=1, grid=1), atol=2e-3, rtol=0)
    with pytest.raises(ValueError, match="neighbour"):
        baselines.carlini_density(imgs, neighbours=4)
