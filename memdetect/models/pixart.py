"""PixArt-Σ and PixArt-α (``PixArtSigmaPipeline`` / ``PixArtAlphaPipeline``: ``PixArtTransformer2DModel`` with T5).

* A DDPM (epsilon) model: noise and timestep as for DiT (``DDPMScheduler`` from the model's own scheduler config,
  betas 1e-4..0.02 linear; t = 50), the learned-variance half of the output dropped.
* Condition: the empty prompt through the pipeline's own ``encode_prompt`` (T5-XXL over ``max_sequence_length``
  tokens, 300 for Σ, 120 for α, with its attention mask, which the transformer receives as
  ``encoder_attention_mask``), as the pipeline encodes its negative prompt. Encoded once per model and cached.
* Size conditioning: PixArt-α 1024 (``use_additional_conditions``) takes the image's resolution and aspect ratio: the
  scan's own size (R, R) and 1.0.
* Default layer: ``transformer_blocks.K.ff.net.0`` with K = num_layers / 2 - 1 (block 14 of 28: the DiT-XL reading),
  the MLP activation over image tokens. Token-max pooling.
"""

from __future__ import annotations

import torch

from ..core.hub import load_component
from .base import register_adapter
from .conditions import empty_condition
from .layers import MiddleBlockMLP
from .lazy import LazyModule
from .pipelines import PipelineAdapter, is_meta, load_vae, meta_condition, pipeline_config

MAX_LENGTH = {"PixArtSigmaPipeline": 300, "PixArtAlphaPipeline": 120}


@register_adapter
class PixArtAdapter(MiddleBlockMLP, PipelineAdapter):
    family = "pixart"
    pipeline_classes = ("PixArtSigmaPipeline", "PixArtAlphaPipeline")
    text_components = ("text_encoder", "tokenizer")

    @classmethod
    def load(cls, source, *, device, dtype, max_sequence_length=None, **options):
        from diffusers import DDPMScheduler, PixArtTransformer2DModel

        lazy = LazyModule(PixArtTransformer2DModel, source, "transformer")
        if not is_meta(device):
            lazy.require_weights()  # a config-only folder: say so before loading any text encoder
        cfg = lazy.module.config
        pipe_class = pipeline_config(source).get("_class_name", "PixArtSigmaPipeline")
        n = int(max_sequence_length or MAX_LENGTH.get(pipe_class, 300))
        if is_meta(device):
            cond = meta_condition({"prompt_embeds": (1, n, cfg.caption_channels), "attention_mask": (1, n)})
        else:
            cond = empty_condition(cls.family, source, cls.text_components,
                                   {"max_sequence_length": n, "pipeline": pipe_class},
                                   ("prompt_embeds", "attention_mask"), lambda: _encode_empty(source, pipe_class, n))
        vae = load_vae(source, device)
        scheduler = load_component(DDPMScheduler, source, "scheduler")
        resolution = int(cfg.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1)
        return cls(lazy, vae, scheduler, cond, resolution=resolution, device=device, dtype=dtype, source=source)

    def forward(self, x_t, t):
        self._denoise(x_t, t)

    def predict_noise(self, x_t, t, cond=None):
        if cond is not None:
            self.encode_condition([])
        return self._denoise(x_t, t)[:, : x_t.shape[1]].to(x_t.device)

    def _denoise(self, x_t, t):
        dev = self._run_device()
        b = x_t.shape[0]
        c = self._condition(b)
        added = {"resolution": None, "aspect_ratio": None}
        if self.denoiser.use_additional_conditions:
            added = {"resolution": torch.tensor([[self.resolution, self.resolution]], dtype=x_t.dtype,
                                                device=dev).repeat(b, 1),
                     "aspect_ratio": torch.ones(b, 1, dtype=x_t.dtype, device=dev)}
        timesteps = torch.full((b,), int(t), dtype=torch.long, device=dev)
        with self.autocast():
            return self.denoiser(x_t.to(dev), encoder_hidden_states=c["prompt_embeds"],
                                 encoder_attention_mask=c["attention_mask"], timestep=timesteps,
                                 added_cond_kwargs=added).sample


def _encode_empty(source: str, pipe_class: str, n: int) -> dict[str, torch.Tensor]:
    """The empty prompt through the PixArt pipeline's own ``encode_prompt`` (T5 in bf16), text components only."""
    import diffusers

    cls = getattr(diffusers, pipe_class if pipe_class in MAX_LENGTH else "PixArtSigmaPipeline")
    pipe = load_component(cls, source, None, transformer=None, vae=None, torch_dtype=torch.bfloat16)
    embeds, mask, _, _ = pipe.encode_prompt(prompt="", do_classifier_free_guidance=False, device=torch.device("cpu"),
                                            max_sequence_length=n)
    del pipe
    return {"prompt_embeds": embeds, "attention_mask": mask.float()}
