"""Named presets: model family, where the weights come from, and the paper's layer and timestep for it.

A preset is one row; a new family adds its rows here or calls ``register_preset`` (a plug-in package, a test).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources


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


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("sd14", "sd", "CompVis/stable-diffusion-v1-4", "up_blocks.0.resnets.2.conv2:in",
               note="paper setting: LAION memorization; = up_blocks.0.resnets.2.nonlinearity@2"),
        Preset("sd15", "sd", "stable-diffusion-v1-5/stable-diffusion-v1-5", "up_blocks.0.resnets.2.conv2:in",
               note="same architecture as sd14; layer not validated by the paper"),
        Preset("sd2-base", "sd", "stabilityai/stable-diffusion-2-base", "up_blocks.0.resnets.2.conv2:in",
               note="512 px SD 2.x; layer not validated by the paper"),
        Preset("dit", "dit", "facebook/DiT-XL-2-256", None, options={"reading": "mlp"},
               note="MLP activation of the middle block (transformer_blocks.13.ff.net.0 for XL/2)"),
        Preset("dit-adaln", "dit", "facebook/DiT-XL-2-256", None, options={"reading": "adaln"},
               note="adaLN SiLU of the middle block: sees no image tokens (the literal 'SiLU' reading)"),
        Preset("ddpm-cifar10", "ddpm", "google/ddpm-cifar10-32", None,
               note="pixel DDPM, 32x32; lowest-resolution up block"),
        Preset("edm-cifar10", "edm", "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-uncond-vp.pkl",
               "model.enc.8x8_block3.norm0",
               note="EDM DDPM++ CIFAR-10 (NVlabs .pkl, read as data; sha256-checked download); t=50 -> sigma 0.176; "
                    "decoder: model.dec.8x8_block3.norm0"),
        Preset("demo", "ddpm", packaged("demo"), None,
               note="shipped ground-truth model: 40 CIFAR-10 images memorized (memdetect bench demo)"),
    ]
}


def register_preset(preset: Preset) -> Preset:
    """Add ``preset`` to ``PRESETS`` (a later row of the same name replaces it)."""
    PRESETS[preset.name] = preset
    return preset
