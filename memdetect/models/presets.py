"""Named presets: model family, where the weights come from, and the paper's layer and timestep for it.

A preset is one row; a new family adds its rows here or calls ``register_preset`` (a plug-in package, a test).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

#: The DDPM noise schedules of the presets' weights (from their scheduler configs): a timestep's noise level differs
#: between them (``schedule_sigma``), which ``memdetect models`` shows.
SCALED_LINEAR = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}
LINEAR = {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02, "num_train_timesteps": 1000}
#: Flow-matching models (``models/flow.py``): the SNR of DDPM t on SD's schedule, times the model's shift (SD3 and
#: SD3.5: ``shift`` 3.0; Flux.1-dev at 1024 px: exp(max_shift 1.15), its dynamic shift at 4096 image tokens).
FLOW_SD3 = {"beta_schedule": "flow, shift 3.0", "flow_shift": 3.0}
FLOW_FLUX_1024 = {"beta_schedule": "flow, shift 3.16 at 1024 px", "flow_shift": math.exp(1.15)}


def packaged(name: str) -> str:
    """Path of a model folder shipped inside the package (``memdetect/data/<name>``)."""
    return str(resources.files("memdetect") / "data" / name)


@dataclass(frozen=True)
class Preset:
    name: str
    family: str
    source: str  # hub id, local folder, or a checkpoint URL (edm)
    layer: str | None = None  # None: the adapter's default for the loaded architecture
    timestep: int = 50
    options: dict = field(default_factory=dict)  # extra adapter options (e.g. DiT reading)
    note: str = ""
    schedule: dict | None = None  # DDPM schedule (DDPMScheduler keywords); None: the local scheduler config
    nemo_published: bool = False  # NeMo's published neuron statistics (SD 1.4, 50k LAION prompts) fit these weights

    def noise_schedule(self) -> dict | None:
        """``schedule``, or the ``scheduler/scheduler_config.json`` of a local source (None when neither)."""
        if self.schedule is not None:
            return self.schedule
        config = Path(self.source) / "scheduler" / "scheduler_config.json"
        if not config.is_file():
            return None
        cfg = json.loads(config.read_text())
        if cfg.get("_class_name") == "FlowMatchEulerDiscreteScheduler":
            shift = float(cfg.get("shift", 1.0) or 1.0)
            return None if cfg.get("use_dynamic_shifting") else {"beta_schedule": f"flow, shift {shift:g}",
                                                                   "flow_shift": shift}
        return {k: cfg[k] for k in ("beta_schedule", "beta_start", "beta_end", "num_train_timesteps") if k in cfg}


def schedule_sigma(schedule: dict, t: int) -> float:
    """Noise-to-signal ratio sqrt((1 - abar_t) / abar_t) of timestep ``t`` under a DDPM ``schedule`` (the
    ``DDPMScheduler`` keywords of ``SCALED_LINEAR`` / ``LINEAR``): what ``Adapter.sigma`` gives for loaded weights.
    For a flow-matching schedule (``flow_shift``) it is the s of x_t = (1 - s) x0 + s eps (``models/flow.py``)."""
    from diffusers import DDPMScheduler

    if "flow_shift" in schedule:
        from .flow import flow_sigma

        return flow_sigma(int(t), float(schedule["flow_shift"]))

    abar = float(DDPMScheduler(**schedule).alphas_cumprod[int(t)])
    return math.sqrt((1 - abar) / abar)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("sd14", "sd", "CompVis/stable-diffusion-v1-4", "up_blocks.0.resnets.2.conv2:in",
               note="paper setting: LAION memorization; = up_blocks.0.resnets.2.nonlinearity@2", schedule=SCALED_LINEAR,
               nemo_published=True),
        Preset("sd15", "sd", "stable-diffusion-v1-5/stable-diffusion-v1-5", "up_blocks.0.resnets.2.conv2:in",
               note="same architecture as sd14; layer not validated by the paper", schedule=SCALED_LINEAR),
        Preset("sd2-base", "sd", "stabilityai/stable-diffusion-2-base", "up_blocks.0.resnets.2.conv2:in",
               note="512 px SD 2.x; layer not validated by the paper", schedule=SCALED_LINEAR),
        Preset("dit", "dit", "facebook/DiT-XL-2-256", None, options={"reading": "mlp"},
               note="MLP activation of the middle block (transformer_blocks.13.ff.net.0 for XL/2)", schedule=LINEAR),
        Preset("dit-adaln", "dit", "facebook/DiT-XL-2-256", None, options={"reading": "adaln"},
               note="adaLN SiLU of the middle block: sees no image tokens (the literal 'SiLU' reading)", schedule=LINEAR),
        Preset("ddpm-cifar10", "ddpm", "google/ddpm-cifar10-32", None,
               note="pixel DDPM, 32x32; lowest-resolution up block", schedule=LINEAR),
        Preset("edm-cifar10", "edm", "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-uncond-vp.pkl",
               "model.enc.8x8_block3.norm0",
               note="EDM DDPM++ CIFAR-10 (NVlabs .pkl, read as data; sha256-checked download); --timestep maps to "
                    "sigma through the DDPM linear schedule; decoder: model.dec.8x8_block3.norm0", schedule=LINEAR),
        Preset("sdxl", "sdxl", "stabilityai/stable-diffusion-xl-base-1.0", None,
               note="SDXL base 1.0 at 1024 px: paper's SD layer at the lowest-resolution up block "
                    "(up_blocks.0.resnets.2.conv2:in, 1280 ch); empty prompt = zeros (force_zeros_for_empty_prompt); "
                    "not validated on ground truth", schedule=SCALED_LINEAR),
        Preset("sd3-medium", "sd3", "stabilityai/stable-diffusion-3-medium-diffusers", None,
               note="SD3 medium (MMDiT, 24 blocks): image MLP of block 12 (transformer_blocks.11.ff.net.0); "
                    "flow matching at the SNR of SD's t, shift 3; not validated on ground truth", schedule=FLOW_SD3),
        Preset("sd3.5-large", "sd3", "stabilityai/stable-diffusion-3.5-large", None,
               note="SD3.5 large (MMDiT, 38 blocks): image MLP of block 19 (transformer_blocks.18.ff.net.0); "
                    "as sd3-medium", schedule=FLOW_SD3),
        Preset("flux-dev", "flux", "black-forest-labs/FLUX.1-dev", None,
               note="Flux.1-dev (19 double + 38 single blocks): image MLP of the last double block "
                    "(transformer_blocks.18.ff.net.0); guidance 3.5; dynamic shift at 1024 px; not validated on "
                    "ground truth", schedule=FLOW_FLUX_1024),
        Preset("pixart-sigma", "pixart", "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", None,
               note="PixArt-Σ XL/2 1024 (28 blocks, T5 300 tokens): MLP of block 14 (transformer_blocks.13.ff.net.0), "
                    "the DiT-XL reading; not validated on ground truth", schedule=LINEAR),
        Preset("demo", "ddpm", packaged("demo"), None,
               note="shipped ground-truth model: 40 CIFAR-10 images memorized (memdetect bench demo)"),
        Preset("demo-sd", "sd", packaged("demo-sd"), "up_blocks.0.resnets.2.conv2:in",
               note="shipped ground-truth StableDiffusionPipeline in miniature (CIFAR-10 captions, graded "
                    "duplication, memorized prompts in memorized_prompts.csv); layer as sd14"),
        Preset("demo-dit", "dit", packaged("demo-dit"), None, options={"reading": "mlp"},
               note="shipped ground-truth DiTPipeline in miniature (CIFAR-10 classes, graded duplication); "
                    "middle block MLP (transformer_blocks.3.ff.net.0)"),
        Preset("demo-sd3", "sd3", packaged("demo-sd3"), None, options={"max_sequence_length": 4},
               note="shipped ground-truth StableDiffusion3Pipeline in miniature (MMDiT trained by flow matching, "
                    "two small CLIPs with a 16-token context, no T5: 4 zero T5 tokens as trained; CIFAR-10 captions, "
                    "graded duplication, memorized prompts in memorized_prompts.csv); image MLP of the middle block "
                    "(transformer_blocks.2.ff.net.0), as sd3-medium"),
        Preset("demo-edm", "edm", packaged("demo-edm"), "model.enc.8x8_block3.norm0",
               note="shipped ground-truth SongUNet + EDMPrecond (CIFAR-10 pixels, graded duplication); "
                    "layer as edm-cifar10"),
    ]
}


def register_preset(preset: Preset) -> Preset:
    """Add ``preset`` to ``PRESETS`` (a later row of the same name replaces it)."""
    PRESETS[preset.name] = preset
    return preset
