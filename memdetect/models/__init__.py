"""Model adapters: the family table, presets, family detection and loading.

The built-in families (``sd``, ``dit``, ``ddpm``, ``edm``, ``sdxl``, ``sd3``, ``flux``, ``pixart``) register themselves when their files are imported here;
other packages add theirs through the ``memdetect.adapters`` entry-point group (objects: ``Adapter`` subclasses, or
``ScanAdapter`` subclasses for a family that only scans). What each feature needs of a family, and the check that
says when it lacks it: ``capabilities`` (``require``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path

import torch

from ..errors import UnsupportedModelError, UsageError
from ..core.hub import read_json
from . import ddpm
from . import dit
from . import edm
from . import flux
from . import pixart
from . import sd
from . import sd3
from . import sdxl  # noqa: F401  (each registers its adapter)
from .base import ADAPTERS, Adapter, ScanAdapter, register_adapter
from .capabilities import require
from .presets import PRESETS, Preset, register_preset

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "memdetect.adapters"


def load_entry_points() -> list[str]:
    """Register the adapters of the ``memdetect.adapters`` entry-point group; returns their families."""
    added = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = register_adapter(ep.load())
        except Exception as e:  # one broken plug-in must not stop memdetect
            log.warning("entry point %s (%s) is not a usable adapter: %s", ep.name, ENTRY_POINT_GROUP, e)
            continue
        added.append(cls.family)
    return added


load_entry_points()


def detect_family(source: str) -> str:
    """The adapter family of a hub id or local diffusers folder, from its model_index.json (or config.json)."""
    for filename in ("model_index.json", "config.json"):
        cfg = read_json(source, filename)
        if cfg is None:
            continue
        name = cfg.get("_class_name", "")
        for family, cls in ADAPTERS.items():
            if name in cls.pipeline_classes:
                return family
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


def adapter_class(family: str) -> type[ScanAdapter]:
    """The registered adapter of ``family``; UnsupportedModelError naming it and the known ones otherwise."""
    try:
        return ADAPTERS[family]
    except KeyError:
        raise UnsupportedModelError(f"no adapter for family {family!r} (have: {', '.join(sorted(ADAPTERS))})") from None


def load_adapter(spec: ModelSpec, device: torch.device, dtype: torch.dtype, *, place: bool = True) -> ScanAdapter:
    """Load ``spec``'s adapter; ``place=False`` leaves its networks as read (see ``Adapter.place``), for a caller that
    drops what it will not run first (``Detector``)."""
    adapter = adapter_class(spec.family).load(spec.source, device=device, dtype=dtype, **spec.options)
    return adapter.place() if place else adapter


__all__ = ["ADAPTERS", "Adapter", "ENTRY_POINT_GROUP", "ModelSpec", "PRESETS", "Preset", "adapter_class",
           "detect_family", "load_adapter", "load_entry_points", "register_adapter", "register_preset",
           "require", "resolve_model", "ScanAdapter"]
