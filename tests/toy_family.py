"""A toy model family, written as a third party would write one: this adapter file, plus a preset row.

The model is a three-layer pixel-space convolutional denoiser (no diffusers model class), stored as
``toy.safetensors`` with its width in ``toy.json``; noising and sampling come from the ``Adapter`` protocol's
defaults (the DDPM linear schedule, DDIM). Importing this file registers the family ``toy``; the tests add the preset
row with ``register_preset`` and check that scan, layers and a benchmark work with no other change to memdetect.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from memdetect.errors import ModelNotFoundError
from memdetect.models.base import Adapter, place, register_adapter, to_unit_range


class ToyDenoiser(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.width = width
        self.body = nn.Sequential(nn.Conv2d(4, width, 3, padding=1), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1),
                                  nn.SiLU(), nn.Conv2d(width, 3, 3, padding=1))

    def forward(self, x: torch.Tensor, t: int) -> torch.Tensor:
        level = torch.full_like(x[:, :1], float(t) / 1000.0)  # the timestep as a fourth input channel
        return self.body(torch.cat([x, level.to(x.dtype)], dim=1))


def save_toy(folder: Path, width: int = 8, seed: int = 0) -> Path:
    """Write a randomly initialised toy model into ``folder``."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(ToyDenoiser(width).state_dict(), str(folder / "toy.safetensors"))
    (folder / "toy.json").write_text(json.dumps({"width": width, "resolution": 16}))
    return folder


@register_adapter
class ToyAdapter(Adapter):
    family = "toy"
    pooling = "spatial-max"

    @classmethod
    def load(cls, source, *, device, dtype, **options):
        from diffusers import DDPMScheduler
        from safetensors.torch import load_file

        folder = Path(source)
        if not (folder / "toy.json").is_file():
            raise ModelNotFoundError(f"{source} holds no toy model (toy.json, toy.safetensors)")
        cfg = json.loads((folder / "toy.json").read_text())
        net = ToyDenoiser(cfg["width"])
        net.load_state_dict(load_file(str(folder / "toy.safetensors")))
        return cls(place(net, device, dtype), DDPMScheduler(num_train_timesteps=1000), resolution=cfg["resolution"],
                   device=device, dtype=dtype, source=str(source))

    @classmethod
    def layer_hint(cls, options):
        return "body.3 (the second SiLU)"

    def default_layer(self) -> str:
        return "body.3"

    def encode(self, images):
        return to_unit_range(images).to(self.device, self.dtype)

    def predict_noise(self, x_t, t, cond=None):
        self._unconditional(cond)
        return self.denoiser(x_t, int(t))
