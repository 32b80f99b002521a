"""The adapter protocol: one model family per adapter, each a self-contained file that registers itself.

An adapter owns a loaded model and everything about its family that memdetect and its benchmarks need:

* scanning: ``encode`` (uint8 RGB ``[B, 3, R, R]`` -> the denoiser's input space ``x0``: VAE latent mean x scaling
  factor for latent models, ``[-1, 1]`` pixels for pixel models), ``noise`` (``x0`` -> ``x_t`` with the family's
  own noising, one seeded draw per image), ``forward`` (one denoiser call with the null condition),
  ``default_layer`` and ``pooling`` (where to look and how to reduce what is captured there);
* conditioning: ``conditioning`` says what a condition is ("text": prompts, "class": class labels, None:
  unconditional); ``encode_condition`` turns prompts or class indices into the condition ``predict_noise`` takes,
  and ``predict_noise(x_t, t, cond=None)`` uses the null condition (empty prompt, null class, none) when ``cond``
  is None; ``cross_attention_values`` finds the text cross-attention value layers (NeMo) in the module tree;
* generation: ``sample`` (DDIM here; a family with another sampler overrides it) and ``decode`` (model space ->
  uint8 pixels).

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from ..errors import UnsupportedModelError, UsageError

#: family name -> adapter class (``register_adapter``)
ADAPTERS: dict[str, type["Adapter"]] = {}
#: what ``Adapter.conditioning`` may be, and how to say it
CONDITIONING = {"text": "text-conditional (prompts)", "class": "class-conditional", None: "unconditional"}


def register_adapter(cls: type["Adapter"]) -> type["Adapter"]:
    """Class decorator: add an adapter class to ``ADAPTERS`` under ``cls.family`` (a later class replaces it)."""
    family = getattr(cls, "family", None)
    if not (isinstance(cls, type) and issubclass(cls, Adapter)) or not isinstance(family, str) or not family:
        raise TypeError(f"{cls!r} is not an Adapter subclass with a family name")
    if cls.conditioning not in CONDITIONING:
        raise TypeError(f"{cls.__name__}.conditioning must be one of {', '.join(map(repr, CONDITIONING))}")
    ADAPTERS[family] = cls
    return cls


@dataclass(frozen=True)
class GuardStep:
    """What ``memdetect.guard`` reads from one denoiser call inside a diffusers pipeline (``Adapter.guard_step``):
    the denoiser's input ``x`` (the whole batch), its timestep ``t``, ``rows``: one row of the batch per image, in
    image order, and ``unconditional``: whether those rows carry the null condition (the unconditional half under
    classifier-free guidance, every row of an unconditional model). When they do not (a conditional model sampled
    without guidance, or with a negative prompt), the guard runs one extra forward of ``x[rows]`` with the null
    condition at the guarded step."""

    x: torch.Tensor
    t: int
    rows: slice
    unconditional: bool


@dataclass(frozen=True)
class Sample:
    """What a sampler returns, in model space (float32): the samples, the sampler's first denoiser input, its first
    timestep (-1 for samplers without DDPM timesteps) and, with a condition, Wen et al.'s noise-difference norms
    ||eps(x, c) - eps(x, null)|| at every step ([steps, B]; None without a condition)."""

    x0: torch.Tensor
    x_T: torch.Tensor
    first_t: int
    noise_difference: torch.Tensor | None = None


class Adapter(ABC):
    family: ClassVar[str]
    #: "spatial-max" for UNets, "token-max" for transformers
    pooling: ClassVar[str] = "spatial-max"
    #: diffusers ``_class_name`` values (model_index.json, config.json) this adapter loads: family detection
    pipeline_classes: ClassVar[tuple[str, ...]] = ()
    #: "text", "class" or None (see ``CONDITIONING``)
    conditioning: ClassVar[str | None] = None
    #: whether the family takes a noise level ``sigma`` directly (``--sigma``) as well as a DDPM timestep
    accepts_sigma: ClassVar[bool] = False
    #: sampling: the default number of steps, DDIM's eta (1: DDPM's ancestral sampler) and how to name the sampler
    sampling_steps: ClassVar[int] = 50
    sampling_eta: ClassVar[float] = 0.0
    sampler: ClassVar[str] = "DDIM (eta=0)"

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
        of a resumable scan's key (``memdetect.state``), so changed weights are never matched with old scores. An
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
        """The layers ``memdetect calibrate --select-layer`` tries for this family (``memdetect.select``), in forward
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

    # -- conditioning ----------------------------------------------------------------------------------------------
    def encode_condition(self, values: Sequence[str] | Sequence[int]) -> Any:
        """Prompts (``conditioning == "text"``) or class indices (``"class"``) -> the condition ``predict_noise``
        takes, one per value (batch first)."""
        raise UsageError(f"{self.family} models are {CONDITIONING[self.conditioning]}: they take no condition")

    @property
    def num_classes(self) -> int | None:
        """How many classes a class-conditional model knows (None for the others)."""
        return None

    def cross_attention_values(self) -> dict[str, nn.Module]:
        """The value projections of the denoiser's text cross-attention that NeMo reads, by module name, in forward
        order (text-conditional families only)."""
        raise UnsupportedModelError(f"{self.family} models have no text cross-attention (NeMo needs a "
                                    f"text-conditional model)")

    # -- baselines in the family's own terms (``memdetect.bench.baselines``) ----------------------------------------
    def denoising_error(self, x0: torch.Tensor, t: int, eps: torch.Tensor) -> torch.Tensor:
        """The family's training loss per sample at ``t`` with the null condition, for noise ``eps``: here the
        epsilon error ||eps_hat(x_t, t) - eps||^2 / D (flow-matching families: the velocity error)."""
        x_t = self.apply_noise(x0, t, eps)
        return (self.predict_noise(x_t.to(self.dtype), t).float() - eps.float()).pow(2).flatten(1).mean(1)

    def first_sampling_step(self, steps: int) -> int | str:
        """The first timestep of the model's own sampler over ``steps`` steps (here DDIM from the scheduler config)."""
        from diffusers import DDIMScheduler

        sched = DDIMScheduler.from_config(self.scheduler.config)
        sched.set_timesteps(int(steps))
        return int(sched.timesteps[0])

    def first_step_difference(self, seeds: Sequence[int], cond: Any, steps: int) -> torch.Tensor:
        """Wen et al.'s first-step quantity: ||eps(x_T, t_1, cond) - eps(x_T, t_1, null)|| per sample at the
        generation's initial noise x_T (``initial_noise(seeds)``) and the sampler's first timestep t_1."""
        t = self.first_sampling_step(steps)
        x_T = self.initial_noise(seeds).to(self.dtype)
        return noise_difference_norm(self.predict_noise(x_T, t, cond), self.predict_noise(x_T, t))

    def _unconditional(self, cond: Any) -> None:
        """For ``predict_noise`` of an unconditional family: refuse a condition."""
        if cond is not None:
            raise UsageError(f"{self.family} models are unconditional; the condition must be None")

    # -- guarding a diffusers pipeline (memdetect.guard) ---------------------------------------------------------
    @classmethod
    def from_pipeline(cls, pipe) -> "Adapter":
        """An adapter over the modules of a loaded diffusers pipeline of this family (shared, not copied)."""
        raise UnsupportedModelError(f"memdetect.guard does not support {cls.family} pipelines")

    @classmethod
    def load_pipeline(cls, source: str, *, device: torch.device, dtype: torch.dtype):
        """The diffusers pipeline of this family from a local folder or hub id (``memdetect generate``)."""
        raise UnsupportedModelError(f"memdetect generate does not support {cls.family} models")

    def guard_step(self, pipe, call: dict, args: tuple, kwargs: dict) -> GuardStep:
        """Read one denoiser call of ``pipe`` (positional ``args`` and keyword ``kwargs``; ``call``: the keywords the
        pipeline was called with). This default fits diffusers' unconditional pipelines: ``denoiser(x, t)``, every
        row unconditional."""
        return GuardStep(_call_input(args, kwargs), _call_timestep(args, kwargs), slice(None), True)

    def pipeline_call(self, conditions: Sequence | None, n: int, *, steps: int | None,
                      guidance: float | None) -> dict:
        """The keywords of one call of this family's pipeline (``load_pipeline``) that makes ``n`` images per
        condition (prompt or class; None for an unconditional model). This default: an unconditional DDIM pipeline,
        ``sampling_eta`` over ``steps`` (default ``sampling_steps``)."""
        if conditions:
            raise UsageError(f"{self.family} models are {CONDITIONING[self.conditioning]}: they take no prompt or class")
        return {"batch_size": n, "num_inference_steps": steps or self.sampling_steps, "eta": float(self.sampling_eta)}

    def guard_subset(self, call: dict, indices: Sequence[int], n_images: int) -> dict:
        """The pipeline keywords that generate again only images ``indices`` of a call with keywords ``call`` that
        made ``n_images`` (``regenerate``; the guard adds fresh generators). Unconditional: a smaller batch."""
        return {**call, "batch_size": len(indices)}

    # -- generation ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, seeds: Sequence[int], *, cond: Any = None, steps: int | None = None,
               guidance: float = 1.0) -> Sample:
        """Generate one sample per seed in model space: DDIM with ``sampling_eta`` over ``steps`` (default
        ``sampling_steps``) and classifier-free guidance eps = u + g (c - u) when a condition is given.

        diffusers' ``DDIMScheduler`` is built from the model's own scheduler config (its betas and timestep spacing),
        as Wen et al. and NeMo swap it into the SD pipeline; ``eta=1`` with every training timestep is DDPM's
        ancestral sampler with the posterior variance. With a condition both predictions are always evaluated
        (Wen et al.'s norms need them). Every sample's initial noise (and DDPM's per-step noise) comes from its own
        CPU generator seeded by the caller: a sample is the same alone or in any batch.
        """
        from diffusers import DDIMScheduler

        steps = steps or self.sampling_steps
        if not 1 <= steps <= self.num_train_timesteps:
            raise UsageError(f"--steps must be in [1, {self.num_train_timesteps}], got {steps}")
        sched = DDIMScheduler.from_config(self.scheduler.config)
        sched.set_timesteps(steps)
        eta = float(self.sampling_eta)
        x = self.initial_noise(seeds) * float(sched.init_noise_sigma)
        x_T = x.clone()
        gens = [torch.Generator().manual_seed(int(s) + 1) for s in seeds] if eta > 0 else None
        norms = []
        for t in sched.timesteps:
            t = int(t)
            model_in = sched.scale_model_input(x, t).to(self.dtype)
            if cond is None:
                eps = self.predict_noise(model_in, t).float()
            else:
                eps_c, eps_u = self.predict_noise(model_in, t, cond).float(), self.predict_noise(model_in, t).float()
                norms.append(noise_difference_norm(eps_c, eps_u).cpu())
                eps = eps_u + guidance * (eps_c - eps_u)
            noise = None
            if gens is not None:
                noise = torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens]).to(x.device)
            x = sched.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample.float()
        return Sample(x, x_T, int(sched.timesteps[0]), torch.stack(norms) if norms else None)

    def initial_noise(self, seeds: Sequence[int]) -> torch.Tensor:
        """eps ~ N(0, I) in the model's input space, one CPU generator per seed (``draw_noise``)."""
        return self.draw_noise(torch.empty(len(seeds), *self.latent_shape(), device=self.device), seeds)

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Model space -> uint8 [B, 3, R, R] on the CPU (pixel models: x0 is the image in [-1, 1])."""
        return to_uint8(x0)


def _call_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The denoiser's input in a diffusers denoiser call: the first positional argument, or ``sample`` /
    ``hidden_states`` by keyword."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for key in ("sample", "hidden_states"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key]
    raise UnsupportedModelError("cannot find the denoiser's input in its call (expected a tensor first)")


def _call_timestep(args: tuple, kwargs: dict) -> int:
    """The timestep of a diffusers denoiser call: the second positional argument or ``timestep`` (a number, a 0-d
    tensor or one value per row, all equal in a pipeline)."""
    t = args[1] if len(args) > 1 else kwargs.get("timestep")
    if t is None:
        raise UnsupportedModelError("cannot find the timestep in the denoiser's call")
    if isinstance(t, torch.Tensor):
        t = t.reshape(-1)[0].item()
    return int(round(float(t)))


def noise_difference_norm(eps_cond: torch.Tensor, eps_uncond: torch.Tensor) -> torch.Tensor:
    """||eps_cond - eps_uncond||_2 per sample (float32, on the inputs' device): Wen et al.'s per-step quantity."""
    return (eps_cond.float() - eps_uncond.float()).flatten(1).norm(dim=1)


class LatentAdapter(Adapter):
    """Shared part of latent models with a diffusers ``AutoencoderKL``: x0 = the VAE posterior mean x scaling factor
    (``vae.config.scaling_factor``, 0.18215 when absent); decoding is the VAE's decoder."""

    def __init__(self, denoiser: nn.Module, vae: nn.Module, scheduler, *, device: torch.device, dtype: torch.dtype,
                 source: str = ""):
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        super().__init__(denoiser, scheduler, resolution=denoiser.config.sample_size * self.vae_scale, device=device,
                         dtype=dtype, source=source)
        self.vae = vae.eval().requires_grad_(False)
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", None) or 0.18215)

    def encode(self, images):
        x = to_unit_range(images).to(self.device, self.dtype)
        with self.autocast():
            return vae_latent(self.vae, x, self.scaling_factor)

    def latent_shape(self):
        r = self.resolution // self.vae_scale
        return (self.vae.config.latent_channels, r, r)

    @torch.no_grad()
    def decode(self, x0):
        with self.autocast():
            pixels = self.vae.decode((x0 / self.scaling_factor).to(self.dtype)).sample
        return to_uint8(pixels)


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


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images.float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] -> uint8 [0, 255] on the CPU (clamped, rounded)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


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


def vae_latent(vae, x: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """The VAE posterior's mean times the scaling factor, for pixels ``x`` in [-1, 1] (``[B, 3, R, R]``)."""
    return vae.encode(x).latent_dist.mean * scaling_factor
