"""The adapter: one model family per adapter, each a self-contained file that registers itself, built from the
capabilities each feature needs (their protocols and ``require``: ``memdetect.models.capabilities``):

* scanning (``ScanAdapter``, every family): ``encode`` (uint8 RGB ``[B, 3, R, R]`` -> the denoiser's input space
  ``x0``: VAE latent mean x scaling factor for latent models, ``[-1, 1]`` pixels for pixel models), ``noise``
  (``x0`` -> ``x_t`` with the family's own noising, one seeded draw per image), ``forward`` (one denoiser call with
  the null condition), ``default_layer`` and ``pooling`` (where to look and how to reduce what is captured there);
  ``predict_noise(x_t, t, cond=None)`` uses the null condition (empty prompt, null class, none) when ``cond`` is
  None, and ``conditioning`` says what a condition is ("text": prompts, "class": class labels, None:
  unconditional);
* conditioning, NeMo's layers, guard and generation: the mixins ``ConditioningMixin``, ``CrossAttentionMixin``,
  ``GuardMixin`` and ``GenerationMixin`` (``memdetect.models.mixins``).

``Adapter`` has all of them, with defaults that refuse (naming the family) where a family does not override them;
a family that only scans may subclass ``ScanAdapter`` alone. ``VAELatents`` is the latent space of a diffusers
``AutoencoderKL`` (``LatentAdapter``, ``pipelines.PipelineAdapter``).

Loading and memory: ``load`` builds the networks on the CPU as read (diffusers maps safetensors files, so weights that
are never touched cost no memory) and leaves placing them to ``Adapter.place`` (device, dtype, channels-last,
copied out of the file mapping). The ``Detector`` first drops what its scan never runs (``capture.prune``: the VAE
decoder, the denoiser after the hooked layer) and then places the rest, so those weights are never read;
``models.load_adapter`` places at once for other uses.

Registering: decorate the class with ``register_adapter`` (the family's name -> class table ``ADAPTERS``), or, from
another package, name it in the ``memdetect.adapters`` entry-point group. A new family is one adapter file plus a
preset row (``memdetect.models.presets.register_preset``). The ``Detector`` composes these; hooks are attached to
``adapter.denoiser``.
"""

from __future__ import annotations

import contextlib
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from ..errors import UsageError
from .mixins import (CONDITIONING, ConditioningMixin, CrossAttentionMixin, GenerationMixin, GuardMixin, GuardStep,
                     Sample, noise_difference_norm)  # GuardStep, Sample, noise_difference_norm: re-exported
from .pixels import to_uint8, to_unit_range

#: family name -> adapter class (``register_adapter``)
ADAPTERS: dict[str, type["ScanAdapter"]] = {}


def register_adapter(cls: type["ScanAdapter"]) -> type["ScanAdapter"]:
    """Class decorator: add an adapter class (an ``Adapter``, or a ``ScanAdapter`` for a family that only scans) to
    ``ADAPTERS`` under ``cls.family`` (a later class replaces it)."""
    family = getattr(cls, "family", None)
    if not (isinstance(cls, type) and issubclass(cls, ScanAdapter)) or not isinstance(family, str) or not family:
        raise TypeError(f"{cls!r} is not an Adapter subclass with a family name")
    if cls.conditioning not in CONDITIONING:
        raise TypeError(f"{cls.__name__}.conditioning must be one of {', '.join(map(repr, CONDITIONING))}")
    ADAPTERS[family] = cls
    return cls


