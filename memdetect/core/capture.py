"""Capturing activations with forward hooks, pooling them, and stopping the forward pass early.

Layer specs name a tensor a user can type:

* ``NAME``          the output of module ``NAME`` on its first call (``@0``);
* ``NAME@K``        the output on its K-th call in one forward pass (0-based). diffusers' ``ResnetBlock2D`` calls its
                    ``nonlinearity`` SiLU three times per forward: ``@0`` after ``norm1``, ``@1`` on the time embedding,
                    ``@2`` after ``norm2``;
* ``NAME:in``       the first positional input of module ``NAME`` (a forward *pre*-hook), e.g.
                    ``up_blocks.0.resnets.2.conv2:in`` is exactly the ``nonlinearity@2`` tensor in eval mode;
* ``NAME:in@K``     the input on the K-th call.

This module knows no model family: it sees an ``nn.Module`` and names.
"""

from __future__ import annotations

import difflib
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from ..errors import LayerError, PrunedModuleError

_SPEC = re.compile(r"^(?P<name>[A-Za-z0-9_.\-]+?)(?::(?P<port>in|out))?(?:@(?P<call>\d+))?$")


@dataclass(frozen=True)
class LayerSpec:
    name: str
    call: int = 0
    port: str = "out"  # "out": module output (forward hook); "in": first input (forward pre-hook)

    @classmethod
    def parse(cls, text: str) -> "LayerSpec":
        m = _SPEC.match(text.strip())
        if not m:
            raise LayerError(f"bad layer spec {text!r}: expected NAME, NAME@CALL, NAME:in or NAME:in@CALL")
        return cls(name=m["name"], call=int(m["call"] or 0), port=m["port"] or "out")

    def __str__(self) -> str:
        port = ":in" if self.port == "in" else ""
        call = f"@{self.call}" if self.call else ""
        return f"{self.name}{port}{call}"


