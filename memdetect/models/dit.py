"""DiT (class-conditional latent transformer, diffusers ``DiTTransformer2DModel``) with its VAE.

x0 = VAE posterior mean x scaling factor (0.18215); condition = the null class (label ``num_embeds_ada_norm``,
1000 for ImageNet, the class-free-guidance token). Pooling is a max over tokens.

The paper reads "the SiLU in block 12 of 24" of DiT-L/4. In a DiT block the only ``nn.SiLU`` modules act on the
(timestep, class) conditioning vector and never see image tokens, so two readings are offered:

* ``mlp`` (default): the MLP activation of the middle block, ``transformer_blocks.K.ff.net.0`` ([B, T, 4D], the
  only per-token nonlinearity in the block; ``blocks.K.mlp.act`` in the original code);
* ``adaln``: the adaLN modulation SiLU, ``transformer_blocks.K.norm1.silu`` ([B, D]; image-independent for a fixed
  timestep and class, so it cannot separate images: kept to make that measurable).

K = num_layers / 2 - 1: block 12 of 24 for DiT-L/4, block 14 of 28 (index 13) for DiT-XL/2.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import UsageError
from ..core.hub import component_files, load_component
from .base import GuardStep, LatentAdapter, register_adapter
from .mixins import _call_input, _call_timestep

READINGS = {"mlp": "transformer_blocks.{k}.ff.net.0", "adaln": "transformer_blocks.{k}.norm1.silu"}


@register_adapter
class DiTAdapter(LatentAdapter):
    family = "dit"
    pooling = "token-max"
    pipeline_classes = ("DiTPipeline",)
    conditioning = "class"

    def __init__(self, transformer, vae, scheduler, *, device, dtype, source="", reading="mlp"):
        if reading not in READINGS:
            raise ValueError(f"unknown DiT layer reading {reading!r}; choose one of {', '.join(READINGS)}")
        super().__init__(transformer, vae, scheduler, device=device, dtype=dtype, source=source)
        self.reading = reading
        self.null_class = int(transformer.config.num_embeds_ada_norm)

    @classmethod
    def load(cls, source, *, device, dtype, reading="mlp", **options):
        from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel

        transformer = load_component(DiTTransformer2DModel, source, "transformer")
        vae = load_component(AutoencoderKL, source, "vae")
        scheduler = load_component(DDPMScheduler, source, "scheduler")
        return cls(transformer, vae, scheduler, device=device, dtype=dtype, source=source, reading=reading)

    @classmethod
    def layer_hint(cls, options):
        return "middle block: " + options.get("reading", "mlp")

    def default_layer(self) -> str:
        k = self.denoiser.config.num_layers // 2 - 1
        return READINGS[self.reading].format(k=k)

    def selection_layers(self) -> list[str]:
        """Every block's MLP activation and output (the best layer of an independent DiT was its last block)."""
        out = []
        for k in range(self.denoiser.config.num_layers):
            out += [READINGS["mlp"].format(k=k), f"transformer_blocks.{k}"]
        return out

    def predict_noise(self, x_t, t, cond: torch.Tensor | None = None):
        """Epsilon prediction for the null class, or for class labels ``cond`` [B] if given (learned sigma dropped)."""
        b = x_t.shape[0]
        if cond is None:
            cond = torch.full((b,), self.null_class, dtype=torch.long, device=x_t.device)
        timesteps = torch.full((b,), int(t), dtype=torch.long, device=x_t.device)
        with self.autocast():
            out = self.denoiser(x_t, timestep=timesteps, class_labels=cond).sample
        return out[:, : x_t.shape[1]]

    def activation_grid(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, C]`` tokens -> ``[B, C, g, g]``: the patch tokens in raster order (``PatchEmbed`` flattens the
        latent's ``g x g`` patch grid row by row); an adaLN capture ``[B, C]`` is a 1x1 grid."""
        if x.ndim == 3:
            b, t, c = x.shape
            g = int(round(t ** 0.5))
            if g * g != t:
                raise UsageError(f"cannot lay {t} DiT tokens out on a square patch grid")
            return x.transpose(1, 2).reshape(b, c, g, g)
        return super().activation_grid(x)

    @property
    def num_classes(self) -> int:
        return self.null_class  # the null class is the label after the last real one

    def encode_condition(self, values: Sequence[int]) -> torch.Tensor:
        """Class indices -> class labels [B] (long, on the device)."""
        bad = [v for v in values if not 0 <= int(v) < self.num_classes]
        if bad:
            raise UsageError(f"class indices must be in [0, {self.num_classes}), got {bad[0]}")
        return torch.tensor([int(v) for v in values], dtype=torch.long, device=self.device)

    def default_batch_size(self):
        return 64 if self.device.type == "cuda" else 8

    # -- memdetect.guard ---------------------------------------------------------------------------------------------
    @classmethod
    def from_pipeline(cls, pipe, reading: str = "mlp"):
        t = pipe.transformer
        return cls(t, pipe.vae, pipe.scheduler, device=t.device, dtype=t.dtype,
                   source=str(getattr(pipe, "name_or_path", "") or ""), reading=reading)

    @classmethod
    def load_pipeline(cls, source, *, device, dtype):
        from diffusers import DiTPipeline

        from ..core.hub import load_component
        pipe = load_component(DiTPipeline, source, None, torch_dtype=dtype).to(device)
        map_imagenet_null_label(pipe.transformer)
        return pipe

    def guard_step(self, pipe, call, args, kwargs):
        """diffusers' DiT pipeline concatenates [classes, null classes] under classifier-free guidance: the second
        half is unconditional when every label in it is a null label (the pipeline's 1000, or this model's
        ``num_embeds_ada_norm``)."""
        x = _call_input(args, kwargs)
        labels = kwargs.get("class_labels")
        if labels is None and len(args) > 2:
            labels = args[2]
        b = x.shape[0]
        if labels is not None and b % 2 == 0:
            second = torch.as_tensor(labels).reshape(-1)[b // 2:]
            if bool(((second == self.null_class) | (second == 1000)).all()):
                return GuardStep(x, _call_timestep(args, kwargs), slice(b // 2, b), unconditional=True)
        return GuardStep(x, _call_timestep(args, kwargs), slice(None), unconditional=False)

    def pipeline_call(self, conditions, n, *, steps, guidance):
        if not conditions:
            raise UsageError("a DiT model needs class indices (--class)")
        labels = self.encode_condition([int(c) for c in conditions]).tolist()
        return {"class_labels": [c for c in labels for _ in range(n)], "num_inference_steps": steps or self.sampling_steps,
                "guidance_scale": 4.0 if guidance is None else float(guidance)}

    def guard_subset(self, call, indices, n_images):
        labels = call.get("class_labels")
        labels = labels.tolist() if isinstance(labels, torch.Tensor) else list(labels)
        if call.get("latents") is not None:
            raise UsageError("regenerating needs fresh noise; the pipeline was called with latents")
        return {**call, "class_labels": [labels[i] for i in indices]}

    def weight_files(self):
        return component_files(self.source, ("transformer", "vae", "scheduler"))


IMAGENET_NULL_LABEL = 1000  # what ``DiTPipeline.__call__`` passes as the null class under guidance, whatever the model


def map_imagenet_null_label(transformer) -> None:
    """Let ``DiTPipeline`` sample with classifier-free guidance from a model with other than 1000 classes.

    The pipeline hard-codes ImageNet's null label 1000 for the unconditional half; a model with ``num_embeds_ada_norm``
    = K classes has its null label at K, and 1000 is out of its embedding table. A forward pre-hook on the transformer
    maps 1000 to K. Nothing changes for a 1000-class model (no hook is added)."""
    k = int(transformer.config.num_embeds_ada_norm)
    if k == IMAGENET_NULL_LABEL:
        return

    def to_own_null(module, args, kwargs):
        labels = kwargs.get("class_labels")
        if isinstance(labels, torch.Tensor) and bool((labels == IMAGENET_NULL_LABEL).any()):
            return args, {**kwargs, "class_labels": labels.masked_fill(labels == IMAGENET_NULL_LABEL, k)}
        return None

    transformer.register_forward_pre_hook(to_own_null, with_kwargs=True)
