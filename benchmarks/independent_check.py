"""An independent check of ``calibrate --select-layer`` (issue 29, goal 2): a memorizing class-conditional DiT the
project was never developed on, trained and evaluated from scratch by this script.

Usage (CPU, one thread; every output lives under --out, outside the repository)::

    python benchmarks/independent_check.py train    --out /work/indep29-run --time-budget 1920
    python benchmarks/independent_check.py export   --out /work/indep29-run   # ckpt.pt -> a DiTPipeline folder
    python benchmarks/independent_check.py sample   --out /work/indep29-run --samples 400 --sample-steps 25
    python benchmarks/independent_check.py evaluate --out /work/indep29-run

**The model** differs from the shipped demo-dit in data and shape: MNIST *test* digits (never used by any shipped
model), padded to 32x32 and repeated over RGB; a ``DiTTransformer2DModel`` of width 128 (2 heads), depth 6 and patch
size 1 (64 tokens; demo-dit: width 192, depth 8, patch 2, 16 tokens), class-conditional over the 10 digits, trained
with epsilon prediction in the latent space of demo-dit's frozen VAE (trained on CIFAR-10 training images; on MNIST
digits its round trip has a median Pearson correlation of 0.98). The duplication is graded: a seeded draw of
digits repeated 256, 64, 16 and 4 times, and unique digits seen once (``GRADES``).

**The protocol** (fixed before any held-out number was looked at):

* generations: DDIM, ``--sample-steps`` steps, classifier-free guidance 4 against the null class, equal numbers per
  digit class, seeds 0..N-1; labelled by the project's shipped colour-cast-invariant rule
  (``memdetect.bench.labels.nearest_match(colour="cast")`` against the distinct training digits, ``LabelRule``:
  memorized >= 0.95, novel < 0.80, the band between excluded);
* split: the labelled generations are split by a seeded stratified coin (seed 29) into a *selection* half and a
  *held-out* half; the held-out half is only ever scored, never used for choosing;
* selection A ("labelled generations"): ``select_from_images`` (what ``calibrate --select-layer`` runs) on the
  selection half's memorized vs novel generations;
* selection B ("training duplicates"): ``training_duplicate_examples``' positives, as ``calibrate
  --training-duplicates`` builds them: the distinct training digits present >= ``MIN_COPIES`` times, against the
  unique training digits as novel;
* held-out report: the family default layer and each selection's chosen configuration score the held-out half;
  AUROC and TPR@1%FPR with stratified bootstrap 95% intervals (``memdetect.core.metrics``), and the baselines
  ``bench demo`` uses (``memdetect.bench.baselines``) where they apply to an image-only, class-conditional model.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from gt_common import write_json, write_log  # noqa: E402
from train_ground_truth import (dit_sample, dit_scheduler_config, encode_latents, eps_loss_fn, load_vae, log,  # noqa: E402
                                roundtrip_quality, save_fp16, train_loop, versions)

MNIST = REPO.parent / "shared" / "data" / "datasets" / "mnist"  # the developers' shared data folder
VAE = REPO / "memdetect" / "data" / "demo-dit"
#: copies -> distinct digits; 1 = unique digits seen once
GRADES = {256: 6, 64: 12, 16: 16, 4: 24, 1: 400}
NULL = 10


def load_mnist_test(root: Path = MNIST) -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 MNIST test digits as uint8 [N,3,32,32] (2 px zero padding, grey repeated over RGB) and labels."""
    raw = gzip.open(root / "t10k-images-idx3-ubyte.gz").read()
    x = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)
    x = np.repeat(np.pad(x, ((0, 0), (2, 2), (2, 2)))[:, None], 3, 1).copy()
    y = np.frombuffer(gzip.open(root / "t10k-labels-idx1-ubyte.gz").read(), np.uint8, offset=8).astype(np.int64)
    return x, y


def split(seed: int = 0) -> dict:
    """A seeded draw of distinct test digits per grade: ``index`` (into the test set), ``count`` per distinct digit
    and ``rows`` (the training rows, as positions in ``index``)."""
    n = sum(GRADES.values())
    idx = np.random.default_rng(seed).permutation(10000)[:n]
    counts = np.concatenate([np.full(k, c) for c, k in GRADES.items()])
    rows = np.repeat(np.arange(n), counts)
    return {"index": idx, "count": counts, "rows": rows}


def build(args):
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(num_attention_heads=args.width // 64, attention_head_dim=64, in_channels=8,
                                 out_channels=8, num_layers=args.depth, sample_size=8, patch_size=args.patch,
                                 num_embeds_ada_norm=10, norm_type="ada_norm_zero", norm_elementwise_affine=False,
                                 dropout=0.0)


