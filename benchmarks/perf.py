"""Speed and memory of a memdetect scan against the arithmetic floor, a naive full forward and the baselines.

Every model is built from its real config in ``../shared/data/configs`` with random weights (no download; speed and
memory do not depend on the weights) and written once into a model folder with ``save_pretrained`` (``--workdir``),
so that each measurement loads it the way a user's scan does (``Detector.from_pretrained(preset, folder)``). Each
measured configuration runs in **its own subprocess**: its peak resident memory is its own (``ru_maxrss`` of that
process and the DataLoader workers it waited for, what ``/usr/bin/time -v`` reports), and one configuration's heap
cannot sink the next. Settings (``--settings``):

* **default**: memdetect's scan as a user gets it: ``Detector.scan`` over PNG files on disk, the adapter's default
  batch, early exit at the hooked layer with the modules after it dropped (``prune``), ``inference_mode``,
  channels-last weights, freed memory kept for reuse up to one batch's working set (``memdetect.speed.runtime``, as the
  command line opts in) and, on a CPU, Winograd's algorithm for the wide 3x3 convolutions that pay
  (``memdetect.speed.winograd``, weights transformed per call);
* **direct**: the default with Winograd off (``MEMDETECT_WINOGRAD=0``): exactly the model's FLOPs;
* **all**: every speed-up on: the default with every transformed Winograd weight kept
  (``MEMDETECT_WINOGRAD_CACHE=all``);
* **whole-model**: the default without pruning (``prune=False``): what keeping the whole model costs;
* **naive**: what a plain diffusers script does: full denoiser forward, batch 1, none of the above
  (``MEMDETECT_CHANNELS_LAST=0``, ``MEMDETECT_WINOGRAD=0``, ``MEMDETECT_RETAIN_MEMORY=0``, whole model);
* **baselines** as the benchmark harness implements them (``memdetect.bench.baselines``, whole model, same batch
  policy): Ross et al.'s FLIPD (one Hutchinson probe) and, for text-conditional SD, Wen et al.'s first-step score;
* **cli**: ``memdetect scan FOLDER --model PRESET --model-path DIR`` as a command: wall time including loading, and
  its peak RSS (the issue-19 measurement).

``--compare PATH`` also runs **default** and **cli** with the memdetect package of another checkout (``PATH`` first
on ``PYTHONPATH``), e.g. the code before a change, in the same run. The **floor** is the model's FLOPs for
everything the default path computes per image (VAE encoder + denoiser up to the hooked layer), counted with
``torch.utils.flop_counter.FlopCounterMode`` on direct convolutions, divided by this machine's measured fp32 (CPU)
or bf16 (GPU) matmul peak (the best of a few square sizes, written into a preallocated output); Winograd executes
fewer multiplications (``GFLOP run``), so the default path can run below it.

It prints a table and, last, one JSON line per model with ``model, seconds_per_image_<setting>,
peak_rss_gb_<setting>, floor_seconds, floor_ratio, speedup_vs_naive, device`` and, on a GPU, ``peak_cuda_gb_<setting>``
and SD1.4's images/s at batch 64 in bf16. ``--memory N`` also scans a generated folder of N small images with the
shipped demo model (in a subprocess) and reports the peak RSS after each tenth of the folder: it must stay flat.

**Today's families** (``--models today`` or any of ``sdxl, sd3-medium, sd3.5-large, flux-dev, pixart-sigma``; never
in the default run): the real configs in ``tests/data/configs`` with random bf16 weights streamed into sharded
safetensors (``benchmarks/random_weights.py``: never the whole state dict in memory), scanned in bf16 the way the
adapters load them (``memdetect.models.lazy``: the denoiser is built on ``meta`` and only the tensors a forward up
to the hooked layer reads come out of the files). Two subprocesses per model: **condition** (the first use of a
model: the empty prompt through the pipeline's own text encoders, cached on disk; SDXL's is zeros) and **scan**
(every later scan: the condition from the cache, ``Detector.scan`` over PNGs at the model's resolution, no warm-up).
Each reports its peak RSS, and the scan its wall and **CPU** seconds per image (``time.process_time`` of the child:
far less sensitive than wall time to other processes on a shared machine) and the megabytes of weights it read.
The text encoders are small stand-ins of the real widths unless ``--text-encoders real`` (CLIP-L, OpenCLIP-G and
T5-v1.1-XXL at full size, random). ``--first`` adds a third subprocess: a first scan in one process with a cold
cache (encode the empty prompt, release the encoders, read the denoiser, scan), as ``memdetect scan`` runs it; its
peak shows whether the two phases' memory adds up. ``--rss-cap-gb`` kills a child whose RSS passes a cap (a guard
for a shared machine). Before each child the parent checks that ``MemAvailable`` covers the model's
estimated peak plus ``--margin-gb`` (3 GiB) and otherwise skips it with a reason. ``--today-workdir`` keeps the
weights (e.g. outside the repo); ``--keep-weights`` stops them being deleted after each model.

Run: ``python benchmarks/perf.py`` (all models, about 30 minutes on 2 CPU cores; SD1.4's folder takes 4.3 GB of
disk) or ``python benchmarks/perf.py --models ddpm-cifar10 --images 64``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "configs"
MODELS = ("sd14", "dit", "edm", "ddpm-cifar10")
PRESETS = {"sd14": "sd14", "dit": "dit", "edm": "edm-cifar10", "ddpm-cifar10": "ddpm-cifar10"}
RESOLUTION = {"sd14": 512, "dit": 256, "edm": 32, "ddpm-cifar10": 32}
#: the released EDM CIFAR-10 network (edm-cifar10-32x32-uncond-vp): DDPM++ with VP preconditioning
EDM_CIFAR10 = dict(img_resolution=32, img_channels=3, model_channels=128, channel_mult=[2, 2, 2], num_blocks=4,
                   attn_resolutions=[16], dropout=0.13, embedding_type="positional", channel_mult_noise=1,
                   encoder_type="standard", decoder_type="standard", resample_filter=[1, 1], augment_dim=9,
                   model_type="SongUNet")
NAIVE_ENV = {"MEMDETECT_CHANNELS_LAST": "0", "MEMDETECT_WINOGRAD": "0", "MEMDETECT_RETAIN_MEMORY": "0"}
SETTINGS = {  # name -> environment of its subprocess
    "default": {}, "direct": {"MEMDETECT_WINOGRAD": "0"}, "all": {"MEMDETECT_WINOGRAD_CACHE": "all"},
    "whole-model": {}, "naive": NAIVE_ENV, "baselines": {}, "cli": {},
}
DEFAULT_SETTINGS = "default,direct,all,whole-model,naive,baselines,cli"
#: today's families: config folder under tests/data/configs, preset, preset options, estimated peak RSS (GB) of the
#: scan child in bf16 (the memory check before it), default images
TODAY_CONFIGS = Path(__file__).resolve().parents[1] / "tests" / "data" / "configs"
TODAY = {  # estimates: the bf16 weights up to the hooked layer + the VAE encoder's working set + torch
    "sdxl": ("sdxl", "sdxl", {}, 8.0, 1),
    "sd3-medium": ("sd3", "sd3-medium", {}, 6.0, 1),
    "sd3.5-large": ("sd3.5-large", "sd3.5-large", {}, 12.0, 1),
    "flux-dev": ("flux", "flux-dev", {"resolution": 512}, 15.0, 1),
    "pixart-sigma": ("pixart", "pixart-sigma", {}, 5.0, 1),
}


# -- model folders with random weights --------------------------------------------------------------------------------

def _cfg(root: Path, *parts: str) -> dict:
    return json.loads(root.joinpath(*parts).read_text())


def write_model(name: str, configs: Path, folder: Path) -> None:
    """``name``'s real architecture with random weights (seed 0), saved as a model folder its preset loads."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    if name == "sd14":
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        src = configs / "sd14"
        for sub in ("tokenizer", "scheduler"):
            shutil.copytree(src / sub, folder / sub, dirs_exist_ok=True)
        shutil.copy(src / "model_index.json", folder / "model_index.json")
        CLIPTextModel(CLIPTextConfig.from_pretrained(src / "text_encoder")).save_pretrained(folder / "text_encoder")
        AutoencoderKL.from_config(_cfg(src, "vae", "config.json")).save_pretrained(folder / "vae")
        UNet2DConditionModel.from_config(_cfg(src, "unet", "config.json")).save_pretrained(folder / "unet")
    elif name == "dit":
        from diffusers import DiTTransformer2DModel

        src = configs / "dit-xl-2-256"
        shutil.copy(src / "model_index.json", folder / "model_index.json")
        DDPMScheduler.from_config(_cfg(src, "scheduler", "scheduler_config.json")).save_pretrained(folder / "scheduler")
        AutoencoderKL.from_config(_cfg(src, "vae", "config.json")).save_pretrained(folder / "vae")
        DiTTransformer2DModel.from_config(_cfg(src, "transformer", "config.json")).save_pretrained(
            folder / "transformer")
    elif name == "ddpm-cifar10":
        from diffusers import UNet2DModel

        src = configs / "ddpm-cifar10-32"
        shutil.copy(src / "model_index.json", folder / "model_index.json")
        DDPMScheduler.from_config(_cfg(src, "scheduler_config.json")).save_pretrained(folder / "scheduler")
        UNet2DModel.from_config(_cfg(src, "config.json")).save_pretrained(folder / "unet")
    elif name == "edm":
        from memdetect.models.edm import build_network, save_safetensors

        save_safetensors(build_network("VPPrecond", EDM_CIFAR10).eval(), folder / "edm-cifar10.safetensors")
    else:
        raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    (folder / ".complete").write_text("ok")


