"""Denoisers built without weights, whose tensors are read from safetensors by name only when they are needed.

A scan runs the denoiser only up to its hooked layer (``capture.Trace(stop=True)``), so the blocks after it never
need their weights. For the big transformers (Flux.1-dev: 12B parameters, 24 GB in bf16) reading them anyway would
not fit a 24 GB machine. ``LazyModule`` therefore:

1. builds the network from its config under ``accelerate.init_empty_weights`` (parameters on the ``meta`` device: no
   memory), and puts every buffer on ``meta`` too, keeping the values the constructor computed (positional tables
   that are not in the checkpoint) aside;
2. until it is materialised, runs the network on ``meta`` inputs (``pending``): shapes only, which is what
   ``Detector``'s probe and ``memdetect layers --device meta`` need;
3. ``materialise(names)`` reads exactly the named tensors from the safetensors file(s) (``safe_open`` reads one
   tensor at a time; a sharded checkpoint's ``*.safetensors.index.json`` says which file holds which name), converts
   them to the run's device and dtype and puts them in place. Everything else stays on ``meta``, and calling a module
   that still has ``meta`` weights raises ``PrunedModuleError``.

``needed_for(layer)``: the tensors a forward up to ``layer`` reads, found by running that forward on ``meta`` under
``capture.trace_usage`` (the same probe the ``Detector`` uses to prune).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from ..errors import ModelNotFoundError, PrunedModuleError
from ..core.hub import local_root, not_found, offline

log = logging.getLogger(__name__)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


def build_empty(cls, config: dict) -> nn.Module:
    """``cls.from_config(config)`` with every parameter on ``meta`` (no memory, no initialisation)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return cls.from_config(config)


def weight_map(folder: Path) -> dict[str, Path]:
    """tensor name -> safetensors file of a diffusers component folder (single file or sharded with an index);
    empty when the folder has no safetensors weights."""
    index = folder / INDEX_NAME
    if index.is_file():
        data = json.loads(index.read_text())
        return {str(k): folder / str(v) for k, v in dict(data.get("weight_map", {})).items()}
    single = folder / WEIGHTS_NAME
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return {k: single for k in f.keys()}
    return {}


def component_folder(source: str, subfolder: str, what: str) -> Path:
    """The local folder of a component: of a local model, or of a hub repo's snapshot (that component and
    model_index.json downloaded when missing, unless offline). ModelNotFoundError when it cannot be had."""
    root = local_root(source)
    if root is None and not Path(source).expanduser().exists():
        from huggingface_hub import snapshot_download

        try:
            root = Path(snapshot_download(source, allow_patterns=[f"{subfolder}/*", "model_index.json"],
                                          local_files_only=offline()))
        except Exception as e:  # no network, no such repo, gated: one sentence from not_found
            raise not_found(source, what, e) from None
    if root is None:
        raise not_found(source, what)
    return root / subfolder


