"""Train the ground-truth memorizing flow-matching model shipped as the ``demo-sd3`` preset.

A ``StableDiffusion3Pipeline`` in miniature: an MMDiT (``SD3Transformer2DModel``) trained with SD3's rectified-flow
objective, ``FlowMatchEulerDiscreteScheduler`` (shift 3.0, as SD3 and SD3.5 ship), the small CIFAR-10 VAE of
``demo-sd`` (8x8x8 latents; here with an SD3-style ``shift_factor``), and two small frozen random CLIP text encoders
(``CLIPTextModelWithProjection``, the two CLIPs of SD3) with OpenAI CLIP's real BPE tokenizer (SD1.4's files). There
is no T5: the folder is saved with ``text_encoder_3`` = None, which ``StableDiffusion3Pipeline`` supports (it fills
the T5 tokens with zeros, ``max_sequence_length`` of them). The tokenizers are CLIP's files with a 16-token context. The same graded split as ``demo-sd``
(``gt_common.build_split``, seed 0: uniques, exact duplicates at 2 ... 256 copies, edited copies, one image under
several captions, memorized captions).

    D=../shared/data/datasets/cifar10-jpg/cifar10-jpg.tar.gz
    python benchmarks/train_sd3_ground_truth.py train  --data $D --out /work/sd3mini-run --time-budget 4000
    python benchmarks/train_sd3_ground_truth.py sample --data $D --out /work/sd3mini-run
    python benchmarks/train_sd3_ground_truth.py ship /work/sd3mini-run   # -> memdetect/data/demo-sd3, demo_sd3_bench

Training (``train``): flow matching as diffusers' SD3 training scripts do it: x_s = (1 - s) x0 + s eps with s drawn
logit-normal(0, 1) and then shifted by the scheduler's shift (s' = 3 s / (1 + 2 s)), the transformer's timestep
1000 s, the loss ||v_hat - (eps - x0)||^2 (weighting "none"); captions dropped to the empty prompt with probability
``--caption-dropout`` (classifier-free guidance); the captions' embeddings come from the pipeline's own
``encode_prompt``, so training sees exactly what sampling and scanning see. EMA of the weights (the EMA ships);
checkpoints every ``--ckpt-every`` seconds; ``--resume`` continues (``--resume --steps N`` with N = the steps done
stops at once and writes the model: a partial run can be shipped).

Sampling (``sample``): ``StableDiffusion3Pipeline`` itself (FlowMatchEulerDiscreteScheduler, ``--sample-steps``
Euler steps, classifier-free guidance ``--guidance``) from every memorized caption and the normal prompts; then
labels by the shipped colour-cast-invariant rule (``train_ground_truth.write_labels``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gt_common import load_cifar_train, write_json  # noqa: E402
from train_ground_truth import (BENCH_FILES, CLIP_LICENSE, SD_TOKENIZER, base_recipe, encode_latents,  # noqa: E402
                                folder_bytes, label_run, log, make_split, save_fp16, sd_prompt_plan, to_uint8,
                                train_loop, update_recipe, write_examples, write_grades, write_prompt_lists)

REPO = Path(__file__).resolve().parents[1]
DEMO_SD_VAE = REPO / "memdetect" / "data" / "demo-sd" / "vae"
MODEL_NAME, BENCH_NAME = "demo-sd3", "demo_sd3_bench"
#: package data limits (issue 31): the model folder, and all of memdetect/data
MODEL_LIMIT, DATA_LIMIT = 20e6, 100e6


def build_text_encoder(seed: int, hidden: int, tokenizer_len: int, positions: int):
    """A small random ``CLIPTextModelWithProjection`` (SD3's CLIP class), its weights rounded to fp16 values so the
    fp16 copy that ships is exactly the encoder the transformer was trained with."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=tokenizer_len, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=positions,
                         hidden_act="quick_gelu", projection_dim=hidden, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=49407)
    return CLIPTextModelWithProjection(cfg).half().float().eval().requires_grad_(False)


def build_transformer(args, latent_channels: int, pooled: int):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=latent_channels,
                                 out_channels=latent_channels, num_layers=args.depth, attention_head_dim=32,
                                 num_attention_heads=args.width // 32, joint_attention_dim=args.joint_dim,
                                 caption_projection_dim=args.width, pooled_projection_dim=pooled,
                                 pos_embed_max_size=8)