class ScanAdapter(ABC):
    """The scan capability, which every family has (``capabilities.Scanning``): loading and placing the networks,
    ``encode``, ``noise``, ``forward``, the layers (``default_layer``, ``selection_layers``) and how to read them
    (``pooling``, ``activation_grid``). A family that only scans subclasses this; ``Adapter`` adds the other
    capabilities."""

    family: ClassVar[str]
    #: "spatial-max" for UNets, "token-max" for transformers
    pooling: ClassVar[str] = "spatial-max"
    #: diffusers ``_class_name`` values (model_index.json, config.json) this adapter loads: family detection
    pipeline_classes: ClassVar[tuple[str, ...]] = ()
    #: "text", "class" or None (see ``CONDITIONING``): what ``predict_noise``'s condition is; None (unconditional)
    #: unless the family has the conditioning capability (``ConditioningMixin``)
    conditioning: ClassVar[str | None] = None
    #: whether the family takes a noise level ``sigma`` directly (``--sigma``) as well as a DDPM timestep
    accepts_sigma: ClassVar[bool] = False

    def __init__(self, denoiser: nn.Module, scheduler, *, resolution: int, device: torch.device,
                 dtype: torch.dtype, source: str = ""):
        self.denoiser = denoiser.eval().requires_grad_(False)
        self.scheduler = scheduler
        self.resolution = int(resolution)
        self.device = device
        self.dtype = dtype
        self.source = source
        #: the layer spec this adapter's networks were pruned for (``Detector(prune=True)``), else None
        self.pruned_for: str | None = None
        self._placed = False

    # -- loading -------------------------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def load(cls, source: str, *, device: torch.device, dtype: torch.dtype, **options) -> "Adapter":
        """Load from a hub id or a local folder (raising ModelNotFoundError when unavailable)."""

    @classmethod
    def layer_hint(cls, options: dict) -> str:
        """How ``memdetect models`` describes the default layer of a preset that leaves it to the adapter."""
        return "the adapter's default layer"

    def weight_files(self) -> list[Path]:
        """The files the model was loaded from (weights and the configs that shape it): their content hash is part
        of a resumable scan's key (``memdetect.store.state``), so changed weights are never matched with old scores. An
        adapter that returns none (this default) has its loaded tensors hashed instead, once per run."""
        return []

    def networks(self) -> list[nn.Module]:
        """The modules this adapter runs (denoiser, VAE, ...): where speed settings such as Winograd apply."""
        return [m for m in vars(self).values() if isinstance(m, nn.Module)]

    def place(self) -> "Adapter":
        """Put every network on the adapter's device and dtype (``place``) and let it own its memory; once (later
        calls do nothing). Dropped (meta) tensors stay dropped."""
        if not self._placed:
            for m in self.networks():
                place(m, self.device, self.dtype)
            self._placed = True
        return self

    # -- the scan's stages ---------------------------------------------------------------------------------------
    @abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, R, R] -> x0 in model space, on ``self.device`` in ``self.dtype``."""

    @abstractmethod
    def predict_noise(self, x_t: torch.Tensor, t: int, cond: Any = None) -> torch.Tensor:
        """The denoiser's epsilon prediction at ``x_t`` (same shape as ``x_t``) with condition ``cond`` (from
        ``encode_condition``) or, when None, the null condition."""

    def forward(self, x_t: torch.Tensor, t: int) -> None:
        """Run the denoiser once on ``x_t`` at timestep ``t`` with the null condition (the hooks read it)."""
        self.predict_noise(x_t, t)

    @abstractmethod
    def default_layer(self) -> str:
        """The layer spec the paper's method reads for this model."""

    def selection_layers(self) -> list[str]:
        """The layers ``memdetect calibrate --select-layer`` tries for this family (``memdetect.workflows.select``), in forward
        order. This default: the family's default layer only; families override it."""
        return [self.default_layer()]

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

    def activation_grid(self, x: torch.Tensor) -> torch.Tensor:
        """A captured activation as ``[B, C, h, w]``: where each channel fires over the image (evidence maps).
        This default takes a UNet's ``[B, C, H, W]`` as it is; a ``[B, C]`` capture has no spatial axis (a 1x1
        grid). Families whose layers hold tokens override it (DiT: the token grid)."""
        if x.ndim == 4:
            return x
        if x.ndim == 2:
            return x[:, :, None, None]
        raise UsageError(f"{self.family} layers of shape {tuple(x.shape)} have no spatial layout this adapter knows")

    def describe(self) -> dict:
        return {"family": self.family, "source": self.source, "resolution": self.resolution,
                "pooling": self.pooling, "dtype": str(self.dtype).replace("torch.", ""), "device": str(self.device)}

    # -- a baseline in the family's own terms (``memdetect.bench.baselines``) -----------------------------------------
    def denoising_error(self, x0: torch.Tensor, t: int, eps: torch.Tensor) -> torch.Tensor:
        """The family's training loss per sample at ``t`` with the null condition, for noise ``eps``: here the
        epsilon error ||eps_hat(x_t, t) - eps||^2 / D (flow-matching families: the velocity error)."""
        x_t = self.apply_noise(x0, t, eps)
        return (self.predict_noise(x_t.to(self.dtype), t).float() - eps.float()).pow(2).flatten(1).mean(1)

    def _unconditional(self, cond: Any) -> None:
        """For ``predict_noise`` of an unconditional family: refuse a condition."""
        if cond is not None:
            raise UsageError(f"{self.family} models are unconditional; the condition must be None")


