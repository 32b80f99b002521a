"""Baseline memorization detectors, implemented once over the ``Adapter`` protocol and reused by every benchmark.

Every function returns one score per image oriented like ours: **higher = more likely memorized**.

* ``denoising_loss``: the per-sample denoising error ||eps_hat(x_t, t) - eps||^2 / D at timestep ``t``, averaged
  over ``draws`` noise draws. Memorized samples are fitted better, so the score is the *negative* loss. The error
  is the family's own training loss (``Adapter.denoising_error``): for flow-matching models (SD3, Flux) the
  flow-matching loss ||v_hat(x_s, s) - (eps - x0)||^2 / D.
* ``flipd``: Ross et al.'s local-intrinsic-dimension criterion with the FLIPD estimator (Kamkari et al., 2024).
  With x_t = a x + s eps (a = sqrt(abar_t), s = sqrt(1 - abar_t) for variance-preserving models; a = 1, s = sigma for
  EDM: ``Adapter.apply_noise`` / ``noise_std``) and score s_t(y) = -eps_hat(y, t) / s, at y = a x:
      LID(x) ~= D + s^2 (tr grad_y s_t(y) + ||s_t(y)||^2) = D - s tr(d eps_hat / d y) + ||eps_hat(y)||^2,
  the trace from Hutchinson's estimator with ``probes`` Rademacher vectors (one vector-Jacobian product each).
  Memorized samples sit on low-dimensional pieces of the learned density: the score is the *negative* LID.
* ``carlini_density`` (Carlini et al., 2023, "Extracting Training Data from Diffusion Models"): memorized training
  images are regenerated many times, so a memorized generation has near-copies among the other generations of the
  same prompt (or pool). Carlini et al. link two generations whose *tiled* L2 distance (``tiled_l2``: the image cut
  into a 4x4 grid of tiles, the distance is the largest per-tile distance, so every tile must match) is below a
  threshold and call a prompt memorized when the generations form a large clique. The threshold-free version used
  for ROC curves: the score of a generation is minus its tiled-L2 distance to its ``neighbours``-th nearest other
  generation, i.e. the smallest threshold at which it has that many linked neighbours (a star around it; any clique
  of ``neighbours`` + 1 generations containing it implies the star at the same threshold). ``nearest_generation``
  is the same criterion with one tile and one neighbour (the demo benchmark's pool criterion).
* ``noise_difference_norm`` / ``wen_first_step`` / ``wen_all_steps`` (Wen et al., ICLR 2024, "Detecting,
  Explaining, and Mitigating Memorization in Diffusion Models"): the L2 norm, per generation, of the difference
  between the conditional and the unconditional noise predictions, ||eps(x_t, c) - eps(x_t, null)||, at the first
  sampling step (from the initial noise x_T) or averaged over every step of the generation. Memorized prompts pull
  the prediction hard towards their image: large = memorized. For class-conditional models c is the class and null
  the null class (the class-conditional analogue). ``wen_first_step_of`` takes the family's own sampler and terms
  (``Adapter.first_step_difference``): for flow-matching models the *velocity* difference ||v(x_T, c) - v(x_T,
  null)|| at the Euler sampler's first sigma (s = 1, x_T = eps, where the epsilon difference is identically 0).
* ``nemo_activations`` / ``NemoStatistics`` (Hintersdorf et al., NeurIPS 2024, "Finding NeMo"): the cross-attention
  *value* layers (``Adapter.cross_attention_values``: ``attn2.to_v`` of the down and mid blocks, the 7 layers NeMo
  reads in SD 1.x) applied to the prompt's text embedding; a neuron's activation is its absolute value averaged over the 77 tokens. NeMo flags
  neurons whose activation is an outlier, |a - mean| / std > theta, against statistics of non-memorized prompts.
  The score here is the largest such z-score over all neurons of all value layers (a threshold-free version of
  NeMo's out-of-distribution neuron test, for ROC curves). The statistics are NeMo's published ones for SD 1.4
  (``NemoMoments``, read by ``memdetect.bench.nemo_stats``: 50k held-out LAION prompts) or, as a fallback, fitted
  on reference prompts the caller chooses (``NemoStatistics``; ``bench laion``: the normal prompts, each of them
  scored against the others: leave-one-out).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from ..models.base import ScanAdapter, noise_difference_norm
from ..models.capabilities import Generation, require


def predict_eps(adapter: ScanAdapter, x_t: torch.Tensor, t: int, cond: Any = None) -> torch.Tensor:
    """The adapter's noise prediction (float32) with ``cond`` (``Adapter.encode_condition``) or the null condition."""
    return adapter.predict_noise(x_t.to(adapter.dtype), t, cond).float()


