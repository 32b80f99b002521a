"""Pixel similarity: the flip- and shift-invariant nearest image by pixel correlation.

Shared by the benchmarks' ground-truth labels (``memdetect.bench.labels``, whose docstring gives the definition)
and the evidence's copy search (``memdetect.workflows.evidence``, ``--reference-dir``): a sample's nearest reference image
and the transform (mirror, shift of up to ``MAX_SHIFT`` pixels) that lines them up. It knows no model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

#: Default invariance of ``nearest_match``: shifts of up to this many pixels each way, and a horizontal flip.
MAX_SHIFT = 2


def centred_unit(x: torch.Tensor) -> torch.Tensor:
    """Each image centred and scaled to norm 1, flattened [N, C*H*W]: the dot product of two such rows is their
    pixel correlation."""
    flat = x.reshape(x.shape[0], -1).float()
    flat = flat - flat.mean(dim=1, keepdim=True)
    return flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-8)


def _channel_unit(x: torch.Tensor) -> torch.Tensor:
    """Each channel centred and scaled to norm 1/sqrt(C), flattened: the dot product of two such vectors is the mean
    over channels of the per-channel pixel correlations, unchanged by a positive gain and an offset per channel."""
    f = x.reshape(x.shape[0], x.shape[1], -1).float()
    f = f - f.mean(dim=2, keepdim=True)
    f = f / f.norm(dim=2, keepdim=True).clamp_min(1e-8)
    return f.reshape(x.shape[0], -1) / x.shape[1] ** 0.5


#: ``colour`` options of ``nearest_match``: how the pixels of two windows are compared.
COLOUR_MODES = ("rgb", "cast")


@dataclass(frozen=True)
class Match:
    """Per sample: best similarity, index of the nearest training image, and the transform that achieved it
    (``flipped``: the sample was mirrored; ``dy``, ``dx``: sample[y + dy, x + dx] lines up with train[y, x])."""

    similarity: torch.Tensor  # float [N]
    index: torch.Tensor  # long [N]
    flipped: torch.Tensor  # bool [N]
    dy: torch.Tensor  # long [N]
    dx: torch.Tensor  # long [N]


class RunningBest:
    """The nearest candidate so far, for each of ``n`` samples, over candidates that arrive in batches: the highest
    similarity, the candidate's index (counting across batches: ``offset`` is how many came before the batch) and a
    ``tag`` (e.g. which transform won). Starts below any correlation or cosine (-2); a tie keeps the earlier one."""

    def __init__(self, n: int, device: torch.device | str | None = None):
        self.similarity = torch.full((n,), -2.0, device=device)
        self.index = torch.zeros(n, dtype=torch.long, device=device)
        self.tag = torch.zeros(n, dtype=torch.long, device=device)

    def update(self, similarity: torch.Tensor, index: torch.Tensor, offset: int = 0, tag: int = 0) -> None:
        """Take the batch's best (``similarity``, ``index`` within the batch) where it beats the best so far."""
        better = similarity > self.similarity
        self.similarity = torch.where(better, similarity, self.similarity)
        self.index = torch.where(better, index + offset, self.index)
        self.tag = torch.where(better, torch.full_like(self.tag, tag), self.tag)


def _variants(max_shift: int, flip: bool) -> list[tuple[bool, int, int]]:
    shifts = range(-max_shift, max_shift + 1)
    return [(f, dy, dx) for f in ((False, True) if flip else (False,)) for dy in shifts for dx in shifts]


@torch.no_grad()
def nearest_match(samples: torch.Tensor, train: torch.Tensor | Iterable[torch.Tensor], *,
                  max_shift: int = MAX_SHIFT, flip: bool = True, colour: str = "rgb", chunk: int = 2048) -> Match:
    """Flip- and shift-invariant nearest training image by pixel correlation (see the module docstring).

    samples: [N, C, H, W]; train: [M, C, H, W] or an iterable of such batches (indices count across batches).
    ``max_shift=0, flip=False`` gives exactly ``nearest_neighbours``.

    ``colour``: ``"rgb"`` (default) correlates the flattened channels together; ``"cast"`` also survives a colour
    cast: the similarity of each window pair is the larger of the RGB correlation and the mean per-channel
    correlation (each channel centred and scaled on its own, so a positive gain and an offset per channel, e.g. a
    tint or a white-balance shift, leave it at 1). ``"cast"`` is never below ``"rgb"``.
    """
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    if colour not in COLOUR_MODES:
        raise ValueError(f"colour must be one of {', '.join(COLOUR_MODES)}, got {colour!r}")
    norms = [centred_unit] if colour == "rgb" else [centred_unit, _channel_unit]
    n, _, h, w = samples.shape
    s = max_shift
    if not (2 * s < h and 2 * s < w):
        raise ValueError(f"max_shift {s} leaves no overlap on {h}x{w} images")
    variants = _variants(s, flip)
    sample_windows = []
    for f, dy, dx in variants:
        x = samples.flip(-1) if f else samples
        window = x[:, :, s + dy: h - s + dy, s + dx: w - s + dx]
        sample_windows.append([norm(window) for norm in norms])
    batches = train
    if isinstance(train, torch.Tensor):
        batches = (train[start: start + chunk] for start in range(0, train.shape[0], chunk))
    best = RunningBest(n)
    start = 0
    for batch in batches:
        if batch.shape[1:] != samples.shape[1:]:
            raise ValueError(f"samples {tuple(samples.shape[1:])} and training images {tuple(batch.shape[1:])} differ")
        window = batch.to(samples.device)[:, :, s: h - s, s: w - s]
        ts = [norm(window) for norm in norms]
        for v, sw in enumerate(sample_windows):
            sims = sw[0] @ ts[0].T
            for a, b in zip(sw[1:], ts[1:]):
                sims = torch.maximum(sims, a @ b.T)
            val, idx = sims.max(dim=1)
            best.update(val.cpu(), idx.cpu(), start, tag=v)
        start += batch.shape[0]
    table = torch.tensor([(int(f), dy, dx) for f, dy, dx in variants], dtype=torch.long)
    chosen = table[best.tag]
    return Match(best.similarity, best.index, chosen[:, 0].bool(), chosen[:, 1], chosen[:, 2])


@torch.no_grad()
def near_duplicates(images: torch.Tensor, *, threshold: float = 0.95, size: int = 32, chunk: int = 1024
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Near-duplicate groups among ``images`` (uint8 or float ``[N, C, H, W]``) by pixel correlation (the measure of
    ``nearest_match`` without shifts or flips), at ``size`` x ``size`` pixels: ``counts`` [N] (how many images, itself
    included, correlate with each at >= ``threshold``) and ``group`` [N] (the index of the first image of its group:
    images are taken in order and each still ungrouped one gathers the ungrouped images that match it)."""
    x = images.float()
    if x.shape[-1] != size or x.shape[-2] != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="area")
    u = centred_unit(x)
    n = u.shape[0]
    counts = torch.zeros(n, dtype=torch.long)
    group = torch.full((n,), -1, dtype=torch.long)
    for start in range(0, n, chunk):
        sims = u[start:start + chunk] @ u.T >= threshold
        counts[start:start + chunk] = sims.sum(dim=1)
        for i in range(sims.shape[0]):
            k = start + i
            if group[k] < 0:
                members = sims[i] & (group < 0)
                group[members] = k
                group[k] = k
    return counts, group


__all__ = ["COLOUR_MODES", "MAX_SHIFT", "Match", "RunningBest", "centred_unit", "near_duplicates", "nearest_match"]
