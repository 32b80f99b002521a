"""In-generation guard vs post-hoc scan on the shipped ``demo`` model, on the same generations with the same labels.

The shipped labelled generations (``memdetect/data/demo_bench``) were made by ``benchmarks/train_demo.py``'s sampler:
DDIM, 100 steps, eta 0, initial noise drawn batch after batch (500 per batch) from one CPU generator seeded 0. diffusers'
``DDIMPipeline`` over the demo UNet with the same generator draws the same noise and runs the same scheduler, so it
regenerates those images (on another device, up to float rounding: each regenerated image is compared with the
shipped one, and only those that match keep the shipped label). The guard scores every image at the sampling step
nearest t=50 from the pipeline's own forward; the post-hoc score is ``Detector("demo")`` on the finished images,
exactly what ``memdetect scan`` computes. Overhead: plain ``DDIMPipeline`` calls against guarded ones on the same
seeds, alternated, in the same process.

    nice -n 15 env OMP_NUM_THREADS=1 python benchmarks/guard_demo.py --n 500 --out runs/guard-demo
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch


def to_uint8(images: np.ndarray) -> torch.Tensor:
    """DDIMPipeline's output_type="np" ([N, H, W, 3] in [0, 1]) -> uint8 [N, 3, H, W] (as train_demo rounds)."""
    return torch.from_numpy(np.round(images * 255.0).clip(0, 255).astype(np.uint8)).permute(0, 3, 1, 2).contiguous()