@torch.no_grad()
def denoising_loss(adapter: ScanAdapter, images: torch.Tensor, t: int, seeds: Sequence[int],
                   draws: int = 1) -> torch.Tensor:
    x0 = adapter.encode(images)
    total = torch.zeros(x0.shape[0])
    for k in range(draws):
        eps = adapter.draw_noise(x0, [int(seed) + 7919 * k for seed in seeds])
        total += adapter.denoising_error(x0, t, eps).float().cpu()
    return -(total / draws)


def flipd(adapter: ScanAdapter, images: torch.Tensor, t: int, seeds: Sequence[int], probes: int = 1,
          cond: Any = None) -> torch.Tensor:
    """Negative FLIPD LID estimate (see module docstring); ``seeds`` seed the Hutchinson probes.

    ``cond``: the condition of a conditional model (text embeddings ``[B, 77, D]``, class labels ``[B]``) for the
    conditional LID(x | c) that Ross et al. use on text-to-image models; None: the empty condition.
    """
    with torch.no_grad():
        x0 = adapter.encode(images).float()
    s = adapter.noise_std(t)
    d = x0[0].numel()
    # the noise-free point of x_t's space: a x0 for variance-preserving models, x0 for EDM's variance-exploding one
    y = adapter.apply_noise(x0, t, torch.zeros_like(x0)).detach().requires_grad_(True)
    with torch.enable_grad():
        eps = predict_eps(adapter, y, t, cond)
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


