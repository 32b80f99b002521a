"""EDM's sampler: Karras et al.'s deterministic Heun sampler on the preconditioned denoiser D(x; sigma)."""

from __future__ import annotations

import torch

from ...errors import UsageError
from ..base import Adapter


@torch.no_grad()
def sample_heun(adapter: Adapter, seeds, *, steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0,
                rho: float = 7.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Karras et al.'s deterministic Heun sampler (EDM, Algorithm 1; 18 steps = 35 network evaluations for
    CIFAR-10, sigma from 80 to 0.002, rho = 7) on the preconditioned denoiser D(x; sigma) ``adapter.denoiser``.
    Each sample's initial noise comes from its own CPU generator seeded by the caller. Returns (x0, x_T)."""
    net = adapter.denoiser
    if steps < 2:
        raise UsageError(f"the EDM sampler needs at least 2 steps, got {steps}")
    sigma_min = max(sigma_min, float(getattr(net, "sigma_min", 0.0)))
    sigma_max = min(sigma_max, float(getattr(net, "sigma_max", float("inf"))))
    i = torch.arange(steps, dtype=torch.float64)
    sig = (sigma_max ** (1 / rho) + i / (steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    sig = torch.cat([sig, torch.zeros(1, dtype=torch.float64)]).tolist()

    def denoise(x: torch.Tensor, s: float) -> torch.Tensor:
        with adapter.autocast():
            return net(x.to(adapter.dtype), torch.full((x.shape[0],), s, device=x.device)).float()

    x = adapter.initial_noise(seeds) * sig[0]
    x_T = x.clone()
    for s, s_next in zip(sig[:-1], sig[1:]):
        d = (x - denoise(x, s)) / s
        x_next = x + (s_next - s) * d
        if s_next > 0:
            d2 = (x_next - denoise(x_next, s_next)) / s_next
            x_next = x + (s_next - s) * (d + d2) / 2
        x = x_next
    return x, x_T
