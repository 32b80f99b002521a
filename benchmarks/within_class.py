"""Within-class AUROC of every method on a class-conditional ground-truth model (demo-dit), from `bench demo` output.

On a class-conditional miniature the memorized generations can concentrate in the classes that hold a heavily
duplicated image (on the retired, unbalanced demo-dit, sampling a class whose 256-copy image the model memorized
mostly returned that copy), so the pooled AUROC of a score also measures how its level differs between classes and
between the few memorized images. This script separates the two: for each sampling class with at least ``--min``
memorized and ``--min`` generalized generations it computes each method's AUROC within the class, and reports the
mean over those classes with a 95% bootstrap interval (generations resampled within each class and label, 1,000
replicates, seed 0) beside the pooled AUROC. The class is the condition the generation was sampled with, not derived
from its label.

    memdetect bench demo --model demo-dit -o bench/demo-dit
    python benchmarks/within_class.py bench/demo-dit [--min 5]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

def class_mean_auroc(y: np.ndarray, score: np.ndarray, groups: np.ndarray, keep: list) -> float:
    return float(np.mean([roc_auc_score(y[groups == g], score[groups == g]) for g in keep]))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path, help="a `memdetect bench demo` output folder (scores.csv, results.csv)")
    ap.add_argument("--by", default="class", help="column of the sampling condition (default: class)")
    ap.add_argument("--min", type=int, default=5, help="memorized and generalized generations a class needs")
    ap.add_argument("--bootstrap", type=int, default=1000)
    args = ap.parse_args(argv)
    s = pd.read_csv(args.folder / "scores.csv")
    if args.by not in s.columns:
        raise SystemExit(f"{args.folder / 'scores.csv'} has no column {args.by!r} (a class-conditional model's)")
    y = (s["label"] == "memorized").to_numpy().astype(int)
    groups = s[args.by].astype(str).to_numpy()
    counts = pd.crosstab(groups, y)
    keep = [g for g in counts.index if counts.loc[g].get(1, 0) >= args.min and counts.loc[g].get(0, 0) >= args.min]
    if not keep:
        raise SystemExit(f"no {args.by} has {args.min} memorized and {args.min} generalized generations")
    methods = pd.read_csv(args.folder / "results.csv")["method"].tolist()  # what bench demo scored
    rng = np.random.default_rng(0)
    strata = [np.flatnonzero((groups == g) & (y == lab)) for g in keep for lab in (0, 1)]
    boots = [np.concatenate([rng.choice(idx, len(idx)) for idx in strata]) for _ in range(args.bootstrap)]
    print(f"{args.folder}: {len(keep)} of {len(counts)} {args.by} values with >= {args.min} of each label: "
          + ", ".join(f"{g} ({counts.loc[g].get(1, 0)} mem / {counts.loc[g].get(0, 0)} gen)" for g in keep))
    print("\n| method | pooled AUROC (all classes) | mean within-class AUROC [95% CI] | lowest class |")
    print("|---|---|---|---|")
    for m in methods:
        v = s[m].to_numpy(dtype=float)
        if np.isnan(v).any():
            continue
        point = class_mean_auroc(y, v, groups, keep)
        reps = [class_mean_auroc(y[b], v[b], groups[b], keep) for b in boots]
        lo, hi = np.percentile(reps, [2.5, 97.5])
        per = {g: roc_auc_score(y[groups == g], v[groups == g]) for g in keep}
        low = min(per, key=per.get)
        print(f"| {m} | {roc_auc_score(y, v):.3f} | {point:.3f} [{lo:.3f}, {hi:.3f}] | {low} {per[low]:.3f} |")


if __name__ == "__main__":
    main()
