"""Generation for the paper benchmarks: one sampler per noise parameterisation, over the ``Adapter`` protocol.

Writing the samplers against the adapter (rather than calling a diffusers pipeline) keeps one model in memory for
generation and scoring, lets every family share the code, and gives Wen et al.'s per-step noise difference for
free: classifier-free guidance computes the conditional and the unconditional prediction anyway.

* ``sample_ddim`` (SD, DiT, pixel DDPM): diffusers' ``DDIMScheduler`` built from the model's own scheduler config
  (its betas and timestep spacing), as Wen et al. and NeMo swap it into the SD pipeline. ``eta=0`` is the
  deterministic DDIM sampler (SD: 50 steps, guidance 7.5, as the peers generate); ``eta=1`` with every training
  timestep is DDPM's ancestral sampler with the posterior variance. Guidance: eps = u + g (c - u).
* ``sample_edm`` (EDM): Karras et al.'s deterministic Heun sampler (18 steps = 35 network evaluations for
  CIFAR-10, sigma from 80 to 0.002, rho = 7), on the preconditioned denoiser D(x; sigma).

Every sample's initial noise (and DDPM's per-step noise) comes from its own CPU generator seeded by the caller, so a
sample is the same alone or in any batch, on any process: a resumed or split run regenerates identical images.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..models.base import Adapter
from .baselines import noise_difference_norm, predict_eps


@dataclass
class Generation:
    images: torch.Tensor  # uint8 [B, 3, R, R] on the CPU
    x_T: torch.Tensor  # the sampler's first denoiser input (model space, float32)
    first_t: int  # the first timestep (DDIM); -1 for EDM
    noise_difference: torch.Tensor | None  # [steps, B] ||eps(x, c) - eps(x, null)|| per step; None without a condition


def generation_seed(seed: int, key: str, k: int = 0) -> int:
    """Seed of generation ``k`` of item ``key`` (a prompt id, a sample index) in a run seeded ``seed``."""
    h = hashlib.blake2b(f"{int(seed)}:{key}:{int(k)}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & 0x7FFF_FFFF_FFFF_FFFF


def initial_noise(adapter: Adapter, seeds: Sequence[int]) -> torch.Tensor:
    """eps ~ N(0, I) in the model's input space, one CPU generator per seed (``Adapter.draw_noise``)."""
    shape = adapter.latent_shape()
    return adapter.draw_noise(torch.empty(len(seeds), *shape, device=adapter.device), seeds)


def ddim_scheduler(adapter: Adapter, steps: int):
    from diffusers import DDIMScheduler

    if steps < 1 or steps > adapter.num_train_timesteps:
        raise ValueError(f"--steps must be in [1, {adapter.num_train_timesteps}], got {steps}")
    sched = DDIMScheduler.from_config(adapter.scheduler.config)
    sched.set_timesteps(steps)
    return sched


@torch.no_grad()
def sample_ddim(adapter: Adapter, seeds: Sequence[int], *, cond: Any = None, steps: int = 50, guidance: float = 1.0,
                eta: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None]:
    """DDIM / DDPM sampling in model space. Returns (x0, x_T, first timestep, noise-difference norms [steps, B]).

    ``cond``: text embeddings [B, 77, D] or class labels [B] (None: unconditional, no guidance). With a condition
    the sampler always evaluates both predictions (Wen et al.'s norms need them), and guides with ``guidance``.
    """
    sched = ddim_scheduler(adapter, steps)
    x = initial_noise(adapter, seeds) * float(sched.init_noise_sigma)
    x_T = x.clone()
    gens = [torch.Generator().manual_seed(int(s) + 1) for s in seeds] if eta > 0 else None
    norms = []
    for t in sched.timesteps:
        t = int(t)
        model_in = sched.scale_model_input(x, t)
        if cond is None:
            eps = predict_eps(adapter, model_in, t)
        else:
            eps_c, eps_u = predict_eps(adapter, model_in, t, cond), predict_eps(adapter, model_in, t)
            norms.append(noise_difference_norm(eps_c, eps_u).cpu())
            eps = eps_u + guidance * (eps_c - eps_u)
        noise = None
        if gens is not None:
            noise = torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens]).to(x.device)
        x = sched.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample.float()
    return x, x_T, int(sched.timesteps[0]), (torch.stack(norms) if norms else None)


