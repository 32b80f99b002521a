"""Flux.1 (``FluxPipeline``: ``FluxTransformer2DModel``, double- and single-stream blocks; flow matching).

* Latents: the VAE's 16 channels, packed 2x2 into tokens of 64 channels (``FluxPipeline._pack_latents``) for the
  transformer, with the pipeline's image ids (row, column) and text ids (zeros). Noise is drawn and applied in the
  unpacked latent (same per-element noise).
* Condition: the empty prompt through ``FluxPipeline.encode_prompt``: CLIP-L's pooled output and T5-XXL's hidden
  states over ``max_sequence_length`` = 512 tokens. Encoded once per model and cached (``conditions.py``).
* Guidance (Flux.1-dev is guidance-distilled: the guidance scale is an input, not two passes): ``guidance`` = 3.5,
  ``FluxPipeline``'s default ``guidance_scale``, i.e. the value the model is sampled with; models without a guidance
  embedding (``guidance_embeds`` false, Flux.1-schnell) get none. A preset option (``guidance=``) changes it.
* Noise: ``flow.py``, with Flux's dynamic shift at the scan's resolution (1024 px: a = 3.16, t = 50 -> s = 0.416);
  the transformer takes s (it multiplies by 1000 itself).
* Resolution: the VAE config's ``sample_size`` (1024 px for Flux.1, ``FluxPipeline``'s default size); option
  ``resolution`` (a multiple of 16).
* Default layer: ``transformer_blocks.<num_layers-1>.ff.net.0``, the image-stream MLP activation of the last
  double-stream block ([B, T, 4D], T image tokens; block 19 of 19 in Flux.1). A double-stream block holds about the
  weights of two single-stream ones, so this block ends the first half of the network by parameters and compute
  (38 of 76 single-block units), the paper's "middle block" reading; unlike the single-stream blocks, its MLP sees
  only image tokens (a single block's tokens are the 512 text tokens followed by the image's, and a token max would
  pool the text's). Token-max pooling.
"""

from __future__ import annotations

import torch

from ..errors import UsageError
from ..core.hub import load_component
from .base import register_adapter
from .layers import MLP_LAYER
from .pipelines import FlowMatchAdapter, load_vae, token_grid

GUIDANCE = 3.5


@register_adapter
class FluxAdapter(FlowMatchAdapter):
    family = "flux"
    pooling = "token-max"
    pipeline_classes = ("FluxPipeline", "FluxImg2ImgPipeline")
    text_components = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")

    def __init__(self, *args, guidance: float | None = GUIDANCE, **kwargs):
        super().__init__(*args, **kwargs)
        self.guidance = float(guidance) if guidance is not None and self.denoiser.config.guidance_embeds else None

    @classmethod
    def load(cls, source, *, device, dtype, sigma=None, shift=True, max_sequence_length=512, resolution=None,
             guidance=GUIDANCE, **options):
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

        lazy, cond = cls.transformer_and_condition(FluxTransformer2DModel, source, device, _encode_empty,
                                                   max_sequence_length=max_sequence_length,
                                                   text_tokens=max_sequence_length)
        vae = load_vae(source, device)
        resolution = int(vae.config.sample_size) if resolution is None else resolution
        if not isinstance(resolution, int) or resolution < 16 or resolution % 16:
            raise UsageError(f"the Flux resolution must be a positive multiple of 16, got {resolution!r}")
        scheduler = load_component(FlowMatchEulerDiscreteScheduler, source, "scheduler")
        return cls(lazy, vae, scheduler, cond, resolution=resolution, device=device, dtype=dtype, source=source,
                   sigma=sigma, shift=shift, guidance=guidance)

    @classmethod
    def layer_hint(cls, options):
        return MLP_LAYER.format(k="<num_layers-1>") + " (last double-stream block)"

    def default_layer(self) -> str:
        return MLP_LAYER.format(k=self.denoiser.config.num_layers - 1)

    def image_seq_len(self) -> int:
        return (self.resolution // self.vae_scale // 2) ** 2

    def velocity(self, x_t, s):
        dev = self._run_device()
        b, c, h, w = x_t.shape
        packed = x_t.to(dev).view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
        cond = self._condition(b)
        img_ids = torch.zeros(h // 2, w // 2, 3, device=dev)
        img_ids[..., 1] += torch.arange(h // 2, device=dev)[:, None]
        img_ids[..., 2] += torch.arange(w // 2, device=dev)[None, :]
        txt_ids = torch.zeros(cond["prompt_embeds"].shape[1], 3, device=dev)
        t = torch.full((b,), float(s), device=dev, dtype=x_t.dtype)
        guidance = None if self.guidance is None else torch.full((b,), self.guidance, device=dev, dtype=torch.float32)
        with self.autocast():
            out = self.denoiser(hidden_states=packed, timestep=t, guidance=guidance,
                                pooled_projections=cond["pooled_prompt_embeds"],
                                encoder_hidden_states=cond["prompt_embeds"], txt_ids=txt_ids,
                                img_ids=img_ids.reshape(-1, 3), return_dict=False)[0]
        return out.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    def activation_grid(self, x):
        return token_grid(x) if x.ndim == 3 else super().activation_grid(x)

    def describe(self):
        return {**super().describe(), "guidance": self.guidance}


def _encode_empty(source: str, max_sequence_length: int, transformer=None) -> dict[str, torch.Tensor]:
    """The empty prompt through ``FluxPipeline.encode_prompt``, text components only (T5 in bf16); ``transformer``
    is not needed (``FlowMatchAdapter.transformer_and_condition`` passes it)."""
    from diffusers import FluxPipeline

    pipe = load_component(FluxPipeline, source, None, transformer=None, vae=None, torch_dtype=torch.bfloat16)
    embeds, pooled, _ = pipe.encode_prompt(prompt="", prompt_2=None, device=torch.device("cpu"),
                                           max_sequence_length=max_sequence_length)
    del pipe
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
