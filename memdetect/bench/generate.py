"""Generation for the paper benchmarks, over the ``Adapter`` protocol: the family's own sampler and decoder.

Generating with the adapter (rather than a diffusers pipeline) keeps one model in memory for generation and
scoring, lets every family share the benchmark code, and gives Wen et al.'s per-step noise difference for free:
classifier-free guidance computes the conditional and the unconditional prediction anyway. The samplers
(``Adapter.sample``: DDIM / DDPM ancestral; EDM's Heun sampler) seed every sample's noise from its own CPU
generator, so a sample is the same alone or in any batch, on any process: a resumed or split run regenerates
identical images.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..models.base import Sample
from ..models import capabilities


@dataclass(frozen=True)
class Generation:
    images: torch.Tensor  # uint8 [B, 3, R, R] on the CPU
    sample: Sample  # model space: x0, the first denoiser input x_T, the first timestep, Wen et al.'s norms


def generation_seed(seed: int, key: str, k: int = 0) -> int:
    """Seed of generation ``k`` of item ``key`` (a prompt id, a sample index) in a run seeded ``seed``."""
    h = hashlib.blake2b(f"{int(seed)}:{key}:{int(k)}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & 0x7FFF_FFFF_FFFF_FFFF


def generate(adapter: capabilities.Generation, seeds: Sequence[int], *, cond: Any = None, steps: int | None = None,
             guidance: float = 1.0) -> Generation:
    """One image per seed: the family's sampler (``steps``: its default when None), then its decoder."""
    capabilities.require(adapter, capabilities.Generation, "generation")
    sample = adapter.sample(seeds, cond=cond, steps=steps, guidance=guidance)
    return Generation(adapter.decode(sample.x0), sample)


def save_png(images: torch.Tensor, paths: Sequence[Path]) -> None:
    """Write uint8 [B, 3, H, W] images losslessly (PNG), so that scanning the files later gives the same pixels."""
    from PIL import Image

    for img, path in zip(images, paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        Image.fromarray(np.ascontiguousarray(img.permute(1, 2, 0).numpy())).save(tmp, format="PNG")
        tmp.replace(path)
