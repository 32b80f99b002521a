"""Stable Diffusion 1.x / 2.x (latent UNet with CLIP text conditioning).

x0 = VAE posterior mean x ``vae.config.scaling_factor``; condition = the empty prompt's text embedding, computed
once at load time (the text encoder is then freed). Default layer: ``up_blocks.0.resnets.<last>.conv2:in``, the
input of the last up-block-0 resnet's second conv, which in eval mode *is* the output of that resnet's
``nonlinearity`` SiLU on its third call (after ``norm2``; [B, 1280, 8, 8] for SD1.4 at 512 px). We hook the conv
input because the SiLU module fires three times per forward and, in diffusers 0.22-0.32, was one object shared by
the whole UNet. ``up_blocks.0.resnets.2.nonlinearity@2`` names the same tensor on other diffusers versions.
"""

from __future__ import annotations

import torch

from .base import Adapter, place, to_unit_range, vae_latent
from .hub import load_component


class StableDiffusionAdapter(Adapter):
    family = "sd"
    pooling = "spatial-max"

    def __init__(self, unet, vae, cond: torch.Tensor, scheduler, *, device, dtype, source=""):
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        super().__init__(unet, scheduler, resolution=unet.config.sample_size * scale, device=device, dtype=dtype,
                         source=source)
        self.vae = vae.eval().requires_grad_(False)
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", 0.18215))
        self.cond = cond

    @classmethod
    def load(cls, source, *, device, dtype, **kwargs):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        tokenizer = load_component(CLIPTokenizer, source, "tokenizer")
        text_encoder = load_component(CLIPTextModel, source, "text_encoder")
        unet = load_component(UNet2DConditionModel, source, "unet")
        vae = load_component(AutoencoderKL, source, "vae")
        scheduler = load_component(DDPMScheduler, source, "scheduler")
        cond = empty_prompt_embedding(tokenizer, text_encoder)
        del text_encoder
        return cls(place(unet, device, dtype), place(vae, device, dtype), cond.to(device, dtype), scheduler,
                   device=device, dtype=dtype, source=source)

    def default_layer(self) -> str:
        last = len(self.denoiser.up_blocks[0].resnets) - 1
        return f"up_blocks.0.resnets.{last}.conv2:in"

    def encode(self, images):
        x = to_unit_range(images).to(self.device, self.dtype)
        with self.autocast():
            return vae_latent(self.vae, x, self.scaling_factor)

    def latent_shape(self):
        scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        r = self.resolution // scale
        return (self.vae.config.latent_channels, r, r)

    def forward(self, x_t, t):
        self.predict_noise(x_t, t)

    def predict_noise(self, x_t, t, cond: torch.Tensor | None = None):
        """Epsilon prediction with the empty prompt, or with ``cond`` (text embeddings [B, 77, D]) if given."""
        cond = self.cond if cond is None else cond
        cond = cond.expand(x_t.shape[0], *cond.shape[1:]) if cond.shape[0] == 1 else cond
        with self.autocast():
            return self.denoiser(x_t, int(t), encoder_hidden_states=cond).sample

    def default_batch_size(self):
        return 32 if self.device.type == "cuda" else 4


@torch.no_grad()
def empty_prompt_embedding(tokenizer, text_encoder) -> torch.Tensor:
    """The text embedding of the empty prompt, padded to the tokenizer's max length ([1, 77, D] for CLIP)."""
    ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device))[0].detach()
