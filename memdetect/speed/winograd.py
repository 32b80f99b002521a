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

Memory. The transformed weight ``[36, C_in, C_out]`` is 4x the layer's weight (SD1.4: ~12 GB for every wide conv of
the UNet and VAE). It is therefore computed on the fly for each call (one ``[36, 9] @ [9, C_in * C_out]`` matmul,
memory-bound: ~40 ms for 512 x 512 channels, ~150 ms for 1280 x 1280 on 2 cores) and kept only within a byte budget
(``MEMDETECT_WINOGRAD_CACHE``, default ``DEFAULT_CACHE_BYTES``; cached and on-the-fly transforms are the same
computation, bit for bit, so the budget never changes a score). A layer uses Winograd only where that pays at the
model's default batch size: at least ``MIN_TILES`` 4x4 output tiles per call, so that the on-the-fly transform is
small next to the multiplications it saves (measured: SD1.4's 8x8 and 16x16 UNet layers at batch 4 are faster
direct than with a per-call transform), and only for layers that run (``configure``'s ``tiles``, from the
detector's probe of what runs before its early exit). The activations go through the transforms in chunks of at
most ``CHUNK_BYTES`` per intermediate, so the working memory stays near the direct convolution's.

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
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

ENV = "MEMDETECT_WINOGRAD"
#: bytes of transformed weights kept between calls (``MEMDETECT_WINOGRAD_CACHE``: a number of bytes with an optional
#: K/M/G suffix, or "all"); the rest are transformed on the fly for each call
CACHE_ENV = "MEMDETECT_WINOGRAD_CACHE"
DEFAULT_CACHE_BYTES = 0
#: smallest C_in x C_out that uses Winograd: below it the transforms cost more than they save (128 x 128: 0.7-0.85x;
#: 128 x 256 at 256 px: 1.1-1.35x)
MIN_CHANNEL_PRODUCT = 128 * 256
#: fewest 4x4 output tiles per call (images x tiles per image, at the model's default batch size) that use Winograd
#: with a per-call weight transform: SD1.4 at batch 4 measured break-even at 64 tiles (16x16 px) and 1.8x at 256
#: (32x32 px, 640 channels); at 16 tiles (8x8 px) it is slower even with a cached transform at batch 1
MIN_TILES = 128
#: largest intermediate of the tile transforms, per chunk of tile rows (the direct kernel needs no such buffers)
CHUNK_BYTES = 128 * 2**20

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
_GG32 = torch.kron(_G, _G).float()  # [36, 9]: row 6a + b, column 3k + l holds G[a, k] G[b, l]

_local = threading.local()


def default() -> bool:
    """Whether a ``Detector`` uses Winograd when not told: yes, unless ``MEMDETECT_WINOGRAD`` is 0/false/no/off."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def cache_bytes() -> int | None:
    """The transform cache's budget from ``MEMDETECT_WINOGRAD_CACHE`` (None: no limit); ``DEFAULT_CACHE_BYTES`` when
    unset. ValueError names the variable when it cannot be read."""
    raw = os.environ.get(CACHE_ENV, "").strip().lower()
    if not raw:
        return DEFAULT_CACHE_BYTES
    if raw in ("all", "unlimited", "inf"):
        return None
    scale = {"k": 2**10, "m": 2**20, "g": 2**30}.get(raw[-1], 1)
    try:
        value = float(raw[:-1] if scale > 1 else raw) * scale
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise ValueError(f"{CACHE_ENV}={raw!r}: expected a number of bytes (optionally with K, M or G) or 'all'")
    return int(value)


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
    """``[C_out, C_in, 3, 3]`` -> ``G g G^T`` as ``[36, C_in, C_out]`` float32: one ``[36, 9] @ [9, C_in * C_out]``
    matmul with the Kronecker product of ``G`` (rounded to float32 once), whatever the weight's memory format."""
    w = weight.detach()
    if w.dtype != torch.float32 or w.device.type != "cpu":
        w = w.float().cpu()
    c_out, c_in = w.shape[:2]
    return (_GG32 @ w.permute(2, 3, 1, 0).reshape(9, c_in * c_out)).view(36, c_in, c_out)


def transformed_bytes(conv: nn.Module) -> int:
    """Bytes of ``transform_weight`` of ``conv``'s weight."""
    return 36 * conv.in_channels * conv.out_channels * 4


def conv3x3(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None, *,
            chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """``conv2d(x, w, bias, padding=1)`` for a 3x3 ``w`` given as ``u = transform_weight(w)``; float32 CPU.

    ``x``: ``[N, C, H, W]`` in any memory format; the result is ``[N, C_out, H, W]`` in channels-last. The tiles go
    through the transforms in chunks (whole images, or rows of tiles of one image), each intermediate at most
    ``chunk_bytes`` (at least one row of tiles).
    """
    n, c, h, w = x.shape
    c_out = u.shape[2]
    th, tw = -(-h // 4), -(-w // 4)
    # zero-padded NHWC input, sized to whole 4x4 output tiles; 6x6 tiles overlapping by 2
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 4 * tw + 1 - w, 1, 4 * th + 1 - h))
    tiles = xp.unfold(1, 6, 4).unfold(2, 6, 4)  # [N, th, tw, C, 6, 6] view
    y = x.new_empty(n, 4 * th, 4 * tw, c_out)
    row_bytes = 36 * tw * max(c, c_out) * 4  # one row of tiles through the largest intermediate
    if th * row_bytes <= chunk_bytes:  # whole images per chunk
        step = max(1, chunk_bytes // (th * row_bytes))
        chunks = [(slice(i, min(n, i + step)), slice(0, th)) for i in range(0, n, step)]
    else:  # rows of tiles of one image per chunk
        step = max(1, chunk_bytes // row_bytes)
        chunks = [(slice(i, i + 1), slice(r, min(th, r + step))) for i in range(n) for r in range(0, th, step)]
    for imgs, rows in chunks:
        k, r = imgs.stop - imgs.start, rows.stop - rows.start
        p = k * r * tw
        # [6 rows, 6 cols * tiles * C]
        d = tiles[imgs, rows].permute(4, 5, 0, 1, 2, 3).reshape(6, 6 * p * c)
        v = torch.matmul(_BT32, (_BT32 @ d).view(6, 6, p * c))  # B^T d B: [6, 6, tiles * C]
        m = torch.bmm(v.view(36, p, c), u)  # the element-wise products, as 36 matmuls: [36, tiles, C_out]
        out = torch.matmul(_AT32, (_AT32 @ m.view(6, 6 * p * c_out)).view(4, 6, p * c_out))  # A^T m A: [4, 4, ...]
        y[imgs, 4 * rows.start:4 * rows.stop] = out.view(4, 4, k, r, tw, c_out).permute(2, 3, 0, 4, 1, 5).reshape(
            k, 4 * r, 4 * tw, c_out)
        del d, v, m, out  # before the next chunk's buffers are allocated
    if 4 * th != h or 4 * tw != w:
        y = y[:, :h, :w].contiguous()
    if bias is not None:
        y += bias
    return y.permute(0, 3, 1, 2)


def eligible(conv: nn.Module) -> bool:
    """A plain 3x3, stride-1, 'same'-padded, ungrouped convolution with enough channels."""
    return (type(conv) in (nn.Conv2d, WinogradConv2d) and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and conv.in_channels * conv.out_channels >= MIN_CHANNEL_PRODUCT)


class WinogradConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` whose forward uses ``conv3x3`` where it applies (CPU, float32, no autograd).

    Made by ``use_winograd``, which swaps the class of existing modules: names, parameters, state-dict keys and
    hooks stay as they are. The weight is transformed for each call, or once and kept (recomputed when the weight
    changes) when ``configure`` gave the layer a place in the cache's budget: the same computation either way.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type != "cpu" or x.dtype != torch.float32 or self.weight.dtype != torch.float32
                or torch.is_grad_enabled() or getattr(_local, "off", False)):
            return super().forward(x)
        if not self.__dict__.get("_winograd_cache", False):
            return conv3x3(x, transform_weight(self.weight), self.bias)
        key = (self.weight.data_ptr(), self.weight._version)
        if self.__dict__.get("_winograd_key") != key:
            self._winograd_u = transform_weight(self.weight)
            self._winograd_key = key
        return conv3x3(x, self._winograd_u, self.bias)


def _forget(conv: nn.Module) -> None:
    for k in ("_winograd_u", "_winograd_key", "_winograd_cache"):
        conv.__dict__.pop(k, None)


def use_winograd(module: nn.Module) -> int:
    """Swap every eligible ``nn.Conv2d`` in ``module`` to ``WinogradConv2d`` in place (weights transformed per call);
    returns how many."""
    count = 0
    for m in module.modules():
        if type(m) is nn.Conv2d and eligible(m):
            m.__class__ = WinogradConv2d
            count += 1
    return count


def use_direct(module: nn.Module) -> int:
    """Swap every ``WinogradConv2d`` in ``module`` back to ``nn.Conv2d`` (dropping its cached transform); how many."""
    count = 0
    for m in module.modules():
        if type(m) is WinogradConv2d:
            m.__class__ = nn.Conv2d
            _forget(m)
            count += 1
    return count


def configure(modules: Iterable[nn.Module], on: bool, *, tiles: Mapping[nn.Module, int] | None = None,
              budget: int | None | str = "env") -> int:
    """Winograd on or off for the eligible convolutions of ``modules``; returns how many use it now.

    ``tiles``: for the convolutions that run, the 4x4 output tiles of one call at the default batch size (in forward
    order); then only those with at least ``MIN_TILES`` use Winograd and the others keep the direct kernel. Without
    it every eligible convolution does. ``budget``: bytes of transformed weights to keep, given in forward order
    (None: all; default: ``cache_bytes()``); the others are transformed for each call.
    """
    modules = list(modules)
    if budget == "env":
        budget = cache_bytes()
    convs = [c for m in modules for c in m.modules() if eligible(c)]
    if tiles is not None:
        order = {id(c): i for i, c in enumerate(tiles)}
        use = sorted((c for c in convs if tiles.get(c, 0) >= MIN_TILES), key=lambda c: order[id(c)])
    else:
        use = convs
    chosen = {id(c) for c in use} if on else set()
    for c in convs:
        if id(c) not in chosen and type(c) is WinogradConv2d:
            c.__class__ = nn.Conv2d
            _forget(c)
    kept = 0
    for c in use if on else ():
        c.__class__ = WinogradConv2d
        size = transformed_bytes(c)
        cache = budget is None or kept + size <= budget
        if not cache:
            c.__dict__.pop("_winograd_u", None)
            c.__dict__.pop("_winograd_key", None)
        kept += size if cache else 0
        c._winograd_cache = cache
    return sum(type(c) is WinogradConv2d for m in modules for c in m.modules())
