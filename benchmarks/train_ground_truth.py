"""Train the ground-truth memorizing models shipped as the ``demo-sd``, ``demo-dit`` and ``demo-edm`` presets.

One command per model (CPU is fine; every run is bounded by ``--time-budget`` seconds of training):

    D=../shared/data/datasets/cifar10-jpg/cifar10-jpg.tar.gz
    python benchmarks/train_ground_truth.py vae --data $D --out runs/gt-vae --time-budget 4500
    python benchmarks/train_ground_truth.py edm --data $D --out runs/demo-edm --time-budget 6000
    python benchmarks/train_ground_truth.py sd  --data $D --vae runs/gt-vae --out runs/demo-sd --time-budget 5400
    python benchmarks/train_ground_truth.py dit --data $D --vae runs/gt-vae --out runs/demo-dit --time-budget 4200 \
        --balanced --exact 2:20,4:20,8:20,16:20,64:20 --edited 16:10,64:10   # the shipped (balanced) demo-dit
    python benchmarks/train_ground_truth.py ship runs/demo-sd      # -> memdetect/data/demo-sd, demo_sd_bench

``vae`` trains the small ``AutoencoderKL`` (32 px -> 8x8x8 latents) on all 50,000 CIFAR-10 training images and
sets its ``scaling_factor`` to 1 / std of the training latents; ``sd`` and ``dit`` copy it into their pipeline
folders. ``sd``, ``dit`` and ``edm`` run three stages (``--stage all``, or ``train`` / ``sample`` / ``label``):

1. train on the graded duplication split (``gt_common.build_split``: uniques seen once, exact duplicates at several
   counts, edited copies, and for demo-sd one image under several captions), fixed seeds, time-budgeted, with an
   EMA of the weights (the EMA ships); checkpoints every ``--ckpt-every`` seconds, ``--resume`` continues;
2. sample with the model's own sampler (SD: ``StableDiffusionPipeline`` + DDIM with CFG from memorized and normal
   prompts; DiT: ``DiTPipeline`` + DDIM with CFG over classes; EDM: Heun's 2nd-order EDM sampler);
3. label every sample by its flip-, shift- and colour-cast-invariant pixel correlation to the nearest distinct
   training image (``memdetect.bench.labels.nearest_match``, ``colour="cast"``) and record the duplication grade
   of that image. ``relabel memdetect/data/<model>_bench --data $D`` labels a shipped folder again.

Outputs in ``--out``: ``model/`` (the diffusers pipeline folder, or ``demo-edm.safetensors`` + ``.json``),
``samples.npz`` (uint8 [N,3,32,32]), ``manifest.csv``, ``recipe.json`` (every flag, seeds, sizes, steps, seconds,
versions, the grade table), ``train_log.csv``, ``grades.csv``; demo-sd also ``memorized_prompts.csv`` and
``normal_prompts.csv``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gt_common import (CLASSES, Grade, Split, build_split, ema_update, load_cifar_train, lr_at,  # noqa: E402
                       normal_prompts, write_json, write_log)

REPO = Path(__file__).resolve().parents[1]
SD_TOKENIZER = REPO.parent / "shared" / "data" / "configs" / "sd14" / "tokenizer"
CLIP_LICENSE = """The tokenizer files in this folder (vocab.json, merges.txt) are OpenAI CLIP's byte-pair vocabulary, as
shipped in CompVis/stable-diffusion-v1-4's tokenizer folder, under the MIT License:

MIT License

Copyright (c) 2021 OpenAI

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def versions() -> dict:
    import diffusers
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "numpy": np.__version__, "python": platform.python_version(), "device": "cpu",
            "cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------------------------------------------
# A generic time-budgeted training loop with EMA, checkpoints and resume.


def train_loop(model: torch.nn.Module, loss_fn, args, out: Path, *, ema_decay: float | None) -> dict:
    """Optimise ``loss_fn(step_generator) -> loss`` until ``--steps`` or ``--time-budget``; returns run stats and
    leaves the EMA (or the model, without EMA) in ``model_out``."""
    ckpt = out / "ckpt.pt"
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    ema = copy.deepcopy(model).eval().requires_grad_(False) if ema_decay else None
    gen = torch.Generator().manual_seed(args.seed)
    step, elapsed, rows, loss_avg = 0, 0.0, [], None
    resumed = []
    if args.resume and ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        gen.set_state(state["gen"])
        step, elapsed, rows, loss_avg = state["step"], state["elapsed"], state["rows"], state["loss_avg"]
        resumed = state.get("resumed", []) + [{"step": step, "seconds": round(elapsed)}]
        log(f"resumed at step {step}, {elapsed:.0f}s")
    model.train()
    t0 = time.time() - elapsed
    last_ckpt = time.time()

    def save():
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "ema": ema.state_dict() if ema else None,
                    "gen": gen.get_state(), "step": step, "elapsed": time.time() - t0, "rows": rows,
                    "loss_avg": loss_avg, "resumed": resumed}, ckpt)

    while step < args.steps and time.time() - t0 < args.time_budget:
        lr = lr_at(step, time.time() - t0, lr=args.lr, warmup=args.warmup, budget=args.time_budget,
                   max_steps=args.steps)
        for g in opt.param_groups:
            g["lr"] = lr
        loss = loss_fn(gen)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if ema is not None:
            ema_update(ema, model, step, ema_decay)
        step += 1
        lv = loss.item()
        loss_avg = lv if loss_avg is None else 0.98 * loss_avg + 0.02 * lv
        if step % 50 == 0:
            rows.append({"step": step, "seconds": round(time.time() - t0, 1), "loss_ema": round(loss_avg, 6),
                         "lr": round(lr, 8)})
        if step % 100 == 0:
            log(f"step {step} loss~{loss_avg:.5f} lr {lr:.2e} {time.time() - t0:.0f}s")
        if time.time() - last_ckpt > args.ckpt_every:
            save()
            last_ckpt = time.time()
    save()
    seconds = time.time() - t0
    log(f"trained {step} steps in {seconds:.0f}s, final loss~{loss_avg:.5f}")
    write_log(out / "train_log.csv", rows)
    model.eval()
    return {"steps_done": step, "train_seconds": round(seconds), "final_loss_ema": loss_avg,
            "resumed_at": resumed, "model_out": ema if ema is not None else model}


