"""What each feature needs from a model family, as small protocols, and one check that says so when a family lacks it.

An adapter is built from capabilities: ``ScanAdapter`` (``memdetect.models.base``) is the scan (load, encode, noise,
forward, layers) and every family has it; the mixins ``ConditioningMixin``, ``CrossAttentionMixin``, ``GuardMixin``
and ``GenerationMixin`` (``memdetect.models.mixins``) add the others with defaults that refuse with a message naming
the family. ``Adapter`` is
all of them (memdetect's own families, and third-party adapters written against it); a third-party family may
subclass ``ScanAdapter`` alone and still scan.

Each feature types its adapter with the protocol it needs and checks it with ``require`` where it starts:

=============================  =====================================  ==================================
feature                        protocol                               members it calls
=============================  =====================================  ==================================
``Detector`` (scan, layers)    ``Scanning``                           encode, noise, forward, default_layer
bench baselines (conditions)   ``Conditioning``                       encode_condition, predict_noise
NeMo                           ``CrossAttention``                     cross_attention_values
``memdetect.guard``, generate  ``Guarding``                           from_pipeline, load_pipeline, ...
bench generation               ``Generation``                         sample, decode
=============================  =====================================  ==================================

The protocols are structural (``typing.runtime_checkable``): a class that has the members passes, whatever it
inherits. They name class-level members only (methods, class variables), so ``require`` checks an adapter class
(before loading) as well as an instance.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, TypeVar, runtime_checkable

import torch

from ..errors import UnsupportedModelError


@runtime_checkable
class Scanning(Protocol):
    """The scan: uint8 images -> x0 -> x_t -> one denoiser call, read by hooks on ``denoiser`` at ``default_layer``
    (or any layer by name), reduced by ``pooling``."""

    family: str
    pooling: str

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...
    def noise(self, x0: torch.Tensor, t: int, seeds: Sequence[int]) -> torch.Tensor: ...
    def forward(self, x_t: torch.Tensor, t: int) -> None: ...
    def predict_noise(self, x_t: torch.Tensor, t: int, cond: Any = None) -> torch.Tensor: ...
    def default_layer(self) -> str: ...
    def latent_shape(self) -> tuple[int, ...]: ...


@runtime_checkable
class Conditioning(Protocol):
    """Conditions (prompts, class indices) turned into what ``predict_noise`` takes; the conditional baselines
    (Wen et al., conditional FLIPD, the paper benchmarks' prompts and classes)."""

    conditioning: str | None

    def encode_condition(self, values: Sequence[str] | Sequence[int]) -> Any: ...
    def predict_noise(self, x_t: torch.Tensor, t: int, cond: Any = None) -> torch.Tensor: ...


@runtime_checkable
class CrossAttention(Protocol):
    """The text cross-attention value layers NeMo reads."""

    def cross_attention_values(self) -> dict[str, torch.nn.Module]: ...


@runtime_checkable
class Guarding(Protocol):
    """A diffusers pipeline of the family: loading it (``memdetect generate``), an adapter over its modules and
    reading its denoiser calls (``memdetect.guard``)."""

    sampling_steps: int
    sampling_eta: float

    def from_pipeline(self, pipe) -> Any: ...
    def load_pipeline(self, source: str, *, device: torch.device, dtype: torch.dtype) -> Any: ...
    def guard_step(self, pipe, call: dict, args: tuple, kwargs: dict) -> Any: ...
    def pipeline_call(self, conditions: Sequence | None, n: int, *, steps: int | None,
                      guidance: float | None) -> dict: ...
    def guard_subset(self, call: dict, indices: Sequence[int], n_images: int) -> dict: ...


@runtime_checkable
class Generation(Protocol):
    """Sampling in model space with the family's own sampler, and decoding to pixels (the paper benchmarks)."""

    sampling_steps: int
    sampler: str

    def sample(self, seeds: Sequence[int], *, cond: Any = None, steps: int | None = None,
               guidance: float = 1.0) -> Any: ...
    def decode(self, x0: torch.Tensor) -> torch.Tensor: ...


#: how a missing capability is named in messages
WHAT = {Scanning: "scanning (encode, noise, forward, default_layer)",
        Conditioning: "conditions (encode_condition)",
        CrossAttention: "text cross-attention value layers (cross_attention_values)",
        Guarding: "diffusers pipelines (from_pipeline, load_pipeline, guard_step, pipeline_call, guard_subset)",
        Generation: "generation (sample, decode)"}

A = TypeVar("A")


def require(adapter: A, capability: type, feature: str) -> A:
    """``adapter`` (an instance or a class) when it has ``capability`` (one of the protocols above), else an
    ``UnsupportedModelError`` naming the feature, the family and what it lacks."""
    if isinstance(adapter, capability):
        return adapter
    cls = adapter if isinstance(adapter, type) else type(adapter)
    family = getattr(adapter, "family", None)
    who = f"{family} models ({cls.__name__})" if isinstance(family, str) else f"a {cls.__name__}"
    raise UnsupportedModelError(f"{feature} does not support {who}: the adapter has no "
                                f"{WHAT.get(capability, capability.__name__)}")