def write_images(folder: Path, n: int, resolution: int, seed: int = 0) -> list[Path]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"img_{i:05d}.png"
        if not p.exists():
            Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


# -- measurements (in the subprocesses) -------------------------------------------------------------------------------

def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def matmul_peak(device, dtype, seconds: float = 1.5) -> float:
    """Sustained FLOP/s of square matmuls in the scan's dtype (a roofline for dense layers): the best over a few
    sizes, each written into a preallocated output so that no allocation or page fault is timed."""
    import torch

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


def flops_per_image(det, image, *, direct: bool = True) -> float:
    """FLOPs of the default path for one image: encode, noise, denoiser up to the hooked layer (early exit).

    ``direct``: the model's FLOPs (direct convolutions); otherwise what runs (Winograd where it applies)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from memdetect.speed import winograd
    off = winograd.disabled() if direct else contextlib.nullcontext()
    with off, torch.inference_mode(), FlopCounterMode(display=False) as fc:
        det.features(image)
    return float(fc.get_total_flops())


def wen_first_step_seconds(adapter, folder: Path, n: int) -> float | None:
    """Seconds per sample of Wen et al.'s first-step score as the harness times it (SD only): encoding the prompt,
    then one conditional and one unconditional denoiser call at the initial noise and the first DDIM timestep."""
    import torch

    from memdetect.bench import baselines

    if adapter.conditioning != "text":
        return None
    prompts = ["a photograph of an astronaut riding a horse"] * n
    adapter.encode_condition(prompts[:1])  # loads the text encoder (untimed, as the harness loads it once)
    x_T = torch.randn(n, *adapter.latent_shape(), generator=torch.Generator().manual_seed(0)).to(adapter.device,
                                                                                                   adapter.dtype)

    def run():
        with torch.inference_mode():
            baselines.wen_first_step(adapter, x_T, 981, adapter.encode_condition(prompts))  # DDIM's first step at 50

    return timed(run, adapter.device) / n


def gpu_throughput(adapter, batch: int = 64, reps: int = 5) -> dict:
    """SD1.4 images/second at batch 64 in bf16 (the model must already be in bf16 on the GPU)."""
    import torch

    from memdetect.detector import Detector

    det = Detector(adapter, batch_size=batch)
    x = torch.randint(0, 256, (batch, 3, adapter.resolution, adapter.resolution), dtype=torch.uint8)
    seeds = list(range(batch))
    det.features(x, seeds)
    t = min(timed(lambda: det.features(x, seeds), adapter.device) for _ in range(reps))
    return {"gpu_images_per_second_batch64": batch / t}


def describe_device(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {torch.get_num_threads()} threads"


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def child(args) -> dict:
    """One configuration (``--setting``) of one model, in this process; returns what it measured."""
    import numpy as np
    import torch
    from PIL import Image

    from memdetect import __version__
    from memdetect.speed import runtime
    from memdetect.detector import Detector, resolve_device

    device = resolve_device(args.device)
    setting, name = args.setting, args.child
    if device.type == "cpu" and setting != "naive":
        runtime.retain_freed_memory()  # what the memdetect command does (MEMDETECT_RETAIN_MEMORY=0: not)
    files = sorted(Path(args.images_dir).glob("*.png"))[:args.n]
    kwargs = {"device": args.device}
    if setting in ("whole-model", "baselines"):
        kwargs["prune"] = False
    if setting == "naive":
        kwargs.update(batch_size=1, early_exit=False)
    t0 = time.perf_counter()
    det = Detector.from_pretrained(PRESETS[name], args.model_dir, **kwargs)
    out = {"memdetect": __version__, "torch": torch.__version__, "load_seconds": time.perf_counter() - t0,
           "rss_after_load_gb": _status_kib("VmRSS") * 1024 / 1e9, "batch_size": det.batch_size,
           "layer": str(det.layer), "images": len(files), "device": describe_device(device),
           "allocator": runtime.allocator_state(), "winograd": det.winograd,
           "pruned": bool(getattr(det, "pruned", False))}
    imgs = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files])
    det.features(imgs[:1])  # warm-up: allocator, oneDNN / cuDNN plans
    if setting == "naive":  # one at a time, full forward
        out["seconds_per_image"] = timed(lambda: [det.features(imgs[i:i + 1]) for i in range(len(files))],
                                         device) / len(files)
    elif setting == "baselines":
        from memdetect.bench import baselines

        a, nb = det.adapter, min(len(files), det.batch_size)
        seeds = list(range(nb))
        out["seconds_per_image_ross_flipd"] = timed(
            lambda: baselines.flipd(a, imgs[:nb], det.timestep, seeds, probes=1), device) / nb
        wen = wen_first_step_seconds(a, Path(args.model_dir), nb)
        if wen is not None:
            out["seconds_per_image_wen_first_step"] = wen
    else:
        out["seconds_per_image"] = timed(lambda: det.scan(files), device) / len(files)
        if setting == "default" and args.flops:
            out["gflops_per_image"] = flops_per_image(det, imgs[:1]) / 1e9
            out["gflops_run_per_image"] = flops_per_image(det, imgs[:1], direct=False) / 1e9
        if device.type == "cuda" and name == "sd14" and setting == "default" and args.gpu_throughput:
            out.update(gpu_throughput(det.adapter))
    if device.type == "cuda":
        out["peak_cuda_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    out["peak_rss_self_gb"] = _status_kib("VmHWM") * 1024 / 1e9
    return out


def memory_profile(n: int, batch_size: int = 64) -> dict:
    """Scan ``n`` generated 32x32 PNGs with the demo model; RSS (MiB) sampled after every tenth of the folder."""
    from memdetect.speed import runtime
    from memdetect.detector import Detector

    runtime.retain_freed_memory()
    det = Detector.from_pretrained("demo", device="cpu", batch_size=batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        files = write_images(Path(tmp), n, 32, seed=1)
        done, marks, peak = 0, [], [0.0]
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], _status_kib("VmRSS") / 1024)
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


# -- today's families: real configs, random bf16 weights streamed to disk, lazy reads --------------------------------

TODAY_RESOLUTION = {"sdxl": 1024, "sd3-medium": 1024, "sd3.5-large": 1024, "flux-dev": 512, "pixart-sigma": 1024}
#: T5-v1.1-XXL's encoder (google/t5-v1_1-xxl, the text_encoder_2/_3 of FLUX.1 and SD3, PixArt's text_encoder): 4.76B
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
              layer_norm_epsilon=1e-6, tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0,
              eos_token_id=1)


def t5_tokenizer():
    """A T5 tokenizer (``T5TokenizerFast``) over a 30-piece unigram vocabulary (no download; the real one's
    ``spiece.model`` is not here). The empty prompt is ``</s>`` padded to the pipeline's length either way, so the
    encoder's cost is the real one's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in "abcdefghijklmnopqrstuvwxyz▁"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0)