def common_args(ap: argparse.ArgumentParser, *, lr: float, batch: int, budget: float, ema: float,
                steps: int) -> None:
    ap.add_argument("--data", type=Path, required=True, help="cifar10-jpg.tar.gz or its extracted folder")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=steps, help="optimizer steps (the learning-rate schedule's length)")
    ap.add_argument("--time-budget", type=float, default=budget,
                    help="wall-clock cap on training, seconds (the schedule then decays over the budget's last 25%%)")
    ap.add_argument("--batch-size", type=int, default=batch)
    ap.add_argument("--lr", type=float, default=lr)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--ema", type=float, default=ema)
    ap.add_argument("--ckpt-every", type=float, default=600.0, help="seconds between checkpoints")
    ap.add_argument("--resume", action="store_true", help="continue from --out/ckpt.pt")


def split_args(ap: argparse.ArgumentParser, *, unique: int, exact: str, edited: str, captions: str = "") -> None:
    ap.add_argument("--unique", type=int, default=unique, help="images seen once")
    ap.add_argument("--exact", default=exact, help="count:images,... pixel-identical duplicates")
    ap.add_argument("--edited", default=edited, help="count:images,... duplicates with a small edit per copy")
    if captions:
        ap.add_argument("--captions", default=captions, help="count:imagesxcaptions,... one image, several captions")
    ap.add_argument("--balanced", action=argparse.BooleanOptionalAction, default=False,
                    help="spread each duplicated grade's images evenly over the classes (gt_common.build_split)")
    ap.add_argument("--samples", type=int, default=2000, help="generations to label")
    ap.add_argument("--stage", choices=["all", "train", "sample", "label"], default="all")


def make_split(args, images, names, classes, *, text: bool = False) -> Split:
    return build_split(images, names, classes, seed=args.seed, unique=args.unique, exact=args.exact,
                       edited=args.edited, captions=getattr(args, "captions", ""), text=text,
                       balanced=args.balanced)


def write_grades(out: Path, split: Split) -> None:
    with open(out / "grades.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["train_index", "name", "class", "count", "kind", "grade", "captions"])
        for g in split.grades:
            w.writerow([g.index, g.name, CLASSES[g.cls], g.count, g.kind, g.grade, " | ".join(g.captions)])


def base_recipe(args, split: Split) -> dict:
    flags = {k: v for k, v in vars(args).items() if k != "func"}
    return {"command": " ".join(sys.argv), "flags": flags, "versions": versions(), "split": split.summary(), "training_rows": int(len(split.rows)),
            "distinct_training_images": len(split.grades),
            "augmentation": "none (no flips; edited copies are fixed, pre-generated variants)"}


def update_recipe(out: Path, **fields) -> dict:
    path = out / "recipe.json"
    recipe = json.loads(path.read_text()) if path.is_file() else {}
    recipe.update(fields)
    write_json(path, recipe)
    return recipe


# ----------------------------------------------------------------------------------------------------------------
# The VAE.


def build_vae(latent_channels: int = 8):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 64),
                         layers_per_block=1, latent_channels=latent_channels, norm_num_groups=16, sample_size=32,
                         mid_block_add_attention=False)


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    """Posterior means (unscaled) of uint8 [N,3,32,32]."""
    out = []
    for s in range(0, len(images), batch):
        x = torch.from_numpy(images[s: s + batch]).float() / 127.5 - 1
        out.append(vae.encode(x).latent_dist.mean)
    return torch.cat(out)


