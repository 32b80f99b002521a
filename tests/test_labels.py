"""Ground-truth labels: the flip- and shift- (and colour-cast-) invariant pixel similarity, and the SSCD labeller."""

import pytest
import torch
import torch.nn.functional as F

from memdetect.bench.labels import (GENERALIZED_BELOW, MEMORIZED_AT, SSCD_MEAN, SSCD_RULE, SSCD_SIZE, SSCD_STD,
                                    LabelRule, PixelLabeller, SSCDLabeller, load_sscd, make_labeller,
                                    nearest_match, nearest_neighbours, paired_correlation)
from memdetect.errors import ModelNotFoundError, UsageError


def textures(n: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    """Seeded uint8 images [n,3,size,size] with structure at several scales (like small photos, unlike pure noise)."""
    g = torch.Generator().manual_seed(seed)
    x = sum(F.interpolate(torch.randn(n, 3, r, r, generator=g), size=size, mode="bilinear", align_corners=False)
            for r in (4, 8, 16))
    x = (x - x.amin(dim=(1, 2, 3), keepdim=True)) / (x.amax(dim=(1, 2, 3), keepdim=True) -
                                                      x.amin(dim=(1, 2, 3), keepdim=True))
    return (x * 255).round().to(torch.uint8)


def shifted(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """img moved by (dy, dx) px (out[y + dy, x + dx] = img[y, x]), edges replicated: what a shifted copy looks like."""
    h, w = img.shape[-2:]
    pad = max(abs(dy), abs(dx))
    p = F.pad(img[None].float(), (pad, pad, pad, pad), mode="replicate")[0]
    return p[:, pad - dy: pad - dy + h, pad - dx: pad - dx + w].round().to(torch.uint8)


TRAIN = textures(64)


def test_default_rule_is_unchanged():
    assert (MEMORIZED_AT, GENERALIZED_BELOW) == (0.95, 0.80)
    assert LabelRule().label(0.96) == "memorized" and LabelRule().label(0.85) == "excluded"
    assert LabelRule().label(0.5) == "generalized"
    assert (SSCD_RULE.memorized_at, SSCD_RULE.generalized_below) == (0.9, 0.5)
    with pytest.raises(ValueError, match="must not exceed"):
        LabelRule(0.5, 0.9)


def test_without_invariance_it_is_the_plain_correlation():
    samples = torch.cat([TRAIN[:5], textures(5, seed=1)])
    m = nearest_match(samples, TRAIN, max_shift=0, flip=False)
    sim, idx = nearest_neighbours(samples, TRAIN)
    assert torch.allclose(m.similarity, sim, atol=1e-5) and torch.equal(m.index, idx)
    assert not m.flipped.any() and (m.dy == 0).all() and (m.dx == 0).all()
    assert torch.allclose(m.similarity[:5], torch.ones(5), atol=1e-5)  # exact copies


def test_flipped_copy_is_memorized_only_with_the_invariance():
    copy = TRAIN[7].flip(-1)[None]
    plain, _ = nearest_neighbours(copy, TRAIN)
    assert LabelRule().label(float(plain[0])) != "memorized"  # a mirrored copy escapes the plain correlation
    m = nearest_match(copy, TRAIN)
    assert int(m.index[0]) == 7 and bool(m.flipped[0])
    assert float(m.similarity[0]) > 0.999
    assert LabelRule().label(float(m.similarity[0])) == "memorized"


@pytest.mark.parametrize("dy,dx", [(2, -1), (-2, 2), (0, 1)])
def test_shifted_copy_is_memorized_only_with_the_invariance(dy, dx):
    copy = shifted(TRAIN[11], dy, dx)[None]
    plain, _ = nearest_neighbours(copy, TRAIN)
    assert LabelRule().label(float(plain[0])) != "memorized"
    m = nearest_match(copy, TRAIN)
    assert int(m.index[0]) == 11 and not bool(m.flipped[0])
    assert (int(m.dy[0]), int(m.dx[0])) == (dy, dx)
    assert float(m.similarity[0]) > 0.999  # the overlapping windows are identical
    assert LabelRule().label(float(m.similarity[0])) == "memorized"


def test_shift_beyond_max_shift_is_not_found_and_novel_images_stay_generalized():
    far = shifted(TRAIN[3], 0, 6)[None]
    assert float(nearest_match(far, TRAIN).similarity[0]) < MEMORIZED_AT
    novel = textures(20, seed=5)
    sims = nearest_match(novel, TRAIN).similarity
    assert (sims < GENERALIZED_BELOW).all()  # the max over 50 transforms does not lift unrelated images


def tinted(img: torch.Tensor, gain=(0.5, 0.8, 0.6), offset=(10, 40, 90)) -> torch.Tensor:
    """img under a colour cast: a gain and an offset per channel (what a blue-tinted copy looks like)."""
    g = torch.tensor(gain).view(3, 1, 1)
    o = torch.tensor(offset, dtype=torch.float32).view(3, 1, 1)
    return (img.float() * g + o).clamp(0, 255).round().to(torch.uint8)


def test_colour_cast_copy_is_memorized_only_with_the_cast_mode():
    copy = tinted(shifted(TRAIN[21], 1, -1).flip(-1))[None]
    rgb = nearest_match(copy, TRAIN)
    assert LabelRule().label(float(rgb.similarity[0])) != "memorized"  # the cast escapes the RGB correlation
    cast = nearest_match(copy, TRAIN, colour="cast")
    assert int(cast.index[0]) == 21 and bool(cast.flipped[0]) and (int(cast.dy[0]), int(cast.dx[0])) == (1, -1)
    assert float(cast.similarity[0]) > 0.995  # only uint8 rounding separates it from the copy
    labeller = make_labeller("pixel-cast")
    assert labeller.name == "pixel-cast" and labeller.rule == LabelRule()
    sim, idx = labeller.nearest(copy, TRAIN)
    assert int(idx[0]) == 21 and labeller.rule.label(float(sim[0])) == "memorized"


def test_cast_mode_never_lowers_the_similarity_and_keeps_novel_images_generalized():
    samples = torch.cat([TRAIN[:4], tinted(TRAIN[4:8]), textures(20, seed=5)])
    rgb = nearest_match(samples, TRAIN).similarity
    cast = nearest_match(samples, TRAIN, colour="cast").similarity
    assert (cast >= rgb - 1e-6).all()
    assert torch.allclose(cast[:4], torch.ones(4), atol=1e-5)
    assert (cast[8:] < GENERALIZED_BELOW).all()  # unrelated images stay unrelated under the extra invariance
    batched = nearest_match(samples, (TRAIN[s: s + 10] for s in range(0, 64, 10)), colour="cast")
    assert torch.allclose(batched.similarity, cast)
    with pytest.raises(ValueError, match="colour must be one of"):
        nearest_match(samples, TRAIN, colour="hsv")


def test_batches_and_flip_of_flip():
    samples = torch.cat([TRAIN[40].flip(-1)[None], shifted(TRAIN[63], -1, -2)[None], textures(3, seed=9)])
    whole = nearest_match(samples, TRAIN)
    batched = nearest_match(samples, (TRAIN[s: s + 10] for s in range(0, 64, 10)))
    assert torch.equal(whole.index, batched.index) and torch.allclose(whole.similarity, batched.similarity)
    assert whole.index[:2].tolist() == [40, 63]


def test_errors_and_paired_correlation():
    with pytest.raises(ValueError, match="no overlap"):
        nearest_match(TRAIN[:1], TRAIN, max_shift=16)
    with pytest.raises(ValueError, match=">= 0"):
        nearest_match(TRAIN[:1], TRAIN, max_shift=-1)
    with pytest.raises(ValueError, match="differ"):
        nearest_match(TRAIN[:1, :, :16, :16], TRAIN)
    r = paired_correlation(TRAIN[:4], TRAIN[:4])
    assert torch.allclose(r, torch.ones(4), atol=1e-5)
    brighter = (TRAIN[:4].float() * 0.8 + 20).round()  # affine in intensity: correlation stays ~1
    assert (paired_correlation(brighter, TRAIN[:4]) > 0.999).all()


def test_pixel_labeller_and_factory():
    lab = make_labeller("pixel")
    assert isinstance(lab, PixelLabeller) and lab.rule == LabelRule() and lab.name == "pixel"
    sim, idx = lab.nearest(TRAIN[5].flip(-1)[None], TRAIN)
    assert int(idx[0]) == 5 and float(sim[0]) > 0.999
    with pytest.raises(UsageError, match="--sscd-weights"):
        make_labeller("sscd")
    with pytest.raises(UsageError, match="applies to --labeller sscd"):
        make_labeller("pixel", sscd_weights="x.pt")
    with pytest.raises(UsageError, match="unknown labeller 'clip'"):
        make_labeller("clip")


class TinyDescriptor(torch.nn.Module):
    """A stand-in for SSCD's TorchScript network: [B,3,H,W] -> [B,D]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 16, 5, stride=4)
        self.fc = torch.nn.Linear(16 * 4, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        return self.fc(F.adaptive_avg_pool2d(h, 2).flatten(1))


class Probe(torch.nn.Module):
    """Returns what it was given: channel means and the input size, to check the preprocessing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = torch.full((x.shape[0], 1), float(x.shape[-1]))
        return torch.cat([x.mean(dim=(2, 3)), size], dim=1)


def test_sscd_labeller_on_a_torchscript_module(tmp_path):
    path = tmp_path / "sscd_test.torchscript.pt"
    torch.jit.script(TinyDescriptor()).save(str(path))
    lab = make_labeller("sscd", sscd_weights=path)
    assert isinstance(lab, SSCDLabeller) and lab.rule == SSCD_RULE and lab.name == "sscd"
    d = lab.embed(TRAIN[:5])
    assert d.shape == (5, 24) and torch.allclose(d.norm(dim=1), torch.ones(5), atol=1e-5)
    samples = torch.cat([TRAIN[[9, 30]], textures(2, seed=3)])
    sim, idx = lab.nearest(samples, TRAIN)
    assert idx[:2].tolist() == [9, 30] and torch.allclose(sim[:2], torch.ones(2), atol=1e-5)
    assert lab.rule.label(float(sim[0])) == "memorized"
    # same result through load_sscd + the class, batch by batch
    lab2 = SSCDLabeller(load_sscd(path), batch_size=3)
    sim2, idx2 = lab2.nearest(samples, TRAIN)
    assert torch.equal(idx, idx2) and torch.allclose(sim, sim2, atol=1e-5)


def test_sscd_preprocessing_resizes_and_normalises(tmp_path):
    path = tmp_path / "probe.pt"
    torch.jit.script(Probe()).save(str(path))
    lab = SSCDLabeller(load_sscd(path))
    gray = torch.full((1, 3, 32, 32), 128, dtype=torch.uint8)
    raw = lab.model((F.interpolate(gray.float() / 255, size=SSCD_SIZE) - torch.tensor(SSCD_MEAN).view(1, 3, 1, 1))
                    / torch.tensor(SSCD_STD).view(1, 3, 1, 1))
    assert float(raw[0, 3]) == SSCD_SIZE
    assert torch.allclose(lab.embed(gray), F.normalize(raw, dim=1), atol=1e-5)


def test_load_sscd_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="do not exist"):
        load_sscd(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a zip archive")
    with pytest.raises(ModelNotFoundError, match="not a TorchScript module"):
        load_sscd(bad)


def test_the_paper_benches_label_batch_by_batch_as_in_one_piece(tmp_path):
    """``bench imagenet | cifar10`` stream the training folder in batches: every labeller finds the same nearest
    image and similarity as over the whole set at once."""
    from memdetect.bench.paper import nearest_in

    path = tmp_path / "sscd_test.torchscript.pt"
    torch.jit.script(TinyDescriptor()).save(str(path))
    samples = torch.cat([TRAIN[[9, 30]].flip(-1), tinted(TRAIN[41])[None], textures(3, seed=5)])
    batches = [TRAIN[i:i + 7] for i in range(0, len(TRAIN), 7)]

    class Plain:  # neither pixel nor embed: asked batch by batch
        name, rule = "plain", LabelRule()

        def nearest(self, s, t):
            return PixelLabeller(max_shift=0, flip=False).nearest(s, t)

    for lab in (PixelLabeller(), make_labeller("pixel-cast"), make_labeller("sscd", sscd_weights=path), Plain()):
        whole = lab.nearest(samples, TRAIN)
        streamed = nearest_in(lab, samples, iter(batches))
        assert torch.equal(whole[1], streamed[1]) and torch.allclose(whole[0], streamed[0], atol=1e-5), lab.name
        if lab.name == "pixel-cast":  # the paper benches' default finds the tinted copy
            assert int(streamed[1][2]) == 41 and lab.rule.label(float(streamed[0][2])) == "memorized"