def write_text_encoders(name: str, configs: Path, clip_tokenizer: Path, folder: Path, real: bool) -> dict:
    """The text components ``name``'s pipeline encodes the empty prompt with. ``real``: CLIP-L and OpenCLIP-G from
    SDXL's real text-encoder configs and T5-v1.1-XXL, random bf16, streamed; otherwise stand-ins with the real widths
    (so the condition has the real shapes) and one or two layers."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Config
    from transformers import T5EncoderModel

    from random_weights import write_random_transformers

    family = TODAY[name][0]
    tok = CLIPTokenizer.from_pretrained(clip_tokenizer)
    if family == "sdxl":  # force_zeros_for_empty_prompt: no text encoder runs; the folder has their configs only
        for sub in ("text_encoder", "text_encoder_2"):
            shutil.copytree(configs / "sdxl" / sub, folder / sub, dirs_exist_ok=True)
        for sub in ("tokenizer", "tokenizer_2"):
            tok.save_pretrained(folder / sub)
        return {}
    written = {}

    src = configs / family

    def clip(sub: str, which: str, projection: bool):
        own = src / sub / "config.json"  # a folder with its own text-encoder configs (tests); else SDXL's CLIPs
        cfg = CLIPTextConfig.from_pretrained(str(own.parent if own.is_file() else configs / "sdxl" / which))
        cls = CLIPTextModelWithProjection if projection else CLIPTextModel
        if not real:
            cfg.num_hidden_layers, cfg.intermediate_size, cfg.num_attention_heads = 2, 64, 2
            torch.manual_seed(0)
            model = cls(cfg)
            model.save_pretrained(folder / sub)
            written[sub] = sum(p.numel() for p in model.parameters())
        else:
            written[sub] = write_random_transformers(cls, cfg, folder / sub)["parameters"]

    def t5(sub: str):
        own = src / sub / "config.json"
        full = T5Config.from_pretrained(str(own.parent)) if own.is_file() else T5Config(**T5_XXL)
        if real:
            written[sub] = write_random_transformers(T5EncoderModel, full, folder / sub)["parameters"]
        else:
            cfg = T5Config(**{**full.to_dict(), "vocab_size": 32, "d_kv": 4, "d_ff": 32, "num_layers": 1,
                              "num_heads": 2, "relative_attention_num_buckets": 8})
            torch.manual_seed(0)
            model = T5EncoderModel(cfg)
            model.save_pretrained(folder / sub)
            written[sub] = sum(p.numel() for p in model.parameters())

    if family == "flux":
        clip("text_encoder", "text_encoder", False)
        t5("text_encoder_2")
        tok.save_pretrained(folder / "tokenizer")
        t5_tokenizer().save_pretrained(folder / "tokenizer_2")
    elif family in ("sd3", "sd3.5-large"):
        clip("text_encoder", "text_encoder", True)
        clip("text_encoder_2", "text_encoder_2", True)
        t5("text_encoder_3")
        for sub in ("tokenizer", "tokenizer_2"):
            tok.save_pretrained(folder / sub)
        t5_tokenizer().save_pretrained(folder / "tokenizer_3")
    elif family == "pixart":
        t5("text_encoder")
        t5_tokenizer().save_pretrained(folder / "tokenizer")
    return written


def write_today_model(name: str, configs: Path, folder: Path, clip_tokenizer: Path, real_text: bool) -> dict:
    """``name``'s real configs with random weights: the denoiser in bf16 streamed into sharded safetensors, the VAE
    the same way, the scheduler and model_index.json as found, and its text encoders (``write_text_encoders``)."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel
    from diffusers import UNet2DConditionModel

    from random_weights import write_random_diffusers

    src = configs / TODAY[name][0]
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "model_index.json", folder / "model_index.json")
    shutil.copytree(src / "scheduler", folder / "scheduler", dirs_exist_ok=True)
    sub, cls = {"sdxl": ("unet", UNet2DConditionModel), "flux": ("transformer", FluxTransformer2DModel),
                "pixart": ("transformer", PixArtTransformer2DModel)}.get(TODAY[name][0],
                                                                         ("transformer", SD3Transformer2DModel))
    den = write_random_diffusers(cls, cls.load_config(str(src / sub)), folder / sub, dtype=torch.bfloat16)
    vae = write_random_diffusers(AutoencoderKL, AutoencoderKL.load_config(str(src / "vae")), folder / "vae",
                                 dtype=torch.bfloat16, seed=1)
    text = write_text_encoders(name, configs, clip_tokenizer, folder, real_text)
    info = {"denoiser_parameters": den["parameters"], "denoiser_bytes": den["bytes"], "denoiser_files": den["files"],
            "vae_parameters": vae["parameters"], "text_encoder_parameters": text, "real_text_encoders": real_text}
    (folder / "written.json").write_text(json.dumps(info, indent=2))
    (folder / ".complete").write_text("ok")
    return info


