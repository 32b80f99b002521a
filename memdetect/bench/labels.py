"""Ground-truth labels for generated samples: nearest-neighbour similarity to the training set.

The paper labels a generation *memorized* when its SSCD similarity to the closest training image is above 0.9 and
*generalized* below 0.5, and drops the ambiguous middle. Three labellers implement that form here:

**pixel** (no weights needed). The similarity of a sample x to a training image y is the Pearson
correlation of their flattened RGB pixels,

    corr(x, y) = < (x - mean(x)) / ||x - mean(x)||,  (y - mean(y)) / ||y - mean(y)|| >,

which is 1 for an exact copy and insensitive to a global brightness offset or contrast scale. ``nearest_match``
makes it survive the two simplest transformations of a copy: it is the maximum over a horizontal flip of the
sample (``flip``) and over shifts of the sample by (dy, dx) in [-s, s]^2 pixels (``max_shift`` = s, default 2) of
the correlation of the overlapping windows: the central (H - 2s) x (W - 2s) window of the training image against
the window of the sample displaced by (dy, dx). Every shift compares windows of the same size; with s = 0 and no
flip it is exactly the full-image correlation of ``nearest_neighbours``. Search is exact, over every training image.
Thresholds (``LabelRule``): memorized >= 0.95, generalized < 0.80, the band between excluded.

**pixel-cast** (the similarity of the shipped ground-truth labels since 2026-12-03, and the paper protocols' default
``--labeller``). The same search, but each window pair scores the larger of the RGB correlation and the mean
per-channel correlation (``nearest_match(..., colour="cast")``), so a copy under a colour cast (a per-channel gain
and offset) also counts. Same thresholds.

**sscd** (optional; the paper's labeller). A user who has SSCD's TorchScript weights (e.g. ``sscd_disc_mixup.torchscript.pt``
from facebookresearch/sscd-copy-detection; memdetect does not download them) gets the cosine similarity of SSCD
descriptors: ``SSCDLabeller(load_sscd(path)).nearest(samples, train)``, thresholds 0.9 / 0.5 (``SSCD_RULE``).
``make_labeller("pixel-cast" | "pixel" | "sscd", sscd_weights=...)`` returns any of them behind one interface.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Protocol

import torch
import torch.nn.functional as F

from ..core.similarity import MAX_SHIFT, RunningBest, centred_unit, nearest_match

#: Default thresholds on the pixel correlation (see module docstring and benchmarks/RESULTS.md).
MEMORIZED_AT = 0.95
GENERALIZED_BELOW = 0.80


def paired_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pixel correlation of a[i] with b[i] (same shapes [N, C, H, W]); [N]."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} and {tuple(b.shape)}")
    return (centred_unit(a) * centred_unit(b)).sum(dim=1)


@torch.no_grad()
def nearest_neighbours(
    samples: torch.Tensor, train: torch.Tensor, chunk: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each sample, the highest pixel correlation to any training image, and that image's index.

    samples: [N, C, H, W], train: [M, C, H, W], any real dtype (uint8 is fine). Returns (sim [N], index [N]).
    No invariance: ``nearest_match`` is the flip- and shift-invariant version.
    """
    return nearest_neighbours_in(samples, (train[start : start + chunk] for start in range(0, train.shape[0], chunk)))