class Adapter(ConditioningMixin, CrossAttentionMixin, GuardMixin, GenerationMixin, ScanAdapter):
    """A family with every capability (scan, conditioning, NeMo's layers, guard, generation; see the module
    docstring); the defaults of those it does not implement refuse with a message naming the family. memdetect's
    families and third-party adapters subclass this, or ``ScanAdapter`` alone for a family that only scans."""


class VAELatents:
    """Latents of a diffusers ``AutoencoderKL`` (``self.vae``, set by ``_use_vae``): x0 = (the VAE posterior mean -
    ``shift_factor``) x ``scaling_factor`` (``vae.config``; 0.18215 and 0 when absent; SD3 and Flux have a shift
    factor), and ``decode`` is the VAE's decoder. For a ``ScanAdapter``."""

    def _use_vae(self, vae: nn.Module) -> None:
        self.vae = vae.eval().requires_grad_(False)
        self.vae_scale = vae_scale(vae)
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", None) or 0.18215)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)

    def encode(self, images):
        x = to_unit_range(images).to(self.device, self.dtype)
        with self.autocast():
            return vae_latent(self.vae, x, self.scaling_factor, self.shift_factor)

    def latent_shape(self):
        r = self.resolution // self.vae_scale
        return (self.vae.config.latent_channels, r, r)

    @torch.no_grad()
    def decode(self, x0):
        z = x0 / self.scaling_factor
        if self.shift_factor:
            z = z + self.shift_factor
        with self.autocast():
            pixels = self.vae.decode(z.to(self.dtype)).sample
        return to_uint8(pixels)


class LatentAdapter(VAELatents, Adapter):
    """Shared part of latent models whose denoiser's ``config.sample_size`` is the latent size (``VAELatents``)."""

    def __init__(self, denoiser: nn.Module, vae: nn.Module, scheduler, *, device: torch.device, dtype: torch.dtype,
                 source: str = ""):
        super().__init__(denoiser, scheduler, resolution=denoiser.config.sample_size * vae_scale(vae), device=device,
                         dtype=dtype, source=source)
        self._use_vae(vae)


#: The paper's layer in a diffusers UNet: the input of the last up-block-0 resnet's second convolution, which in eval
#: mode is the output of that resnet's post-norm2 SiLU, at the lowest resolution of the up path.
UNET_LAYER = "up_blocks.0.resnets.{last}.conv2:in"


def unet_layer(unet: nn.Module) -> str:
    """``UNET_LAYER`` of a diffusers UNet (``UNet2DModel``, ``UNet2DConditionModel``)."""
    return UNET_LAYER.format(last=len(unet.up_blocks[0].resnets) - 1)