def _today_spec(name: str, folder: Path):
    from dataclasses import replace

    from memdetect.models import resolve_model

    spec = resolve_model(TODAY[name][1], str(folder))
    return replace(spec, options={**spec.options, **TODAY[name][2]})


def blocks_read(module) -> dict[str, str]:
    """For each list of blocks (``transformer_blocks``, ``down_blocks`` ...): how many of them have any weight read
    (not on ``meta``), e.g. ``{"transformer_blocks": "19/19", "single_transformer_blocks": "0/38"}``."""
    import torch

    out = {}
    for lname, child in module.named_children():
        if isinstance(child, torch.nn.ModuleList):
            read = sum(any(not p.is_meta for p in b.parameters()) for b in child)
            out[lname] = f"{read}/{len(child)}"
        elif lname == "mid_block":
            out[lname] = "1/1" if any(not p.is_meta for p in child.parameters()) else "0/1"
    return out


def today_child(args) -> dict:
    """One of today's models in this process: ``--setting condition`` encodes the empty prompt (the model's first
    use; cached under ``$MEMDETECT_CACHE``); ``scan`` loads the detector (the condition from the cache, the denoiser's
    tensors up to the hooked layer) and scans ``--n`` PNGs once, timed in wall and CPU seconds."""
    import torch

    from memdetect import __version__
    from memdetect.detector import Detector
    from memdetect.models import load_adapter
    from memdetect.speed import runtime

    name, device, dtype = args.child, torch.device("cpu"), torch.bfloat16
    spec = _today_spec(name, Path(args.model_dir))
    out = {"memdetect": __version__, "torch": torch.__version__, "device": describe_device(device), "dtype": "bfloat16"}
    c0, t0 = time.process_time(), time.perf_counter()
    if args.setting == "first":  # a first scan in one process, as `memdetect scan` runs it: cold cache
        runtime.retain_freed_memory()
        adapter = load_adapter(spec, device, dtype, place=False)
        rss_encoded = _status_kib("VmRSS") * 1024 / 1e9
        det = Detector(adapter, layer=spec.layer, timestep=spec.timestep, name=spec.name)
        files = sorted(Path(args.images_dir).glob("*.png"))[:args.n]
        df = det.scan(files, num_workers=0)
        out.update(first_wall_seconds=time.perf_counter() - t0, first_cpu_seconds=time.process_time() - c0,
                   rss_after_condition_gb=rss_encoded, images=len(files),
                   scores_finite=bool(df["score"].notna().all()))
        out["peak_rss_self_gb"] = _status_kib("VmHWM") * 1024 / 1e9
        return out
    if args.setting == "condition":
        adapter = load_adapter(spec, device, dtype, place=False)
        out.update(condition_wall_seconds=time.perf_counter() - t0, condition_cpu_seconds=time.process_time() - c0,
                   condition={k: list(v.shape) for k, v in adapter.cond.items()})
        out["peak_rss_self_gb"] = _status_kib("VmHWM") * 1024 / 1e9
        return out
    runtime.retain_freed_memory()
    adapter = load_adapter(spec, device, dtype, place=False)
    det = Detector(adapter, layer=spec.layer, timestep=spec.timestep, name=spec.name)
    den = adapter.denoiser
    held = sum(t.numel() * t.element_size() for t in [*den.parameters(), *den.buffers()] if not t.is_meta)
    n_all = sum(p.numel() for p in den.parameters())
    n_read = sum(p.numel() for p in den.parameters() if not p.is_meta)
    out.update(load_wall_seconds=time.perf_counter() - t0, load_cpu_seconds=time.process_time() - c0,
               rss_after_load_gb=_status_kib("VmRSS") * 1024 / 1e9, layer=str(det.layer),
               resolution=adapter.resolution, batch_size=det.batch_size, weights_read_gb=held / 1e9,
               parameters_read=n_read, parameters_total=n_all, blocks_read=blocks_read(den))
    files = sorted(Path(args.images_dir).glob("*.png"))[:args.n]
    c0, t0 = time.process_time(), time.perf_counter()
    df = det.scan(files, num_workers=0)
    out.update(seconds_per_image=(time.perf_counter() - t0) / len(files),
               cpu_seconds_per_image=(time.process_time() - c0) / len(files), images=len(files),
               scores_finite=bool(df["score"].notna().all()), errors=int(df["error"].notna().sum()))
    out["peak_rss_self_gb"] = _status_kib("VmHWM") * 1024 / 1e9
    return out