def tiled_l2(x: torch.Tensor, y: torch.Tensor, grid: int = 4) -> torch.Tensor:
    """Carlini et al.'s tiled distance between every image of ``x`` [N, C, H, W] and of ``y`` [M, C, H, W]: both
    cut into a ``grid`` x ``grid`` array of tiles (H and W divisible by ``grid``), the distance is the largest
    per-tile RMS pixel difference (pixels scaled to [0, 1]; uint8 or float input). Returns [N, M]."""
    if x.shape[1:] != y.shape[1:]:
        raise ValueError(f"images {tuple(x.shape[1:])} and {tuple(y.shape[1:])} differ in shape")
    c, h, w = x.shape[1:]
    if grid < 1 or h % grid or w % grid:
        raise ValueError(f"a {grid}x{grid} tiling needs the image sides ({h}x{w}) to be multiples of {grid}")

    def tiles(z: torch.Tensor) -> torch.Tensor:  # [N, grid * grid, C * th * tw]
        z = z.float() / 255.0 if z.dtype == torch.uint8 else z.float()
        z = z.reshape(z.shape[0], c, grid, h // grid, grid, w // grid).permute(2, 4, 0, 1, 3, 5)
        return z.reshape(grid * grid, z.shape[2], -1)

    tx, ty = tiles(x), tiles(y)
    dist = torch.cdist(tx, ty)  # [tiles, N, M]
    return dist.amax(dim=0) / tx.shape[-1] ** 0.5


@torch.no_grad()
def carlini_density(images: torch.Tensor, pool: torch.Tensor | None = None, *, neighbours: int = 1, grid: int = 4,
                    chunk: int = 1024) -> torch.Tensor:
    """Minus the tiled-L2 distance from each image to its ``neighbours``-th nearest other image of ``pool``
    (default: ``images``; when given, ``pool`` must hold ``images`` as its first rows, so that an image is never its
    own neighbour). High = the image has many near-copies among the generations = memorized (module docstring)."""
    n = images.shape[0]
    pool = images if pool is None else pool
    if not 1 <= neighbours <= pool.shape[0] - 1:
        raise ValueError(f"{neighbours} neighbour(s) asked for in a pool of {pool.shape[0]} images (at most "
                         f"{pool.shape[0] - 1})")
    best = torch.full((n, neighbours), float("inf"))
    for start in range(0, pool.shape[0], chunk):
        block = pool[start:start + chunk]
        dist = tiled_l2(images, block, grid)
        idx = torch.arange(start, start + block.shape[0])
        dist[idx[None, :] == torch.arange(n)[:, None]] = float("inf")  # an image is not its own neighbour
        best = torch.cat([best, dist], dim=1).topk(neighbours, dim=1, largest=False).values
    return -best[:, neighbours - 1]


def nearest_generation(images: torch.Tensor, pool: torch.Tensor | None = None, chunk: int = 2048) -> torch.Tensor:
    """Negative RMS pixel distance from each image to its nearest other image in ``pool`` (default: ``images``):
    ``carlini_density`` with one tile and one neighbour.

    ``pool`` must contain ``images`` as its first rows when given (an image is never its own neighbour).
    """
    return carlini_density(images, pool, neighbours=1, grid=1, chunk=chunk)


# -- Wen et al. ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def wen_first_step_of(adapter: ScanAdapter, seeds: Sequence[int], cond: Any, steps: int) -> torch.Tensor:
    """Wen et al.'s first-step score of generations made from ``seeds`` (their initial noise) with ``cond``, by the
    model's own sampler over ``steps`` steps, in the family's own terms (``first_step_difference``: the
    noise-difference norm at DDIM's first timestep; for flow-matching models the velocity difference at the Euler
    sampler's first sigma)."""
    gen = require(adapter, Generation, "Wen et al.'s first step")
    return gen.first_step_difference(seeds, cond, steps).float().cpu()


@torch.no_grad()
def wen_first_step(adapter: ScanAdapter, x_T: torch.Tensor, t: int, cond: Any) -> torch.Tensor:
    """Wen et al.'s detection at the first sampling step: the noise-difference norm at the initial noise ``x_T``
    (as the sampler feeds it to the denoiser) and the first timestep ``t``, for condition ``cond`` against the empty
    condition. One conditional and one unconditional denoiser call per sample; no generation needed."""
    return noise_difference_norm(predict_eps(adapter, x_T, t, cond), predict_eps(adapter, x_T, t)).cpu()


def wen_all_steps(step_norms: torch.Tensor) -> torch.Tensor:
    """Wen et al.'s all-step score: the noise-difference norms recorded at every step of the generation
    ([steps, B], see ``Adapter.sample``), averaged over the steps."""
    return step_norms.float().mean(dim=0)


# -- NeMo (Hintersdorf et al.) -------------------------------------------------------------------------------------

@torch.no_grad()
def nemo_activations(value_layers: Iterable[nn.Module], text_embeddings: torch.Tensor) -> torch.Tensor:
    """|to_v(text embedding)| averaged over tokens, for every neuron of every value layer (``value_layers``, e.g.
    ``adapter.cross_attention_values().values()``): [B, neurons] (float32).

    The value projections see only the text embedding, so no denoiser forward pass is needed: this is what NeMo's
    hooks capture during the first denoising step.
    """
    acts = []
    for layer in value_layers:
        weight = next(layer.parameters())
        acts.append(layer(text_embeddings.to(weight.device, weight.dtype)).float().abs().mean(dim=1).cpu())
    return torch.cat(acts, dim=1)


@dataclass(frozen=True)
class NemoStatistics:
    """Per-neuron mean and standard deviation (unbiased, as NeMo computes them) over reference prompts, kept as
    float64 sums so that one prompt can be left out exactly (``without``)."""

    total: torch.Tensor  # sum of the activations, float64 [neurons]
    squares: torch.Tensor  # sum of their squares, float64 [neurons]
    count: int

    @classmethod
    def fit(cls, activations: torch.Tensor) -> "NemoStatistics":
        if activations.shape[0] < 2:
            raise ValueError("NeMo's statistics need at least 2 reference prompts")
        a = activations.double()
        return cls(a.sum(dim=0), a.pow(2).sum(dim=0), int(a.shape[0]))

    def without(self, activations: torch.Tensor) -> "NemoStatistics":
        """The statistics of the reference prompts less one of them (its activations [neurons]): a reference prompt
        that is also scored is compared with the others only, never with statistics that contain it."""
        if self.count < 3:
            raise ValueError("leaving a prompt out of NeMo's statistics needs at least 3 reference prompts")
        a = activations.double()
        return NemoStatistics(self.total - a, self.squares - a.pow(2), self.count - 1)

    @property
    def mean(self) -> torch.Tensor:
        return (self.total / self.count).float()

    @property
    def std(self) -> torch.Tensor:
        var = (self.squares - self.total.pow(2) / self.count) / (self.count - 1)
        return var.clamp_min(0).sqrt().float()

    def zscores(self, activations: torch.Tensor) -> torch.Tensor:
        return nemo_zscores(activations, self.mean, self.std)

    def score(self, activations: torch.Tensor) -> torch.Tensor:
        """The largest z-score over all neurons of all value layers: high = memorized."""
        return self.zscores(activations).amax(dim=1)


@dataclass(frozen=True)
class NemoMoments:
    """Fixed per-neuron mean and standard deviation (float32 [neurons]), e.g. NeMo's published statistics."""

    mean: torch.Tensor
    std: torch.Tensor

    def __post_init__(self) -> None:
        if self.mean.shape != self.std.shape or self.mean.ndim != 1:
            raise ValueError(f"mean {tuple(self.mean.shape)} and std {tuple(self.std.shape)} must be 1-D and equal")

    def zscores(self, activations: torch.Tensor) -> torch.Tensor:
        return nemo_zscores(activations, self.mean, self.std)

    def score(self, activations: torch.Tensor) -> torch.Tensor:
        """The largest z-score over all neurons of all value layers: high = memorized."""
        return self.zscores(activations).amax(dim=1)


def nemo_zscores(activations: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """|a - mean| / std per neuron, [B, neurons] (std floored at 1e-8: a constant neuron is never an outlier unless
    it moves)."""
    return (activations.float() - mean.float()).abs() / std.float().clamp_min(1e-8)
