"""Shared part of the adapters for today's diffusers pipelines (``sdxl``, ``sd3``, ``flux``, ``pixart``).

* The denoiser is a ``lazy.LazyModule``: built on ``meta`` from its config, its weights read from safetensors by
  name in ``place()``. When the ``Detector`` pruned for a layer (``pruned_for``), only the tensors a forward up to that
  layer reads are read; otherwise all of them. Before that the denoiser runs on ``meta`` inputs (shapes only), which is
  what the ``Detector``'s probe needs. The VAE is read as usual (diffusers maps the file; the ``Detector`` drops its
  decoder).
* ``--device meta``: nothing is read at all (config-only folders work): every network is built on ``meta`` and the
  empty condition is a ``meta`` tensor of its shape. ``memdetect layers --device meta`` lists a real architecture's
  layers and shapes with no weights and no memory.
* x0 = (VAE posterior mean - ``shift_factor``) x ``scaling_factor`` (SD3 and Flux have a shift factor; SDXL and
  PixArt do not).
* The empty prompt's condition comes from ``conditions.empty_condition`` (encoded once per model, cached on disk).

Flow-matching noise (SD3, Flux): ``flow.py``.
"""

from __future__ import annotations

import logging
from typing import Callable, ClassVar, Sequence

import torch

from ..core.capture import Trace
from ..errors import UnsupportedModelError, UsageError
from ..core.hub import component_files, load_component, read_json
from .base import Adapter, VAELatents, noise_difference_norm
from .conditions import empty_condition
from .flow import flow_sigma, scheduler_shift
from .lazy import LazyModule, build_empty, component_folder

log = logging.getLogger(__name__)

META = torch.device("meta")


def is_meta(device: torch.device) -> bool:
    return torch.device(device).type == "meta"


def load_vae(source: str, device: torch.device):
    """The pipeline's ``AutoencoderKL`` (on ``meta`` from its config when ``device`` is meta)."""
    from diffusers import AutoencoderKL

    if is_meta(device):
        folder = component_folder(source, "vae", "vae (AutoencoderKL)")
        return build_empty(AutoencoderKL, AutoencoderKL.load_config(str(folder))).to(META)
    return load_component(AutoencoderKL, source, "vae")


