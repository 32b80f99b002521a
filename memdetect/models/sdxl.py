"""Stable Diffusion XL (``StableDiffusionXLPipeline``: ``UNet2DConditionModel`` with two CLIP text encoders).

* A DDPM (epsilon) model on SD's scaled-linear schedule: noise and timestep exactly as for SD 1.x (``DDPMScheduler``
  from the model's own scheduler config; t = 50).
* Condition: the empty prompt as the pipeline conditions its unconditional half. With ``force_zeros_for_empty_prompt``
  (model_index.json; true for SDXL base 1.0) the pipeline uses zeros for both the token embeddings [1, 77, 2048] and
  the pooled embedding [1, 1280], and so do we (no text encoder is loaded at all); otherwise ``""`` goes through the
  pipeline's own ``encode_prompt`` (both CLIPs' penultimate hidden states, CLIP-G's pooled projection), once per
  model, cached (``conditions.py``).
* Micro-conditioning (``add_time_ids``): original size = target size = the image's own size as the UNet sees it
  (R, R) and crop (0, 0), as the pipeline sets them for an uncropped image of that size.
* Default layer: ``up_blocks.0.resnets.<last>.conv2:in``, the paper's SD layer at the lowest resolution of the up
  path (1280 channels at 32x32 for 1024 px). Spatial-max pooling.
"""

from __future__ import annotations

import torch

from ..core.hub import load_component
from .base import register_adapter
from .layers import UNetLayer
from .conditions import empty_condition
from .lazy import LazyModule
from .pipelines import PipelineAdapter, is_meta, load_vae, meta_condition, pipeline_config


@register_adapter
class SDXLAdapter(UNetLayer, PipelineAdapter):
    family = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
    denoiser_folder = "unet"
    text_components = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        r = float(self.resolution)
        self.time_ids = torch.tensor([[r, r, 0.0, 0.0, r, r]], device=self.device, dtype=self.dtype)

    @classmethod
    def load(cls, source, *, device, dtype, **options):
        from diffusers import DDPMScheduler, UNet2DConditionModel

        lazy = LazyModule(UNet2DConditionModel, source, "unet")
        if not is_meta(device):
            lazy.require_weights()  # a config-only folder: say so before loading any text encoder
        cfg = lazy.module.config
        pooled = int(cfg.projection_class_embeddings_input_dim) - 6 * int(cfg.addition_time_embed_dim)
        shapes = {"prompt_embeds": (1, 77, int(cfg.cross_attention_dim)), "pooled_prompt_embeds": (1, pooled)}
        zeros = bool(pipeline_config(source).get("force_zeros_for_empty_prompt", True))
        if is_meta(device):
            cond = meta_condition(shapes)
        elif zeros:
            cond = {k: torch.zeros(s) for k, s in shapes.items()}
        else:
            cond = empty_condition(cls.family, source, cls.text_components, {}, tuple(shapes),
                                   lambda: _encode_empty(source))
        vae = load_vae(source, device)
        scheduler = load_component(DDPMScheduler, source, "scheduler")
        resolution = int(cfg.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1)
        adapter = cls(lazy, vae, scheduler, cond, resolution=resolution, device=device, dtype=dtype, source=source)
        adapter.zeroed_condition = zeros
        return adapter

    def forward(self, x_t, t):
        self._denoise(x_t, t)

    def predict_noise(self, x_t, t, cond=None):
        if cond is not None:
            self.encode_condition([])
        return self._denoise(x_t, t).to(x_t.device)

    def _denoise(self, x_t, t):
        dev = self._run_device()
        b = x_t.shape[0]
        c = self._condition(b)
        added = {"text_embeds": c["pooled_prompt_embeds"], "time_ids": self.time_ids.to(dev).expand(b, -1)}
        with self.autocast():
            return self.denoiser(x_t.to(dev), int(t), encoder_hidden_states=c["prompt_embeds"],
                                 added_cond_kwargs=added).sample

    def describe(self):
        return {**super().describe(), "empty_condition": "zeros (force_zeros_for_empty_prompt)"
                if getattr(self, "zeroed_condition", False) else "encoded"}


def _encode_empty(source: str) -> dict[str, torch.Tensor]:
    """The empty prompt through ``StableDiffusionXLPipeline.encode_prompt`` (text components only, float32)."""
    from diffusers import StableDiffusionXLPipeline

    pipe = load_component(StableDiffusionXLPipeline, source, None, unet=None, vae=None, torch_dtype=torch.float32)
    embeds, _, pooled, _ = pipe.encode_prompt(prompt="", device=torch.device("cpu"),
                                              do_classifier_free_guidance=False)
    del pipe
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
