"""How close a memdetect scan runs to the arithmetic floor, against a naive full forward and the baselines.

For each model, built from its real config in ``../shared/data/configs`` with random weights (no download; speed
does not depend on the weights), one run on one machine measures:

* **default**: memdetect's scan path as a user gets it: ``Detector.scan`` over PNG files on disk (decoding in
  DataLoader workers), the adapter's default batch size, early exit at the hooked layer, ``inference_mode``,
  channels-last weights, freed memory kept for reuse (``memdetect.runtime``) and, on a CPU, Winograd's algorithm
  for the wide 3x3 convolutions (``memdetect.winograd``);
* **direct convs**: the default path with Winograd off (``MEMDETECT_WINOGRAD=0``), i.e. executing exactly the
  model's FLOPs: how close the rest of the pipeline runs to the floor;
* **naive**: what a plain diffusers script does: the same images one at a time with the *full* denoiser forward,
  batch 1, in a separate process with none of the above (``MEMDETECT_CHANNELS_LAST=0``, ``MEMDETECT_WINOGRAD=0``,
  ``MEMDETECT_RETAIN_MEMORY=0``, early exit off);
* **floor**: the model's FLOPs for everything the default path computes per image (VAE encoder + denoiser up to
  the hooked layer), counted with ``torch.utils.flop_counter.FlopCounterMode`` on the direct convolutions, divided
  by this machine's measured fp32 (CPU) or bf16 (GPU) matmul peak (the best of a few square sizes, written into a
  preallocated output). Winograd executes fewer multiplications than the model's FLOP count (``GFLOP run``), so
  the default path can run below this floor; the direct-convs column is the like-for-like comparison;
* **baselines** as the benchmark harness implements them (``memdetect.bench.baselines``), same device and batch
  policy: Ross et al.'s FLIPD (one Hutchinson probe) and, for text-conditional SD, Wen et al.'s first-step score.

It prints a table and, last, one JSON line per model with ``model, seconds_per_image_default,
seconds_per_image_naive, floor_seconds, floor_ratio, speedup_vs_naive, device`` (plus the direct-convolution
path, the baselines' seconds and the executed FLOPs).
``--memory N`` also scans a generated folder of N small images with the shipped demo model and reports the peak
RSS after each tenth of the folder: it must stay flat.

Run: ``python benchmarks/perf.py`` (all models; SD1.4 takes ~4 minutes on 2 CPU cores) or
``python benchmarks/perf.py --models ddpm-cifar10 --images 64``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from memdetect import __version__, runtime, winograd
from memdetect.bench import baselines
from memdetect.capture import Trace
from memdetect.detector import Detector
from memdetect.models.base import place

CONFIGS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "configs"
MODELS = ("sd14", "dit", "ddpm-cifar10")


# -- building real architectures with random weights -----------------------------------------------------------------

def _cfg(root: Path, *parts: str) -> dict:
    return json.loads(root.joinpath(*parts).read_text())


def build(name: str, root: Path, device: torch.device, dtype: torch.dtype):
    """The adapter of ``name`` over its real architecture with random weights, plus per-image extras."""
    from diffusers import AutoencoderKL, DDPMScheduler

    torch.manual_seed(0)
    if name == "sd14":
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

        from memdetect.models.sd import StableDiffusionAdapter, prompt_embeddings

        sd = root / "sd14"
        tok = CLIPTokenizer.from_pretrained(sd / "tokenizer")
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(sd / "text_encoder")).eval()
        cond = prompt_embeddings(tok, text, [""])
        unet = UNet2DConditionModel.from_config(_cfg(sd, "unet", "config.json"))
        vae = AutoencoderKL.from_config(_cfg(sd, "vae", "config.json"))
        sched = DDPMScheduler.from_config(_cfg(sd, "scheduler", "scheduler_config.json"))
        adapter = StableDiffusionAdapter(place(unet, device, dtype), place(vae, device, dtype), cond.to(device, dtype),
                                         sched, device=device, dtype=dtype, source="sd14 config, random weights")
        return adapter, {"tokenizer": tok, "text_encoder": text}
    if name == "dit":
        from diffusers import DiTTransformer2DModel

        from memdetect.models.dit import DiTAdapter

        d = root / "dit-xl-2-256"
        tr = DiTTransformer2DModel.from_config(_cfg(d, "transformer", "config.json"))
        vae = AutoencoderKL.from_config(_cfg(d, "vae", "config.json"))
        sched = DDPMScheduler.from_config(_cfg(d, "scheduler", "scheduler_config.json"))
        return DiTAdapter(place(tr, device, dtype), place(vae, device, dtype), sched, device=device, dtype=dtype,
                          source="DiT-XL/2-256 config, random weights"), {}
    if name == "ddpm-cifar10":
        from diffusers import UNet2DModel

        from memdetect.models.ddpm import PixelDDPMAdapter

        d = root / "ddpm-cifar10-32"
        unet = UNet2DModel.from_config(_cfg(d, "config.json"))
        sched = DDPMScheduler.from_config(_cfg(d, "scheduler_config.json"))
        return PixelDDPMAdapter(place(unet, device, dtype), sched, resolution=32, device=device, dtype=dtype,
                                source="ddpm-cifar10-32 config, random weights"), {}
    raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


# -- measurements ----------------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 1.5) -> float:
    """Sustained FLOP/s of square matmuls in the scan's dtype (a roofline for dense layers): the best over a few
    sizes, each written into a preallocated output so that no allocation or page fault is timed."""
    best = 0.0
    for n in ((4096, 8192) if device.type == "cuda" else (2048, 3072, 4096)):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        c = torch.empty(n, n, device=device, dtype=dtype)
        for _ in range(2):
            torch.mm(a, b, out=c)
        _sync(device)
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            torch.mm(a, b, out=c)
            reps += 1
        _sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
        del a, b, c
    return best


def write_images(folder: Path, n: int, resolution: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"img_{i:05d}.png"
        Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def flops_per_image(det: Detector, image: torch.Tensor, *, direct: bool = True) -> float:
    """FLOPs of the default path for one image: encode, noise, denoiser up to the hooked layer (early exit).

    ``direct``: the model's FLOPs (direct convolutions); otherwise what runs (Winograd where it applies)."""
    off = winograd.disabled() if direct else contextlib.nullcontext()
    with off, torch.inference_mode(), FlopCounterMode(display=False) as fc:
        det.features(image)
    return float(fc.get_total_flops())