def mem_available_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def measure_today(name: str, args, work: Path) -> dict:
    """Write ``name``'s weights, then its condition and scan subprocesses, each after a memory check; the weights
    are deleted afterwards unless ``--keep-weights``."""
    folder, images, cache = work / name, work / f"{name}-images", work / f"{name}-cache"
    res = TODAY_RESOLUTION[name]
    row = {"model": name, "resolution": res, "dtype": "bfloat16", "real_text_encoders": args.text_encoders == "real",
           "load_average": [round(x, 2) for x in os.getloadavg()]}
    env = {**os.environ, "MEMDETECT_CACHE": str(cache)}
    try:
        if not (folder / ".complete").exists():
            print(f"[{name}] writing random bf16 weights to {folder} ...", flush=True)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--write-today", name, "--model-dir", str(folder),
                   "--configs", args.configs, "--today-configs", args.today_configs, "--text-encoders",
                   args.text_encoders]
            out, err, rc, wall, rss = run_measured(cmd, env)
            if rc != 0:
                raise SystemExit(f"[{name}] writing the model failed:\n{err[-3000:]}")
            row.update(write_seconds=wall, write_peak_rss_gb=rss)
        row.update(json.loads((folder / "written.json").read_text()))
        n = args.images or TODAY[name][4]
        write_images(images, n, res)
        base = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--model-dir", str(folder),
                "--images-dir", str(images), "--n", str(n)]
        need_cond = 12.0 if args.text_encoders == "real" and TODAY[name][0] != "sdxl" else 3.0
        phases = [("condition", need_cond), ("scan", TODAY[name][3])]
        if args.first:
            phases.append(("first", max(need_cond, TODAY[name][3])))
        for setting, need in phases:
            if setting == "first":
                shutil.rmtree(cache, ignore_errors=True)  # cold: the empty prompt is encoded again
            avail, deadline = mem_available_gb(), time.monotonic() + args.wait_memory
            while avail < need + args.margin_gb * 2**30 / 1e9 and time.monotonic() < deadline:
                time.sleep(15)  # other processes may free memory: wait up to --wait-memory seconds
                avail = mem_available_gb()
            if avail < need + args.margin_gb * 2**30 / 1e9:
                row[f"skipped_{setting}"] = (f"MemAvailable {avail:.1f} GB < estimated peak {need:.0f} GB + "
                                             f"{args.margin_gb:g} GiB margin")
                print(f"[{name}] {setting} skipped: {row[f'skipped_{setting}']}", flush=True)
                break
            row[f"mem_available_before_{setting}_gb"] = round(avail, 1)
            out, err, rc, wall, rss = run_measured(base + ["--setting", setting], env, args.timeout,
                                                   rss_cap_gb=args.rss_cap_gb)
            if rc != 0:
                row[f"failed_{setting}"] = err.strip().splitlines()[-1][:300] if err.strip() else f"exit {rc}"
                print(f"[{name}] {setting} failed ({rc}):\n{err[-3000:]}", flush=True)
                break
            r = json.loads(out.strip().splitlines()[-1])
            r.update({f"peak_rss_gb_{setting}": rss, f"wall_seconds_{setting}": wall})
            r[f"peak_rss_self_gb_{setting}"] = r.pop("peak_rss_self_gb")
            print(f"[{name}] {setting}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                      for k, v in r.items() if k not in ("device",)), flush=True)
            row.update(r)
    finally:
        if not args.keep_weights:
            shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(images, ignore_errors=True)
            shutil.rmtree(cache, ignore_errors=True)
    return row


def print_today(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="today's families on CPU, bf16, random weights (wall seconds depend on the machine's load; CPU "
                    "seconds of the child far less)", title_justify="left")
    for c in ("model", "px", "layer", "blocks read", "weights read GB", "condition peak GB", "scan peak GB",
              "CPU s/img", "wall s/img", "load s (CPU)"):
        t.add_column(c, justify="left" if c in ("model", "layer", "blocks read") else "right")
    f = lambda v, fmt="{:.2f}": "-" if v is None else fmt.format(v)  # noqa: E731
    for r in rows:
        t.add_row(r["model"], str(r["resolution"]), r.get("layer", "-"),
                  ", ".join(f"{k} {v}" for k, v in r.get("blocks_read", {}).items()) or "-",
                  f(r.get("weights_read_gb")), f(r.get("peak_rss_gb_condition")), f(r.get("peak_rss_gb_scan")),
                  f(r.get("cpu_seconds_per_image"), "{:.1f}"), f(r.get("seconds_per_image"), "{:.1f}"),
                  f(r.get("load_cpu_seconds"), "{:.1f}") if "skipped_scan" not in r else r["skipped_scan"])
    Console(width=220).print(t)


# -- the parent: one subprocess per configuration ---------------------------------------------------------------------

def _watch_rss(proc, cap_bytes: int, stop: threading.Event) -> None:
    """Kill ``proc`` when its resident memory passes ``cap_bytes`` (polled every 0.2 s): a guard for the machine."""
    while not stop.wait(0.2):
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                rss = next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:")), 0)
        except OSError:
            return
        if rss > cap_bytes:
            print(f"RSS {rss / 1e9:.1f} GB passed the cap of {cap_bytes / 1e9:.1f} GB: killed", file=sys.stderr)
            proc.kill()
            return


def run_measured(cmd: list[str], env: dict, timeout: float | None = None,
                 rss_cap_gb: float | None = None) -> tuple[str, str, int, float, float]:
    """Run ``cmd``; (stdout, stderr, exit code, wall seconds, peak RSS in GB of it and the children it waited for).
    ``rss_cap_gb``: kill it when its RSS passes that many GB."""
    with tempfile.TemporaryFile(mode="w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env, text=True)
        timer = threading.Timer(timeout, proc.kill) if timeout else None
        if timer:
            timer.start()
        stop = threading.Event()
        if rss_cap_gb:
            threading.Thread(target=_watch_rss, args=(proc, int(rss_cap_gb * 1e9), stop), daemon=True).start()
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        stop.set()
        if timer:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        proc.stdout.close()
        wall = time.perf_counter() - t0
        err.seek(0)
        return out, err.read(), proc.returncode, wall, usage.ru_maxrss * 1024 / 1e9


def _env(extra: dict, code: str | None) -> dict:
    env = {**os.environ, **extra}
    if code:
        env["PYTHONPATH"] = os.pathsep.join([code, *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def measure_setting(name: str, setting: str, args, folder: Path, images: Path, n: int, code: str | None) -> dict:
    """One subprocess: a ``--child`` run of this file, or for ``cli`` the ``memdetect scan`` command."""
    env = _env(SETTINGS[setting], code)
    if setting == "cli":
        with tempfile.TemporaryDirectory() as tmp:
            sub = Path(tmp) / "images"
            sub.mkdir()
            for f in sorted(images.glob("*.png"))[:n]:
                os.symlink(f, sub / f.name)
            cmd = [sys.executable, "-m", "memdetect", "scan", str(sub), "--model", PRESETS[name], "--model-path",
                   str(folder), "--device", args.device, "--output", str(Path(tmp) / "report.csv"), "--quiet"]
            out, err, rc, wall, rss = run_measured(cmd, env, args.timeout)
        if rc not in (0, 1):
            raise SystemExit(f"[{name}] memdetect scan failed ({rc}):\n{err[-3000:]}")
        return {"wall_seconds": wall, "peak_rss_gb": rss, "images": n}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--setting", setting, "--model-dir",
           str(folder), "--images-dir", str(images), "--n", str(n), "--device", args.device]
    if not args.flops:
        cmd.append("--no-flops")
    if not args.gpu_throughput:
        cmd.append("--no-gpu-throughput")
    out, err, rc, wall, rss = run_measured(cmd, env, args.timeout)
    if rc != 0:
        raise SystemExit(f"[{name}] setting {setting} failed ({rc}):\n{err[-3000:]}")
    row = json.loads(out.strip().splitlines()[-1])
    row.update(peak_rss_gb=rss, wall_seconds=wall)
    return row


def prepare(name: str, args, work: Path) -> tuple[Path, Path]:
    folder, images = work / name, work / f"{name}-images"
    if not (folder / ".complete").exists():
        print(f"[{name}] writing the model with random weights to {folder} ...", flush=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--write-model", name, "--model-dir", str(folder),
               "--configs", args.configs]
        out, err, rc, wall, rss = run_measured(cmd, dict(os.environ))
        if rc != 0:
            raise SystemExit(f"[{name}] writing the model failed:\n{err[-3000:]}")
    return folder, images


def default_images(name: str, batch: int) -> int:
    return {"sd14": 12, "dit": 16, "edm": 256, "ddpm-cifar10": 256}.get(name, 4 * batch)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    p.add_argument("--settings", default=DEFAULT_SETTINGS, help="comma-separated: " + ", ".join(SETTINGS))
    p.add_argument("--configs", default=str(CONFIGS), help="folder with the real configs (../shared/data/configs)")
    p.add_argument("--device", default="auto")
    p.add_argument("--images", type=int, default=None, help="images per setting (default: SD1.4 12, DiT 16, "
                                                            "EDM and ddpm-cifar10 256)")
    p.add_argument("--naive-images", type=int, default=None, help="images for the naive path (default: 2 for "
                                                                  "SD1.4 and DiT on a CPU)")
    p.add_argument("--baseline-images", type=int, default=None)
    p.add_argument("--workdir", default=None, help="where the model folders and images are written and kept "
                                                   "(default: a temporary folder, removed at the end)")
    p.add_argument("--compare", default=None, metavar="PATH", help="also run default and cli with the memdetect "
                                                                   "package of the checkout at PATH")
    p.add_argument("--flops", action=argparse.BooleanOptionalAction, default=True, help="count the FLOPs (floor)")
    p.add_argument("--gpu-throughput", action=argparse.BooleanOptionalAction, default=True,
                   help="on a GPU: SD1.4 images/s at batch 64 bf16")
    p.add_argument("--memory", type=int, default=0, metavar="N", help="also: peak RSS while scanning N images")
    p.add_argument("--peak", type=float, default=None, help="matmul FLOP/s to use instead of measuring it")
    p.add_argument("--timeout", type=float, default=None, help="seconds per subprocess")
    p.add_argument("--today-configs", default=str(TODAY_CONFIGS), help="today's families' real configs "
                                                                       "(tests/data/configs)")
    p.add_argument("--today-workdir", default=None, help="where today's models' random weights are written "
                                                         "(default: a temporary folder)")
    p.add_argument("--text-encoders", choices=("small", "real"), default="small",
                   help="today's families: text encoders at full size (real) or stand-ins of the real widths")
    p.add_argument("--margin-gb", type=float, default=3.0, help="GiB of MemAvailable to keep free beyond a today "
                                                                "model's estimated peak, else it is skipped")
    p.add_argument("--wait-memory", type=float, default=0, metavar="S", help="wait up to S seconds for enough "
                                                                           "MemAvailable before skipping")
    p.add_argument("--first", action="store_true", help="today's families: also a first scan in one process "
                                                        "(cold condition cache: encode, then scan)")
    p.add_argument("--rss-cap-gb", type=float, default=None, help="today's families: kill a child whose RSS "
                                                                  "passes this many GB (a guard for the machine)")
    p.add_argument("--keep-weights", action="store_true", help="keep today's models' weights after measuring")
    # internal: the subprocesses
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--setting", default="default", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--images-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--write-model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--memory-child", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--write-today", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.write_today:
        print(json.dumps(write_today_model(args.write_today, Path(args.today_configs), Path(args.model_dir),
                                           Path(args.configs) / "sd14" / "tokenizer", args.text_encoders == "real")))
        return 0
    if args.child in TODAY:
        print(json.dumps(today_child(args)))
        return 0
    if args.write_model:
        write_model(args.write_model, Path(args.configs), Path(args.model_dir))
        return 0
    if args.child:
        print(json.dumps(child(args)))
        return 0
    if args.memory_child:
        print(json.dumps(memory_profile(args.memory_child)))
        return 0

    import torch

    from memdetect import __version__
    from memdetect.detector import resolve_device, resolve_dtype

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    models = [x for m in models for x in (TODAY if m == "today" else [m])]
    today, models = [m for m in models if m in TODAY], [m for m in models if m not in TODAY]
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    bad = [m for m in models if m not in MODELS] + [s for s in settings if s not in SETTINGS]
    if bad:
        print(f"unknown model or setting {bad[0]!r}; models: {', '.join(MODELS)}, today ({', '.join(TODAY)}); "
              f"settings: {', '.join(SETTINGS)}", file=sys.stderr)
        return 2
    if today:
        return main_today(today, args)
    if not Path(args.configs).is_dir():
        print(f"real configs not found at {args.configs} (pass --configs)", file=sys.stderr)
        return 2
    device = resolve_device(args.device)
    args.device = device.type
    dtype = resolve_dtype("auto", device)
    if args.peak is None:
        args.peak = matmul_peak(device, dtype)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"memdetect {__version__}, torch {torch.__version__}, python {platform.python_version()}, "
          f"{describe_device(device)}; matmul peak {args.peak / 1e9:.0f} GFLOP/s ({str(dtype).replace('torch.', '')}); "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    mem = None
    if args.memory:
        out, err, rc, wall, rss = run_measured([sys.executable, str(Path(__file__).resolve()), "--memory-child",
                                                str(args.memory)], dict(os.environ))
        if rc != 0:
            raise SystemExit(f"memory profile failed:\n{err[-3000:]}")
        mem = json.loads(out.strip().splitlines()[-1])
    work_ctx = contextlib.nullcontext(args.workdir) if args.workdir else tempfile.TemporaryDirectory()
    rows = []
    with work_ctx as work:
        work = Path(work)
        for name in models:
            folder, images_dir = prepare(name, args, work)
            bs = {"sd14": 4, "dit": 8}.get(name, 64) if device.type == "cpu" else 64
            n = args.images or default_images(name, bs)
            n_naive = args.naive_images or (2 if device.type == "cpu" and name in ("sd14", "dit") else n)
            n_base = min(n, args.baseline_images or bs)
            write_images(images_dir, max(n, n_naive, n_base), RESOLUTION[name])
            row = {"model": name, "device": describe_device(device), "peak_gflops": args.peak / 1e9,
                   "load_average": [round(x, 2) for x in load]}
            runs = [(s, None) for s in settings]
            if args.compare:
                runs += [(s, args.compare) for s in ("default", "cli") if s in settings]
            for setting, code in runs:
                key = setting + ("-compare" if code else "")
                count = {"naive": n_naive, "baselines": n_base}.get(setting, n)
                r = measure_setting(name, setting, args, folder, images_dir, count, code)
                print(f"[{name}] {key}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                      for k, v in r.items() if k not in ("device", "layer")),
                      flush=True)
                for k, v in r.items():
                    if k in ("seconds_per_image", "peak_rss_gb", "peak_cuda_gb", "wall_seconds", "load_seconds",
                             "rss_after_load_gb", "seconds_per_image_ross_flipd", "seconds_per_image_wen_first_step",
                             "gpu_images_per_second_batch64"):
                        row[f"{k}_{key}" if not k.startswith("seconds_per_image_") and not k.startswith("gpu")
                            else k] = v
                    elif k in ("gflops_per_image", "gflops_run_per_image", "batch_size", "layer", "memdetect"):
                        row.setdefault(k, v)
            if "gflops_per_image" in row:
                row["floor_seconds"] = row["gflops_per_image"] * 1e9 / args.peak
                if "seconds_per_image_default" in row:
                    row["floor_ratio"] = row["seconds_per_image_default"] / row["floor_seconds"]
                if "seconds_per_image_direct" in row:
                    row["floor_ratio_direct"] = row["seconds_per_image_direct"] / row["floor_seconds"]
            if "seconds_per_image_naive" in row and "seconds_per_image_default" in row:
                row["speedup_vs_naive"] = row["seconds_per_image_naive"] / row["seconds_per_image_default"]
            rows.append(row)
    print_table(rows, settings, bool(args.compare))
    if mem:
        print(f"memory: {mem['rows']} images in {mem['seconds']} s; peak RSS (MiB) after each tenth: "
              f"{mem['peak_rss_mib_by_tenth']}; growth {mem['peak_rss_growth_mib']} MiB")
        print(json.dumps(mem))
    for r in rows:
        print(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()}))
    return 0


def main_today(names: list[str], args) -> int:
    """Today's families, one after another (never two measurements at once), smallest first as listed."""
    import torch

    from memdetect import __version__

    if not (Path(args.configs) / "sd14" / "tokenizer").is_dir():
        print(f"the CLIP tokenizer is read from {args.configs}/sd14/tokenizer, which is missing (pass --configs)",
              file=sys.stderr)
        return 2
    load = os.getloadavg()
    print(f"memdetect {__version__}, torch {torch.__version__}, python {platform.python_version()}, "
          f"{describe_device(torch.device('cpu'))}, nice {os.nice(0)}; load average {load[0]:.2f} {load[1]:.2f} "
          f"{load[2]:.2f}; MemAvailable {mem_available_gb():.1f} GB", flush=True)
    work_ctx = (contextlib.nullcontext(args.today_workdir) if args.today_workdir else
                tempfile.TemporaryDirectory(prefix="memdetect-perf-"))
    rows = []
    with work_ctx as work:
        Path(work).mkdir(parents=True, exist_ok=True)
        for name in names:
            rows.append(measure_today(name, args, Path(work)))
    print_today(rows)
    for r in rows:
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}))
    return 0