def unet_selection_layers(unet: nn.Module) -> list[str]:
    """A diffusers UNet's candidate layers for ``Adapter.selection_layers``: every resnet of the encoder and decoder
    blocks at the lowest resolution and one level up (the last two down blocks, the mid block, the first two up
    blocks), each as its output and as its post-norm2 SiLU (``conv2:in``, the paper's kind of layer)."""
    blocks = [f"down_blocks.{i}" for i in range(max(0, len(unet.down_blocks) - 2), len(unet.down_blocks))]
    blocks += ["mid_block"] + [f"up_blocks.{i}" for i in range(min(2, len(unet.up_blocks)))]
    out = []
    for b in blocks:
        module = unet.get_submodule(b)
        for j in range(len(getattr(module, "resnets", []))):
            out += [f"{b}.resnets.{j}.conv2:in", f"{b}.resnets.{j}"]
    return out


def place(module, device: torch.device, dtype: torch.dtype):
    """Move a module to ``device``, cast it to ``dtype`` unless float32, and store convolution weights channels-last.

    Channels-last (NHWC) lets oneDNN / cuDNN pick their fast convolution kernels and avoids layout reorders between
    layers: measured on 2 CPU cores with SD1.4's real architecture, the VAE encoder went from 12.7 to 9.8 s per
    512 px image and the UNet up to ``up_blocks.0`` from 3.4 to 2.9 s (``benchmarks/perf.py``). Activations follow
    the weights' layout; values are unchanged up to float rounding. ``MEMDETECT_CHANNELS_LAST=0`` turns it off.
    (Winograd's convolutions are a setting of the ``Detector``, recorded in its ``Settings``.)

    Every tensor ends up in memory of its own: one that the conversion leaves where it was (a CPU float32 weight that
    diffusers read as a view of the memory-mapped file) is copied, so the file mapping goes away with the last view
    of it instead of keeping its pages resident next to the copies. Tensors on the ``meta`` device (dropped by
    ``capture.prune``) are left as they are. In place; returns ``module``.
    """
    channels_last = os.environ.get("MEMDETECT_CHANNELS_LAST", "1") != "0" and any(
        isinstance(m, nn.Conv2d) for m in module.modules())
    device = torch.device(device)

    def convert(t: torch.Tensor) -> torch.Tensor:
        if t.is_meta:
            return t
        out = t.to(device, dtype if dtype != torch.float32 and t.is_floating_point() else None)
        if channels_last and out.dim() in (4, 5):
            out = out.contiguous(memory_format=torch.channels_last if out.dim() == 4 else torch.channels_last_3d)
        if out.device.type == "cpu" and out.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
            out = out.clone()
        return out

    return module._apply(convert)


def vae_latent(vae, x: torch.Tensor, scaling_factor: float, shift_factor: float = 0.0) -> torch.Tensor:
    """(The VAE posterior's mean - ``shift_factor``) x ``scaling_factor``, for pixels ``x`` in [-1, 1]
    (``[B, 3, R, R]``)."""
    mean = vae.encode(x).latent_dist.mean
    return (mean - shift_factor) * scaling_factor if shift_factor else mean * scaling_factor


def vae_scale(vae) -> int:
    """How many pixels one latent spans (per side) in a diffusers ``AutoencoderKL``."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


#: What adapters import from here (``GuardStep``, ``Sample`` and ``noise_difference_norm`` live in ``mixins``, the
#: pixel ranges in ``pixels``; they stay importable from here for adapters written against this module).
__all__ = ["ADAPTERS", "Adapter", "CONDITIONING", "GuardStep", "LatentAdapter", "Sample", "ScanAdapter", "UNET_LAYER",
           "VAELatents", "noise_difference_norm", "place", "register_adapter", "to_uint8", "to_unit_range",
           "unet_layer", "unet_selection_layers", "vae_latent", "vae_scale"]
