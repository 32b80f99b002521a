"""EDM (Karras et al. 2022): the CIFAR-10 "DDPM++" SongUNet, its preconditioners, and loading NVlabs checkpoints.

diffusers has no EDM network, so this file holds our own implementation of it, written from the architecture's
description (``../shared/data/configs/NOTES-layer-names.md``, section 1) and checked against the module names,
parameter shapes and forward math of NVlabs' released networks. Module names match the released ones, so a state
dict from NVlabs loads as it is and the paper's layer strings resolve:

    precond (VPPrecond | VEPrecond | EDMPrecond)
      model (SongUNet)
        map_noise, map_label, map_augment, map_layer0, map_layer1
        enc: 32x32_conv, 32x32_block0..3, 16x16_down, 16x16_block0..3, 8x8_down, 8x8_block0..3
        dec: 8x8_in0, 8x8_in1, 8x8_block0..4, 16x16_up, 16x16_block0..4, 32x32_up, 32x32_block0..4,
             32x32_aux_norm, 32x32_aux_conv
      each block: norm0, conv0, affine, norm1, conv1, [skip], [norm2, qkv, proj]

Only the DDPM++ settings are implemented (positional noise embedding, "standard" encoder and decoder, any
resample filter); NCSN++ ("fourier" embedding, "residual" encoder) and the ADM network (DhariwalUNet) are refused
with a clear error.

Adapter (family ``edm``):

* x0 = the image in [-1, 1]; the condition is none (a zero class vector for class-conditional checkpoints).
* The noise level is a sigma, not a DDPM timestep. To keep the ``--timestep`` interface, timestep t is mapped
  through the DDPM linear schedule (betas 1e-4..0.02 over 1000 steps): sigma(t) = sqrt((1 - abar_t) / abar_t), so
  t = 50 gives sigma ~= 0.176 (the paper's setting). ``sigma=`` (CLI ``--sigma``) sets sigma directly instead.
* Noising is variance exploding, x = x0 + sigma * eps (the preconditioner scales the input by c_in); eps is drawn
  per image from ``torch.Generator().manual_seed(seed)``, as the base adapter does.
* Default layer: ``model.enc.8x8_block3.norm0`` (the GroupNorm on the input of the last encoder block at the lowest
  resolution; in general ``model.enc.{R}x{R}_block{num_blocks-1}.norm0``). ``8x8_block3`` also exists in the
  decoder: ``model.dec.8x8_block3.norm0`` (512 channels: 256 decoder + 256 skip) is available by name.

Loading (``--model edm --model-path P`` or the ``edm-cifar10`` preset):

* ``P.pkl``: an NVlabs pickle, read as data by ``memdetect.models.edm.safe_pickle`` (nothing from the file is imported or
  run); the EMA network (key ``ema``) is rebuilt from its recorded constructor arguments, checked against what we
  support, and its parameters and buffers are loaded.
* ``P.safetensors``: a state dict of the preconditioner (keys ``model.enc...``; bare SongUNet keys get the prefix),
  with a JSON sidecar ``P.json`` (or ``config.json`` beside it) naming at least the preconditioner:
  ``{"class_name": "EDMPrecond"}`` (or ``{"precond": "edm"}``); constructor arguments it leaves out are inferred
  from the tensor shapes. ``save_safetensors`` writes both files.
* an ``https://`` URL (the preset's): downloaded once into ``$MEMDETECT_CACHE`` (default ``~/.cache/memdetect``),
  under ``downloads/``, and checked against a sha256 on every use (``memdetect.core.hub.fetch``; ``KNOWN_DOWNLOADS``
  says where the pinned checksum comes from).

Files: ``network.py`` (the SongUNet and the preconditioners), ``config.py`` (checked constructor arguments,
``build_network``, ``load_state``), ``loaders.py`` (the checkpoint formats and downloads), ``safe_pickle.py`` (the
restricted unpickler), ``sampler.py`` (EDM's Heun sampler) and this file (the adapter; it re-exports the others'
public names).
"""

from __future__ import annotations

import functools
import math

import torch

from ...errors import UsageError
from ..base import Adapter, Sample, register_adapter, to_unit_range
from .config import build_network, load_state
from .loaders import (EDM_CIFAR10_URL, KNOWN_DOWNLOADS, LIMITS, checkpoint_path, infer_config, load_network,
                      network_from_pickle, network_from_safetensors, save_safetensors)
from .network import PRECONDS, EDMPrecond, SongUNet, VEPrecond, VPPrecond, _Precond
from .sampler import sample_heun

__all__ = ["EDMAdapter", "ddpm_sigma", "sample_heun", "build_network", "load_state", "load_network",
           "network_from_pickle", "network_from_safetensors", "save_safetensors", "checkpoint_path", "infer_config",
           "EDM_CIFAR10_URL", "KNOWN_DOWNLOADS", "LIMITS", "PRECONDS", "SongUNet", "VPPrecond", "VEPrecond",
           "EDMPrecond"]

