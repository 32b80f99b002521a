"""Spikiness scores: pure functions mapping pooled activations ``[B, C]`` to one value per row ``[B]``.

Every score is oriented so that **higher = spikier = more likely memorized** (at layers near the bottleneck, where
the paper finds memorized samples to have spiky representations; other layers may invert, see ``bench --sweep``).
All computations run in float32 (or float64 if given float64). ``SCORES`` is the one table of score names: reports,
journals, configs, calibration and the CLI take the names and their order from it. torch is imported where a score
is computed, so reading the names (the CLI's ``--help``) does not load it.

* ``std``     population standard deviation over channels: sqrt(mean((v - mean(v))^2)). The paper's primary score.
* ``l4l2``    ||v||_4 / ||v||_2 (0 for an all-zero row). In [C^(-1/4), 1]; 1 when one channel holds all the mass.
* ``entropy`` normalised entropy *deficit* 1 - H(p) / log(C), with p = |v| / sum(|v|) and H(p) = -sum p log p
              (0 log 0 = 0). 0 for a perfectly balanced vector, 1 when one channel holds all the mass.
* ``maxmin``  max(v) - min(v).

Two transformations of ``v`` that the benchmarks try before a score (not scores themselves, so not in ``SCORES``):
``centre`` (v - mean(v), the row's mean over channels; std and maxmin are unchanged by it) and ``standardise``
((v - mu) / sigma per channel, with reference statistics the caller must fit without the labels it reports on).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

if TYPE_CHECKING:
    import torch

EPS = 1e-12


def _check(v: torch.Tensor) -> torch.Tensor:
    import torch

    if v.ndim != 2:
        raise ValueError(f"scores expect pooled activations of shape [B, C], got {tuple(v.shape)}")
    if v.shape[1] < 2:
        raise ValueError(f"scores need at least 2 channels, got {v.shape[1]}")
    return v if v.dtype == torch.float64 else v.float()


def std(v: torch.Tensor) -> torch.Tensor:
    """Population standard deviation over channels."""
    return _check(v).std(dim=1, correction=0)


def l4l2(v: torch.Tensor) -> torch.Tensor:
    """||v||_4 / ||v||_2 per row (0 where the row is all zeros)."""
    import torch

    v = _check(v)
    l2 = torch.linalg.vector_norm(v, ord=2, dim=1)
    l4 = torch.linalg.vector_norm(v, ord=4, dim=1)
    return torch.where(l2 > 0, l4 / l2.clamp_min(EPS), torch.zeros_like(l2))


def entropy(v: torch.Tensor) -> torch.Tensor:
    """1 - H(p)/log(C) with p = |v|/sum|v| (0 for an all-zero row, which has no distribution)."""
    import torch

    v = _check(v)
    a = v.abs()
    total = a.sum(dim=1, keepdim=True)
    p = a / total.clamp_min(EPS)
    h = -(torch.special.xlogy(p, p)).sum(dim=1)
    deficit = 1 - h / math.log(v.shape[1])
    return torch.where(total.squeeze(1) > 0, deficit, torch.zeros_like(deficit))


def maxmin(v: torch.Tensor) -> torch.Tensor:
    """max(v) - min(v) per row."""
    v = _check(v)
    return v.amax(dim=1) - v.amin(dim=1)


def centre(v: torch.Tensor) -> torch.Tensor:
    """v - mean(v) per row (the mean over channels)."""
    v = _check(v)
    return v - v.mean(dim=1, keepdim=True)


def standardise(v: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(v - mean) / scale per channel (``mean``, ``scale``: [C] reference statistics; scale floored at 1e-8)."""
    v = _check(v)
    if mean.shape != v.shape[1:] or scale.shape != v.shape[1:]:
        raise ValueError(f"per-channel statistics of shape {tuple(v.shape[1:])} expected, got "
                         f"{tuple(mean.shape)} and {tuple(scale.shape)}")
    return (v - mean.to(v.dtype)) / scale.to(v.dtype).clamp_min(1e-8)


def channel_statistics(stats: Mapping[str, Sequence[float]] | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-channel reference ``mean`` and ``std`` (``[calibration.channels]``, ``Detector(normalise=...)``,
    ``Guard(normalise=...)``) as float64 tensors for ``standardise``, checked; None stays None."""
    if stats is None:
        return None
    import numpy as np
    import torch

    from ..errors import UsageError

    try:
        mean, scale = (torch.as_tensor(np.asarray(stats[k], dtype=np.float64)) for k in ("mean", "std"))
    except (KeyError, TypeError, ValueError):
        raise UsageError("normalise needs per-channel 'mean' and 'std' numbers") from None
    if mean.ndim != 1 or mean.shape != scale.shape or len(mean) < 2 or not torch.isfinite(mean).all() \
            or not torch.isfinite(scale).all() or (scale < 0).any():
        raise UsageError("normalise needs finite per-channel 'mean' and non-negative 'std' lists of one length")
    return mean, scale


#: Name -> function. The order is the order of the report columns.
SCORES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "std": std,
    "l4l2": l4l2,
    "entropy": entropy,
    "maxmin": maxmin,
}


def compute_all(v: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every score in ``SCORES`` for pooled activations ``v`` [B, C]."""
    return {name: fn(v) for name, fn in SCORES.items()}
