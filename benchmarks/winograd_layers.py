"""Winograd F(4x4, 3x3) against oneDNN's direct convolution, per layer shape of SD1.4 and ddpm-cifar10.

For each shape: the best of a few timed calls of each kernel on the same channels-last input (CPU float32, freed
memory retained as in a scan): the direct convolution, Winograd with the transformed weight kept (``cached``) and
with the weight transformed in the call (``per call``, what a scan does outside the cache's budget), and each
result's largest error against a float64 direct convolution, relative to the output's largest value. ``scan uses``
says what a scan picks: ``direct`` below ``memdetect.speed.winograd.MIN_CHANNEL_PRODUCT`` channels or ``MIN_TILES`` tiles
per call.

Run: ``python benchmarks/winograd_layers.py`` (about three minutes on 2 CPU cores).
"""

from __future__ import annotations

import platform
import time

import torch
import torch.nn.functional as F

from memdetect import __version__
from memdetect.speed import runtime, winograd

# (where, batch, C_in, C_out, size), at each model's default CPU batch (SD1.4: 4, ddpm-cifar10: 64)
SHAPES = [
    ("SD1.4 VAE down 0", 4, 128, 128, 512),
    ("SD1.4 VAE down 1 (first)", 4, 128, 256, 256),
    ("SD1.4 VAE down 1", 4, 256, 256, 256),
    ("SD1.4 VAE down 2 (first)", 4, 256, 512, 128),
    ("SD1.4 VAE down 2", 4, 512, 512, 128),
    ("SD1.4 VAE down 3 / mid", 4, 512, 512, 64),
    ("SD1.4 UNet down 0", 4, 320, 320, 64),
    ("SD1.4 UNet down 1", 4, 640, 640, 32),
    ("SD1.4 UNet down 2", 4, 1280, 1280, 16),
    ("SD1.4 UNet down 3 / mid", 4, 1280, 1280, 8),
    ("SD1.4 UNet up 0 (conv1)", 4, 2560, 1280, 8),
    ("ddpm-cifar10 32 px", 64, 128, 128, 32),
    ("ddpm-cifar10 16 px", 64, 256, 256, 16),
    ("ddpm-cifar10 8 px", 64, 256, 256, 8),
]


def best(fn, reps: int = 3) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    runtime.retain_freed_memory()
    print(f"memdetect {__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads")
    print("| layer | batch | C_in→C_out | px | tiles | direct ms | Winograd cached ms | per call ms | speed-up per call "
          "| direct err | Winograd err | scan uses |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for where, n, c_in, c_out, px in SHAPES:
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(c_in, c_out, 3, padding=1).to(memory_format=torch.channels_last)
        x = torch.randn(n, c_in, px, px).to(memory_format=torch.channels_last)
        u = winograd.transform_weight(conv.weight)
        with torch.inference_mode():
            ref = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
            scale = ref.abs().max()
            e_direct = float((conv(x).double() - ref).abs().max() / scale)
            e_wino = float((winograd.conv3x3(x, u, conv.bias).double() - ref).abs().max() / scale)
            del ref
            t_direct = best(lambda: conv(x))
            t_wino = best(lambda: winograd.conv3x3(x, u, conv.bias))
            t_fly = best(lambda: winograd.conv3x3(x, winograd.transform_weight(conv.weight), conv.bias))
        tiles = n * (-(-px // 4)) ** 2
        uses = ("Winograd" if c_in * c_out >= winograd.MIN_CHANNEL_PRODUCT and tiles >= winograd.MIN_TILES
                else "direct")
        print(f"| {where} | {n} | {c_in}→{c_out} | {px} | {tiles} | {t_direct * 1e3:.0f} | {t_wino * 1e3:.0f} | "
              f"{t_fly * 1e3:.0f} | {t_direct / t_fly:.2f}× | {e_direct:.1e} | {e_wino:.1e} | {uses} |", flush=True)


if __name__ == "__main__":
    main()