def correlation(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    a, b = a.flatten(1).double(), b.flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1).div(a.norm(dim=1) * b.norm(dim=1) + 1e-12).numpy()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=500, help="generations (a multiple of the shipped batch of 500 or less)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--timing-batch", type=int, default=32)
    ap.add_argument("--timing-repeats", type=int, default=3)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "datasets"
                    / "cifar10-jpg" / "cifar10-jpg.tar.gz", help="CIFAR-10 JPEGs (train_demo.py's --data)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--report-only", action="store_true", help="recompute the tables from OUT/scores.csv")
    ap.add_argument("--ship", type=Path, help="also write DIR/memdetect.toml (the [guard] calibration: thresholds at "
                                              "1%% FPR on the generalized generations) and the first 16 labelled "
                                              "generations (DIR/samples.npz, DIR/manifest.csv) for the tests")
    args = ap.parse_args(argv)
    if args.report_only:
        frame = pd.read_csv(args.out / "scores.csv")
        use = frame["label"].isin(["memorized", "generalized"])
        report(frame, use.to_numpy(), args)
        return

    import diffusers

    import memdetect
    from memdetect import Detector
    from memdetect.core.metrics import bootstrap_metrics, paired_difference, threshold_at_fpr
    from memdetect.models.ddpm import PixelDDPMAdapter
    from memdetect.models.presets import packaged

    args.out.mkdir(parents=True, exist_ok=True)
    pipe = PixelDDPMAdapter.load_pipeline(packaged("demo"), device=torch.device("cpu"), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    guarded = memdetect.guard(pipe, threshold=None)

    # 1. the shipped generations again, guarded
    gen = torch.Generator().manual_seed(0)
    images, scores, t0 = [], [], time.perf_counter()
    for start in range(0, args.n, 500):
        b = min(500, args.n - start)
        out = guarded(batch_size=b, generator=gen, num_inference_steps=args.steps, eta=0.0, output_type="np")
        images.append(to_uint8(out.images))
        scores.append(pd.DataFrame(out.guard.scores))
        guarded_t = out.guard.timestep
    gen_seconds = time.perf_counter() - t0
    images = torch.cat(images)
    guard_scores = pd.concat(scores, ignore_index=True)

    np.savez_compressed(args.out / "samples.npz", samples=images.numpy())
    # labels: flip/shift-invariant pixel correlation with the nearest of the demo's 12,040 distinct training images
    # (train_demo.py's seeded selection from the CIFAR-10 training JPEGs), memorized >= 0.95, generalized < 0.80
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gt_common import load_cifar_train

    from memdetect.bench.labels import LabelRule, nearest_match

    recipe = json.loads((Path(packaged("demo_bench")) / "recipe.json").read_text())
    cifar, names, _ = load_cifar_train(args.data)
    perm = np.random.default_rng(recipe["seed"]).permutation(len(cifar))
    dup_idx = np.sort(perm[recipe["unique"]: recipe["unique"] + recipe["dup_images"]])
    if [names[i] for i in dup_idx] != recipe["duplicated_images"]:
        raise SystemExit("the training selection does not reproduce recipe.json's duplicated images")
    train_idx = np.concatenate([np.sort(perm[: recipe["unique"]]), dup_idx])
    nearest = nearest_match(images, torch.from_numpy(cifar[train_idx]))
    sim = nearest.similarity.numpy()
    rule = LabelRule()
    label = np.array([rule.label(float(v)) for v in sim])
    use = np.isin(label, ["memorized", "generalized"])
    y = (label[use] == "memorized").astype(int)

    # 2. post-hoc: the scan's score of the same images
    det = Detector.from_pretrained("demo", device="cpu")
    t0 = time.perf_counter()
    post = pd.DataFrame(det.score_tensor(images))
    scan_seconds = time.perf_counter() - t0

    frame = pd.DataFrame({"sample": np.arange(args.n), "similarity": sim, "label": label, "used": use,
                          **{f"guard_{m}": guard_scores[m] for m in guard_scores},
                          **{f"scan_{m}": post[m] for m in post}})
    frame.to_csv(args.out / "scores.csv", index=False)

    rows = []
    for m in guard_scores:
        g = bootstrap_metrics(y, frame[f"guard_{m}"].to_numpy()[use], n_boot=args.bootstrap)
        s = bootstrap_metrics(y, frame[f"scan_{m}"].to_numpy()[use], n_boot=args.bootstrap)
        d = paired_difference(y, frame[f"guard_{m}"].to_numpy()[use], frame[f"scan_{m}"].to_numpy()[use],
                              n_boot=args.bootstrap)
        rows.append({"metric": m, "guard_auroc": str(g["auroc"]), "scan_auroc": str(s["auroc"]),
                     "guard_minus_scan_auroc": str(d["auroc"]), "guard_tpr_at_1pct_fpr": str(g["tpr"]),
                     "scan_tpr_at_1pct_fpr": str(s["tpr"]), "guard_minus_scan_tpr": str(d["tpr"])})
    table = pd.DataFrame(rows)
    table.to_csv(args.out / "results.csv", index=False)
    thr = threshold_at_fpr(y, frame["guard_std"].to_numpy()[use], 0.01)

    # 3. overhead: plain vs guarded, same seeds, alternated
    b = args.timing_batch
    plain_s, guard_s = [], []
    for r in range(args.timing_repeats):
        for which in ("plain", "guard"):
            g = torch.Generator().manual_seed(1000 + r)
            fn = pipe if which == "plain" else guarded
            t0 = time.perf_counter()
            fn(batch_size=b, generator=g, num_inference_steps=args.steps, eta=0.0, output_type="np")
            (plain_s if which == "plain" else guard_s).append((time.perf_counter() - t0) / b)

    summary = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": "benchmarks/guard_demo.py " + " ".join(argv or __import__("sys").argv[1:]),
        "hardware": f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, no GPU",
        "versions": {"memdetect": memdetect.__version__, "torch": torch.__version__,
                     "diffusers": diffusers.__version__, "python": platform.python_version()},
        "n": args.n, "steps": args.steps, "guarded_timestep": guarded_t,
        "n_memorized": int(y.sum()), "n_generalized": int((1 - y).sum()),
        "generation_seconds_guarded": round(gen_seconds, 1), "scan_seconds": round(scan_seconds, 2),
        "guard_std_threshold_at_1pct_fpr": thr,
        "timing_batch": b, "plain_s_per_image": plain_s, "guard_s_per_image": guard_s,
        "overhead_median_pct": 100 * (np.median(guard_s) / np.median(plain_s) - 1),
        "guard_own_seconds_last_call": None,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    print(json.dumps(summary, indent=2, default=float))
    print(table.to_string(index=False))


def report(frame: pd.DataFrame, use: np.ndarray, args) -> None:
    """AUROC / TPR@1%FPR with bootstrap intervals, guard vs scan, on the rows ``use``; optionally the [guard]
    config (``calibrate.fpr_threshold`` on the generalized rows' guard scores, every metric)."""
    from memdetect.core.metrics import bootstrap_metrics, paired_difference
    from memdetect.workflows.calibrate import RULE, fpr_threshold

    y = (frame["label"].to_numpy()[use] == "memorized").astype(int)
    metrics = [c[len("guard_"):] for c in frame if c.startswith("guard_")]
    rows = []
    for m in metrics:
        g_s, p_s = frame[f"guard_{m}"].to_numpy()[use], frame[f"scan_{m}"].to_numpy()[use]
        g = bootstrap_metrics(y, g_s, n_boot=args.bootstrap)
        s = bootstrap_metrics(y, p_s, n_boot=args.bootstrap)
        d = paired_difference(y, g_s, p_s, n_boot=args.bootstrap)
        rows.append({"metric": m, "guard_auroc": str(g["auroc"]), "scan_auroc": str(s["auroc"]),
                     "guard_minus_scan_auroc": str(d["auroc"]), "guard_tpr_at_1pct_fpr": str(g["tpr"]),
                     "scan_tpr_at_1pct_fpr": str(s["tpr"]), "guard_minus_scan_tpr": str(d["tpr"])})
    table = pd.DataFrame(rows)
    table.to_csv(args.out / "results.csv", index=False)
    print(f"{int(use.sum())} labelled generations used: {int(y.sum())} memorized, {int((1 - y).sum())} generalized "
          "(fresh labels, nearest training image)")
    print(table.to_string(index=False))
    if args.ship:
        from memdetect.config import to_toml

        args.ship.mkdir(parents=True, exist_ok=True)
        novel = frame[use & (frame["label"] == "generalized").to_numpy()]
        thresholds = {m: fpr_threshold(novel[f"guard_{m}"].to_numpy(), 0.01) for m in metrics}
        summary = json.loads((args.out / "summary.json").read_text())
        doc = {"version": 1, "model": "demo",
               "guard": {"threshold": thresholds["std"], "metric": "std", "step_t": 50,
                         "timestep": summary["guarded_timestep"], "steps": summary["steps"], "fpr": 0.01,
                         "rule": RULE, "n_reference": int(len(novel)),
                         "reference": ["the generalized (< 0.80) generations of benchmarks/guard_demo.py: DDIM "
                                       "eta 0, one CPU generator seeded 0"],
                         "family": "ddpm", "thresholds": thresholds}}
        (args.ship / "memdetect.toml").write_text(
            to_toml(doc, "memdetect guard calibration of the shipped demo model (benchmarks/guard_demo.py --ship)."),
            encoding="utf-8")
        k = 16
        np.savez_compressed(args.ship / "samples.npz", samples=np.load(args.out / "samples.npz")["samples"][:k])
        frame[["sample", "similarity", "label"]].head(k).to_csv(args.ship / "manifest.csv", index=False)
        print(f"wrote {args.ship}")

if __name__ == "__main__":
    main()