@torch.no_grad()
def decode_latents(vae, z: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """uint8 images from unscaled latents."""
    out = []
    for s in range(0, len(z), batch):
        x = vae.decode(z[s: s + batch]).sample
        out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
    return torch.cat(out)


def roundtrip_quality(vae, images: np.ndarray) -> dict:
    from memdetect.bench.labels import paired_correlation

    rec = decode_latents(vae, encode_latents(vae, images))
    x = torch.from_numpy(images)
    corr = paired_correlation(rec, x).numpy()
    mse = ((rec.float() - x.float()) / 255).pow(2).mean(dim=(1, 2, 3))
    psnr = (10 * torch.log10(1 / mse.clamp_min(1e-10))).numpy()
    return {"images": int(len(images)), "pearson_mean": float(corr.mean()), "pearson_median": float(np.median(corr)),
            "pearson_p5": float(np.percentile(corr, 5)), "pearson_p1": float(np.percentile(corr, 1)),
            "fraction_pearson_ge_0.95": float((corr >= 0.95).mean()),
            "fraction_pearson_ge_0.90": float((corr >= 0.90).mean()),
            "psnr_mean_db": float(psnr.mean()), "psnr_median_db": float(np.median(psnr))}


def cmd_vae(args) -> None:
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    images, names, classes = load_cifar_train(args.data)
    data = torch.from_numpy(images)
    vae = build_vae(args.latent_channels)
    n_params = sum(p.numel() for p in vae.parameters())
    log(f"VAE {n_params:,} parameters, {len(images)} training images")

    crop = args.crop

    def loss_fn(gen):
        idx = torch.randint(0, len(data), (args.batch_size,), generator=gen)
        x = data[idx].float() / 127.5 - 1
        if crop < 32:  # one random crop per batch, at a multiple of 4 px so pixels stay aligned with the latent grid
            oy, ox = (int(v) * 4 for v in torch.randint(0, (32 - crop) // 4 + 1, (2,), generator=gen))
            x = x[:, :, oy: oy + crop, ox: ox + crop]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        kl = post.kl().mean() / post.mean[0].numel()
        return F.mse_loss(rec, x) + args.kl_weight * kl

    stats = train_loop(vae, loss_fn, args, out, ema_decay=None)
    vae = stats.pop("model_out")
    rng = np.random.default_rng(args.seed + 10)
    sub = images[rng.choice(len(images), 10000, replace=False)]
    lat = encode_latents(vae, sub)
    scaling = 1.0 / float(lat.std())
    vae.register_to_config(scaling_factor=scaling)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    quality = roundtrip_quality(vae, sub[:5000])
    log(f"scaling_factor {scaling:.5f}; round trip on 5000 training images: {quality}")
    write_json(out / "recipe.json", {
        "flags": {k: v for k, v in vars(args).items() if k != "func"}, "versions": versions(),
        "vae_parameters": n_params, "architecture": dict(vae.config), **stats,
        "scaling_factor": scaling, "latent_mean": float(lat.mean()), "latent_std_unscaled": float(lat.std()),
        "roundtrip_training_images": quality,
        "training_data": f"all 50,000 CIFAR-10 training images, uniform sampling, one random {args.crop} px crop "
                         f"position per batch (offsets multiples of 4), no other augmentation",
        "loss": f"MSE on [-1,1] pixels of a posterior sample's decoding + {args.kl_weight} x mean per-element KL"})


# ----------------------------------------------------------------------------------------------------------------
# EDM (pixel space, our SongUNet with EDM preconditioning).


def build_edm(args):
    from memdetect.models.edm import EDMPrecond

    return EDMPrecond(img_resolution=32, img_channels=3, model_channels=args.channels,
                      channel_mult=[int(c) for c in args.channel_mult.split(",")], num_blocks=4,
                      attn_resolutions=[], dropout=0.0, sigma_data=0.5)


def edm_sample(net, n: int, *, seed: int, steps: int = 18, batch: int = 100) -> tuple[torch.Tensor, list[int]]:
    """The library's EDM sampler (``memdetect.models.edm.sample_heun``: Karras et al.'s deterministic Heun, Algorithm 1,
    S_churn = 0, sigma 0.002..80, rho 7) on the CPU in float32, in batches of ``batch``; sample i uses seed
    ``seed*10**6+i``. The shipped demo-edm samples came from an earlier copy of it here that kept the state in
    float64: this one reproduces them but for rounding (1 pixel of the first 16 samples' 49,152 off by one grey level).
    """
    from memdetect.models.edm import EDMAdapter, sample_heun

    adapter = EDMAdapter(net, device=torch.device("cpu"), dtype=torch.float32)
    out, seeds = [], [seed * 10**6 + k for k in range(n)]
    for s in range(0, n, batch):
        out.append(adapter.decode(sample_heun(adapter, seeds[s: s + batch], steps=steps)[0]))
        log(f"sampled {min(s + batch, n)}/{n}")
    return torch.cat(out), seeds


def cmd_edm(args) -> None:
    from memdetect.models.edm import load_network, save_safetensors

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    images, names, classes = load_cifar_train(args.data)
    split = make_split(args, images, names, classes)
    model_file = out / "model" / "demo-edm.safetensors"
    if args.stage in ("all", "train"):
        write_grades(out, split)
        net = build_edm(args)
        n_params = sum(p.numel() for p in net.parameters())
        log(f"EDM SongUNet {n_params:,} parameters; {len(split.rows)} training rows, {len(split.grades)} distinct")
        write_json(out / "recipe.json", {**base_recipe(args, split), "parameters": n_params,
                                         "architecture": net.init_kwargs, "grade_table": split.table()})
        data = torch.from_numpy(split.row_images)
        p_mean, p_std, sd = args.p_mean, args.p_std, 0.5

        def loss_fn(gen):
            idx = torch.randint(0, len(data), (args.batch_size,), generator=gen)
            y = data[idx].float() / 127.5 - 1
            sigma = (torch.randn(len(y), 1, 1, 1, generator=gen) * p_std + p_mean).exp()
            weight = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
            n = torch.randn(y.shape, generator=gen) * sigma
            d = net(y + n, sigma.flatten())
            return (weight * (d - y) ** 2).mean()

        stats = train_loop(net, loss_fn, args, out, ema_decay=args.ema)
        ema = stats.pop("model_out")
        model_file.parent.mkdir(exist_ok=True)
        save_safetensors(ema, model_file)
        update_recipe(out, **stats, loss="EDM (Karras et al. 2022): P_mean %.1f, P_std %.1f, sigma_data 0.5"
                      % (p_mean, p_std))
    if args.stage in ("all", "sample"):
        net = load_network(model_file)  # the format `--model edm --model-path` loads
        t0 = time.time()
        samples, seeds = edm_sample(net, args.samples, seed=args.seed, steps=args.sample_steps)
        np.savez_compressed(out / "samples.npz", samples=samples.numpy())
        conds = [{"seed": s} for s in seeds]
        write_json(out / "conditions.json", conds)
        update_recipe(out, sampler=f"EDM Heun (Karras Alg. 1, S_churn 0), {args.sample_steps} steps "
                      f"({2 * args.sample_steps - 1} evaluations), sigma 0.002..80, rho 7",
                      sample_seconds=round(time.time() - t0))
    if args.stage in ("all", "sample", "label"):
        label_run(out, split, images)


# ----------------------------------------------------------------------------------------------------------------
# Latent models (demo-sd, demo-dit): the shared VAE, pre-encoded training latents, pipeline folders in fp16.


def load_vae(path: Path):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(path / "vae" if (path / "vae").is_dir() else path).eval().requires_grad_(False)


def row_latents(vae, split: Split) -> torch.Tensor:
    """Scaled posterior means of every training row (edited copies encoded one by one)."""
    return encode_latents(vae, split.row_images) * float(vae.config.scaling_factor)


def save_fp16(module, folder: Path) -> None:
    """save_pretrained with fp16 tensors (diffusers loads them back into float32 modules by default)."""
    module = copy.deepcopy(module).half()
    module.save_pretrained(folder, safe_serialization=True)


def sd_scheduler_config() -> dict:
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def dit_scheduler_config() -> dict:
    return dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=0)


def eps_loss_fn(model, latents: torch.Tensor, cond_of, args, alphas_cumprod: torch.Tensor):
    """Epsilon-prediction DDPM loss on random rows; ``cond_of(idx, gen) -> kwargs`` gives the condition."""

    def loss_fn(gen):
        idx = torch.randint(0, len(latents), (args.batch_size,), generator=gen)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (len(idx),), generator=gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = model(xt, t, **cond_of(idx, gen)).sample
        return F.mse_loss(pred[:, : x0.shape[1]], noise)

    return loss_fn


def to_uint8(images: np.ndarray) -> torch.Tensor:
    """float [N,H,W,3] in [0,1] (a pipeline's ``output_type="np"``) -> uint8 [N,3,H,W]."""
    return torch.from_numpy((np.clip(images, 0, 1) * 255).round().astype(np.uint8)).permute(0, 3, 1, 2).contiguous()


# -- demo-sd --------------------------------------------------------------------------------------------------------


def build_text_encoder(seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
                         projection_dim=32, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    # Rounded to fp16 values now, so the fp16 copy that ships is exactly the encoder the UNet was trained with.
    return CLIPTextModel(cfg).half().float().eval().requires_grad_(False)


def save_text_encoder_fp16(text_encoder, folder: Path) -> None:
    """fp16 tensors with ``dtype: float32`` in config.json: transformers loads them back into float32."""
    te = copy.deepcopy(text_encoder).half()
    te.save_pretrained(folder, safe_serialization=True)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["dtype"] = "float32"
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


def build_sd_unet(args, latent_channels: int):
    from diffusers import UNet2DConditionModel

    ch = tuple(int(c) for c in args.channels.split(","))
    return UNet2DConditionModel(
        sample_size=8, in_channels=latent_channels, out_channels=latent_channels, layers_per_block=2,
        block_out_channels=ch, down_block_types=("CrossAttnDownBlock2D",) * (len(ch) - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(ch) - 1), cross_attention_dim=32,
        attention_head_dim=4, norm_num_groups=32)


@torch.no_grad()
def embed_prompts(tokenizer, text_encoder, prompts: list[str], batch: int = 256) -> torch.Tensor:
    out = []
    for s in range(0, len(prompts), batch):
        ids = tokenizer(prompts[s: s + batch], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        out.append(text_encoder(ids)[0])
    return torch.cat(out)


def sd_prompt_plan(split: Split, args) -> list[dict]:
    """Generations to make: K per memorized prompt (every duplicated image's caption(s)) and K per normal prompt."""
    plan = []
    for g in split.grades:
        if g.kind == "unique":
            continue
        for cap in g.captions:
            plan += [{"prompt": cap, "prompt_source": "memorized", "prompt_train": g.name, "prompt_grade": g.grade}
                     for _ in range(args.per_memorized_prompt)]
    for p in normal_prompts():
        plan += [{"prompt": p, "prompt_source": "normal", "prompt_train": "", "prompt_grade": ""}
                 for _ in range(args.per_normal_prompt)]
    return plan


def write_prompt_lists(out: Path, split: Split) -> None:
    with open(out / "memorized_prompts.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "train_image", "class", "count", "kind", "grade", "captions_of_image"])
        for g in split.grades:
            if g.kind != "unique":
                for cap in g.captions:
                    w.writerow([cap, g.name, CLASSES[g.cls], g.count, g.kind, g.grade, len(g.captions)])
    with open(out / "normal_prompts.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "class"])
        for c in CLASSES:
            for t in __import__("gt_common").NORMAL_TEMPLATES:
                w.writerow([t.format(c), c])


def cmd_sd(args) -> None:
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    images, names, classes = load_cifar_train(args.data)
    split = make_split(args, images, names, classes, text=True)
    model_dir = out / "model"
    if args.stage in ("all", "train"):
        write_grades(out, split)
        write_prompt_lists(out, split)
        vae = load_vae(args.vae)
        tok_dir = out / "tokenizer-src"
        shutil.copytree(args.tokenizer, tok_dir, dirs_exist_ok=True)
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
        text_encoder = build_text_encoder(args.seed)
        unet = build_sd_unet(args, vae.config.latent_channels)
        n_params = sum(p.numel() for p in unet.parameters())
        captions = sorted(set(split.row_captions) | {""})
        cap_index = {c: i for i, c in enumerate(captions)}
        table = embed_prompts(tokenizer, text_encoder, captions)
        row_cap = torch.tensor([cap_index[c] for c in split.row_captions])
        empty = cap_index[""]
        t0 = time.time()
        latents = row_latents(vae, split)
        log(f"SD UNet {n_params:,} parameters; {len(split.rows)} rows, {len(split.grades)} distinct, "
            f"{len(captions)} captions; latents {tuple(latents.shape[1:])} in {time.time() - t0:.0f}s")
        write_json(out / "recipe.json", {**base_recipe(args, split), "unet_parameters": n_params,
                                         "text_encoder_parameters": sum(p.numel() for p in text_encoder.parameters()),
                                         "vae_recipe": json.loads((args.vae / "recipe.json").read_text()),
                                         "unet_architecture": dict(unet.config),
                                         "text_encoder_architecture": text_encoder.config.to_dict(),
                                         "grade_table": split.table()})
        sched = DDPMScheduler(**{k: v for k, v in sd_scheduler_config().items()
                                 if k not in ("set_alpha_to_one", "steps_offset")})

        def cond_of(idx, gen):
            c = row_cap[idx].clone()
            c[torch.rand(len(idx), generator=gen) < args.caption_dropout] = empty
            return {"encoder_hidden_states": table[c]}

        stats = train_loop(unet, eps_loss_fn(unet, latents, cond_of, args, sched.alphas_cumprod), args, out,
                           ema_decay=args.ema)
        ema = stats.pop("model_out")
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=ema,
                                       scheduler=DDIMScheduler(**sd_scheduler_config()), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(model_dir, safe_serialization=True)
        shutil.rmtree(model_dir / "tokenizer")  # ship the original CLIP files (vocab.json, merges.txt), not a rewrite
        shutil.copytree(tok_dir, model_dir / "tokenizer")
        (model_dir / "tokenizer" / "LICENSE").write_text(CLIP_LICENSE)
        save_fp16(ema, model_dir / "unet")
        save_fp16(vae, model_dir / "vae")
        save_text_encoder_fp16(text_encoder, model_dir / "text_encoder")
        update_recipe(out, **stats, caption_dropout=args.caption_dropout,
                      storage="weights in fp16 (from_pretrained loads them into float32; the text encoder's "
                              "random weights were rounded to fp16 values before training)")
    if args.stage in ("all", "sample"):
        pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        plan = sd_prompt_plan(split, args)
        conds = [{"seed": args.seed * 10**6 + i, **p} for i, p in enumerate(plan)]
        t0 = time.time()
        samples = []
        for s in range(0, len(conds), args.sample_batch):
            chunk = conds[s: s + args.sample_batch]
            res = pipe([c["prompt"] for c in chunk], num_inference_steps=args.sample_steps,
                       guidance_scale=args.guidance, eta=0.0, output_type="np",
                       generator=[torch.Generator().manual_seed(c["seed"]) for c in chunk])
            samples.append(to_uint8(res.images))
            log(f"sampled {min(s + args.sample_batch, len(conds))}/{len(conds)}")
        np.savez_compressed(out / "samples.npz", samples=torch.cat(samples).numpy())
        write_json(out / "conditions.json", conds)
        update_recipe(out, sampler=f"StableDiffusionPipeline, DDIM {args.sample_steps} steps, eta 0, guidance "
                      f"{args.guidance}; {args.per_memorized_prompt} per memorized prompt, {args.per_normal_prompt} "
                      f"per normal prompt", sample_seconds=round(time.time() - t0))
    if args.stage in ("all", "sample", "label"):
        label_run(out, split, images)


# -- demo-dit -------------------------------------------------------------------------------------------------------


def build_dit(args, latent_channels: int):
    from diffusers import DiTTransformer2DModel

    if args.depth % 2:
        raise ValueError("--depth must be even (the adapter reads the middle block, depth / 2 - 1)")
    return DiTTransformer2DModel(num_attention_heads=args.width // 64, attention_head_dim=64,
                                 in_channels=latent_channels, out_channels=latent_channels, num_layers=args.depth,
                                 sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_type="ada_norm_zero",
                                 norm_elementwise_affine=False, dropout=0.0)


@torch.no_grad()
def dit_sample(pipe, labels: list[int], seeds: list[int], *, steps: int, guidance: float) -> torch.Tensor:
    """DDIM (eta 0) with classifier-free guidance against the null class ``num_embeds_ada_norm``, using the
    pipeline's components. (``DiTPipeline.__call__`` hard-codes ImageNet's null class 1000.)"""
    from diffusers import DDIMScheduler

    model, vae = pipe.transformer, pipe.vae
    c, r = model.config.in_channels, model.config.sample_size
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    x = torch.stack([torch.randn(c, r, r, generator=torch.Generator().manual_seed(s)) for s in seeds])
    y = torch.tensor(labels)
    null = torch.full_like(y, int(model.config.num_embeds_ada_norm))
    for t in sched.timesteps:
        tt = torch.full((2 * len(x),), int(t))
        eps = model(torch.cat([x, x]), timestep=tt, class_labels=torch.cat([y, null])).sample[:, :c]
        cond, uncond = eps.chunk(2)
        x = sched.step(uncond + guidance * (cond - uncond), t, x, eta=0.0).prev_sample
    img = vae.decode(x / vae.config.scaling_factor).sample
    return ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def cmd_dit(args) -> None:
    from diffusers import DDIMScheduler, DDPMScheduler, DiTPipeline

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    images, names, classes = load_cifar_train(args.data)
    split = make_split(args, images, names, classes)
    model_dir = out / "model"
    if args.stage in ("all", "train"):
        write_grades(out, split)
        vae = load_vae(args.vae)
        model = build_dit(args, vae.config.latent_channels)
        n_params = sum(p.numel() for p in model.parameters())
        latents = row_latents(vae, split)
        row_cls = torch.tensor([split.grades[r].cls for r in split.rows])
        log(f"DiT {n_params:,} parameters; {len(split.rows)} rows, {len(split.grades)} distinct; "
            f"latents {tuple(latents.shape[1:])}")
        write_json(out / "recipe.json", {**base_recipe(args, split), "transformer_parameters": n_params,
                                         "vae_recipe": json.loads((args.vae / "recipe.json").read_text()),
                                         "architecture": dict(model.config), "grade_table": split.table()})
        sched = DDPMScheduler(**{k: v for k, v in dit_scheduler_config().items()
                                 if k not in ("set_alpha_to_one", "steps_offset")})

        def cond_of(idx, gen):
            y = row_cls[idx].clone()
            y[torch.rand(len(idx), generator=gen) < args.class_dropout] = 10  # the null class (CFG)
            return {"class_labels": y}

        for blk in model.transformer_blocks:  # class dropout is done (seeded) in cond_of
            blk.norm1.emb.class_embedder.dropout_prob = 0.0

        class Wrapped(torch.nn.Module):  # the loss calls model(x, t, **cond)
            def __init__(self):
                super().__init__()
                self.m = model

            def forward(self, xt, t, class_labels):
                return self.m(xt, timestep=t, class_labels=class_labels)

        w = Wrapped()
        stats = train_loop(w, eps_loss_fn(w, latents, cond_of, args, sched.alphas_cumprod), args, out,
                           ema_decay=args.ema)
        ema = stats.pop("model_out").m
        for blk in ema.transformer_blocks:
            blk.norm1.emb.class_embedder.dropout_prob = args.class_dropout  # as in DiT's config (inactive in eval)
        pipe = DiTPipeline(transformer=ema, vae=vae, scheduler=DDIMScheduler(**dit_scheduler_config()),
                           id2label={i: c for i, c in enumerate(CLASSES)})
        pipe.save_pretrained(model_dir, safe_serialization=True)
        save_fp16(ema, model_dir / "transformer")
        save_fp16(vae, model_dir / "vae")
        update_recipe(out, **stats, class_dropout=args.class_dropout,
                      storage="transformer and vae weights in fp16 (loaded into float32 by from_pretrained)")
    if args.stage in ("all", "sample"):
        pipe = DiTPipeline.from_pretrained(model_dir)
        per = args.samples // 10
        conds = [{"seed": args.seed * 10**6 + i, "class": CLASSES[i // per]} for i in range(per * 10)]
        t0 = time.time()
        samples = []
        for s in range(0, len(conds), args.sample_batch):
            chunk = conds[s: s + args.sample_batch]
            samples.append(dit_sample(pipe, [CLASSES.index(c["class"]) for c in chunk], [c["seed"] for c in chunk],
                                      steps=args.sample_steps, guidance=args.guidance))
            log(f"sampled {min(s + args.sample_batch, len(conds))}/{len(conds)}")
        np.savez_compressed(out / "samples.npz", samples=torch.cat(samples).numpy())
        write_json(out / "conditions.json", conds)
        update_recipe(out, sampler=f"DDIM {args.sample_steps} steps, eta 0, classifier-free guidance "
                      f"{args.guidance} against the null class 10 (dit_sample: DiTPipeline's own loop hard-codes "
                      f"ImageNet's null class 1000), {per} per class", sample_seconds=round(time.time() - t0))
    if args.stage in ("all", "sample", "label"):
        label_run(out, split, images)


# ----------------------------------------------------------------------------------------------------------------
# Labelling (shared by every model).


#: How labels compare a generation with a training image (``nearest_match``'s ``colour``): the shipped labels use
#: "cast", flip-, shift- and colour-cast-invariant (see benchmarks/RESULTS.md, "Colour-cast-invariant labels");
#: "rgb" is the rule shipped until 2026-12-03 (benchmarks/colour_labels.py rebuilds it).
LABEL_SIMILARITY = {
    "cast": "max over horizontal flip and shifts of up to 2 px, and over RGB vs per-channel (colour-cast invariant) "
            "correlation, of the pixel correlation to the nearest distinct training image "
            "(memdetect.bench.labels.nearest_match, colour='cast')",
    "rgb": "max over horizontal flip and shifts of up to 2 px of the pixel correlation to the nearest distinct "
           "training image (memdetect.bench.labels.nearest_match)",
}


def label_run(out: Path, split: Split, images: np.ndarray) -> None:
    samples = torch.from_numpy(np.load(out / "samples.npz")["samples"])
    conds = json.loads((out / "conditions.json").read_text())
    write_labels(out, split.grades, samples, conds, images)


def write_labels(out: Path, grades: list[Grade], samples: torch.Tensor, conds: list[dict], images: np.ndarray,
                 colour: str = "cast") -> None:
    """manifest.csv (one row per generation: its condition, similarity, label and nearest training image) and the
    recipe's ``labels`` block. ``similarity`` is the labelling one (``LABEL_SIMILARITY[colour]``); ``similarity_rgb``
    the flip- and shift-invariant RGB correlation alone, ``similarity_plain`` the correlation without any
    invariance."""
    from memdetect.bench.labels import LabelRule, nearest_match

    t0 = time.time()
    train = torch.from_numpy(images[[g.index for g in grades]])
    m = nearest_match(samples, train, colour=colour)
    rgb = m if colour == "rgb" else nearest_match(samples, train)
    plain = nearest_match(samples, train, max_shift=0, flip=False)
    rule = LabelRule()
    extra = sorted({k for c in conds for k in c} - {"seed"})
    cols = ["sample", "seed", *extra, "similarity", "label", "nearest_train", "nearest_index", "nearest_grade",
            "nearest_count", "nearest_kind", "nearest_class", "flipped", "shift_dy", "shift_dx", "similarity_rgb",
            "similarity_plain"]
    counts: dict[str, dict[str, int]] = {}
    with open(out / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for i in range(len(samples)):
            g = grades[int(m.index[i])]
            lab = rule.label(float(m.similarity[i]))
            counts.setdefault(g.grade, {"memorized": 0, "generalized": 0, "excluded": 0})[lab] += 1
            w.writerow({"sample": i, **conds[i], "similarity": f"{float(m.similarity[i]):.5f}", "label": lab,
                        "nearest_train": g.name, "nearest_index": g.index, "nearest_grade": g.grade,
                        "nearest_count": g.count, "nearest_kind": g.kind, "nearest_class": CLASSES[g.cls],
                        "flipped": int(m.flipped[i]), "shift_dy": int(m.dy[i]), "shift_dx": int(m.dx[i]),
                        "similarity_rgb": f"{float(rgb.similarity[i]):.5f}",
                        "similarity_plain": f"{float(plain.similarity[i]):.5f}"})
    kind_count = {g.grade: (g.kind, g.count) for g in grades}
    order = sorted(counts, key=lambda k: (k != "unique", *kind_count[k]))
    per_grade = {k: counts[k] for k in order}
    totals = {lab: sum(c[lab] for c in counts.values()) for lab in ("memorized", "generalized", "excluded")}
    update_recipe(out, labels={"rule": f"memorized >= {rule.memorized_at}, generalized < {rule.generalized_below}",
                               "similarity": LABEL_SIMILARITY[colour], "totals": totals,
                               "per_nearest_grade": per_grade,
                               "seconds": round(time.time() - t0)})
    log(f"labels: {totals}")
    for k in order:
        log(f"  {k:14s} {counts[k]}")


def relabel_folder(folder: Path, images: np.ndarray, names: list[str], colour: str = "cast") -> None:
    """Label a bench folder's generations again (``write_labels``) from its grades.csv and the CIFAR-10 training
    images (``images``, ``names``: ``load_cifar_train``'s); every column before ``similarity`` (the generation's
    condition) is kept as it was."""
    import pandas as pd

    man = pd.read_csv(folder / "manifest.csv", keep_default_na=False)
    table = pd.read_csv(folder / "grades.csv", keep_default_na=False)
    if [names[i] for i in table["train_index"]] != table["name"].tolist():
        raise SystemExit(f"{folder / 'grades.csv'} does not match the CIFAR-10 training images")
    grades = [Grade(index=int(r["train_index"]), name=r["name"], cls=CLASSES.index(r["class"]), count=int(r["count"]),
                    kind=r["kind"]) for _, r in table.iterrows()]
    cond_cols = list(man.columns[1:list(man.columns).index("similarity")])
    conds = [{c: (int(v) if c in ("seed", "class_index") else v) for c, v in zip(cond_cols, row)}
             for row in man[cond_cols].itertuples(index=False)]
    samples = torch.from_numpy(np.load(folder / "samples.npz")["samples"])
    write_labels(folder, grades, samples, conds, images, colour=colour)


def cmd_relabel(args) -> None:
    """``relabel_folder`` on a shipped bench folder, then redraw examples/<model> if a label moved under one."""
    import pandas as pd

    folder = args.folder
    images, names, _ = load_cifar_train(args.data)
    relabel_folder(folder, images, names)
    if args.examples:  # examples/<model> are redrawn only when one of them no longer carries the label its name says
        model_name = next(name for name, bench in SHIP.values() if bench == folder.name)
        labels = pd.read_csv(folder / "manifest.csv")["label"]
        files = sorted((REPO / "examples" / model_name).glob("*_*.png"))
        stale = [f.name for f in files
                 if labels[int(f.stem.split("_")[1])] != ("memorized" if f.name.startswith("mem_") else "generalized")]
        if stale or not files:
            log(f"examples/{model_name}: {', '.join(stale) or 'none'} no longer labelled as named; redrawing")
            write_examples(model_name, folder, args.examples)


# ----------------------------------------------------------------------------------------------------------------
# Shipping: copy a finished run into the package (memdetect/data) and write its example images.

SHIP = {  # run kind -> (model folder name, bench folder name)
    "sd": ("demo-sd", "demo_sd_bench"),
    "dit": ("demo-dit", "demo_dit_bench"),
    "edm": ("demo-edm", "demo_edm_bench"),
}
BENCH_FILES = ["samples.npz", "manifest.csv", "recipe.json", "train_log.csv", "grades.csv"]


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def cmd_ship(args) -> None:
    import pandas as pd

    run = args.run
    recipe = json.loads((run / "recipe.json").read_text())
    kind = recipe["flags"]["cmd"]
    model_name, bench_name = SHIP[kind]
    data = REPO / "memdetect" / "data"
    model_dst, bench_dst = data / model_name, data / bench_name
    for d in (model_dst, bench_dst):
        if d.exists():
            shutil.rmtree(d)
    shutil.copytree(run / "model", model_dst)
    if kind == "sd":
        for name in ("memorized_prompts.csv", "normal_prompts.csv"):
            shutil.copy2(run / name, model_dst / name)
    bench_dst.mkdir(parents=True)
    for name in BENCH_FILES:
        shutil.copy2(run / name, bench_dst / name)
    man = pd.read_csv(bench_dst / "manifest.csv")
    if "class" in man.columns and "class_index" not in man.columns:
        # the class label each generation was sampled with, as the model takes it (``bench demo`` reads it)
        man.insert(list(man.columns).index("class") + 1, "class_index", [CLASSES.index(c) for c in man["class"]])
        man.to_csv(bench_dst / "manifest.csv", index=False)
    size = folder_bytes(model_dst)
    if size > 20e6:
        raise SystemExit(f"{model_dst} is {size / 1e6:.1f} MB, over the 20 MB limit")
    total = folder_bytes(data)
    log(f"shipped {model_dst} ({size / 1e6:.1f} MB) and {bench_dst} ({folder_bytes(bench_dst) / 1e6:.1f} MB); "
        f"memdetect/data is {total / 1e6:.1f} MB")
    if total > 100e6:  # issue 31: package data stays <= 100 MB in all
        raise SystemExit(f"memdetect/data is {total / 1e6:.1f} MB, over the 100 MB limit")

    write_examples(model_name, run, args.examples)


def write_examples(model_name: str, folder: Path, n: int) -> None:
    """examples/<model>: the most similar memorized samples (spread over grades) and a seeded draw of generalized
    ones, from ``folder``'s manifest.csv and samples.npz."""
    import pandas as pd
    from PIL import Image

    m = pd.read_csv(folder / "manifest.csv")
    samples = np.load(folder / "samples.npz")["samples"]
    ex = REPO / "examples" / model_name
    if ex.exists():
        shutil.rmtree(ex)
    ex.mkdir(parents=True)
    mem = m[m["label"] == "memorized"].sort_values("similarity", ascending=False)
    mem = mem.groupby("nearest_train", sort=False).head(1)  # distinct training images first
    mem = mem.sort_values(["nearest_count", "similarity"], ascending=[True, False]).head(n)
    gen = m[m["label"] == "generalized"].sample(n=n, random_state=0)
    for prefix, rows in (("mem", mem), ("gen", gen)):
        for i in rows["sample"]:
            Image.fromarray(samples[int(i)].transpose(1, 2, 0)).save(ex / f"{prefix}_{int(i):04d}.png")
    log(f"wrote {len(mem)} mem_*.png and {len(gen)} gen_*.png to {ex}")


# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("vae", help="train the shared AutoencoderKL")
    common_args(p, lr=1e-3, batch=64, budget=7200, ema=0.0, steps=3000)
    p.add_argument("--kl-weight", type=float, default=1e-5)
    p.add_argument("--latent-channels", type=int, default=8,
                   help="8x8xC latents (tried: 8 channels, 3000 steps: round-trip Pearson median 0.972, PSNR 26.4 dB; "
                        "16 channels, 2400 steps: median 0.970, PSNR 26.0 dB; the conv layers limit, not C)")
    p.add_argument("--crop", type=int, default=16, help="train on random crops of this size (the VAE is fully "
                   "convolutional: 16 px crops cost a quarter of full images); 32 = full images")
    p.set_defaults(func=cmd_vae)

    p = sub.add_parser("edm", help="train demo-edm (SongUNet + EDMPrecond, pixels)")
    common_args(p, lr=1e-3, batch=32, budget=14400, ema=0.999, steps=4000)
    split_args(p, unique=2000, exact="2:16,4:16,8:16,16:12,64:6,256:3", edited="16:8,64:4")
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--channel-mult", default="1,2,4")
    p.add_argument("--p-mean", type=float, default=-1.2)
    p.add_argument("--p-std", type=float, default=1.2)
    p.add_argument("--sample-steps", type=int, default=18)
    p.set_defaults(func=cmd_edm)

    p = sub.add_parser("sd", help="train demo-sd (StableDiffusionPipeline in miniature)")
    common_args(p, lr=1e-3, batch=32, budget=14400, ema=0.999, steps=3500)
    split_args(p, unique=1500, exact="2:16,4:16,8:16,16:12,64:6,256:3", edited="16:8,64:4", captions="64:4x8")
    p.add_argument("--vae", type=Path, required=True, help="the `vae` command's --out folder")
    p.add_argument("--tokenizer", type=Path, default=SD_TOKENIZER, help="the CLIP tokenizer files (SD1.4's)")
    p.add_argument("--channels", default="64,128")
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--per-memorized-prompt", type=int, default=10)
    p.add_argument("--per-normal-prompt", type=int, default=15)
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--sample-batch", type=int, default=100)
    p.set_defaults(func=cmd_sd)

    p = sub.add_parser("dit", help="train demo-dit (DiTPipeline in miniature)")
    common_args(p, lr=1e-3, batch=32, budget=14400, ema=0.999, steps=10000)
    split_args(p, unique=1500, exact="2:16,4:16,8:16,16:12,64:6,256:3", edited="16:8,64:4")
    p.add_argument("--vae", type=Path, required=True, help="the `vae` command's --out folder")
    p.add_argument("--width", type=int, default=192, help="hidden size (heads of 64)")
    p.add_argument("--depth", type=int, default=8, help="transformer blocks (even)")
    p.add_argument("--class-dropout", type=float, default=0.1)
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--sample-batch", type=int, default=100)
    p.set_defaults(func=cmd_dit)

    p = sub.add_parser("relabel", help="label a shipped bench folder's generations again (write_labels)")
    p.add_argument("folder", type=Path, help="e.g. memdetect/data/demo_sd_bench")
    p.add_argument("--data", type=Path, required=True, help="the CIFAR-10 training images (folder or .tar.gz)")
    p.add_argument("--examples", type=int, default=10, help="memorized and generalized PNGs each, when "
                   "examples/<model> must be redrawn (0: leave examples/ alone)")
    p.set_defaults(func=cmd_relabel)

    p = sub.add_parser("ship", help="copy a finished run into memdetect/data and examples/")
    p.add_argument("run", type=Path, help="a run's --out folder")
    p.add_argument("--examples", type=int, default=10, help="memorized and generalized PNGs each")
    p.set_defaults(func=cmd_ship)

    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    args.func(args)


if __name__ == "__main__":
    main()