def timed(fn, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def wen_first_step_seconds(adapter, extras: dict, n: int) -> float | None:
    """Seconds per sample of Wen et al.'s first-step score as the harness times it (SD only): encoding the prompt,
    then one conditional and one unconditional denoiser call at the initial noise and the first DDIM timestep."""
    if "tokenizer" not in extras:
        return None
    tok, text = extras["tokenizer"], extras["text_encoder"]
    prompts = ["a photograph of an astronaut riding a horse"] * n
    x_T = torch.randn(n, *adapter.latent_shape(), generator=torch.Generator().manual_seed(0)).to(adapter.device,
                                                                                                   adapter.dtype)

    def run():
        with torch.inference_mode():
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            cond = text(ids)[0].to(adapter.device, adapter.dtype)
            baselines.wen_first_step(adapter, x_T, 981, cond)  # 981: DDIM's first timestep at 50 steps

    return timed(run, adapter.device) / n


NAIVE_ENV = {"MEMDETECT_CHANNELS_LAST": "0", "MEMDETECT_WINOGRAD": "0", "MEMDETECT_RETAIN_MEMORY": "0"}


def naive_seconds(name: str, args, device: torch.device, dtype: torch.dtype, n: int) -> float:
    """The naive path, run here (``--naive-child``) in a process started with ``NAIVE_ENV``: full forward, batch 1."""
    adapter, _ = build(name, Path(args.configs), device, dtype)
    naive_det = Detector(adapter, batch_size=1, early_exit=False)
    with tempfile.TemporaryDirectory() as tmp:
        files = write_images(Path(tmp), n, adapter.resolution)
        imgs = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files])
    naive_det.features(imgs[:1])  # warm-up, as for the default path

    def naive_run():
        for i in range(n):
            naive_det.features(imgs[i:i + 1])

    return timed(naive_run, device) / n


