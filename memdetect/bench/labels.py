"""Ground-truth labels for generated samples: nearest-neighbour similarity to the training set.

The paper labels a generation *memorized* when its SSCD similarity to the closest training image is above 0.9 and
*generalized* below 0.5, and drops the ambiguous middle. SSCD weights are not available offline, so for pixel-space
models we use a fixed, documented pixel similarity instead:

    sim(x, y) = < (x - mean(x)) / ||x - mean(x)||,  (y - mean(y)) / ||y - mean(y)|| >

i.e. the Pearson correlation of the two flattened RGB pixel vectors (the cosine similarity after removing each
image's mean). It is 1 for an exact copy, is insensitive to a global brightness shift or contrast scale, and is
computed against every training image (exact search, no index).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

#: Default thresholds on the pixel correlation (see module docstring and benchmarks/RESULTS.md).
MEMORIZED_AT = 0.95
GENERALIZED_BELOW = 0.80


def _centred_unit(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(x.shape[0], -1).float()
    flat = flat - flat.mean(dim=1, keepdim=True)
    return flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-8)


@torch.no_grad()
def nearest_neighbours(
    samples: torch.Tensor, train: torch.Tensor, chunk: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each sample, the highest pixel correlation to any training image, and that image's index.

    samples: [N, C, H, W], train: [M, C, H, W], any real dtype (uint8 is fine). Returns (sim [N], index [N]).
    """
    return nearest_neighbours_in(samples, (train[start : start + chunk] for start in range(0, train.shape[0], chunk)))


@torch.no_grad()
def nearest_neighbours_in(
    samples: torch.Tensor, train_batches: Iterable[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``nearest_neighbours`` over training images that arrive in batches (a folder too large for memory);
    indices count across the batches in order."""
    s = _centred_unit(samples)
    best_sim = torch.full((s.shape[0],), -2.0, device=s.device)
    best_idx = torch.zeros(s.shape[0], dtype=torch.long, device=s.device)
    start = 0
    for batch in train_batches:
        if batch.shape[1:] != samples.shape[1:]:
            raise ValueError(f"samples {tuple(samples.shape[1:])} and training images {tuple(batch.shape[1:])} differ")
        t = _centred_unit(batch.to(s.device))
        sim = s @ t.T
        val, idx = sim.max(dim=1)
        better = val > best_sim
        best_sim = torch.where(better, val, best_sim)
        best_idx = torch.where(better, idx + start, best_idx)
        start += batch.shape[0]
    return best_sim.cpu(), best_idx.cpu()


@dataclass(frozen=True)
class LabelRule:
    memorized_at: float = MEMORIZED_AT
    generalized_below: float = GENERALIZED_BELOW

    def __post_init__(self) -> None:
        if not self.generalized_below <= self.memorized_at:
            raise ValueError("generalized_below must not exceed memorized_at")

    def label(self, sim: float) -> str:
        """'memorized', 'generalized' or 'excluded' (the ambiguous middle band)."""
        if sim >= self.memorized_at:
            return "memorized"
        if sim < self.generalized_below:
            return "generalized"
        return "excluded"
