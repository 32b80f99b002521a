"""Train the ground-truth memorizing demo model shipped as the `demo` preset.

Recipe (all seeds fixed; the numbers below are the defaults, written into ``recipe.json`` next to the model):

* data: CIFAR-10 training JPEGs (``cifar10-jpg.tar.gz`` from ``../shared/data/datasets``). A seeded permutation of
  the 50,000 training images gives ``--unique`` images that appear once and ``--dup-images`` other images that are
  repeated ``--dup-repeats`` times each (the paper's Fig. 17 setting: a few duplicated images among many unique ones).
* model: a small diffusers ``UNet2DModel`` at 32x32 (3 resolutions, 32/64/128 channels), DDPM linear schedule
  1e-4..0.02 over 1000 steps, epsilon prediction, the same scheduler as google/ddpm-cifar10-32. No augmentation
  (a horizontal flip would make a memorized copy appear mirrored).
* training: AdamW, constant lr after warm-up, bf16 autocast on CUDA, EMA of the weights (the EMA is what ships).
* sampling: ``--samples`` images with DDIM (``--sample-steps``, eta 0) from a generator seeded with ``--seed``.
* labels: each sample's nearest training image by pixel correlation (``memdetect.bench.labels``).

Outputs in ``--out``: ``model/`` (a diffusers DDPMPipeline folder, safetensors), ``samples.npz`` (uint8
[N,3,32,32]), ``manifest.csv`` (sample index, nearest training image, its similarity, whether that image was one of
the duplicated ones), ``recipe.json`` and ``train_log.csv``.

Run: ``python benchmarks/train_demo.py --data ../shared/data/datasets/cifar10-jpg/cifar10-jpg.tar.gz --out runs/demo``
(a GPU is strongly recommended; ``--time-budget`` stops training after that many seconds).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gt_common import load_cifar_train  # noqa: E402


def build_unet(resolution: int):
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=resolution,
        in_channels=3,
        out_channels=3,
        layers_per_block=2,
        block_out_channels=(32, 64, 128),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=None,
        dropout=0.0,
    )


def build_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
        clip_sample=True, variance_type="fixed_large", prediction_type="epsilon",
    )


@torch.no_grad()
def sample(unet, n: int, steps: int, seed: int, batch: int, device: torch.device) -> torch.Tensor:
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(build_scheduler().config)
    sched.set_timesteps(steps)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    res = unet.config.sample_size
    for start in range(0, n, batch):
        b = min(batch, n - start)
        x = torch.randn(b, 3, res, res, generator=gen).to(device)
        for t in sched.timesteps:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                eps = unet(x, t).sample.float()
            x = sched.step(eps, t, x, eta=0.0).prev_sample
        out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu())
    return torch.cat(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="cifar10-jpg.tar.gz or its extracted folder")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--unique", type=int, default=12000)
    ap.add_argument("--dup-images", type=int, default=40)
    ap.add_argument("--dup-repeats", type=int, default=150)
    ap.add_argument("--steps", type=int, default=60000, help="upper bound on optimizer steps")
    ap.add_argument("--time-budget", type=float, default=float("inf"), help="stop training after this many seconds")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--sample-steps", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    t_start = time.time()
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    images, names, _ = load_cifar_train(args.data)
    print(f"loaded {len(images)} training images in {time.time() - t_start:.1f}s", flush=True)
    perm = np.random.default_rng(args.seed).permutation(len(images))
    unique_idx = np.sort(perm[: args.unique])
    dup_idx = np.sort(perm[args.unique : args.unique + args.dup_images])
    train_idx = np.concatenate([unique_idx, dup_idx])  # distinct training images
    epoch_idx = np.concatenate([unique_idx, np.repeat(dup_idx, args.dup_repeats)])
    data = torch.from_numpy(images[epoch_idx]).to(device)  # uint8 on device

    unet = build_unet(32).to(device)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    sched = build_scheduler()
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"unet parameters: {n_params:,}; training set {len(epoch_idx)} rows "
          f"({len(unique_idx)} unique + {len(dup_idx)}x{args.dup_repeats})", flush=True)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    alphas_cumprod = sched.alphas_cumprod.to(device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    log_rows = []
    t_train = time.time()
    step = 0
    loss_avg = None
    while step < args.steps and time.time() - t_train < args.time_budget:
        idx = torch.randint(0, len(data), (args.batch_size,), device=device, generator=gen)
        x0 = data[idx].float() / 127.5 - 1
        noise = torch.randn(x0.shape, device=device, generator=gen)
        t = torch.randint(0, 1000, (args.batch_size,), device=device, generator=gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            pred = unet(xt, t).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        step += 1
        if step % 200 == 0:
            lv = loss.item()
            loss_avg = lv if loss_avg is None else 0.9 * loss_avg + 0.1 * lv
            log_rows.append({"step": step, "seconds": round(time.time() - t_train, 1), "loss_ema": round(loss_avg, 5)})
            if step % 2000 == 0:
                print(f"step {step} loss~{loss_avg:.4f} {time.time() - t_train:.0f}s", flush=True)
    train_seconds = time.time() - t_train
    print(f"trained {step} steps in {train_seconds:.0f}s", flush=True)

    from diffusers import DDPMPipeline

    ema = ema.float().cpu()
    DDPMPipeline(unet=ema, scheduler=build_scheduler()).save_pretrained(args.out / "model", safe_serialization=True)
    ema = ema.to(device)

    t0 = time.time()
    samples = sample(ema, args.samples, args.sample_steps, args.seed, batch=500, device=device)
    print(f"sampled {len(samples)} in {time.time() - t0:.0f}s", flush=True)
    np.savez_compressed(args.out / "samples.npz", samples=samples.numpy())

    from memdetect.bench.labels import nearest_neighbours

    train_imgs = torch.from_numpy(images[train_idx])
    sim, nn = nearest_neighbours(samples.to(device), train_imgs.to(device))
    dup_set = set(dup_idx.tolist())
    with open(args.out / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sample", "similarity", "nearest_train", "nearest_is_duplicated"])
        for i in range(len(samples)):
            j = int(train_idx[int(nn[i])])
            w.writerow([i, f"{float(sim[i]):.5f}", names[j], int(j in dup_set)])
    with open(args.out / "train_log.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "seconds", "loss_ema"])
        w.writeheader()
        w.writerows(log_rows)
    recipe = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    recipe["time_budget"] = None if math.isinf(args.time_budget) else args.time_budget
    recipe.update(
        steps_done=step, train_seconds=round(train_seconds), unet_parameters=n_params,
        unique_images=len(unique_idx),
        duplicated_images=[names[i] for i in dup_idx],
        torch=torch.__version__, device_name=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        sampler=f"DDIM {args.sample_steps} steps, eta 0",
        similarity="pixel correlation to the nearest training image (memdetect.bench.labels)",
    )
    (args.out / "recipe.json").write_text(json.dumps(recipe, indent=2))
    hist = np.histogram(sim.numpy(), bins=[-1, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.99, 1.01])
    print("similarity histogram:", list(zip(hist[1][:-1].round(2).tolist(), hist[0].tolist())), flush=True)
    print(f"done in {time.time() - t_start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