def naive_in_child(name: str, args, n: int) -> float:
    cmd = [sys.executable, __file__, "--naive-child", name, "--naive-images", str(n), "--configs", args.configs,
           "--device", args.device]
    out = subprocess.run(cmd, env={**os.environ, **NAIVE_ENV}, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"naive measurement failed:\n{out.stderr}")
    return float(json.loads(out.stdout.strip().splitlines()[-1])["seconds_per_image_naive"])


def measure(name: str, args, device: torch.device, dtype: torch.dtype) -> dict:
    adapter, extras = build(name, Path(args.configs), device, dtype)
    det = Detector(adapter)  # the defaults a user gets: paper layer, t=50, default batch size, early exit
    res = adapter.resolution
    n = args.images or det.batch_size * (1 if name == "sd14" and device.type == "cpu" else 4)
    n_naive = args.naive_images or max(1, min(n, 2 if device.type == "cpu" and name != "ddpm-cifar10" else n))
    print(f"[{name}] {adapter.denoiser.__class__.__name__}, {res}px, layer {det.layer}, batch {det.batch_size}, "
          f"{n} images (naive: {n_naive}), {device} {str(dtype).replace('torch.', '')}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        files = write_images(Path(tmp), n, res)
        one = torch.from_numpy(np.array(Image.open(files[0]).convert("RGB"))).permute(2, 0, 1)[None].contiguous()
        det.features(one)  # warm-up: allocator, oneDNN / cuDNN plans
        default = timed(lambda: det.scan(files), device) / n
        print(f"[{name}] default: {default:.4f} s/image", flush=True)
        with winograd.disabled():
            det.features(one)
            direct = timed(lambda: det.scan(files), device) / n
        print(f"[{name}] default with direct convolutions: {direct:.4f} s/image", flush=True)
        flops = flops_per_image(det, one)
        flops_run = flops_per_image(det, one, direct=False)
    naive = naive_in_child(name, args, n_naive)
    print(f"[{name}] naive (full forward, batch 1, no memdetect speedups): {naive:.4f} s/image", flush=True)
    peak = args.peak
    floor = flops / peak
    row = {"model": name, "seconds_per_image_default": default, "seconds_per_image_naive": naive,
           "floor_seconds": floor, "floor_ratio": default / floor, "speedup_vs_naive": naive / default,
           "device": describe_device(device), "seconds_per_image_direct_convs": direct,
           "floor_ratio_direct_convs": direct / floor, "gflops_per_image": flops / 1e9,
           "gflops_run_per_image": flops_run / 1e9, "peak_gflops": peak / 1e9,
           "batch_size": det.batch_size, "layer": str(det.layer), "images": n, "naive_images": n_naive}
    if not args.no_baselines:
        nb = min(args.baseline_images or det.batch_size, n)
        x = torch.randint(0, 256, (nb, 3, res, res), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
        seeds = list(range(nb))
        flipd_s = timed(lambda: baselines.flipd(adapter, x, det.timestep, seeds, probes=1), device) / nb
        row["seconds_per_image_ross_flipd"] = flipd_s
        print(f"[{name}] Ross et al. FLIPD (1 probe): {flipd_s:.4f} s/image", flush=True)
        wen = wen_first_step_seconds(adapter, extras, nb)
        if wen is not None:
            row["seconds_per_image_wen_first_step"] = wen
            print(f"[{name}] Wen et al. first step: {wen:.4f} s/image", flush=True)
    if device.type == "cuda" and name == "sd14" and args.gpu_throughput:
        row.update(gpu_throughput(adapter))
    del adapter, det
    return row


def gpu_throughput(adapter, batch: int = 64, reps: int = 5) -> dict:
    """SD1.4 images/second at batch 64 in bf16 (the model must already be in bf16 on the GPU)."""
    det = Detector(adapter, batch_size=batch)
    x = torch.randint(0, 256, (batch, 3, adapter.resolution, adapter.resolution), dtype=torch.uint8)
    seeds = list(range(batch))
    det.features(x, seeds)
    t = min(timed(lambda: det.features(x, seeds), adapter.device) for _ in range(reps))
    return {"gpu_images_per_second_batch64": batch / t}


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {torch.get_num_threads()} threads"


# -- memory while streaming a large folder ---------------------------------------------------------------------------

def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def memory_profile(n: int, batch_size: int = 64) -> dict:
    """Scan ``n`` generated 32x32 PNGs with the demo model; RSS (MiB) sampled after every tenth of the folder."""
    det = Detector.from_pretrained("demo", device="cpu", batch_size=batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        files = write_images(Path(tmp), n, 32, seed=1)
        done, marks, peak = 0, [], [0.0]
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], _rss_mib())
                time.sleep(0.05)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        t0 = time.perf_counter()
        rows = 0
        for batch in det.iter_files(files):
            rows += len(batch)
            done += len(batch)
            if done >= (len(marks) + 1) * n / 10:
                marks.append(round(peak[0], 1))
        stop.set()
        th.join()
    return {"memory_images": n, "rows": rows, "seconds": round(time.perf_counter() - t0, 1),
            "peak_rss_mib_by_tenth": marks, "peak_rss_growth_mib": round(marks[-1] - marks[0], 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    p.add_argument("--configs", default=str(CONFIGS), help="folder with the real configs (../shared/data/configs)")
    p.add_argument("--device", default="auto")
    p.add_argument("--images", type=int, default=None, help="images for the default path (default: a few batches)")
    p.add_argument("--naive-images", type=int, default=None)
    p.add_argument("--baseline-images", type=int, default=None)
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--gpu-throughput", action=argparse.BooleanOptionalAction, default=True,
                   help="on a GPU: SD1.4 images/s at batch 64 bf16")
    p.add_argument("--memory", type=int, default=0, metavar="N", help="also: peak RSS while scanning N images")
    p.add_argument("--peak", type=float, default=None, help="matmul FLOP/s to use instead of measuring it")
    p.add_argument("--naive-child", default=None, help=argparse.SUPPRESS)  # internal: the naive path's process
    args = p.parse_args(argv)

    from memdetect.detector import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype("auto", device)
    if device.type == "cpu":
        runtime.retain_freed_memory()  # what the memdetect command does (MEMDETECT_RETAIN_MEMORY=0: not)
    if not Path(args.configs).is_dir():
        print(f"real configs not found at {args.configs} (pass --configs)", file=sys.stderr)
        return 2
    if args.naive_child:
        print(json.dumps({"seconds_per_image_naive": naive_seconds(args.naive_child, args, device, dtype,
                                                                   args.naive_images or 1)}))
        return 0
    if args.peak is None:
        args.peak = matmul_peak(device, dtype)
    print(f"memdetect {__version__}, torch {torch.__version__}, python {platform.python_version()}, "
          f"{describe_device(device)}; matmul peak {args.peak / 1e9:.0f} GFLOP/s ({str(dtype).replace('torch.', '')})",
          flush=True)
    mem = memory_profile(args.memory) if args.memory else None  # first: before the big models inflate the RSS
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        rows.append(measure(name, args, device, dtype))
        torch.cuda.empty_cache() if device.type == "cuda" else None

    from rich.console import Console
    from rich.table import Table

    t = Table(title="seconds per image (lower is better)", title_justify="left")
    cols = ["model", "default", "direct convs", "naive", "floor", "floor ratio", "speedup", "FLIPD", "Wen 1st",
            "GFLOP/img", "GFLOP run"]
    for c in cols:
        t.add_column(c, justify="left" if c == "model" else "right")
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    for r in rows:
        t.add_row(r["model"], fmt(r["seconds_per_image_default"]), fmt(r["seconds_per_image_direct_convs"]),
                  fmt(r["seconds_per_image_naive"]), fmt(r["floor_seconds"]),
                  f"{r['floor_ratio']:.2f} ({r['floor_ratio_direct_convs']:.2f})", f"{r['speedup_vs_naive']:.2f}x",
                  fmt(r.get("seconds_per_image_ross_flipd")), fmt(r.get("seconds_per_image_wen_first_step")),
                  f"{r['gflops_per_image']:.0f}", f"{r['gflops_run_per_image']:.0f}")
    Console(width=160).print(t)
    if mem:
        print(f"memory: {mem['rows']} images in {mem['seconds']} s; peak RSS (MiB) after each tenth: "
              f"{mem['peak_rss_mib_by_tenth']}; growth {mem['peak_rss_growth_mib']} MiB")
        print(json.dumps(mem))
    for r in rows:
        print(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