class Wrapped(torch.nn.Module):  # train_loop's loss calls model(x, t, **cond)
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, xt, t, class_labels):
        return self.m(xt, timestep=t, class_labels=class_labels)


def cmd_train(args) -> None:
    from diffusers import DDPMScheduler

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    images, labels = load_mnist_test()
    sp = split(args.seed)
    distinct = images[sp["index"]]
    vae = load_vae(VAE)
    lat = encode_latents(vae, distinct) * float(vae.config.scaling_factor)
    latents = lat[torch.from_numpy(sp["rows"])]
    row_cls = torch.from_numpy(labels[sp["index"]][sp["rows"]])
    model = build(args)
    for blk in model.transformer_blocks:
        blk.norm1.emb.class_embedder.dropout_prob = 0.0  # class dropout is done (seeded) in cond_of
    n_params = sum(p.numel() for p in model.parameters())
    log(f"DiT {n_params:,} parameters; {len(latents)} rows, {len(distinct)} distinct digits")
    write_json(out / "recipe.json", {
        "command": " ".join(sys.argv), "flags": {k: v for k, v in vars(args).items() if k != "func"},
        "versions": versions(), "grades": {str(k): v for k, v in GRADES.items()}, "training_rows": len(latents),
        "distinct_digits": len(distinct), "transformer_parameters": n_params, "architecture": dict(model.config),
        "data": "MNIST test digits (t10k), 2 px zero padding to 32x32, grey repeated over RGB; no augmentation",
        "vae": "memdetect/data/demo-dit/vae, frozen (trained on CIFAR-10 training images)",
        "vae_roundtrip_on_training_digits": roundtrip_quality(vae, distinct)})
    sched = DDPMScheduler(**{k: v for k, v in dit_scheduler_config().items()
                             if k not in ("set_alpha_to_one", "steps_offset")})

    def cond_of(idx, gen):
        y = row_cls[idx].clone()
        y[torch.rand(len(idx), generator=gen) < args.class_dropout] = NULL
        return {"class_labels": y}

    w = Wrapped(model)
    stats = train_loop(w, eps_loss_fn(w, latents, cond_of, args, sched.alphas_cumprod), args, out,
                       ema_decay=args.ema)
    stats.pop("model_out")
    recipe = json.loads((out / "recipe.json").read_text())
    recipe.update(stats)
    write_json(out / "recipe.json", recipe)
    export(args)


def export(args) -> None:
    """The checkpoint's EMA weights -> ``--out/model`` (a DiTPipeline folder, fp16 weights)."""
    from diffusers import DDIMScheduler, DiTPipeline

    out = args.out
    state = torch.load(out / "ckpt.pt", weights_only=False)
    flags = json.loads((out / "recipe.json").read_text())["flags"]
    model = build(argparse.Namespace(**flags))
    w = Wrapped(model)
    w.load_state_dict(state["ema"] if state["ema"] is not None else state["model"])
    model = w.m.eval()
    for blk in model.transformer_blocks:
        blk.norm1.emb.class_embedder.dropout_prob = flags["class_dropout"]
    vae = load_vae(VAE)
    pipe = DiTPipeline(transformer=model, vae=vae, scheduler=DDIMScheduler(**dit_scheduler_config()),
                       id2label={i: str(i) for i in range(10)})
    pipe.save_pretrained(out / "model", safe_serialization=True)
    save_fp16(model, out / "model" / "transformer")
    save_fp16(vae, out / "model" / "vae")
    write_json(out / "exported.json", {"step": state["step"], "train_seconds": round(state["elapsed"])})
    log(f"exported step {state['step']} ({state['elapsed']:.0f}s) to {out / 'model'}")


# ----------------------------------------------------------------------------------------------------------------
# Labelled generations (a bench folder that ``memdetect bench demo``'s ``run_demo`` reads).


def grade_name(count: int) -> str:
    return "unique" if count == 1 else f"exact-{count}"


