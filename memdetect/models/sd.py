"""Stable Diffusion 1.x / 2.x (latent UNet with CLIP text conditioning).

x0 = VAE posterior mean x ``vae.config.scaling_factor``; the null condition = the empty prompt's text embedding,
computed once at load time (the text encoder is then freed, and loaded again only when prompts are encoded:
``encode_condition``, for the benchmarks). Default layer: ``up_blocks.0.resnets.<last>.conv2:in``, the input of the
last up-block-0 resnet's second conv, which in eval mode *is* the output of that resnet's ``nonlinearity`` SiLU on
its third call (after ``norm2``; [B, 1280, 8, 8] for SD1.4 at 512 px). We hook the conv input because the SiLU
module fires three times per forward and, in diffusers 0.22-0.32, was one object shared by the whole UNet.
``up_blocks.0.resnets.2.nonlinearity@2`` names the same tensor on other diffusers versions.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..errors import UnsupportedModelError, UsageError
from ..core.hub import component_files, load_component
from .base import GuardStep, LatentAdapter, register_adapter
from .mixins import _call_input, _call_timestep
from .layers import UNetLayers


@register_adapter
class StableDiffusionAdapter(UNetLayers, LatentAdapter):
    family = "sd"
    pipeline_classes = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")
    conditioning = "text"

    def __init__(self, unet, vae, cond: torch.Tensor, scheduler, *, device, dtype, source=""):
        super().__init__(unet, vae, scheduler, device=device, dtype=dtype, source=source)
        self.cond = cond  # the empty prompt's embedding [1, 77, D]
        self._text = None  # (tokenizer, text encoder on the device), loaded by the first encode_condition

    @classmethod
    def load(cls, source, *, device, dtype, **options):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        tokenizer, text_encoder = _load_text_encoder(source)
        cond = prompt_embeddings(tokenizer, text_encoder, [""])
        del text_encoder  # freed before the UNet is read: never two networks' worth of weights for nothing
        unet = load_component(UNet2DConditionModel, source, "unet")
        vae = load_component(AutoencoderKL, source, "vae")
        scheduler = load_component(DDPMScheduler, source, "scheduler")
        return cls(unet, vae, cond.to(device, dtype), scheduler, device=device, dtype=dtype, source=source)

    def predict_noise(self, x_t, t, cond: torch.Tensor | None = None):
        """Epsilon prediction with the empty prompt, or with ``cond`` (text embeddings [B, 77, D]) if given."""
        cond = self.cond if cond is None else cond
        cond = cond.expand(x_t.shape[0], *cond.shape[1:]) if cond.shape[0] == 1 else cond
        with self.autocast():
            return self.denoiser(x_t, int(t), encoder_hidden_states=cond).sample

    def encode_condition(self, values: Sequence[str]) -> torch.Tensor:
        """Prompts -> text embeddings [B, 77, D] in the model's dtype (the text encoder runs in float32)."""
        if self._text is None:
            tokenizer, text_encoder = _load_text_encoder(self.source)
            self._text = (tokenizer, text_encoder.to(self.device))
        return prompt_embeddings(*self._text, [str(v) for v in values]).to(self.dtype)

    def cross_attention_values(self) -> dict[str, nn.Module]:
        """``to_v`` of every cross-attention (an attention over the text embedding) in the down and mid blocks, the
        layers NeMo reads (7 in SD 1.x: ``...attn2.to_v``), found from the module tree."""
        return cross_attention_values(self.denoiser)

    def default_batch_size(self):
        return 32 if self.device.type == "cuda" else 4

    # -- memdetect.guard ---------------------------------------------------------------------------------------------
    @classmethod
    def from_pipeline(cls, pipe):
        """Over ``pipe``'s UNet, VAE and scheduler; the empty prompt embedded by ``pipe``'s own text encoder, as the
        pipeline embeds it for classifier-free guidance."""
        unet = pipe.unet
        device, dtype = unet.device, unet.dtype
        with torch.no_grad():
            cond = prompt_embeddings(pipe.tokenizer, pipe.text_encoder, [""])
        return cls(unet, pipe.vae, cond.to(device, dtype), pipe.scheduler, device=device, dtype=dtype,
                   source=str(getattr(pipe, "name_or_path", "") or ""))

    @classmethod
    def load_pipeline(cls, source, *, device, dtype):
        from diffusers import StableDiffusionPipeline

        from ..core.hub import load_component
        return load_component(StableDiffusionPipeline, source, None, safety_checker=None,
                              requires_safety_checker=False, torch_dtype=dtype).to(device)

    def guard_step(self, pipe, call, args, kwargs):
        """diffusers' SD pipeline concatenates [negative, positive] under classifier-free guidance: the first half is
        the empty prompt's, unless a negative prompt replaced it (then no row is unconditional)."""
        x = _call_input(args, kwargs)
        negative = call.get("negative_prompt") is not None or call.get("negative_prompt_embeds") is not None
        cfg = bool(getattr(pipe, "do_classifier_free_guidance", False))
        rows = slice(0, x.shape[0] // 2) if cfg else slice(None)  # under CFG both halves hold the same x_t
        return GuardStep(x, _call_timestep(args, kwargs), rows, unconditional=cfg and not negative)

    def pipeline_call(self, conditions, n, *, steps, guidance):
        if not conditions:
            raise UsageError("a Stable Diffusion model needs a prompt (--prompt)")
        return {"prompt": [str(c) for c in conditions], "num_images_per_prompt": n,
                "num_inference_steps": steps or self.sampling_steps,
                "guidance_scale": 7.5 if guidance is None else float(guidance)}

    def guard_subset(self, call, indices, n_images):
        """Prompts of images ``indices`` (image i comes from prompt i // num_images_per_prompt), one image each."""
        for key in ("prompt_embeds", "latents"):
            if call.get(key) is not None:
                raise UsageError(f"regenerating needs prompt=... and fresh noise; the pipeline was called with {key}")
        per = int(call.get("num_images_per_prompt") or 1)
        prompt = call.get("prompt")
        prompts = [prompt] * (n_images // per) if isinstance(prompt, str) else list(prompt)
        out = {**call, "prompt": [prompts[i // per] for i in indices], "num_images_per_prompt": 1}
        negative = call.get("negative_prompt")
        if isinstance(negative, (list, tuple)):
            out["negative_prompt"] = [negative[i // per] for i in indices]
        return out

    def weight_files(self):
        return component_files(self.source, ("unet", "vae", "scheduler", "text_encoder", "tokenizer"))


def _load_text_encoder(source: str):
    from transformers import CLIPTextModel, CLIPTokenizer

    return load_component(CLIPTokenizer, source, "tokenizer"), load_component(CLIPTextModel, source, "text_encoder")


@torch.no_grad()
def prompt_embeddings(tokenizer, text_encoder, prompts: Sequence[str]) -> torch.Tensor:
    """Text embeddings of ``prompts`` ([B, 77, D] for CLIP), padded to the tokenizer's max length and truncated as
    the SD pipeline does; on the text encoder's device. ``[""]`` gives the empty prompt's embedding."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device))[0].detach()


def cross_attention_values(unet: nn.Module) -> dict[str, nn.Module]:
    """The value projections (``to_v``) of the cross-attention modules (``is_cross_attention``) in a UNet's down
    blocks and mid block, by module name in forward order. Raises if there are none."""
    names = {m: n for n, m in unet.named_modules()}
    parts = [*getattr(unet, "down_blocks", []), *([unet.mid_block] if getattr(unet, "mid_block", None) else [])]
    found = {names[m.to_v]: m.to_v for part in parts for m in part.modules()
             if getattr(m, "is_cross_attention", False) and isinstance(getattr(m, "to_v", None), nn.Module)}
    if not found:
        raise UnsupportedModelError("the model has no cross-attention value layers in its down and mid blocks (NeMo "
                                    "needs a text-conditional UNet)")
    return found
