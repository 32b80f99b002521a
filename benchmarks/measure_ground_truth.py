"""Measure the detector on the shipped ground-truth models: AUROC, TPR@1%FPR and recall per duplication grade.

    python benchmarks/measure_ground_truth.py --models demo-sd demo-dit demo-edm --out runs/measure

For each preset, every labelled sample of its bench folder (``memdetect/data/<bench>``: memorized >= 0.95,
generalized < 0.80 by the flip/shift-invariant pixel correlation) is scored by ``Detector.score_tensor`` at the
preset's default layer and timestep (nothing is tuned here). Recall per grade is measured at the threshold behind
TPR@1%FPR (``memdetect.core.metrics.threshold_at_fpr``: the (k+1)-th highest generalized score, k = floor(1% of the
generalized samples)), and is the fraction of memorized samples, grouped by the duplication grade of their nearest
training image, that score above it.
Writes ``<out>/<model>_scores.csv`` and ``<out>/summary.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from memdetect import Detector
from memdetect.bench.labels import LabelRule
from memdetect.core.metrics import roc_metrics, threshold_at_fpr
from memdetect.models.presets import packaged

BENCH = {"demo-sd": "demo_sd_bench", "demo-dit": "demo_dit_bench", "demo-edm": "demo_edm_bench",
         "demo": "demo_bench"}


def measure(model: str, out: Path, batch_size: int) -> dict:
    folder = Path(packaged(BENCH[model]))
    images = torch.from_numpy(np.load(folder / "samples.npz")["samples"])
    man = pd.read_csv(folder / "manifest.csv")
    rule = LabelRule()
    man["label"] = [rule.label(s) for s in man["similarity"]]
    lab = man[man["label"].isin(["memorized", "generalized"])].copy()
    det = Detector.from_pretrained(model, device="cpu")
    t0 = time.time()
    scores: dict[str, list] = {}
    idx = lab["sample"].to_numpy()
    for s in range(0, len(idx), batch_size):
        for k, v in det.score_tensor(images[idx[s: s + batch_size]]).items():
            scores.setdefault(k, []).append(v)
    seconds = time.time() - t0
    for k, v in scores.items():
        lab[k] = np.concatenate(v)
    y = (lab["label"] == "memorized").to_numpy().astype(int)
    res = {"model": model, "layer": str(det.layer), "timestep": det.timestep, "n_memorized": int(y.sum()),
           "n_generalized": int((1 - y).sum()), "seconds_per_sample": seconds / len(lab)}
    for k in scores:
        m = roc_metrics(y, lab[k].to_numpy())
        res[f"{k}_auroc"], res[f"{k}_tpr_at_1pct_fpr"] = m["auroc"], m["tpr_at_1pct_fpr"]
    thr = threshold_at_fpr(y, lab["std"].to_numpy())
    res["std_threshold_at_1pct_fpr"] = thr
    mem = lab[lab["label"] == "memorized"]
    res["std_recall_per_grade"] = {g: {"memorized": int(len(d)), "recall": float((d["std"] > thr).mean())}
                                   for g, d in mem.groupby("nearest_grade")}
    lab.to_csv(out / f"{model}_scores.csv", index=False)
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["demo-sd", "demo-dit", "demo-edm"])
    ap.add_argument("--out", type=Path, default=Path("runs/measure"))
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for model in args.models:
        r = measure(model, args.out, args.batch_size)
        results.append(r)
        print(f"\n{model}: layer {r['layer']}, t={r['timestep']}: {r['n_memorized']} memorized, "
              f"{r['n_generalized']} generalized, {r['seconds_per_sample'] * 1000:.1f} ms/sample")
        for k in ("std", "l4l2", "entropy", "maxmin"):
            if f"{k}_auroc" in r:
                print(f"  {k:8s} AUROC {r[f'{k}_auroc']:.4f}  TPR@1%FPR {r[f'{k}_tpr_at_1pct_fpr']:.4f}")
        print("  std recall per grade at the 1%-FPR threshold:")
        for g, v in r["std_recall_per_grade"].items():
            print(f"    {g:14s} {v['recall']:.3f} of {v['memorized']}")
    (args.out / "summary.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
