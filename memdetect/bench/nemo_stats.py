"""NeMo's published neuron statistics for Stable Diffusion 1.4, pinned, checked and read as data.

Hintersdorf et al. (NeurIPS 2024, "Finding NeMo") compare a prompt's value-neuron activations with their mean and
standard deviation over 50k held-out LAION prompts. Their repository publishes these statistics as
``statistics/statistics_additional_laion_prompts_v1_4.pt``: a ``torch.save`` archive of a tuple ``(means, stds)``,
7 float32 tensors each, of sizes 320, 320, 640, 640, 1280, 1280, 1280, for the value layers
``down_blocks.{0,1,2}.attentions.{0,1}.transformer_blocks.0.attn2.to_v`` then
``mid_block.attentions.0.transformer_blocks.0.attn2.to_v`` (forward order, as ``Adapter.cross_attention_values``
lists them). Each value is over prompts of |to_v(text embedding)| averaged over the 77 (padded) tokens; the standard
deviation is ``torch.std``'s (unbiased). That is exactly ``baselines.nemo_activations``.

The file is downloaded once from the commit pinned below (the same one the prompt lists come from), into
``$MEMDETECT_CACHE/nemo`` (see ``memdetect.core.hub``), and its SHA-256 and size are checked on every use. It is read
with ``memdetect.models.edm.safe_pickle.load_tensors`` (weights only: no code from the file runs). ``--nemo-stats FILE`` reads
a local copy instead (offline; the same checks of shape, no checksum: a user may bring statistics of their own in
this format).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ..core import hub
from ..errors import InputError, MemdetectError
from .baselines import NemoMoments

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PublishedStatistics:
    url: str
    sha256: str
    size: int
    what: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


PUBLISHED = PublishedStatistics(
    "https://raw.githubusercontent.com/ml-research/localizing_memorization_in_diffusion_models/"
    "f952eded64fca0bcf42e0bb3be9a01d64653cfdb/statistics/statistics_additional_laion_prompts_v1_4.pt",
    "42072d31334d50ce0d981f58865ab2ab378303c51e779c39f8505b681b0d1d9b", 51160,
    "NeMo's published SD 1.4 neuron statistics (50k LAION prompts)")
#: The value layers' widths in SD 1.x, the published file's tensor sizes.
SD1_WIDTHS = (320, 320, 640, 640, 1280, 1280, 1280)


def cache_path() -> Path:
    return hub.cache_dir() / "nemo" / f"{PUBLISHED.sha256[:12]}-{PUBLISHED.filename}"


def fetch_published(*, timeout: float = 60.0) -> Path:
    """The cached, SHA-256-checked copy of NeMo's published statistics, downloaded on first use. Raises
    InputError (one sentence naming ``--nemo-stats FILE``) when it cannot be had."""
    return hub.fetch_pinned_data(PUBLISHED.url, cache_path(), identify=hub.sha256_file, pinned=PUBLISHED.sha256,
                                 what=PUBLISHED.what, hint="--nemo-stats FILE", timeout=timeout)


def layer_widths(value_layers: Mapping[str, nn.Module]) -> tuple[int, ...]:
    """The output width of each value layer (``Adapter.cross_attention_values``), in order."""
    return tuple(int(getattr(m, "out_features", 0) or next(m.parameters()).shape[0]) for m in value_layers.values())


def read_statistics(path: str | os.PathLike, value_layers: Mapping[str, nn.Module]) -> NemoMoments:
    """NeMo-format statistics from ``path`` (module docstring) for the model whose value layers are
    ``value_layers``: one (mean, std) pair of tensors per layer, in order, each as wide as its layer. Returns the
    concatenated moments, in ``nemo_activations``' neuron order. A file of another form, or for other layers, is an
    InputError that says what it holds."""
    from ..models.edm.safe_pickle import load_tensors

    shown = Path(path).name
    try:
        obj = load_tensors(path)
    except MemdetectError as e:
        raise InputError(f"NeMo statistics {e}") from None
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2 and all(isinstance(x, (tuple, list)) for x in obj)
            and all(isinstance(t, torch.Tensor) and t.ndim == 1 for x in obj for t in x)):
        raise InputError(f"{shown} is not NeMo's statistics format (a pair of lists of 1-D tensors: means, stds)")
    means, stds = obj
    have = tuple(int(t.numel()) for t in means)
    want = layer_widths(value_layers)
    if tuple(int(t.numel()) for t in stds) != have or have != want:
        raise InputError(f"{shown} holds statistics for value layers of widths {list(have)}, but this model's "
                         f"{len(want)} cross-attention value layers have widths {list(want)}")
    mean, std = torch.cat([t.float() for t in means]), torch.cat([t.float() for t in stds])
    if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std >= 0).all()):
        raise InputError(f"{shown} holds non-finite means or negative standard deviations")
    return NemoMoments(mean, std)