def meta_condition(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """A condition of the given shapes on ``meta`` (``--device meta``: shapes only)."""
    return {k: torch.empty(s, device=META) for k, s in shapes.items()}


def pipeline_config(source: str) -> dict:
    return read_json(source, "model_index.json") or {}


def token_grid(x: torch.Tensor) -> torch.Tensor:
    """``[B, T, C]`` patch tokens in raster order -> ``[B, C, g, g]``."""
    b, t, c = x.shape
    g = int(round(t ** 0.5))
    if g * g != t:
        raise UsageError(f"cannot lay {t} tokens out on a square patch grid")
    return x.transpose(1, 2).reshape(b, c, g, g)


class PipelineAdapter(VAELatents, Adapter):
    """A latent adapter (``base.VAELatents``) over a lazily read denoiser and an ``AutoencoderKL`` (see the module
    docstring)."""

    conditioning = "text"
    #: the denoiser's component folder and the text components (hashed into the condition cache's key)
    denoiser_folder: ClassVar[str] = "transformer"
    text_components: ClassVar[tuple[str, ...]] = ()

    def __init__(self, lazy: LazyModule, vae, scheduler, cond: dict[str, torch.Tensor], *, resolution: int,
                 device: torch.device, dtype: torch.dtype, source: str = ""):
        super().__init__(lazy.module, scheduler, resolution=resolution, device=device, dtype=dtype, source=source)
        self.lazy = lazy
        self._use_vae(vae)
        self.cond = {k: v.to(device, dtype if v.is_floating_point() else None) for k, v in cond.items()}
        if not is_meta(device):
            lazy.require_weights()  # a config-only folder fails at load, not in the middle of a scan
        if dtype != torch.float32 and torch.device(device).type == "cpu":
            # no autocast on a CPU: the Detector's probe (fake tensors, before ``place``) runs the VAE and the meta
            # denoiser on inputs in ``dtype``, so their weights must be in it too, or the probe fails and nothing is
            # pruned (every block of the denoiser read). The VAE is small; the meta denoiser costs nothing.
            torch.nn.Module.to(self.vae, dtype=dtype)  # (nn.Module's own: diffusers' override warns)
            torch.nn.Module.to(lazy.module, dtype=dtype)

    # -- loading -------------------------------------------------------------------------------------------------
    def place(self) -> "PipelineAdapter":
        """Read the denoiser's weights (only those a forward up to ``pruned_for`` reads, when pruned), then place
        every network (``Adapter.place``)."""
        if self._placed:
            return self
        if not is_meta(self.device) and self.lazy.pending:
            names, called = None, set()
            if self.pruned_for is not None:
                names, called = self.lazy.needed_for(lambda: self._meta_forward(self.pruned_for))
            read = self.lazy.materialise(
                names, self.device, self.dtype, called=called,
                reason=f"this model was loaded for a scan of {self.pruned_for}; load it with prune=False for a "
                       f"full forward" if self.pruned_for else "")
            log.info("read %.0f MB of %s weights%s", read / 1e6, self.family,
                     f" (the modules up to {self.pruned_for})" if names is not None else "")
        return super().place()

    def _meta_forward(self, layer: str) -> None:
        x = torch.zeros(1, *self.latent_shape(), device=META, dtype=next(self.denoiser.parameters()).dtype)
        with Trace(self.denoiser, [layer], stop=True):
            self.forward(x, 0)

    def _run_device(self) -> torch.device:
        """Where the denoiser's inputs go: ``meta`` until its weights are read (shapes only)."""
        return META if self.lazy.pending else self.device

    def _condition(self, batch: int) -> dict[str, torch.Tensor]:
        dev = self._run_device()
        return {k: v.to(dev).expand(batch, *v.shape[1:]) for k, v in self.cond.items()}

    def weight_files(self):
        return component_files(self.source, (self.denoiser_folder, "vae", "scheduler", *self.text_components))

    # -- the scan's stages (encode, latent_shape, decode: ``VAELatents``) ---------------------------------------------
    def activation_grid(self, x):
        if x.ndim == 3:
            return token_grid(x)
        return super().activation_grid(x)

    def default_batch_size(self):
        return 8 if self.device.type == "cuda" else 1

    def describe(self):
        return {**super().describe(), "weights_read": "lazily, by name" if not is_meta(self.device) else "none (meta)"}

    def encode_condition(self, values: Sequence[str]):
        raise UsageError(f"{self.family} scans are prompt-free (the empty prompt's condition is cached); prompts are "
                         f"not supported for this family yet")

    def sample(self, seeds, *, cond=None, steps=None, guidance=1.0):
        raise UnsupportedModelError(f"memdetect does not generate with {self.family} models (scanning only)")


class FlowMatchAdapter(PipelineAdapter):
    """Rectified-flow families (SD3, Flux): x_t = (1 - s) x0 + s eps with s from ``flow.py`` (the SNR of DDPM t on
    SD's schedule, shifted by the model's own resolution shift), or ``sigma`` when given. ``sigma(t)`` is that s (the
    scheduler's sigma; the model's timestep is 1000 s); ``predict_noise`` turns the velocity v = eps - x0 the model
    predicts into eps = x_t + (1 - s) v."""

    accepts_sigma = True

    def __init__(self, *args, sigma: float | None = None, shift: bool = True, **kwargs):
        super().__init__(*args, **kwargs)

        if sigma is not None and not (isinstance(sigma, (int, float)) and 0 < float(sigma) < 1):
            raise UsageError(f"--sigma for a flow-matching model is the s of x_t = (1 - s) x0 + s eps, in (0, 1); "
                             f"got {sigma!r}")
        self.sigma_override = float(sigma) if sigma is not None else None
        self.shift = scheduler_shift(self.scheduler.config, self.image_seq_len()) if shift else 1.0

    @classmethod
    def transformer_and_condition(cls, transformer_class, source: str, device: torch.device, encode: Callable,
                                  *, max_sequence_length: int, text_tokens: int):
        """The lazily read transformer (``transformer_class`` in ``denoiser_folder``) and the empty prompt's condition
        (``prompt_embeds`` of ``text_tokens`` tokens, ``pooled_prompt_embeds``): ``encode(source,
        max_sequence_length, transformer)`` (the transformer as built, on ``meta``) through the on-disk cache (``conditions.empty_condition``), or shapes only on ``meta``
        (``--device meta``). A config-only folder fails here, before any text encoder is loaded."""
        lazy = LazyModule(transformer_class, source, cls.denoiser_folder)
        if is_meta(device):
            cfg = lazy.module.config
            return lazy, meta_condition({"prompt_embeds": (1, text_tokens, cfg.joint_attention_dim),
                                         "pooled_prompt_embeds": (1, cfg.pooled_projection_dim)})
        lazy.require_weights()
        n = int(max_sequence_length)
        return lazy, empty_condition(cls.family, source, cls.text_components, {"max_sequence_length": n},
                                     ("prompt_embeds", "pooled_prompt_embeds"),
                                     lambda: encode(source, n, lazy.module))

    def image_seq_len(self) -> int:
        """Image tokens at the scan's resolution (what Flux's dynamic shift is a function of)."""
        r = self.resolution // self.vae_scale
        p = int(getattr(self.denoiser.config, "patch_size", 2) or 1)
        return (r // p) ** 2

    def sigma(self, t: int) -> float:
        return self.sigma_override if self.sigma_override is not None else flow_sigma(int(t), self.shift)

    def noise_std(self, t: int) -> float:
        return self.sigma(t)

    def apply_noise(self, x0, t, eps):
        s = self.sigma(t)
        return ((1 - s) * x0.float() + s * eps.float()).to(self.dtype)

    def forward(self, x_t, t):
        self.velocity(x_t, self.sigma(t))

    def predict_noise(self, x_t, t, cond=None):
        s = self.sigma(t)
        v = self._velocity(x_t, s, cond)
        return (x_t.float() + (1 - s) * v.float().to(x_t.device)).to(x_t.dtype)

    def velocity(self, x_t: torch.Tensor, s: float) -> torch.Tensor:
        """The model's velocity prediction at noise level ``s`` with the empty prompt's condition (a family that
        takes prompts adds a ``cond`` argument: ``encode_condition``'s output)."""
        raise NotImplementedError

    def _velocity(self, x_t: torch.Tensor, s: float, cond=None) -> torch.Tensor:
        if cond is None:
            return self.velocity(x_t, s)
        if type(self).encode_condition is PipelineAdapter.encode_condition:
            self.encode_condition([])  # the family takes no prompts: its one-line UsageError
        return self.velocity(x_t, s, cond)

    # -- the baselines in flow-matching terms (``bench.baselines``) ------------------------------------------------
    def denoising_error(self, x0, t, eps):
        """The flow-matching loss ||v_hat(x_s, s) - (eps - x0)||^2 / D at the scan's s (``sigma(t)``), the objective
        SD3 and Flux are trained with, with the empty prompt. (The epsilon error of ``predict_noise`` is (1 - s)^2
        times it at a fixed s: the same ranking, here in the model's own units.)"""
        s = self.sigma(t)
        x_t = self.apply_noise(x0, t, eps)
        v = self.velocity(x_t, s).float().to(eps.device)
        return (v - (eps.float() - x0.float())).pow(2).flatten(1).mean(1)

    def first_sampling_sigma(self, steps: int) -> float:
        """The first sigma of the model's own Euler sampler (``FlowMatchEulerDiscreteScheduler`` from its config,
        ``steps`` steps, with the dynamic shift at the scan's token count where the model uses one): 1.0, pure
        noise, for every shipped SD3 / Flux configuration."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        kwargs = {}
        if sched.config.get("use_dynamic_shifting", False):
            import math

            kwargs["mu"] = math.log(scheduler_shift(sched.config, self.image_seq_len()))
        sched.set_timesteps(int(steps), **kwargs)
        return float(sched.sigmas[0])

    def first_sampling_step(self, steps: int) -> str:
        return f"s={self.first_sampling_sigma(steps):.3f} (Euler, {int(steps)} steps)"

    def first_step_difference(self, seeds, cond, steps):
        """Wen et al.'s first-step quantity for a flow model: ||v(x_T, s_1, c) - v(x_T, s_1, empty)|| per sample, at
        the generation's initial noise x_T (the Euler sampler starts at x_T = eps, unscaled) and the sampler's first
        sigma s_1. (Converting to epsilon would give (1 - s_1) times it: exactly 0 at s_1 = 1, so the velocity is the
        quantity the sampler's guidance amplifies.)"""
        s = self.first_sampling_sigma(steps)
        x_T = self.initial_noise(seeds).to(self.dtype)
        return noise_difference_norm(self._velocity(x_T, s, cond), self.velocity(x_T, s))

    def describe(self):
        return {**super().describe(), "sigma": self.sigma_override, "shift": round(self.shift, 4)}