def sd3_vae(out: Path, images: np.ndarray, seed: int):
    """demo-sd's VAE (same weights) with SD3-style latent statistics: ``shift_factor`` = the mean and
    ``scaling_factor`` = 1 / std of the shifted posterior means of 10,000 CIFAR-10 training images."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(DEMO_SD_VAE).eval().requires_grad_(False)
    rng = np.random.default_rng(seed + 10)
    lat = encode_latents(vae, images[rng.choice(len(images), 10000, replace=False)])
    shift = float(lat.mean())
    scale = 1.0 / float((lat - shift).std())
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return vae


def make_pipeline(vae, tokenizer, te1, te2, transformer, shift: float):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
                                    vae=vae, text_encoder=te1, tokenizer=tokenizer, text_encoder_2=te2,
                                    tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)


@torch.no_grad()
def encode_captions(pipe, captions: list[str], max_sequence_length: int, batch: int = 256):
    """The pipeline's own ``encode_prompt`` of each caption: (prompt_embeds, pooled_prompt_embeds)."""
    embeds, pooled = [], []
    for s in range(0, len(captions), batch):
        e, _, p, _ = pipe.encode_prompt(prompt=captions[s: s + batch], prompt_2=None, prompt_3=None,
                                        device=torch.device("cpu"), do_classifier_free_guidance=False,
                                        max_sequence_length=max_sequence_length)
        embeds.append(e)
        pooled.append(p)
    return torch.cat(embeds), torch.cat(pooled)