@torch.no_grad()
def sample_edm(adapter: Adapter, seeds: Sequence[int], *, steps: int = 18, sigma_min: float = 0.002,
               sigma_max: float = 80.0, rho: float = 7.0) -> tuple[torch.Tensor, torch.Tensor]:
    """EDM's deterministic Heun sampler (Karras et al. 2022, Algorithm 1). Returns (x0, x_T)."""
    net = adapter.denoiser
    if steps < 2:
        raise ValueError(f"the EDM sampler needs at least 2 steps, got {steps}")
    sigma_min = max(sigma_min, float(getattr(net, "sigma_min", 0.0)))
    sigma_max = min(sigma_max, float(getattr(net, "sigma_max", float("inf"))))
    i = torch.arange(steps, dtype=torch.float64)
    sig = (sigma_max ** (1 / rho) + i / (steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    sig = torch.cat([sig, torch.zeros(1, dtype=torch.float64)]).tolist()

    def denoise(x: torch.Tensor, s: float) -> torch.Tensor:
        with adapter.autocast():
            return net(x.to(adapter.dtype), torch.full((x.shape[0],), s, device=x.device)).float()

    x = initial_noise(adapter, seeds) * sig[0]
    x_T = x.clone()
    for s, s_next in zip(sig[:-1], sig[1:]):
        d = (x - denoise(x, s)) / s
        x_next = x + (s_next - s) * d
        if s_next > 0:
            d2 = (x_next - denoise(x_next, s_next)) / s_next
            x_next = x + (s_next - s) * (d + d2) / 2
        x = x_next
    return x, x_T


@torch.no_grad()
def decode(adapter: Adapter, x0: torch.Tensor) -> torch.Tensor:
    """Model space -> uint8 [B, 3, R, R] on the CPU (latent models: VAE decode of x0 / scaling factor)."""
    vae = getattr(adapter, "vae", None)
    if vae is not None:
        with adapter.autocast():
            x0 = vae.decode((x0 / adapter.scaling_factor).to(adapter.dtype)).sample
    return ((x0.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def default_steps(family: str) -> int:
    """50 DDIM steps (SD, DiT), 1000 ancestral DDPM steps (pixel DDPM), 18 Heun steps (EDM)."""
    return {"ddpm": 1000, "edm": 18}.get(family, 50)


def generate(adapter: Adapter, seeds: Sequence[int], *, cond: Any = None, steps: int | None = None,
             guidance: float = 1.0) -> Generation:
    """Generate one image per seed with the family's sampler (see the module docstring)."""
    steps = steps or default_steps(adapter.family)
    if adapter.family == "edm":
        x0, x_T = sample_edm(adapter, seeds, steps=steps)
        return Generation(decode(adapter, x0), x_T, -1, None)
    eta = 1.0 if adapter.family == "ddpm" else 0.0
    x0, x_T, first_t, norms = sample_ddim(adapter, seeds, cond=cond, steps=steps, guidance=guidance, eta=eta)
    return Generation(decode(adapter, x0), x_T, first_t, norms)


class TextEncoder:
    """The CLIP tokenizer and text encoder of a Stable Diffusion folder or hub id, for prompt embeddings."""

    def __init__(self, tokenizer, model, device: torch.device, dtype: torch.dtype):
        self.tokenizer = tokenizer
        self.model = model.to(device).eval().requires_grad_(False)
        self.device, self.dtype = device, dtype

    @classmethod
    def load(cls, source: str, device: torch.device, dtype: torch.dtype) -> "TextEncoder":
        from transformers import CLIPTextModel, CLIPTokenizer

        from ..models.hub import load_component

        return cls(load_component(CLIPTokenizer, source, "tokenizer"),
                   load_component(CLIPTextModel, source, "text_encoder"), device, dtype)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        """[B, 77, D] embeddings, padded to the tokenizer's length and truncated as the SD pipeline does."""
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.model(ids.to(self.device))[0].to(self.dtype)


def save_png(images: torch.Tensor, paths: Sequence[Path]) -> None:
    """Write uint8 [B, 3, H, W] images losslessly (PNG), so that scanning the files later gives the same pixels."""
    from PIL import Image

    for img, path in zip(images, paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        Image.fromarray(np.ascontiguousarray(img.permute(1, 2, 0).numpy())).save(tmp, format="PNG")
        tmp.replace(path)