# ------------------------------------------------------------------------------------------------------------------
# The adapter.


@functools.lru_cache(maxsize=8)
def _ddpm_abar(num_train_timesteps: int, beta_start: float, beta_end: float) -> tuple[float, ...]:
    betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    return tuple(torch.cumprod(1 - betas, 0).tolist())


def ddpm_sigma(t: int, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> float:
    """sigma = sqrt((1 - abar_t) / abar_t) of timestep ``t`` under the DDPM linear schedule (t = 50: ~0.176).

    The schedule is computed once per setting and kept as Python floats: the adapter's forward reads sigma with no
    tensor arithmetic, so the detector's probe on fake tensors (``capture.trace_usage``) can run it."""
    abar = _ddpm_abar(int(num_train_timesteps), float(beta_start), float(beta_end))[int(t)]
    return math.sqrt((1 - abar) / abar)


@register_adapter
class EDMAdapter(Adapter):
    family = "edm"
    pooling = "spatial-max"
    accepts_sigma = True
    sampling_steps = 18
    sampler = "EDM Heun (deterministic)"

    def __init__(self, net: _Precond, *, device, dtype, source: str = "", sigma: float | None = None):
        from diffusers import DDPMScheduler

        if sigma is not None and not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
            raise UsageError(f"sigma must be a positive number, got {sigma!r}")
        # The DDPM linear schedule only maps --timestep to sigma; EDM itself has no timesteps.
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
        super().__init__(net, scheduler, resolution=net.img_resolution, device=device, dtype=dtype, source=source)
        self.sigma_override = float(sigma) if sigma is not None else None
        ddpm_sigma(0, self.num_train_timesteps)  # the schedule's table, computed here rather than inside a probe

    @classmethod
    def load(cls, source, *, device, dtype, sigma=None, **options):
        net = load_network(source)
        return cls(net, device=device, dtype=dtype, source=str(source), sigma=sigma)

    @classmethod
    def layer_hint(cls, options):
        return "model.enc.<lowest>_block<last>.norm0"

    def weight_files(self):
        path = checkpoint_path(self.source)
        sidecar = path.with_suffix(".json")
        return [path, sidecar] if path.suffix == ".safetensors" and sidecar.is_file() else [path]

    def default_layer(self) -> str:
        unet = self.denoiser.model
        low = min(int(k.split("x")[0]) for k in unet.enc.keys())
        last = max(int(k.rsplit("block", 1)[1]) for k in unet.enc.keys() if k.startswith(f"{low}x{low}_block"))
        return f"model.enc.{low}x{low}_block{last}.norm0"

    def selection_layers(self) -> list[str]:
        """The encoder and decoder blocks at the lowest resolution and one level up, each as its output and as its
        first normalisation (``norm0``, the default's kind of layer), in forward order."""
        unet = self.denoiser.model
        low = min(int(k.split("x")[0]) for k in unet.enc.keys())
        out = []
        for side in ("enc", "dec"):
            for key, block in getattr(unet, side).items():
                if int(key.split("x")[0]) not in (low, 2 * low):
                    continue
                if hasattr(block, "norm0"):
                    out.append(f"model.{side}.{key}.norm0")
                out.append(f"model.{side}.{key}")
        return out

    def encode(self, images):
        return to_unit_range(images).to(self.device, self.dtype)

    def latent_shape(self):
        return (self.denoiser.img_channels, self.resolution, self.resolution)

    def sigma(self, t: int) -> float:
        """The ``sigma`` override when given, else sigma of DDPM timestep ``t``."""
        if self.sigma_override is not None:
            return self.sigma_override
        return ddpm_sigma(t, self.num_train_timesteps)

    def apply_noise(self, x0, t, eps):
        """x = x0 + sigma * eps (variance exploding; the preconditioner applies c_in)."""
        return (x0.float() + self.sigma(t) * eps.float()).to(self.dtype)

    def noise_std(self, t: int) -> float:
        return self.sigma(t)

    def predict_noise(self, x_t, t, cond=None):
        """eps_hat = (x_t - D(x_t; sigma)) / sigma for x_t = x0 + sigma * eps as made by ``noise`` (not VP-scaled)."""
        self._unconditional(cond)
        sigma = self.sigma(t)
        with self.autocast():
            denoised = self.denoiser(x_t, torch.full((x_t.shape[0],), sigma, device=x_t.device))
        return ((x_t.float() - denoised.float()) / sigma).to(x_t.dtype)

    def sample(self, seeds, *, cond=None, steps=None, guidance=1.0) -> Sample:
        """EDM's deterministic Heun sampler (``sample_heun``), unconditional; ``first_t`` is -1 (no timesteps)."""
        self._unconditional(cond)
        x0, x_T = sample_heun(self, seeds, steps=steps or self.sampling_steps)
        return Sample(x0, x_T, -1, None)

    def describe(self):
        return {**super().describe(), "sigma": self.sigma_override}

    def default_batch_size(self):
        return 256 if self.device.type == "cuda" else 64
