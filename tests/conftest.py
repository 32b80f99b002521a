"""Shared fixtures: tiny random-weight models of every family, saved with ``save_pretrained`` and loaded back
through memdetect's real loading path; sample image folders; the ``../shared`` location (skip when absent; point
``MEMDETECT_SHARED`` at a missing folder to run as a plain clone does); global state reset after every test."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEMDETECT_SHARED", REPO.parent / "shared"))
CONFIGS = SHARED / "data" / "configs"

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def needs_shared(*parts: str):
    """Mark a test ``shared`` and skip it unless ``../shared/<parts>`` exists (a fresh user clone has no ../shared);
    ``pytest -m shared`` runs exactly these."""
    path = SHARED.joinpath(*parts)
    skip = pytest.mark.skipif(not path.exists(), reason=f"needs {path} (the developers' shared data folder), "
                                                        f"absent in a plain clone")

    def mark(test):
        return skip(pytest.mark.shared(test))

    return mark


@pytest.fixture(autouse=True)
def _private_state_dir(tmp_path_factory, monkeypatch):
    """Every test gets its own memdetect state directory (journal secret, audit journals, weight hashes): nothing is
    written under ~/.cache, and no test sees another's state. Subprocesses inherit it through the environment."""
    monkeypatch.setenv("MEMDETECT_STATE_DIR", str(tmp_path_factory.mktemp("state")))


@pytest.fixture(autouse=True)
def _reset_global_state():
    """Process-wide state a test may change goes back after it: the allocator setting (the CLI opts into it) and
    the adapter and preset tables (tests register toy families)."""
    from memdetect.speed import runtime
    from memdetect.models import ADAPTERS, PRESETS

    adapters, presets = dict(ADAPTERS), dict(PRESETS)
    yield
    runtime.restore_allocator()
    for table, saved in ((ADAPTERS, adapters), (PRESETS, presets)):
        table.clear()
        table.update(saved)


def _tokenizer_dir(tmp: Path) -> Path:
    """The real SD1.4 CLIP tokenizer files when ../shared is present, else a minimal byte-level CLIP vocabulary."""
    real = CONFIGS / "sd14" / "tokenizer"
    if real.exists():
        return real
    from tokenizers.pre_tokenizers import ByteLevel  # public API: the 256 characters byte-level BPE maps bytes to

    chars = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    d = tmp / "tokenizer"
    d.mkdir(exist_ok=True)  # several tiny pipelines in one folder share it
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>"}))
    return d


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=4, layers_per_block=1, sample_size=16)


def make_tiny_sd(path: Path) -> Path:
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(_tokenizer_dir(path.parent))
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                                num_hidden_layers=1, num_attention_heads=2,
                                                max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                                                eos_token_id=tokenizer.eos_token_id))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
                                block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=16,
                                attention_head_dim=2,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


def make_tiny_dit(path: Path) -> Path:
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8,
                                        num_layers=4, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    DiTPipeline(transformer=transformer, vae=tiny_vae(), scheduler=DDIMScheduler()).save_pretrained(path)
    return path


def make_tiny_ddpm(path: Path, resolution: int = 16) -> Path:
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=resolution, block_out_channels=(8, 16), layers_per_block=2, norm_num_groups=4,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    return make_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_dit(tmp_path_factory) -> Path:
    return make_tiny_dit(tmp_path_factory.mktemp("dit") / "tiny-dit")


@pytest.fixture(scope="session")
def tiny_ddpm(tmp_path_factory) -> Path:
    return make_tiny_ddpm(tmp_path_factory.mktemp("ddpm") / "tiny-ddpm")


@pytest.fixture
def ddpm_pipe(tiny_ddpm):
    """The tiny DDPM as a DDIMPipeline (what the guard tests generate with)."""
    from diffusers import DDIMPipeline, DDPMScheduler, UNet2DModel

    pipe = DDIMPipeline(unet=UNet2DModel.from_pretrained(tiny_ddpm, subfolder="unet"),
                        scheduler=DDPMScheduler.from_pretrained(tiny_ddpm, subfolder="scheduler"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_images(folder: Path, n: int, size=(24, 20), seed: int = 0) -> list[Path]:
    """``n`` random RGB PNGs named img_000.png ... in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"img_{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


@pytest.fixture
def images_dir(tmp_path) -> Path:
    d = tmp_path / "images"
    write_images(d, 5)
    return d
