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
* Prompts (``encode_condition``, for the benchmarks' conditional baselines only: Wen et al.'s first step, conditional
  FLIPD): the pipeline's own ``encode_prompt`` of each prompt, with its text encoders loaded on the first call and
  kept by the adapter (the prompt-free scan never calls it). Wen's first step and the denoising loss are taken in the
  family's own terms (``FlowMatchAdapter``: the velocity difference at the Euler sampler's first sigma, the
  flow-matching loss). NeMo does not apply: an MMDiT has no text cross-attention (its text tokens are a stream of
  the joint attention, modulated by the timestep, not a value projection of the text embedding alone).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..core.hub import load_component, read_json
from ..errors import UsageError
from .base import register_adapter
from .layers import MiddleBlockMLP
from .pipelines import FlowMatchAdapter, load_vae, pipeline_config

log = logging.getLogger(__name__)


@register_adapter
class SD3Adapter(MiddleBlockMLP, FlowMatchAdapter):
    family = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline")
    text_components = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
    #: T5 tokens of a prompt condition (``load``'s ``max_sequence_length``); the text pipeline, once loaded
    max_sequence_length: int = 256
    _text_pipe = None

    @classmethod
    def load(cls, source, *, device, dtype, sigma=None, shift=True, max_sequence_length=256, **options):
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

        lazy, cond = cls.transformer_and_condition(SD3Transformer2DModel, source, device, _encode_empty,
                                                   max_sequence_length=max_sequence_length,
                                                   text_tokens=_clip_tokens(source) + max_sequence_length)
        cfg = lazy.module.config
        vae = load_vae(source, device)
        scheduler = load_component(FlowMatchEulerDiscreteScheduler, source, "scheduler")
        resolution = int(cfg.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1)
        adapter = cls(lazy, vae, scheduler, cond, resolution=resolution, device=device, dtype=dtype, source=source,
                      sigma=sigma, shift=shift)
        adapter.max_sequence_length = int(max_sequence_length)
        return adapter

    def velocity(self, x_t, s, cond=None):
        dev = self._run_device()
        x_t = x_t.to(dev)
        if cond is None:
            c = self._condition(x_t.shape[0])
        else:
            c = {k: v.to(dev, self.dtype) for k, v in cond.items()}
            if c["prompt_embeds"].shape[0] != x_t.shape[0]:
                raise UsageError(f"{c['prompt_embeds'].shape[0]} prompt condition(s) for {x_t.shape[0]} images")
        t = torch.full((x_t.shape[0],), 1000.0 * s, device=dev, dtype=x_t.dtype)
        with self.autocast():
            return self.denoiser(hidden_states=x_t, encoder_hidden_states=c["prompt_embeds"],
                                 pooled_projections=c["pooled_prompt_embeds"], timestep=t).sample

    def encode_condition(self, values):
        """Prompts -> ``{"prompt_embeds", "pooled_prompt_embeds"}`` through the pipeline's own ``encode_prompt``
        (CLIP-L, CLIP-G and, when the folder has it, T5 at the adapter's ``max_sequence_length``), one row per
        prompt, float32 on the CPU. The text encoders are loaded on the first call and kept."""
        prompts = [str(v) for v in values]
        if not prompts:
            raise UsageError("encode_condition needs at least one prompt")
        if self._text_pipe is None:
            log.info("loading %s's text encoders for prompt conditions", self.source)
            self._text_pipe = _text_pipeline(self.source, self.lazy.module)
        with torch.no_grad():
            embeds, _, pooled, _ = self._text_pipe.encode_prompt(
                prompt=prompts, prompt_2=None, prompt_3=None, device=torch.device("cpu"),
                do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": embeds.float(), "pooled_prompt_embeds": pooled.float()}


def _clip_tokens(source: str) -> int:
    """The CLIP context length of a local folder's tokenizer (``model_max_length``; the pipeline pads prompts to
    it), 77 (CLIP's) otherwise."""
    folder = Path(source).expanduser() / "tokenizer"
    cfg = read_json(str(folder), "tokenizer_config.json") if folder.is_dir() else None
    return int((cfg or {}).get("model_max_length", 77))


def _text_pipeline(source: str, transformer):
    """``StableDiffusion3Pipeline`` with its text components only (T5 in bf16). ``transformer`` is the denoiser as
    built from its config (on ``meta``, no weights read): without T5 the pipeline reads its ``joint_attention_dim``
    for the zero T5 tokens."""
    from diffusers import StableDiffusion3Pipeline

    t5 = any(pipeline_config(source).get("text_encoder_3") or [None])  # [null, null] when saved without T5
    return load_component(StableDiffusion3Pipeline, source, None, transformer=transformer, vae=None,
                          torch_dtype=torch.bfloat16 if t5 else torch.float32,
                          **({} if t5 else {"text_encoder_3": None, "tokenizer_3": None}))


def _encode_empty(source: str, max_sequence_length: int, transformer) -> dict[str, torch.Tensor]:
    """The empty prompt through ``StableDiffusion3Pipeline.encode_prompt``, text components only (T5 in bf16)."""
    pipe = _text_pipeline(source, transformer)
    embeds, _, pooled, _ = pipe.encode_prompt(prompt="", prompt_2=None, prompt_3=None, device=torch.device("cpu"),
                                              do_classifier_free_guidance=False,
                                              max_sequence_length=max_sequence_length)
    del pipe
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
