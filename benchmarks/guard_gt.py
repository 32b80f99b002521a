"""In-generation guard vs post-hoc scan on the ground-truth models ``demo-sd`` and ``demo-dit``, same generations,
same labels.

Fresh generations with each model's shipped sampler (``train_ground_truth.py sd|dit``), each batch seeded from one CPU
generator:

* ``demo-sd``: StableDiffusionPipeline, DDIM 50 steps, eta 0, guidance 7.5; K per memorized prompt of the chosen grades
  and as many normal-prompt images. The guard reads the CFG's unconditional half (the first).
* ``demo-dit``: DiTPipeline, DDIM 50 steps, eta 0, guidance 4.0; K per class. The guard reads the null-class half (the
  second). Memorization is not tied to a condition here, so the labels alone say which generations are copies.

The guard scores each image at the step nearest t=50; the post-hoc score is ``Detector(model)`` on the finished images
(what ``memdetect scan`` computes). Labels as the ship/label stage does (``train_ground_truth.label_run``):
``nearest_match`` against the model's distinct training images (grades.csv's train_index into the CIFAR-10 training
JPEGs), memorized >= 0.95, generalized < 0.80; ``--colour cast`` (default, the shipped labels' rule since 2026-12-03)
or ``rgb`` (the rule of the runs before it).

    nice -n 15 env OMP_NUM_THREADS=1 python benchmarks/guard_gt.py --per-prompt 8 --out runs/guard-sd
    nice -n 15 env OMP_NUM_THREADS=1 python benchmarks/guard_gt.py --model demo-dit --per-class 60 --out runs/guard-dit

``--ship DIR`` (demo-sd) writes what tests/test_guard.py checks instead: DIR/memdetect.toml, the guard calibration made
by ``memdetect.workflows.guarding.calibrate_guard`` (what ``memdetect calibrate --guard`` runs) on 4 generations of each
even-numbered normal prompt (120 images, 1% FPR), and a fixed labelled set made by ``memdetect.workflows.guarding.generate``
(what ``memdetect generate`` runs; seed 0): one image for each memorized prompt of the exact-256, exact-64 and
exact-16 grades and one for each odd-numbered normal prompt (DIR/samples.npz, DIR/manifest.csv). The set is fixed by
that rule, not chosen by score.

    nice -n 15 env OMP_NUM_THREADS=1 python benchmarks/guard_gt.py --ship memdetect/data/demo_sd_guard --out runs/x
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=("demo-sd", "demo-dit"), default="demo-sd")
    ap.add_argument("--per-class", type=int, default=60, help="demo-dit: images per class")
    ap.add_argument("--grades", default="exact-256,exact-64,exact-16,exact-8", help="memorized prompts of these grades")
    ap.add_argument("--per-prompt", type=int, default=8)
    ap.add_argument("--n-normal", type=int, default=None, help="normal-prompt images (default: as many as memorized)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=None, help="default: the shipped sampler's (7.5 SD, 4.0 DiT)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--limit", type=int, default=None, help="generate only the first N planned images (timing)")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--data", type=Path, default=Path("/work/shared/data/datasets/cifar10-jpg/cifar10-jpg.tar.gz"))
    ap.add_argument("--colour", choices=("cast", "rgb"), default="cast",
                    help="label similarity: colour-cast invariant (the shipped labels' rule) or RGB only")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--ship", type=Path, help="demo-sd: write the guard calibration and the fixed labelled test set "
                                              "to DIR instead (see the module's docstring)")
    args = ap.parse_args(argv)
    if args.ship:
        return ship(args, argv)

    import diffusers
    from diffusers import DDIMScheduler

    import memdetect
    from memdetect import Detector
    from memdetect.core.metrics import bootstrap_metrics, paired_difference
    from memdetect.models.presets import packaged

    args.out.mkdir(parents=True, exist_ok=True)
    sd = args.model == "demo-sd"
    if args.guidance is None:
        args.guidance = 7.5 if sd else 4.0
    model_dir = Path(packaged(args.model))
    if sd:  # (condition, source, grade): a prompt
        mem = pd.read_csv(model_dir / "memorized_prompts.csv")
        mem = mem[mem["grade"].isin(args.grades.split(","))]
        normal = pd.read_csv(model_dir / "normal_prompts.csv")["prompt"].tolist()
        plan = [(p, "memorized", g) for p, g in zip(mem["prompt"], mem["grade"]) for _ in range(args.per_prompt)]
        n_norm = args.n_normal if args.n_normal is not None else len(plan)
        plan += [(normal[i % len(normal)], "normal", "") for i in range(n_norm)]
    else:  # a class index, as many per class
        plan = [(c, "class", "") for c in range(10) for _ in range(args.per_class)]
    if args.limit:
        plan = plan[: args.limit]

    from memdetect.workflows.guarding import load_guardable
    pipe, _ = load_guardable(args.model, device="cpu", dtype="float32")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    guarded = memdetect.guard(pipe, threshold=None)
    cond_key = "prompt" if sd else "class_labels"
    extra = {"eta": 0.0} if sd else {}  # DiTPipeline's DDIM step runs with eta 0 and takes no eta

    gen = torch.Generator().manual_seed(0)
    images, scores, t0 = [], [], time.perf_counter()
    for s in range(0, len(plan), args.batch):
        chunk = plan[s: s + args.batch]
        out = guarded(**{cond_key: [c[0] for c in chunk]}, num_inference_steps=args.steps,
                      guidance_scale=args.guidance, output_type="np", generator=gen, **extra)
        images.append(torch.from_numpy(np.round(out.images * 255.0).clip(0, 255).astype(np.uint8))
                      .permute(0, 3, 1, 2).contiguous())
        scores.append(pd.DataFrame(out.guard.scores))
        guarded_t = out.guard.timestep
        print(f"generated {s + len(chunk)}/{len(plan)} in {time.perf_counter() - t0:.0f}s", flush=True)
    gen_seconds = time.perf_counter() - t0
    images = torch.cat(images)
    guard_scores = pd.concat(scores, ignore_index=True)
    np.savez_compressed(args.out / "samples.npz", samples=images.numpy())

    sim, label, nearest_grade = label_against_training_images(images, args.model, args.data, args.colour)
    use = np.isin(label, ["memorized", "generalized"])
    y = (label[use] == "memorized").astype(int)

    det = Detector.from_pretrained(args.model, device="cpu")
    t0 = time.perf_counter()
    post = pd.DataFrame(det.score_tensor(images))
    scan_seconds = time.perf_counter() - t0

    frame = pd.DataFrame({"sample": np.arange(len(plan)), "condition": [c[0] for c in plan],
                          "prompt_source": [c[1] for c in plan], "prompt_grade": [c[2] for c in plan],
                          "similarity": sim, "label": label, "used": use,
                          "nearest_grade": nearest_grade,
                          **{f"guard_{m}": guard_scores[m] for m in guard_scores},
                          **{f"scan_{m}": post[m] for m in post if m in guard_scores}})
    frame.to_csv(args.out / "scores.csv", index=False)
    if len(np.unique(y)) < 2:
        raise SystemExit(f"wrote {args.out / 'scores.csv'}; no AUROC: the {int(use.sum())} labelled generations are "
                         "all of one label (generate more: --per-class / --per-prompt)")
    rows = []
    for m in guard_scores:
        if f"scan_{m}" not in frame:
            continue
        gs, ps = frame[f"guard_{m}"].to_numpy()[use], frame[f"scan_{m}"].to_numpy()[use]
        g = bootstrap_metrics(y, gs, n_boot=args.bootstrap)
        p = bootstrap_metrics(y, ps, n_boot=args.bootstrap)
        d = paired_difference(y, gs, ps, n_boot=args.bootstrap)
        rows.append({"metric": m, "guard_auroc": str(g["auroc"]), "scan_auroc": str(p["auroc"]),
                     "guard_minus_scan_auroc": str(d["auroc"]), "guard_tpr_at_1pct_fpr": str(g["tpr"]),
                     "scan_tpr_at_1pct_fpr": str(p["tpr"]), "guard_minus_scan_tpr": str(d["tpr"]),
                     "pearson_all": float(np.corrcoef(frame[f"guard_{m}"], frame[f"scan_{m}"])[0, 1]),
                     "spearman_all": float(frame[f"guard_{m}"].rank().corr(frame[f"scan_{m}"].rank()))})
    table = pd.DataFrame(rows)
    table.to_csv(args.out / "results.csv", index=False)
    summary = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": "benchmarks/guard_gt.py " + " ".join(argv or sys.argv[1:]),
        "hardware": f"{platform.machine()} 2-core CPU, torch threads {torch.get_num_threads()}, no GPU",
        "versions": {"memdetect": memdetect.__version__, "torch": torch.__version__,
                     "diffusers": diffusers.__version__, "python": platform.python_version()},
        "model": args.model, "n": len(plan), **({"grades": args.grades, "per_prompt": args.per_prompt} if sd else
                                                {"per_class": args.per_class}), "steps": args.steps,
        "guidance": args.guidance, "guarded_timestep": guarded_t,
        "labels": {k: int((label == k).sum()) for k in ("memorized", "generalized", "excluded")},
        "labels_by_source": frame.groupby("prompt_source")["label"].value_counts().unstack(fill_value=0)
        .to_dict(orient="index"),
        "memorized_by_nearest_grade": frame.loc[frame["label"] == "memorized", "nearest_grade"].value_counts().to_dict(),
        "generation_seconds_guarded": round(gen_seconds, 1), "scan_seconds": round(scan_seconds, 1),
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    print(json.dumps(summary, indent=2, default=float))
    print(table.to_string(index=False))


def label_against_training_images(images: torch.Tensor, model: str, data: Path, colour: str = "cast"):
    """(similarity, label, nearest grade) per image, as ``train_ground_truth.label_run`` labels."""
    from gt_common import load_cifar_train

    from memdetect.bench.labels import LabelRule, nearest_match
    from memdetect.models.presets import packaged

    grades = pd.read_csv(Path(packaged(model.replace("-", "_") + "_bench")) / "grades.csv")
    cifar, names, _ = load_cifar_train(data)
    if [names[i] for i in grades["train_index"]] != grades["name"].tolist():
        raise SystemExit("grades.csv's train_index does not match the CIFAR-10 names")
    nearest = nearest_match(images, torch.from_numpy(cifar[grades["train_index"].to_numpy()]), colour=colour)
    sim = nearest.similarity.numpy()
    rule = LabelRule()
    return sim, np.array([rule.label(float(v)) for v in sim]), grades["grade"].to_numpy()[nearest.index.numpy()]


def ship(args, argv) -> None:
    import memdetect
    from memdetect.workflows.guarding import calibrate_guard, generate, load_guardable
    from memdetect.models.presets import packaged

    if args.model != "demo-sd":
        raise SystemExit("--ship is for demo-sd")
    model_dir = Path(packaged("demo-sd"))
    normal = pd.read_csv(model_dir / "normal_prompts.csv")["prompt"].tolist()
    mem = pd.read_csv(model_dir / "memorized_prompts.csv")
    mem = mem[mem["grade"].isin(["exact-256", "exact-64", "exact-16"])]
    args.ship.mkdir(parents=True, exist_ok=True)
    pipe, _ = load_guardable("demo-sd", device="cpu", dtype="float32")
    pipe.set_progress_bar_config(disable=True)
    g = memdetect.guard(pipe, threshold=None)
    t0 = time.perf_counter()
    cal = calibrate_guard(g, normal[0::2], 4, fpr=0.01, steps=args.steps, seed=0, output=args.ship / "memdetect.toml",
                          force=True, model="demo-sd")
    print(cal.table.to_string(index=False), f"\ncalibrated in {time.perf_counter() - t0:.0f}s", flush=True)
    conditions = mem["prompt"].tolist() + normal[1::2]
    source = ["memorized"] * len(mem) + ["normal"] * len(normal[1::2])
    grade = mem["grade"].tolist() + [""] * len(normal[1::2])
    thr = cal.document["guard"]["threshold"]
    gen = generate(memdetect.guard(pipe, threshold=thr), conditions, 1, steps=args.steps, seed=0)
    images = torch.from_numpy(gen.images).permute(0, 3, 1, 2).contiguous()  # uint8 [N, 3, H, W]
    sim, label, nearest_grade = label_against_training_images(images, "demo-sd", args.data, args.colour)
    frame = pd.DataFrame({"sample": np.arange(len(conditions)), "condition": conditions, "prompt_source": source,
                          "prompt_grade": grade, "similarity": sim, "label": label, "nearest_grade": nearest_grade,
                          "guard_std": gen.result.scores["std"], "flagged": gen.result.flagged})
    np.savez_compressed(args.ship / "samples.npz", samples=images.numpy())
    frame.to_csv(args.ship / "manifest.csv", index=False)
    print(frame.groupby(["prompt_source", "label"])["flagged"].agg(["count", "sum"]).to_string())
    print(f"threshold {thr:.4f}; wrote {args.ship}")


if __name__ == "__main__":
    main()