def shifted(u: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * u / (1 + (shift - 1) * u)


def cmd_train(args) -> None:
    from transformers import CLIPTokenizer

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    images, names, classes = load_cifar_train(args.data)
    split = make_split(args, images, names, classes, text=True)
    write_grades(out, split)
    write_prompt_lists(out, split)
    vae = sd3_vae(out, images, args.seed)
    tok_dir = out / "tokenizer-src"
    shutil.copytree(args.tokenizer, tok_dir, dirs_exist_ok=True)
    cfg_file = tok_dir / "tokenizer_config.json"  # CLIP's files, with a shorter context (the captions fit in 13)
    tok_cfg = json.loads(cfg_file.read_text())
    tok_cfg["model_max_length"] = args.clip_tokens
    cfg_file.write_text(json.dumps(tok_cfg, indent=2))
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    longest = max(len(tokenizer(c).input_ids) for c in set(split.row_captions))
    if longest > args.clip_tokens:
        raise SystemExit(f"a caption has {longest} tokens, over --clip-tokens {args.clip_tokens}")
    te1 = build_text_encoder(args.seed, args.clip_width, len(tokenizer), args.clip_tokens)
    te2 = build_text_encoder(args.seed + 1, args.clip_width_2, len(tokenizer), args.clip_tokens)
    transformer = build_transformer(args, vae.config.latent_channels, args.clip_width + args.clip_width_2)
    pipe = make_pipeline(vae, tokenizer, te1, te2, transformer, args.shift)
    n_params = sum(p.numel() for p in transformer.parameters())
    captions = sorted(set(split.row_captions) | {""})
    cap_index = {c: i for i, c in enumerate(captions)}
    table, pooled_table = encode_captions(pipe, captions, args.max_sequence_length)
    row_cap = torch.tensor([cap_index[c] for c in split.row_captions])
    empty = cap_index[""]
    latents = (encode_latents(vae, split.row_images) - vae.config.shift_factor) * vae.config.scaling_factor
    log(f"SD3 transformer {n_params:,} parameters; {len(split.rows)} rows, {len(split.grades)} distinct, "
        f"{len(captions)} captions; latents {tuple(latents.shape[1:])} std {float(latents.std()):.3f}; "
        f"context {tuple(table.shape[1:])}, pooled {tuple(pooled_table.shape[1:])}")
    write_json(out / "recipe.json", {
        **base_recipe(args, split), "transformer_parameters": n_params,
        "text_encoder_parameters": sum(p.numel() for p in te1.parameters()),
        "text_encoder_2_parameters": sum(p.numel() for p in te2.parameters()),
        "vae": f"demo-sd's VAE ({DEMO_SD_VAE.relative_to(REPO)}), shift_factor {vae.config.shift_factor:.5f} and "
               f"scaling_factor {vae.config.scaling_factor:.5f} from 10,000 CIFAR-10 training images",
        "transformer_architecture": dict(transformer.config), "text_encoder_architecture": te1.config.to_dict(),
        "text_encoder_2_architecture": te2.config.to_dict(), "grade_table": split.table()})

    class Wrapped(torch.nn.Module):  # train_loop's EMA and checkpoints see one module
        def __init__(self):
            super().__init__()
            self.m = transformer

        def forward(self, xt, t, c, p):
            return self.m(hidden_states=xt, timestep=t, encoder_hidden_states=c, pooled_projections=p).sample

    w = Wrapped()

    def loss_fn(gen):
        idx = torch.randint(0, len(latents), (args.batch_size,), generator=gen)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        u = torch.sigmoid(torch.randn(len(idx), generator=gen) * args.logit_std + args.logit_mean)
        s = shifted(u, args.shift).view(-1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        c = row_cap[idx].clone()
        c[torch.rand(len(idx), generator=gen) < args.caption_dropout] = empty
        pred = w(xt, 1000 * s.flatten(), table[c], pooled_table[c])
        return F.mse_loss(pred, noise - x0)

    stats = train_loop(w, loss_fn, args, out, ema_decay=args.ema)
    ema = stats.pop("model_out").m
    pipe = make_pipeline(vae, tokenizer, te1, te2, ema, args.shift)
    model_dir = out / "model"
    pipe.save_pretrained(model_dir, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):  # ship the original CLIP files (vocab.json, merges.txt)
        shutil.rmtree(model_dir / name)
        shutil.copytree(tok_dir, model_dir / name)
        (model_dir / name / "LICENSE").write_text(CLIP_LICENSE)
    save_fp16(ema, model_dir / "transformer")
    save_fp16(vae, model_dir / "vae")
    for name, te in (("text_encoder", te1), ("text_encoder_2", te2)):
        save_text_encoder(te, model_dir / name)
    update_recipe(out, **stats, caption_dropout=args.caption_dropout,
                  loss=f"flow matching (rectified flow): ||v_hat - (eps - x0)||^2, s ~ logit-normal"
                       f"({args.logit_mean}, {args.logit_std}) shifted by {args.shift}; timestep 1000 s",
                  storage="weights in fp16 (loaded into float32; the text encoders' random weights were rounded to "
                          "fp16 values before training)")


def save_text_encoder(te, folder: Path) -> None:
    import copy

    copy.deepcopy(te).half().save_pretrained(folder, safe_serialization=True)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["dtype"] = "float32"
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


def cmd_sample(args) -> None:
    from diffusers import StableDiffusion3Pipeline

    out = args.out
    images, names, classes = load_cifar_train(args.data)
    split = make_split(args, images, names, classes, text=True)
    if args.stage in ("all", "sample"):
        pipe = StableDiffusion3Pipeline.from_pretrained(out / "model", text_encoder_3=None, tokenizer_3=None)
        pipe.set_progress_bar_config(disable=True)
        plan = sd_prompt_plan(split, args)
        conds = [{"seed": args.seed * 10**6 + i, **p} for i, p in enumerate(plan)]
        t0 = time.time()
        samples = []
        for s in range(0, len(conds), args.sample_batch):
            chunk = conds[s: s + args.sample_batch]
            with torch.no_grad():
                res = pipe([c["prompt"] for c in chunk], num_inference_steps=args.sample_steps,
                           guidance_scale=args.guidance, output_type="np", height=32, width=32,
                           max_sequence_length=args.max_sequence_length,
                           generator=[torch.Generator().manual_seed(c["seed"]) for c in chunk])
            samples.append(to_uint8(res.images))
            log(f"sampled {min(s + args.sample_batch, len(conds))}/{len(conds)}")
        np.savez_compressed(out / "samples.npz", samples=torch.cat(samples).numpy())
        write_json(out / "conditions.json", conds)
        recipe = json.loads((out / "recipe.json").read_text())
        recipe["flags"].update(sample_steps=args.sample_steps, guidance=args.guidance,
                               per_memorized_prompt=args.per_memorized_prompt,
                               per_normal_prompt=args.per_normal_prompt, samples_drawn=len(conds))
        write_json(out / "recipe.json", recipe)
        update_recipe(out, sampler=f"StableDiffusion3Pipeline, FlowMatchEulerDiscreteScheduler (shift "
                      f"{pipe.scheduler.config.shift}), {args.sample_steps} Euler steps, guidance {args.guidance}, "
                      f"max_sequence_length {args.max_sequence_length}; {args.per_memorized_prompt} per memorized "
                      f"prompt, {args.per_normal_prompt} per normal prompt", sample_seconds=round(time.time() - t0))
    label_run(out, split, images)


def cmd_ship(args) -> None:
    run = args.run
    data = REPO / "memdetect" / "data"
    model_dst, bench_dst = data / MODEL_NAME, data / BENCH_NAME
    for d in (model_dst, bench_dst):
        if d.exists():
            shutil.rmtree(d)
    shutil.copytree(run / "model", model_dst)
    for name in ("memorized_prompts.csv", "normal_prompts.csv"):
        shutil.copy2(run / name, model_dst / name)
    bench_dst.mkdir(parents=True)
    for name in BENCH_FILES:
        shutil.copy2(run / name, bench_dst / name)
    size, total = folder_bytes(model_dst), folder_bytes(data)
    log(f"shipped {model_dst} ({size / 1e6:.1f} MB) and {bench_dst} ({folder_bytes(bench_dst) / 1e6:.1f} MB); "
        f"memdetect/data is {total / 1e6:.1f} MB")
    if size > MODEL_LIMIT or total > DATA_LIMIT:
        raise SystemExit(f"over the limits: model {size / 1e6:.1f} MB (<= {MODEL_LIMIT / 1e6:.0f}), package data "
                         f"{total / 1e6:.1f} MB (<= {DATA_LIMIT / 1e6:.0f})")
    write_examples(MODEL_NAME, run, args.examples)


def split_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, required=True, help="cifar10-jpg.tar.gz or its extracted folder")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--unique", type=int, default=1500)
    p.add_argument("--exact", default="2:16,4:16,8:16,16:12,64:6,256:3")
    p.add_argument("--edited", default="16:8,64:4")
    p.add_argument("--captions", default="64:4x8")
    p.add_argument("--balanced", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--max-sequence-length", type=int, default=4,
                   help="T5 tokens (zeros: no T5 ships) after the CLIP tokens; the preset scans with the same")
    p.add_argument("--clip-tokens", type=int, default=16,
                   help="the CLIP tokenizers' model_max_length (CLIP's 77 cut to 16: the captions fit in 13, and "
                        "the text stream's cost on CPU falls with it)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("train")
    split_flags(p)
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--time-budget", type=float, default=4000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--ckpt-every", type=float, default=300.0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--tokenizer", type=Path, default=SD_TOKENIZER)
    p.add_argument("--width", type=int, default=128, help="transformer width (heads of 32)")
    p.add_argument("--depth", type=int, default=6, help="joint blocks (even: the default layer is depth / 2 - 1)")
    p.add_argument("--joint-dim", type=int, default=64, help="joint_attention_dim (the zero T5 width)")
    p.add_argument("--clip-width", type=int, default=32)
    p.add_argument("--clip-width-2", type=int, default=16)
    p.add_argument("--shift", type=float, default=3.0)
    p.add_argument("--logit-mean", type=float, default=0.0)
    p.add_argument("--logit-std", type=float, default=1.0)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("sample")
    split_flags(p)
    p.add_argument("--stage", choices=["all", "sample", "label"], default="all")
    p.add_argument("--samples", type=int, default=0, help="unused (the plan fixes the count)")
    p.add_argument("--per-memorized-prompt", type=int, default=10)
    p.add_argument("--per-normal-prompt", type=int, default=15)
    p.add_argument("--sample-steps", type=int, default=28, help="SD3's default")
    p.add_argument("--guidance", type=float, default=7.0, help="SD3's default")
    p.add_argument("--sample-batch", type=int, default=100)
    p.set_defaults(func=cmd_sample)
    p = sub.add_parser("ship")
    p.add_argument("run", type=Path)
    p.add_argument("--examples", type=int, default=10)
    p.set_defaults(func=cmd_ship)
    args = ap.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