def print_table(rows: list[dict], settings: list[str], compare: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    keys = [s for s in settings if s != "baselines"] + (["default-compare", "cli-compare"] if compare else [])
    t = Table(title="seconds per image (cli: wall seconds of the command, loading included) and peak RSS (GB)",
              title_justify="left")
    t.add_column("model")
    for k in keys:
        t.add_column(k, justify="right")
    for c in ("floor", "floor ratio", "FLIPD", "Wen 1st", "GFLOP/img (run)"):
        t.add_column(c, justify="right")
    for r in rows:
        cells = []
        for k in keys:
            s = r.get(f"seconds_per_image_{k}", r.get(f"wall_seconds_{k}") if k.startswith("cli") else None)
            m = r.get(f"peak_rss_gb_{k}")
            cuda = r.get(f"peak_cuda_gb_{k}")
            cells.append("-" if s is None else f"{s:.4g} s, {m:.2f} GB" + (f" (GPU {cuda:.2f})" if cuda else ""))
        fmt = lambda v, f="{:.4g}": "-" if v is None else f.format(v)  # noqa: E731
        cells += [fmt(r.get("floor_seconds")), fmt(r.get("floor_ratio"), "{:.2f}"),
                  fmt(r.get("seconds_per_image_ross_flipd")), fmt(r.get("seconds_per_image_wen_first_step")),
                  "-" if "gflops_per_image" not in r else
                  f"{r['gflops_per_image']:.0f} ({r['gflops_run_per_image']:.0f})"]
        t.add_row(r["model"], *cells)
    Console(width=200).print(t)


if __name__ == "__main__":
    sys.exit(main())
