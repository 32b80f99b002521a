"""Model adapters: a name-to-class table, presets, family detection and loading."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path

import torch

from ..errors import UnsupportedModelError, UsageError
from .base import Adapter
from .ddpm import PixelDDPMAdapter
from .dit import DiTAdapter
from .edm import EDMAdapter
from .hub import read_json
from .presets import PRESETS, Preset
from .sd import StableDiffusionAdapter

ADAPTERS: dict[str, type[Adapter]] = {}


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Add an adapter class to the table under ``cls.family`` (usable as a decorator)."""
    ADAPTERS[cls.family] = cls
    return cls


for _cls in (StableDiffusionAdapter, DiTAdapter, PixelDDPMAdapter, EDMAdapter):
    register_adapter(_cls)


def _load_entry_points() -> None:
    """Third-party adapters: entry-point group ``memdetect.adapters`` whose objects are Adapter classes."""
    try:
        eps = entry_points(group="memdetect.adapters")
    except TypeError:  # pragma: no cover - Python < 3.10 API
        eps = entry_points().get("memdetect.adapters", [])
    for ep in eps:
        register_adapter(ep.load())


_load_entry_points()

#: diffusers pipeline / model class name -> family
PIPELINE_FAMILIES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionImg2ImgPipeline": "sd",
    "DiTPipeline": "dit",
    "DDPMPipeline": "ddpm",
    "DDIMPipeline": "ddpm",
    "UNet2DModel": "ddpm",
}


def detect_family(source: str) -> str:
    """The adapter family of a hub id or local diffusers folder, from its model_index.json (or config.json)."""
    for filename in ("model_index.json", "config.json"):
        cfg = read_json(source, filename)
        if cfg is None:
            continue
        name = cfg.get("_class_name", "")
        if name in PIPELINE_FAMILIES:
            return PIPELINE_FAMILIES[name]
        if name:
            raise UnsupportedModelError(
                f"{source} is a {name}, which memdetect does not support (families: {', '.join(sorted(ADAPTERS))})")
    if Path(source).expanduser().is_file():
        raise UnsupportedModelError(f"{source} is a single file; pass a diffusers folder, or --model edm for .pkl")
    raise UnsupportedModelError(f"cannot tell the model family of {source}: it has no model_index.json or config.json")


@dataclass(frozen=True)
class ModelSpec:
    """What to load: family, source, and the preset's layer/timestep defaults (None = adapter default)."""

    family: str
    source: str
    name: str
    layer: str | None = None
    timestep: int = 50
    options: dict = field(default_factory=dict)


def resolve_model(model: str, model_path: str | None = None) -> ModelSpec:
    """Turn ``--model`` / ``--model-path`` into a ModelSpec.

    ``model`` is a preset name (``memdetect models``), a family name (``sd``, ``dit``, ``ddpm``, ...; needs
    ``model_path``), or a hub id / local folder whose family is detected.
    """
    if model in PRESETS:
        p: Preset = PRESETS[model]
        return ModelSpec(p.family, str(model_path or p.source), p.name, p.layer, p.timestep, dict(p.options))
    if model in ADAPTERS:
        if not model_path:
            raise UsageError(f"--model {model} is a model family; give the weights with --model-path DIR "
                             f"(or use a preset: {', '.join(PRESETS)})")
        return ModelSpec(model, str(model_path), model)
    if model_path:
        raise UsageError(f"unknown model {model!r}: with --model-path, --model must be a preset "
                         f"({', '.join(PRESETS)}) or a family ({', '.join(sorted(ADAPTERS))})")
    if "/" not in model and not Path(model).expanduser().exists():
        raise UsageError(f"unknown model {model!r}; choose a preset ({', '.join(PRESETS)}), a family with "
                         f"--model-path, a hub id (owner/name) or a local folder")
    return ModelSpec(detect_family(model), model, model)


def load_adapter(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> Adapter:
    try:
        cls = ADAPTERS[spec.family]
    except KeyError:
        raise UnsupportedModelError(f"no adapter for family {spec.family!r} (have: {', '.join(sorted(ADAPTERS))})")
    return cls.load(spec.source, device=device, dtype=dtype, **spec.options)


__all__ = ["ADAPTERS", "Adapter", "ModelSpec", "PRESETS", "Preset", "detect_family", "load_adapter",
           "register_adapter", "resolve_model"]
