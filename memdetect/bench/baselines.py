"""Baseline memorization detectors, implemented once over the ``Adapter`` protocol and reused by every benchmark.

Every function returns one score per image oriented like ours: **higher = more likely memorized**.

* ``denoising_loss``: the per-sample denoising error ||eps_hat(x_t, t) - eps||^2 / D at timestep ``t``, averaged
  over ``draws`` noise draws. Memorized samples are fitted better, so the score is the *negative* loss.
* ``flipd``: Ross et al.'s local-intrinsic-dimension criterion with the FLIPD estimator (Kamkari et al., 2024).
  With x_t = a x + s eps (a = sqrt(abar_t), s = sqrt(1 - abar_t) for variance-preserving models; a = 1, s = sigma for
  EDM: ``Adapter.apply_noise`` / ``noise_std``) and score s_t(y) = -eps_hat(y, t) / s, at y = a x:
      LID(x) ~= D + s^2 (tr grad_y s_t(y) + ||s_t(y)||^2) = D - s tr(d eps_hat / d y) + ||eps_hat(y)||^2,
  the trace from Hutchinson's estimator with ``probes`` Rademacher vectors (one vector-Jacobian product each).
  Memorized samples sit on low-dimensional pieces of the learned density: the score is the *negative* LID.
* ``nearest_generation``: a Carlini et al.-style density criterion for unconditional models: memorized training
  images are regenerated many times, so a memorized generation has a near-copy among the other generations. The
  score is the negative L2 distance (pixels in [0, 1], per-pixel RMS) to the nearest *other* generation in the pool.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..models.base import Adapter


def _eps(adapter: Adapter, x_t: torch.Tensor, t: int) -> torch.Tensor:
    return adapter.predict_noise(x_t, t).float()


@torch.no_grad()
def denoising_loss(adapter: Adapter, images: torch.Tensor, t: int, seeds: Sequence[int], draws: int = 1) -> torch.Tensor:
    x0 = adapter.encode(images)
    total = torch.zeros(x0.shape[0])
    for k in range(draws):
        eps = adapter.draw_noise(x0, [int(seed) + 7919 * k for seed in seeds])
        x_t = adapter.apply_noise(x0, t, eps)
        err = (_eps(adapter, x_t, t) - eps).pow(2).flatten(1).mean(1)
        total += err.cpu()
    return -(total / draws)


def flipd(adapter: Adapter, images: torch.Tensor, t: int, seeds: Sequence[int], probes: int = 1) -> torch.Tensor:
    """Negative FLIPD LID estimate (see module docstring); ``seeds`` seed the Hutchinson probes."""
    with torch.no_grad():
        x0 = adapter.encode(images).float()
    s = adapter.noise_std(t)
    d = x0[0].numel()
    # the noise-free point of x_t's space: a x0 for variance-preserving models, x0 for EDM's variance-exploding one
    y = adapter.apply_noise(x0, t, torch.zeros_like(x0)).detach().requires_grad_(True)
    with torch.enable_grad():
        eps = _eps(adapter, y, t)
        trace = torch.zeros(x0.shape[0], device=y.device)
        for k in range(probes):
            v = torch.stack([
                torch.randint(0, 2, x0.shape[1:], generator=torch.Generator().manual_seed(int(seed) + 104729 * k))
                for seed in seeds]).to(y.device, torch.float32) * 2 - 1
            (vjp,) = torch.autograd.grad(eps, y, grad_outputs=v, retain_graph=k < probes - 1)
            trace += (vjp.float() * v).flatten(1).sum(1)
    trace /= probes
    lid = d - s * trace + eps.detach().pow(2).flatten(1).sum(1)
    return -lid.detach().cpu()


@torch.no_grad()
def nearest_generation(images: torch.Tensor, pool: torch.Tensor | None = None, chunk: int = 2048) -> torch.Tensor:
    """Negative RMS pixel distance from each image to its nearest other image in ``pool`` (default: ``images``).

    ``pool`` must contain ``images`` as its first rows when given (an image is never its own neighbour).
    """
    x = images.flatten(1).float() / 255.0
    p = x if pool is None else pool.flatten(1).float() / 255.0
    n = x.shape[0]
    best = torch.full((n,), float("inf"))
    for start in range(0, p.shape[0], chunk):
        block = p[start:start + chunk]
        dist = torch.cdist(x, block)
        idx = torch.arange(start, start + block.shape[0])
        self_mask = idx[None, :] == torch.arange(n)[:, None]
        dist[self_mask] = float("inf")
        best = torch.minimum(best, dist.min(dim=1).values)
    return -(best / x.shape[1] ** 0.5)
