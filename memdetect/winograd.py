"""Winograd F(4x4, 3x3) for the 3x3 convolutions of a CPU float32 scan.

A 3x3 stride-1 convolution computes each 4x4 output tile from a 6x6 input tile. Winograd's minimal filtering
algorithm (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016) transforms both into a
6x6 domain where the convolution is an element-wise product, i.e. 36 independent matrix products
``[tiles, C_in] @ [C_in, C_out]``: 36 multiply-adds per tile and channel pair instead of 16 x 9 = 144. The input
and output transforms are small dense matrices applied with a matmul each and cost far less than they save once
the layer has a few hundred channels.

Measured on 2 CPU cores (AVX2, no AVX-512, where oneDNN has no Winograd kernel) against oneDNN's direct
convolution in channels-last (``python benchmarks/winograd_layers.py``, table in ``benchmarks/RESULTS.md``):
about 2x for SD's VAE layers with 512 channels, 1.1-1.5x with 256 channels, 1.3-2.6x for SD1.4's UNet layers
(320-2560 channels); slower (0.7-0.85x) for 128 x 128 channels, which therefore stay direct. The output differs
from the direct convolution by float32 rounding only: about 1e-5 of the output's largest value, against 1e-6 to
5e-6 for the direct convolution itself, both measured against a float64 reference (``tests/test_winograd.py``).

Used only where it is safe and pays: CPU, float32, no autograd (gradient-based baselines keep the direct kernel),
``C_in x C_out >= MIN_CHANNEL_PRODUCT``. It is a setting of the ``Detector`` (``winograd=``; default ``default()``:
on unless ``MEMDETECT_WINOGRAD=0``), applied to the model's modules by ``configure`` and recorded in the scan's
``Settings`` and resume keys. ``disabled()`` runs the direct kernel for a block of code, for measurements only
(``benchmarks/perf.py`` counts the model's FLOPs, the direct convolution's, with it).
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

ENV = "MEMDETECT_WINOGRAD"
#: smallest C_in x C_out that uses Winograd: below it the transforms cost more than they save (128 x 128: 0.7-0.85x;
#: 128 x 256 at 256 px: 1.1-1.35x)
MIN_CHANNEL_PRODUCT = 128 * 256

# Lavin & Gray's F(4x4, 3x3) with interpolation points 0, +-1, +-2, infinity
_BT = torch.tensor([[4, 0, -5, 0, 1, 0],
                    [0, -4, -4, 1, 1, 0],
                    [0, 4, -4, -1, 1, 0],
                    [0, -2, -1, 2, 1, 0],
                    [0, 2, -1, -2, 1, 0],
                    [0, 4, 0, -5, 0, 1]], dtype=torch.float64)
_G = torch.tensor([[1 / 4, 0, 0],
                   [-1 / 6, -1 / 6, -1 / 6],
                   [-1 / 6, 1 / 6, -1 / 6],
                   [1 / 24, 1 / 12, 1 / 6],
                   [1 / 24, -1 / 12, 1 / 6],
                   [0, 0, 1]], dtype=torch.float64)
_AT = torch.tensor([[1, 1, 1, 1, 1, 0],
                    [0, 1, -1, 2, -2, 0],
                    [0, 1, 1, 4, 4, 0],
                    [0, 1, -1, 8, -8, 1]], dtype=torch.float64)
_BT32, _AT32 = _BT.float(), _AT.float()

_local = threading.local()


def default() -> bool:
    """Whether a ``Detector`` uses Winograd when not told: yes, unless ``MEMDETECT_WINOGRAD`` is 0/false/no/off."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


@contextlib.contextmanager
def disabled():
    """Use the direct convolution inside this block (this thread), whatever the modules are configured for."""
    prev = getattr(_local, "off", False)
    _local.off = True
    try:
        yield
    finally:
        _local.off = prev