def cmd_sample(args) -> None:
    """``--samples`` generations (equal per digit class, seeds 0..N-1) -> ``--out/bench`` (samples.npz,
    manifest.csv labelled by the shipped rule, recipe.json), and the training rows as PNGs (``--out/training``)."""
    import pandas as pd
    from diffusers import DiTPipeline
    from PIL import Image

    from memdetect.bench.labels import LabelRule, nearest_match
    from memdetect.models.dit import map_imagenet_null_label

    out, bench = args.out, args.out / "bench"
    bench.mkdir(parents=True, exist_ok=True)
    images, labels = load_mnist_test()
    sp = split(json.loads((out / "recipe.json").read_text())["flags"]["seed"])
    distinct = images[sp["index"]]
    pipe = DiTPipeline.from_pretrained(out / "model")
    map_imagenet_null_label(pipe.transformer)
    per = args.samples // 10
    conds = [{"seed": i, "class": str(i // per), "class_index": i // per} for i in range(per * 10)]
    t0 = time.time()
    chunks = []
    for s in range(0, len(conds), args.sample_batch):
        c = conds[s: s + args.sample_batch]
        chunks.append(dit_sample(pipe, [x["class_index"] for x in c], [x["seed"] for x in c],
                                 steps=args.sample_steps, guidance=args.guidance))
        log(f"sampled {s + len(c)}/{len(conds)}")
    samples = torch.cat(chunks)
    sample_seconds = time.time() - t0
    np.savez_compressed(bench / "samples.npz", samples=samples.numpy())
    m = nearest_match(samples, torch.from_numpy(distinct), colour="cast")
    rule = LabelRule()
    rows = []
    for i, c in enumerate(conds):
        j = int(m.index[i])
        rows.append({"sample": i, **c, "similarity": round(float(m.similarity[i]), 5),
                     "label": rule.label(float(m.similarity[i])), "nearest_index": int(sp["index"][j]),
                     "nearest_count": int(sp["count"][j]), "nearest_grade": grade_name(int(sp["count"][j])),
                     "nearest_class": int(labels[sp["index"][j]])})
    man = pd.DataFrame(rows)
    man.to_csv(bench / "manifest.csv", index=False)
    totals = man["label"].value_counts().to_dict()
    by_grade = man.groupby(["nearest_grade", "label"]).size().unstack(fill_value=0).to_dict("index")
    log(f"labels: {totals}; by nearest grade: {by_grade}")
    flags = json.loads((out / "recipe.json").read_text())
    write_json(bench / "recipe.json", {
        "model_recipe": flags, "exported": json.loads((out / "exported.json").read_text()),
        "flags": {"sample_steps": args.sample_steps, "guidance": args.guidance, "samples": len(conds)},
        "sampler": f"DDIM {args.sample_steps} steps, eta 0, classifier-free guidance {args.guidance} against the "
                   f"null class 10 (train_ground_truth.dit_sample), {per} per digit class, seeds 0..{len(conds) - 1}",
        "sample_seconds": round(sample_seconds),
        "labels": {"rule": f"memorized >= {rule.memorized_at}, generalized < {rule.generalized_below}",
                   "similarity": "nearest_match(colour='cast') against the distinct training digits",
                   "totals": totals, "per_nearest_grade": by_grade}})
    train_dir = out / "training"
    train_dir.mkdir(exist_ok=True)
    for r, j in enumerate(sp["rows"]):  # every training row, duplicates as separate (identical) files
        Image.fromarray(distinct[j].transpose(1, 2, 0)).save(train_dir / f"row{r:05d}_d{j:03d}.png")
    log(f"wrote {len(sp['rows'])} training rows to {train_dir}")


# ----------------------------------------------------------------------------------------------------------------
# Evaluation.


def score_heldout(det, images: torch.Tensor, cand, reference: torch.Tensor) -> np.ndarray:
    """``cand``'s scores of ``images`` (as ``bench.demo.selected_rows`` scores its pick; a reference-normalised
    candidate with statistics of ``reference``, the novel examples it was chosen on)."""
    from memdetect.detector import Detector
    from memdetect.store.io import image_seed
    from memdetect.workflows.select import reference_statistics

    scanner = Detector(det.adapter, layer=cand.layer, timestep=cand.timestep, metric=cand.metric, seed=det.seed,
                       batch_size=16, prune=False, name=det.name)

    def feats(x):
        return torch.cat([scanner.features(x[i:i + 16], [image_seed(v, det.seed) for v in x[i:i + 16].numpy()])
                          for i in range(0, len(x), 16)])

    f = feats(images)
    if cand.normalise == "reference":
        scanner.normalise = reference_statistics(feats(reference))
    return cand.sign * scanner.scores_of(f[:, None, :])[cand.metric].numpy()


def cmd_evaluate(args) -> None:
    """The protocol of the module docstring: ``run_demo`` (default, baselines, selection A on the selection half),
    selection B from the training duplicates, then every method on the held-out half only."""
    import pandas as pd

    from memdetect.bench.demo import load_demo_set, run_demo, split_halves
    from memdetect.core.metrics import bootstrap_metrics, paired_difference
    from memdetect.detector import Detector
    from memdetect.workflows.select import read_images, select_from_images, training_duplicate_examples

    out, bench, res = args.out, args.out / "bench", args.out / "results"
    res.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    demo = run_demo(res / "bench_demo", model="dit", device="cpu", batch_size=16, data_folder=bench,
                    model_path=str(out / "model"), n_boot=args.bootstrap, select=True)
    log(f"run_demo done in {time.time() - t0:.0f}s")
    data = load_demo_set(bench)
    labels, images = data.labels, data.images[data.labelled]
    sel, held = split_halves(labels, 0.5, 0)  # the same split selected_rows used
    per_sample = pd.read_csv(res / "bench_demo" / "scores.csv")
    # selection B: calibrate --select-layer --training-duplicates (positives: training digits present >= MIN_COPIES
    # times; novel: the selection half's novel generations + the unique training digits, as _calibrate_select joins)
    det = Detector.from_pretrained("dit", str(out / "model"), device="cpu", dtype="float32", prune=False)
    pos, unique_names, found = training_duplicate_examples(out / "training", det.adapter.resolution)
    uniq_px, _, _ = read_images(unique_names, det.adapter.resolution)
    novel_sel = images[torch.from_numpy(sel[labels[sel] == 0])]
    novel_b = torch.cat([novel_sel, uniq_px])
    t1 = time.time()
    selection_b, cands_b, _ = select_from_images(det, torch.cat([pos, novel_b]),
                                                 np.r_[np.ones(len(pos), int), np.zeros(len(novel_b), int)],
                                                 batch_size=16, n_boot=args.bootstrap)
    log(f"selection B ({found}) in {time.time() - t1:.0f}s: {selection_b.chosen} ({selection_b.reason})")
    held_x = images[torch.from_numpy(held)]
    b_scores = score_heldout(det, held_x, selection_b.chosen, novel_b)
    b_best = score_heldout(det, held_x, selection_b.best, novel_b)
    hp = per_sample.iloc[held].reset_index(drop=True).assign(ours_selected_duplicates=b_scores,
                                                             ours_best_duplicates=b_best)
    a_record = demo.get("selection") or {}
    methods = ["ours_std", "ours_selected", "ours_selected_duplicates", "ours_best_duplicates",
               *[c for c in ("denoising_loss", "flipd", "flipd_conditional", "nearest_generation", "wen_first_step")
                 if c in hp.columns]]
    yh = labels[held]
    rows = []
    for mth in methods:
        if mth not in hp.columns or hp[mth].isna().any():
            continue
        b = bootstrap_metrics(yh, hp[mth].to_numpy(), n_boot=args.bootstrap, seed=0)
        row = {"method": mth, "auroc": b["auroc"].value, "auroc_lo": b["auroc"].lo, "auroc_hi": b["auroc"].hi,
               "tpr_at_1pct_fpr": b["tpr"].value, "tpr_lo": b["tpr"].lo, "tpr_hi": b["tpr"].hi}
        if mth != "ours_std":
            d = paired_difference(yh, hp[mth].to_numpy(), hp["ours_std"].to_numpy(), n_boot=args.bootstrap, seed=0)
            row.update({"d_auroc_vs_default": d["auroc"].value, "d_auroc_lo": d["auroc"].lo,
                        "d_auroc_hi": d["auroc"].hi, "d_tpr_vs_default": d["tpr"].value, "d_tpr_lo": d["tpr"].lo,
                        "d_tpr_hi": d["tpr"].hi})
        rows.append(row)
    table = pd.DataFrame(rows)
    table.to_csv(res / "heldout.csv", index=False)
    hp.to_csv(res / "heldout_scores.csv", index=False)
    summary = {
        "protocol": __doc__, "split": {"selection": len(sel), "heldout": len(held), "seed": 0, "stratified": True,
                                       "selection_memorized": int(labels[sel].sum()),
                                       "heldout_memorized": int(yh.sum()), "heldout_novel": int((1 - yh).sum())},
        "default": str(det.layer) + f" @ t={det.timestep}, {det.metric}",
        "selection_labelled": a_record,
        "selection_duplicates": {**selection_b.record(), "examples": found, "novel": len(novel_b),
                                 "memorized": len(pos)},
        "heldout": rows, "versions": versions(), "seconds": round(time.time() - t0)}
    write_json(res / "summary.json", summary)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    log(f"wrote {res}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("train")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=100000)
    p.add_argument("--time-budget", type=float, default=1800)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--ckpt-every", type=float, default=240.0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--patch", type=int, default=1)
    p.add_argument("--class-dropout", type=float, default=0.1)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("export")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=export)
    p = sub.add_parser("sample")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--samples", type=int, default=400)
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--sample-batch", type=int, default=50)
    p.set_defaults(func=cmd_sample)
    p = sub.add_parser("evaluate")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.set_defaults(func=cmd_evaluate)
    args = ap.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