def resolve(model: nn.Module, spec: LayerSpec) -> nn.Module:
    """The submodule a spec names; refuses names that are not modules and modules shared under several paths."""
    try:
        module = model.get_submodule(spec.name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        close = [n for n in names if n.endswith(spec.name.split(".")[-1])][:5] or difflib.get_close_matches(
            spec.name, names, n=5, cutoff=0.6)  # the nearest names when none ends like the typed one
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise LayerError(f"layer {spec.name!r} is not a module of {type(model).__name__}{hint}; "
                         f"run `memdetect layers` to list them") from None
    paths = [n for n, m in model.named_modules(remove_duplicate=False) if m is module]
    if len(paths) > 1:
        # diffusers 0.22-0.32 share one nn.SiLU object across the whole UNet: a hook on it fires for every user.
        raise LayerError(
            f"module {spec.name!r} is one object shared by {len(paths)} paths (e.g. {paths[0]}, {paths[1]}), so a "
            f"hook on it fires for all of them; hook a neighbour instead, e.g. the input of the next layer "
            f"('...conv2:in' for a resnet's post-norm2 SiLU)"
        )
    return module


class _StopForward(Exception):
    """Raised by a hook once every wanted tensor is captured; swallowed by ``Trace``."""


def _first_tensor(x):
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    if hasattr(x, "sample") and isinstance(x.sample, torch.Tensor):
        return x.sample
    raise LayerError(f"cannot capture a {type(x).__name__}: the layer does not produce a tensor")


class Trace:
    """Capture the tensors named by ``specs`` during one forward pass of ``model``.

    Use as a context manager around the forward call. ``transform`` (e.g. a pooling function) is applied to each
    tensor as it is captured, so a sweep over many layers keeps only the reduced values. With ``stop=True`` (the default) the forward pass is cut
    short as soon as the last wanted tensor has been captured: the captured values are those of a full forward
    pass, since nothing after the hook can change them. Hooks are registered on entry and always removed on exit.

        with Trace(unet, ["up_blocks.0.resnets.2.conv2:in"]) as tr:
            unet(x, t, encoder_hidden_states=c)
        act = tr["up_blocks.0.resnets.2.conv2:in"]
    """

    def __init__(self, model: nn.Module, specs: Iterable[str | LayerSpec], stop: bool = True,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.model = model
        self.transform = transform  # applied to each captured tensor (e.g. pooling) instead of keeping a copy
        self.specs = [s if isinstance(s, LayerSpec) else LayerSpec.parse(s) for s in specs]
        if not self.specs:
            raise LayerError("no layer to capture")
        self.stop = stop
        self.outputs: dict[str, torch.Tensor] = {}
        self.calls: dict[tuple[str, str], int] = defaultdict(int)
        self.stopped_early = False
        self._handles: list = []
        self._modules = [resolve(model, s) for s in self.specs]

    def __enter__(self) -> "Trace":
        self.outputs.clear()
        self.calls.clear()
        self.stopped_early = False
        by_target: dict[tuple[int, str], list[LayerSpec]] = defaultdict(list)
        modules = {}
        for spec, module in zip(self.specs, self._modules):
            by_target[(id(module), spec.port)].append(spec)
            modules[id(module)] = module
        try:
            for (mid, port), specs in by_target.items():
                module = modules[mid]
                if port == "in":
                    self._handles.append(module.register_forward_pre_hook(self._make_hook(specs, port)))
                else:
                    self._handles.append(module.register_forward_hook(self._make_hook(specs, port)))
        except BaseException:
            self._remove()
            raise
        return self

    def _make_hook(self, specs: Sequence[LayerSpec], port: str):
        key = (specs[0].name, port)

        def hook(module, args, output=None):
            k = self.calls[key]
            self.calls[key] = k + 1
            for spec in specs:
                if spec.call == k:
                    tensor = _first_tensor(args if port == "in" else output)
                    tensor = tensor.detach()
                    self.outputs[str(spec)] = self.transform(tensor) if self.transform else tensor.clone()
            if self.stop and len(self.outputs) == len(self.specs):
                self.stopped_early = True
                raise _StopForward

        if port == "in":
            return lambda module, args: hook(module, args)
        return hook

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._remove()
        if exc_type is _StopForward:
            return True
        if exc_type is None:
            missing = [s for s in self.specs if str(s) not in self.outputs]
            if missing:
                s = missing[0]
                fired = self.calls.get((s.name, s.port), 0)
                raise LayerError(f"layer {str(s)!r} fired {fired} time(s) in the forward pass, so call @{s.call} "
                                 f"does not exist" if fired else f"layer {s.name!r} never ran in the forward pass")
        return False

    def __getitem__(self, spec: str | LayerSpec) -> torch.Tensor:
        return self.outputs[str(spec if isinstance(spec, LayerSpec) else LayerSpec.parse(spec))]


POOLINGS = ("spatial-max", "token-max")


def pool(x: torch.Tensor, how: str) -> torch.Tensor:
    """Global max-pool a captured tensor to ``[B, C]``.

    ``spatial-max``: ``[B, C, *spatial]`` -> max over the spatial axes. ``token-max``: ``[B, T, C]`` -> max over
    tokens. A ``[B, C]`` tensor (no spatial or token axis, e.g. DiT's adaLN SiLU) is returned as it is.
    """
    if x.ndim == 2:
        return x
    if how == "spatial-max":
        if x.ndim < 3:
            raise LayerError(f"spatial-max pooling needs [B, C, H, W], got {tuple(x.shape)}")
        return x.flatten(2).amax(dim=2)
    if how == "token-max":
        if x.ndim != 3:
            raise LayerError(f"token-max pooling needs [B, T, C], got {tuple(x.shape)}")
        return x.amax(dim=1)
    raise LayerError(f"unknown pooling {how!r}; choose one of {', '.join(POOLINGS)}")


@dataclass(frozen=True)
class LayerInfo:
    spec: str  # NAME@K for output captures
    module_type: str
    shape: tuple[int, ...]
    calls: int  # how many times this module fires in one forward pass


def probe_layers(model: nn.Module, run, include_inputs: bool = False) -> list[LayerInfo]:
    """Every hookable (module, call) with the shape it produces, from one full forward pass ``run()``.

    Modules shared by several paths are listed once, under their first path (as ``named_modules`` does).
    """
    records: dict[str, list[tuple[int, ...]]] = defaultdict(list)
    types: dict[str, str] = {}
    handles = []
    try:
        for name, module in model.named_modules():
            if not name:
                continue
            types[name] = type(module).__name__

            def hook(module, args, output, name=name):
                try:
                    records[name].append(tuple(_first_tensor(output).shape))
                except LayerError:
                    records[name].append(())

            handles.append(module.register_forward_hook(hook))
            if include_inputs:
                def pre(module, args, name=name):
                    if args and isinstance(args[0], torch.Tensor):
                        records[name + ":in"].append(tuple(args[0].shape))

                handles.append(module.register_forward_pre_hook(pre))
        run()
    finally:
        for h in handles:
            h.remove()
    out = []
    for name, shapes in records.items():
        base = name.split(":")[0]
        for k, shape in enumerate(shapes):
            spec = name if k == 0 else f"{name}@{k}"
            out.append(LayerInfo(spec=spec, module_type=types.get(base, "?"), shape=shape, calls=len(shapes)))
    return out


# -- what runs before the stop ----------------------------------------------------------------------------------------

@dataclass
class Usage:
    """What one probe forward (``trace_usage``) touched, by object identity.

    ``tensors``: parameters and buffers some operation read; ``fired``: modules whose forward started, in order,
    with the shape of their first positional input on the first call (``()`` when it is not a tensor);
    ``largest_bytes``: the largest tensor a module took or produced.
    """

    tensors: set[int]
    fired: dict[nn.Module, tuple[int, ...]]
    largest_bytes: int

    def __or__(self, other: "Usage") -> "Usage":
        """Both probes' records (``self`` ran first)."""
        return Usage(self.tensors | other.tensors, {**other.fired, **self.fired},
                     max(self.largest_bytes, other.largest_bytes))


def _tensors_in(obj, out: list) -> list:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _tensors_in(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            _tensors_in(o, out)
    return out


def trace_usage(modules: Sequence[nn.Module], run: Callable[[], None]) -> Usage:
    """Run ``run()`` once on fake tensors (shapes and dtypes only: no arithmetic, no memory for activations) and
    record which parameters and buffers of ``modules`` it reads and which modules fire.

    ``run`` typically wraps the forward pass in a ``Trace`` with ``stop=True``: what is recorded is then exactly
    what the scan path executes up to its early exit. Real tensors the run meets (the weights, its inputs) are read
    through fake copies and left untouched, so nothing is computed and no weight page is read. Raises whatever the
    run raises (a model whose forward needs real values, e.g. data-dependent control flow, cannot be probed).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.overrides import TorchFunctionMode

    owned = {id(t) for m in modules for t in [*m.parameters(), *m.buffers()]}
    read: set[int] = set()
    fired: dict[nn.Module, tuple[int, ...]] = {}
    largest = [0]

    def size(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    class Reads(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            for t in _tensors_in((args, kwargs or {}), []):
                if id(t) in owned:
                    read.add(id(t))
            return func(*args, **(kwargs or {}))

    def pre(module, args):
        ts = _tensors_in(args, [])
        if module not in fired:
            fired[module] = tuple(args[0].shape) if args and isinstance(args[0], torch.Tensor) else ()
        largest[0] = max([largest[0], *(size(t) for t in ts)])

    def post(module, args, output):
        largest[0] = max([largest[0], *(size(t) for t in _tensors_in(output, []))])

    handles = []
    try:
        for root in modules:
            for m in root.modules():
                handles.append(m.register_forward_pre_hook(pre))
                handles.append(m.register_forward_hook(post))
        with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True), Reads():
            run()
    finally:
        for h in handles:
            h.remove()
    return Usage(tensors=read, fired=fired, largest_bytes=largest[0])


def prune(modules: Sequence[nn.Module], usage: Usage, reason: str) -> int:
    """Drop from ``modules`` every parameter and buffer that ``usage`` did not see read, returning their bytes.

    A dropped tensor is replaced by one on the ``meta`` device (same shape and dtype, no memory), so the module tree,
    names, ``state_dict`` keys and dtype/shape queries stay; any arithmetic on it fails. Every module that never
    fired and lost a tensor (its own or below it) also gets a pre-hook raising ``PrunedModuleError`` with
    ``reason``, so calling what was dropped says so instead of failing deep inside torch. Shared tensors are
    replaced in every module that holds them.
    """
    replaced: dict[int, torch.Tensor] = {}
    freed = 0
    lost: set[nn.Module] = set()
    for root in modules:
        for name, m in root.named_modules():
            for table in (m._parameters, m._buffers):
                for key, t in list(table.items()):
                    if t is None or t.is_meta or id(t) in usage.tensors:
                        continue
                    if id(t) not in replaced:
                        meta = t.detach().to("meta")
                        replaced[id(t)] = nn.Parameter(meta, requires_grad=False) if isinstance(
                            t, nn.Parameter) else meta
                        freed += t.numel() * t.element_size()
                    table[key] = replaced[id(t)]
                    lost.add(m)

    def guard(module, args, name=""):
        raise PrunedModuleError(f"{name or type(module).__name__} was dropped: {reason}")

    for root in modules:
        for name, m in root.named_modules():
            if m not in usage.fired and any(d in lost for d in m.modules()):
                m.register_forward_pre_hook(lambda mod, args, name=name: guard(mod, args, name))
    return freed