def transform_weight(weight: torch.Tensor) -> torch.Tensor:
    """``[C_out, C_in, 3, 3]`` -> ``G g G^T`` as ``[36, C_in, C_out]`` float32 (computed in float64)."""
    u = torch.einsum("ak,oikl,bl->abio", _G, weight.detach().double().cpu(), _G)
    return u.reshape(36, weight.shape[1], weight.shape[0]).float().contiguous()


def conv3x3(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``conv2d(x, w, bias, padding=1)`` for a 3x3 ``w`` given as ``u = transform_weight(w)``; float32 CPU.

    ``x``: ``[N, C, H, W]`` in any memory format; the result is ``[N, C_out, H, W]`` in channels-last.
    """
    n, c, h, w = x.shape
    c_out = u.shape[2]
    th, tw = -(-h // 4), -(-w // 4)
    p = n * th * tw
    # zero-padded NHWC input, sized to whole 4x4 output tiles; 6x6 tiles overlapping by 2
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 4 * tw + 1 - w, 1, 4 * th + 1 - h))
    tiles = xp.unfold(1, 6, 4).unfold(2, 6, 4)  # [N, th, tw, C, 6, 6] view
    d = tiles.permute(4, 5, 0, 1, 2, 3).reshape(6, 6 * p * c)  # [6 rows, 6 cols * tiles * C]
    v = torch.matmul(_BT32, (_BT32 @ d).view(6, 6, p * c))  # B^T d B: [6, 6, tiles * C]
    m = torch.bmm(v.view(36, p, c), u)  # the element-wise products, as 36 matmuls: [36, tiles, C_out]
    y = torch.matmul(_AT32, (_AT32 @ m.view(6, 6 * p * c_out)).view(4, 6, p * c_out))  # A^T m A: [4, 4, ...]
    y = y.view(4, 4, n, th, tw, c_out).permute(2, 3, 0, 4, 1, 5).reshape(n, 4 * th, 4 * tw, c_out).contiguous()
    if 4 * th != h or 4 * tw != w:
        y = y[:, :h, :w].contiguous()
    if bias is not None:
        y += bias
    return y.permute(0, 3, 1, 2)


def eligible(conv: nn.Module) -> bool:
    """A plain 3x3, stride-1, 'same'-padded, ungrouped convolution with enough channels."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and conv.in_channels * conv.out_channels >= MIN_CHANNEL_PRODUCT)


class WinogradConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` whose forward uses ``conv3x3`` where it applies (CPU, float32, no autograd).

    Made by ``use_winograd``, which swaps the class of existing modules: names, parameters, state-dict keys and
    hooks stay as they are. The transformed weight is cached and recomputed when the weight changes.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type != "cpu" or x.dtype != torch.float32 or self.weight.dtype != torch.float32
                or torch.is_grad_enabled() or getattr(_local, "off", False)):
            return super().forward(x)
        key = (self.weight.data_ptr(), self.weight._version)
        if getattr(self, "_winograd_key", None) != key:
            self._winograd_u = transform_weight(self.weight)
            self._winograd_key = key
        return conv3x3(x, self._winograd_u, self.bias)


def use_winograd(module: nn.Module) -> int:
    """Swap every eligible ``nn.Conv2d`` in ``module`` to ``WinogradConv2d`` in place; returns how many."""
    count = 0
    for m in module.modules():
        if eligible(m):
            m.__class__ = WinogradConv2d
            count += 1
    return count


def use_direct(module: nn.Module) -> int:
    """Swap every ``WinogradConv2d`` in ``module`` back to ``nn.Conv2d`` (dropping its cached transform); how many."""
    count = 0
    for m in module.modules():
        if type(m) is WinogradConv2d:
            m.__class__ = nn.Conv2d
            m.__dict__.pop("_winograd_u", None)
            m.__dict__.pop("_winograd_key", None)
            count += 1
    return count


def configure(modules: Iterable[nn.Module], on: bool) -> int:
    """Winograd on or off for the eligible convolutions of ``modules``; returns how many use it now."""
    modules = list(modules)
    for m in modules:
        (use_winograd if on else use_direct)(m)
    return sum(type(c) is WinogradConv2d for m in modules for c in m.modules())
