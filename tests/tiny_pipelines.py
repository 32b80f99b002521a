"""Tiny random-weight pipelines of today's families (SDXL, SD3, Flux, PixArt-Σ), saved with ``save_pretrained``:
the same classes as the real models with diffusers-test sizes, scanned end to end through the CLI on CPU."""

from __future__ import annotations

from pathlib import Path

import torch

from .conftest import _tokenizer_dir, tiny_vae


def t5_tokenizer():
    """A T5 tokenizer (``T5TokenizerFast``) over a 30-piece unigram vocabulary: real tokenization, no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in "abcdefghijklmnopqrstuvwxyz▁"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0)


def tiny_t5(d_model: int = 16):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=32, d_model=d_model, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                                   relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0))


def clip_pair(path: Path, hidden: int = 16, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(_tokenizer_dir(path.parent))
    cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=hidden,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return tokenizer, (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def flow_vae(latent_channels: int = 4, shift_factor: float = 0.1):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 16),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=4, layers_per_block=1, sample_size=16, scaling_factor=1.5,
                         shift_factor=shift_factor, use_quant_conv=False, use_post_quant_conv=False)


def make_tiny_sd3(path: Path) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    tok, te = clip_pair(path, 16, projection=True)
    tok2, te2 = clip_pair(path, 16, projection=True)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=4,
                                        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=8,
                                        pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16)
    StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                             vae=flow_vae(), text_encoder=te, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok2,
                             text_encoder_3=tiny_t5(32), tokenizer_3=t5_tokenizer()).save_pretrained(path)
    return path


def make_tiny_flux(path: Path) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    tok, te = clip_pair(path, 16)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    FluxPipeline(transformer=transformer, scheduler=sched, vae=flow_vae(4), text_encoder=te, tokenizer=tok,
                 text_encoder_2=tiny_t5(32), tokenizer_2=t5_tokenizer()).save_pretrained(path)
    return path


def make_tiny_pixart(path: Path) -> Path:
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(sample_size=8, num_layers=4, patch_size=2, attention_head_dim=4,
                                           num_attention_heads=2, caption_channels=16, in_channels=4,
                                           cross_attention_dim=8, out_channels=8, norm_num_groups=4)
    PixArtSigmaPipeline(tokenizer=t5_tokenizer(), text_encoder=tiny_t5(16), vae=tiny_vae(), transformer=transformer,
                        scheduler=DPMSolverMultistepScheduler()).save_pretrained(path)
    return path


def make_tiny_sdxl(path: Path, force_zeros: bool = True) -> Path:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    tok, te = clip_pair(path, 16)
    tok2, te2 = clip_pair(path, 16, projection=True)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
                                block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=32,
                                attention_head_dim=2, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), addition_embed_type="text_time",
                                addition_time_embed_dim=4, projection_class_embeddings_input_dim=16 + 6 * 4,
                                transformer_layers_per_block=1, use_linear_projection=True)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   steps_offset=1, timestep_spacing="leading")
    StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2,
                              unet=unet, scheduler=sched,
                              force_zeros_for_empty_prompt=force_zeros).save_pretrained(path)
    return path


def make_real_pixart(path: Path, configs: Path) -> tuple[Path, int]:
    """PixArt-Σ's real transformer and VAE configs (``configs``: tests/data/configs/pixart) with random weights (the
    transformer's in bf16, N(0, 0.02^2), written tensor by tensor from a ``meta`` build: 1.2 GB, never 2.4 GB in
    memory), and a T5 of PixArt's width (4096) with one small layer and the tiny tokenizer. Returns the folder and
    the transformer's parameter count."""
    import shutil

    from diffusers import AutoencoderKL, PixArtTransformer2DModel
    from safetensors.torch import save_file

    from memdetect.models.lazy import build_empty

    shutil.copytree(configs, path)
    cfg = PixArtTransformer2DModel.load_config(str(path / "transformer"))
    gen = torch.Generator().manual_seed(0)
    state = {n: (torch.randn(p.shape, generator=gen) * 0.02).to(torch.bfloat16)
             for n, p in build_empty(PixArtTransformer2DModel, cfg).named_parameters()}
    save_file(state, str(path / "transformer" / "diffusion_pytorch_model.safetensors"))
    n_params = sum(t.numel() for t in state.values())
    del state
    torch.manual_seed(0)
    AutoencoderKL.from_config(AutoencoderKL.load_config(str(path / "vae"))).save_pretrained(path / "vae")
    tiny_t5(4096).save_pretrained(path / "text_encoder")
    t5_tokenizer().save_pretrained(path / "tokenizer")
    return path, n_params