class LazyModule:
    """A diffusers model built on ``meta`` from ``source/subfolder/config.json``, with its safetensors weights read
    on demand (see the module docstring). ``weights`` may be empty only for a shape-only (``meta``) run."""

    def __init__(self, cls, source: str, subfolder: str):
        folder = component_folder(source, subfolder, f"{subfolder} ({cls.__name__})")
        try:
            config = cls.load_config(str(folder))
        except (OSError, ValueError) as e:
            raise not_found(source, f"{subfolder} ({cls.__name__})", e) from None
        self.module = build_empty(cls, config).eval().requires_grad_(False)
        self.folder = folder
        self.weights = weight_map(folder)
        self._constructed: dict[str, torch.Tensor] = {}
        for name, buf in list(self.module.named_buffers()):
            owner, _, key = name.rpartition(".")
            mod = self.module.get_submodule(owner) if owner else self.module
            if not buf.is_meta:
                self._constructed[name] = buf
                mod._buffers[key] = buf.to("meta")
        self.loaded: set[str] = set()
        self.materialised = False

    @property
    def pending(self) -> bool:
        """Whether nothing has been materialised yet (the network runs on ``meta`` inputs, shapes only)."""
        return not self.materialised

    def files(self) -> list[Path]:
        return sorted(set(self.weights.values()))

    def require_weights(self) -> None:
        if not self.weights:
            raise ModelNotFoundError(f"{self.folder} has no {WEIGHTS_NAME} (or sharded index): the weights are needed "
                                     f"to scan; a config-only folder lists its layers and shapes with --device meta")

    def tensor_names(self) -> list[str]:
        return [n for n, _ in self.module.named_parameters()] + [n for n, _ in self.module.named_buffers()]

    def needed_for(self, run: Callable[[], None]) -> tuple[set[str], set[str]]:
        """The names of the parameters and buffers ``run()`` (a ``meta`` forward, typically stopped early) reads, and
        of the modules it calls."""
        from ..core.capture import trace_usage

        usage = trace_usage([self.module], run)
        names = {id(t): n for n, t in [*self.module.named_parameters(), *self.module.named_buffers()]}
        modules = {m: n for n, m in self.module.named_modules()}
        return {names[i] for i in usage.tensors if i in names}, {modules[m] for m in usage.fired if m in modules}

    def materialise(self, names: Iterable[str] | None, device: torch.device, dtype: torch.dtype,
                    reason: str = "", called: Iterable[str] = ()) -> int:
        """Read ``names`` (None: every tensor) into place on ``device`` (floating tensors in ``dtype``); returns the
        bytes read. Modules whose own tensors are all still ``meta`` get a pre-hook raising ``PrunedModuleError``
        (``reason``), except those in ``called`` (modules the scan enters: a layer hooked on its input stops the
        forward in its own pre-hook, registered later than this guard)."""
        from safetensors import safe_open

        self.require_weights()
        wanted = set(self.tensor_names()) if names is None else set(names)
        wanted -= self.loaded
        by_file: dict[Path, list[str]] = {}
        missing = []
        for name in sorted(wanted):
            if name in self.weights:
                by_file.setdefault(self.weights[name], []).append(name)
            elif name in self._constructed:
                self._put(name, self._constructed[name], device, dtype)
            else:
                missing.append(name)
        if missing:
            raise ModelNotFoundError(f"{self.folder} lacks {len(missing)} tensor(s) of its config's architecture, "
                                     f"e.g. {missing[0]} (not a checkpoint of this model)")
        read = 0
        for path, keys in by_file.items():
            with safe_open(str(path), framework="pt") as f:
                for key in keys:
                    t = f.get_tensor(key)
                    read += t.numel() * t.element_size()
                    self._put(key, t, device, dtype)
        self.materialised = True
        self._guard(reason, set(called))
        log.debug("read %d tensors (%.0f MB) of %s", len(wanted), read / 1e6, self.folder)
        return read

    def _put(self, name: str, value: torch.Tensor, device: torch.device, dtype: torch.dtype) -> None:
        owner, _, key = name.rpartition(".")
        mod = self.module.get_submodule(owner) if owner else self.module
        current = mod._parameters.get(key) if key in mod._parameters else mod._buffers.get(key)
        if current is not None and tuple(current.shape) != tuple(value.shape):
            raise ModelNotFoundError(f"{self.folder}: tensor {name} has shape {tuple(value.shape)}, the config's "
                                     f"architecture needs {tuple(current.shape)}")
        value = value.to(device, dtype if value.is_floating_point() and dtype != torch.float32 else
                         (torch.float32 if value.is_floating_point() else None))
        if key in mod._parameters:
            mod._parameters[key] = nn.Parameter(value, requires_grad=False)
        else:
            mod._buffers[key] = value
        self._constructed.pop(name, None)
        self.loaded.add(name)

    def _guard(self, reason: str, called: set[str]) -> None:
        for name, m in self.module.named_modules():
            if getattr(m, "_memdetect_lazy_guard", None) is not None:
                m._memdetect_lazy_guard.remove()
                m._memdetect_lazy_guard = None
            own = [*m.parameters(recurse=False), *m.buffers(recurse=False)]
            if own and all(t.is_meta for t in own) and name not in called:
                def guard(mod, args, name=name):
                    raise PrunedModuleError(f"{name or type(mod).__name__} was never read from the checkpoint: "
                                            f"{reason or 'only the modules before the hooked layer are loaded'}")
                m._memdetect_lazy_guard = m.register_forward_pre_hook(guard)