@torch.no_grad()
def nearest_neighbours_in(
    samples: torch.Tensor, train_batches: Iterable[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``nearest_neighbours`` over training images that arrive in batches (a folder too large for memory);
    indices count across the batches in order."""
    s = centred_unit(samples)
    best = RunningBest(s.shape[0], device=s.device)
    start = 0
    for batch in train_batches:
        if batch.shape[1:] != samples.shape[1:]:
            raise ValueError(f"samples {tuple(samples.shape[1:])} and training images {tuple(batch.shape[1:])} differ")
        t = centred_unit(batch.to(s.device))
        sim = s @ t.T
        val, idx = sim.max(dim=1)
        best.update(val, idx, start)
        start += batch.shape[0]
    return best.similarity.cpu(), best.index.cpu()


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


#: The paper's SSCD thresholds (Zhang et al. 2025, following Somepalli et al.): memorized > 0.9, generalized < 0.5.
SSCD_RULE = LabelRule(memorized_at=0.9, generalized_below=0.5)
PIXEL_RULE = LabelRule()

# ----------------------------------------------------------------------------------------------------------------
# Labellers: one interface for the pixel and the SSCD similarity.


class Labeller(Protocol):
    name: str
    rule: LabelRule

    def nearest(self, samples: torch.Tensor, train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(similarity [N], index of the nearest training image [N]) for uint8 samples [N,3,H,W], train [M,3,H,W]."""


@dataclass(frozen=True)
class PixelLabeller:
    """The flip- and shift-invariant pixel correlation (``nearest_match``) with ``PIXEL_RULE``; ``colour="cast"``
    (``make_labeller("pixel-cast")``) also survives a colour cast."""

    max_shift: int = MAX_SHIFT
    flip: bool = True
    rule: LabelRule = PIXEL_RULE
    name: str = "pixel"
    colour: str = "rgb"

    def nearest(self, samples, train):
        m = nearest_match(samples, train, max_shift=self.max_shift, flip=self.flip, colour=self.colour)
        return m.similarity, m.index


#: SSCD's preprocessing (facebookresearch/sscd-copy-detection README): resize, ImageNet mean and std.
SSCD_MEAN = (0.485, 0.456, 0.406)
SSCD_STD = (0.229, 0.224, 0.225)
SSCD_SIZE = 288


def load_sscd(path: str | os.PathLike, device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """SSCD's TorchScript weights from a local file (``torch.jit.load``; nothing is downloaded)."""
    from ..errors import ModelNotFoundError

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelNotFoundError(f"SSCD weights {path} do not exist; download a TorchScript file from "
                                 f"facebookresearch/sscd-copy-detection and pass its path")
    try:
        return torch.jit.load(path, map_location=device).eval()
    except (RuntimeError, ValueError) as e:
        raise ModelNotFoundError(f"{path} is not a TorchScript module: {str(e).splitlines()[0][:200]}") from None


class SSCDLabeller:
    """Cosine similarity of SSCD descriptors (L2-normalised) to the nearest training image, with ``SSCD_RULE``.

    Images are uint8 [N, 3, H, W]; each is resized (bilinear, antialiased) to ``size`` x ``size``, scaled to [0, 1]
    and normalised with ImageNet's mean and std before the model.
    """

    name = "sscd"

    def __init__(self, model: torch.nn.Module, *, rule: LabelRule = SSCD_RULE, size: int = SSCD_SIZE,
                 batch_size: int = 64, device: str | torch.device = "cpu"):
        self.model, self.rule, self.size, self.batch_size = model, rule, int(size), int(batch_size)
        self.device = torch.device(device)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, H, W] -> L2-normalised descriptors [N, D] (float32, CPU)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [N, 3, H, W], got {tuple(images.shape)}")
        mean = torch.tensor(SSCD_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(SSCD_STD, device=self.device).view(1, 3, 1, 1)
        out = []
        for start in range(0, len(images), self.batch_size):
            x = images[start: start + self.batch_size].to(self.device).float() / 255
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
            d = self.model((x - mean) / std)
            out.append(F.normalize(d.float().reshape(len(x), -1), dim=1).cpu())
        return torch.cat(out)

    def nearest(self, samples, train):
        s, t = self.embed(samples), self.embed(train)
        val, idx = (s @ t.T).max(dim=1)
        return val, idx


def make_labeller(name: str = "pixel-cast", *, sscd_weights: str | os.PathLike | None = None,
                  device: str | torch.device = "cpu") -> Labeller:
    """The labeller a ``--labeller`` flag names: ``pixel-cast`` (default), ``pixel`` or ``sscd`` (needs
    ``sscd_weights``)."""
    from ..errors import UsageError

    if name in ("pixel", "pixel-cast"):
        if sscd_weights is not None:
            raise UsageError("--sscd-weights applies to --labeller sscd only")
        return PixelLabeller() if name == "pixel" else PixelLabeller(colour="cast", name="pixel-cast")
    if name == "sscd":
        if sscd_weights is None:
            raise UsageError("--labeller sscd needs --sscd-weights FILE (SSCD's TorchScript weights)")
        return SSCDLabeller(load_sscd(sscd_weights, device), device=device)
    raise UsageError(f"unknown labeller {name!r}; choose pixel, pixel-cast or sscd")
