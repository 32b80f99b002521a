"""The adapter protocol: one model family per adapter, each a self-contained file.

An adapter owns a loaded model and knows four things about its family:

* ``encode``: uint8 RGB images ``[B, 3, R, R]`` -> the denoiser's input space ``x0`` (VAE latent mean x scaling
  factor for latent models, ``[-1, 1]`` pixels for pixel models);
* ``noise``: ``x0`` -> ``x_t`` with the family's own scheduler (``add_noise``), the noise drawn per image from
  a generator seeded by the caller (so an image's noise does not depend on its batch);
* ``forward``: one denoiser call at timestep ``t`` with the empty condition (empty prompt, null class, none);
* ``default_layer`` and ``pooling``: where to look and how to reduce what is captured there.

The ``Detector`` composes these; hooks are attached to ``adapter.denoiser``.
"""

from __future__ import annotations

import contextlib
import os
from abc import ABC, abstractmethod
from typing import ClassVar, Sequence

import torch
from torch import nn

from ..winograd import use_winograd


class Adapter(ABC):
    family: ClassVar[str]
    #: "spatial-max" for UNets, "token-max" for transformers
    pooling: ClassVar[str] = "spatial-max"

    def __init__(self, denoiser: nn.Module, scheduler, *, resolution: int, device: torch.device,
                 dtype: torch.dtype, source: str = ""):
        self.denoiser = denoiser.eval().requires_grad_(False)
        self.scheduler = scheduler
        self.resolution = int(resolution)
        self.device = device
        self.dtype = dtype
        self.source = source

    # -- loading -------------------------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def load(cls, source: str, *, device: torch.device, dtype: torch.dtype, **kwargs) -> "Adapter":
        """Load from a hub id or a local diffusers folder (raising ModelNotFoundError when unavailable)."""

    # -- the pipeline stages -----------------------------------------------------------------------------------
    @abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, R, R] -> x0 in model space, on ``self.device`` in ``self.dtype``."""

    @abstractmethod
    def forward(self, x_t: torch.Tensor, t: int) -> None:
        """Run the denoiser once on ``x_t`` at timestep ``t`` with the empty condition (output unused)."""

    @abstractmethod
    def predict_noise(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        """The denoiser's epsilon prediction at ``x_t`` (same shape as ``x_t``), for baselines that need it."""

    @abstractmethod
    def default_layer(self) -> str:
        """The layer spec the paper's method reads for this model."""

    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one x0 (without batch), used for noise draws and probe inputs."""
        return tuple(self.encode(torch.zeros(1, 3, self.resolution, self.resolution, dtype=torch.uint8)).shape[1:])

    def noise(self, x0: torch.Tensor, t: int, seeds: Sequence[int]) -> torch.Tensor:
        """Forward-noise ``x0`` to timestep ``t`` with one seeded draw eps ~ N(0, I) per image."""
        return self.apply_noise(x0, t, self.draw_noise(x0, seeds))

    @staticmethod
    def draw_noise(x0: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        """eps ~ N(0, I) shaped like ``x0`` (float32), one CPU generator per seed: independent of batch position."""
        if len(seeds) != x0.shape[0]:
            raise ValueError("one seed per image")
        return torch.stack([
            torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(int(s)), dtype=torch.float32)
            for s in seeds
        ]).to(x0.device)

    def apply_noise(self, x0: torch.Tensor, t: int, eps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps with the model's own scheduler (variance preserving)."""
        timesteps = torch.full((x0.shape[0],), int(t), dtype=torch.long, device=x0.device)
        return self.scheduler.add_noise(x0.float(), eps.float(), timesteps).to(self.dtype)

    def noise_std(self, t: int) -> float:
        """Standard deviation of the noise in x_t (``apply_noise``'s coefficient of eps): sqrt(1 - a_t)."""
        return (1 - float(self.scheduler.alphas_cumprod[int(t)])) ** 0.5

    def sigma(self, t: int) -> float:
        """Noise-to-signal ratio sqrt((1 - a_t) / a_t) of timestep ``t`` under this model's scheduler."""
        a = float(self.scheduler.alphas_cumprod[int(t)])
        return ((1 - a) / a) ** 0.5

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def default_batch_size(self) -> int:
        return 64 if self.device.type == "cuda" else 16

    def autocast(self):
        """Autocast context for the device when running in reduced precision on a GPU."""
        if self.device.type == "cuda" and self.dtype in (torch.float16, torch.bfloat16):
            return torch.autocast("cuda", dtype=self.dtype)
        return contextlib.nullcontext()

    def describe(self) -> dict:
        return {"family": self.family, "source": self.source, "resolution": self.resolution,
                "pooling": self.pooling, "dtype": str(self.dtype).replace("torch.", ""), "device": str(self.device)}


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images.float() / 127.5 - 1.0


def place(module, device: torch.device, dtype: torch.dtype):
    """Move a module to ``device``, cast it to ``dtype`` unless float32, and store convolution weights channels-last.

    Channels-last (NHWC) lets oneDNN / cuDNN pick their fast convolution kernels and avoids layout reorders between
    layers: measured on 2 CPU cores with SD1.4's real architecture, the VAE encoder went from 12.7 to 9.8 s per
    512 px image and the UNet up to ``up_blocks.0`` from 3.4 to 2.9 s (``benchmarks/perf.py``). Activations follow
    the weights' layout; values are unchanged up to float rounding. ``MEMDETECT_CHANNELS_LAST=0`` turns it off.

    On a CPU, the wide 3x3 convolutions also get Winograd's algorithm (``memdetect.winograd``; it applies to float32
    inference only and falls back to the direct kernel everywhere else; ``MEMDETECT_WINOGRAD=0`` turns it off).
    """
    module = module.to(device)
    if dtype != torch.float32:
        module = module.to(dtype)
    if os.environ.get("MEMDETECT_CHANNELS_LAST", "1") != "0" and any(
            isinstance(m, nn.Conv2d) for m in module.modules()):
        module = module.to(memory_format=torch.channels_last)
    if device.type == "cpu":
        use_winograd(module)
    return module


def vae_latent(vae, x: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """The VAE posterior's mean times the scaling factor, for pixels ``x`` in [-1, 1] (``[B, 3, R, R]``)."""
    return vae.encode(x).latent_dist.mean * scaling_factor
