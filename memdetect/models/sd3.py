"""Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``: ``SD3Transformer2DModel``, an MMDiT; flow matching).

* Condition: the empty prompt through the pipeline's own ``encode_prompt`` (CLIP-L and CLIP-G penultimate hidden
  states, concatenated and zero-padded to T5's width, followed by T5-XXL's ``max_sequence_length`` = 256 tokens;
  pooled: both CLIPs' projections), as the pipeline encodes its negative prompt. Encoded once per model and cached
  (``conditions.py``); the scan holds no text encoder. A folder without ``text_encoder_3`` gets T5 zeros, as the
  pipeline does.
* Noise: ``flow.py`` (t = 50 -> s = 0.404 with SD3's ``shift`` = 3.0); the transformer's timestep is 1000 s.
* Default layer: ``transformer_blocks.K.ff.net.0`` with K = num_layers / 2 - 1, the image stream's MLP activation
  ([B, T, 4D]; T image tokens) in the middle joint block, read as the paper reads DiT's middle block (block 12 of 24
  for SD3-medium, 19 of 38 for SD3.5-large). Token-max pooling.
"""

from __future__ import annotations

import torch

from ..core.hub import load_component
from .base import register_adapter
from .layers import MiddleBlockMLP
from .pipelines import FlowMatchAdapter, load_vae, pipeline_config



@register_adapter
class SD3Adapter(MiddleBlockMLP, FlowMatchAdapter):
    family = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline")
    text_components = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")

    @classmethod
    def load(cls, source, *, device, dtype, sigma=None, shift=True, max_sequence_length=256, **options):
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

        lazy, cond = cls.transformer_and_condition(SD3Transformer2DModel, source, device, _encode_empty,
                                                   max_sequence_length=max_sequence_length,
                                                   text_tokens=77 + max_sequence_length)
        cfg = lazy.module.config
        vae = load_vae(source, device)
        scheduler = load_component(FlowMatchEulerDiscreteScheduler, source, "scheduler")
        resolution = int(cfg.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1)
        return cls(lazy, vae, scheduler, cond, resolution=resolution, device=device, dtype=dtype, source=source,
                   sigma=sigma, shift=shift)

    def velocity(self, x_t, s):
        dev = self._run_device()
        x_t = x_t.to(dev)
        c = self._condition(x_t.shape[0])
        t = torch.full((x_t.shape[0],), 1000.0 * s, device=dev, dtype=x_t.dtype)
        with self.autocast():
            return self.denoiser(hidden_states=x_t, encoder_hidden_states=c["prompt_embeds"],
                                 pooled_projections=c["pooled_prompt_embeds"], timestep=t).sample


def _encode_empty(source: str, max_sequence_length: int) -> dict[str, torch.Tensor]:
    """The empty prompt through ``StableDiffusion3Pipeline.encode_prompt``, text components only (T5 in bf16)."""
    from diffusers import StableDiffusion3Pipeline

    t5 = any(pipeline_config(source).get("text_encoder_3") or [None])  # [null, null] when saved without T5
    pipe = load_component(StableDiffusion3Pipeline, source, None, transformer=None, vae=None,
                          torch_dtype=torch.bfloat16 if t5 else torch.float32,
                          **({} if t5 else {"text_encoder_3": None, "tokenizer_3": None}))
    embeds, _, pooled, _ = pipe.encode_prompt(prompt="", prompt_2=None, prompt_3=None, device=torch.device("cpu"),
                                              do_classifier_free_guidance=False,
                                              max_sequence_length=max_sequence_length)
    del pipe
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
