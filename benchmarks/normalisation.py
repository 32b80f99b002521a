"""Reference-only normalisations of the pooled vector on a ground-truth model's held-out half (issue 29, point 3).

Splits the labelled generations as ``bench demo --sweep-layers`` does (``split_halves``: stratified, seed 0), fits
every variant of ``memdetect.bench.normalise`` on the generalized generations of the selection half, and reports each
on the held-out half with bootstrap intervals and the paired difference to the raw std (1,000 replicates, seed 0).
Per-class references where the manifest records the sampling class (``class_index``: demo-dit).

    python benchmarks/normalisation.py --model demo-dit --output bench-norm/demo-dit --reference-sizes 0,100,50
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch

from memdetect import Detector
from memdetect.bench.demo import bench_folder, load_demo_set, split_halves
from memdetect.bench.normalise import study
from memdetect.store.io import image_seed


def features(det: Detector, images: torch.Tensor, batch: int) -> torch.Tensor:
    out = []
    for i in range(0, len(images), batch):
        x = images[i:i + batch]
        out.append(det.features(x, [image_seed(v, det.seed) for v in x.numpy()]))
    return torch.cat(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--output", type=Path, required=True)
    ap.add_argument("--draws", type=int, default=1, help="noise draws per image (mean pooled vector)")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--reference-sizes", default="0", help="comma-separated reference sizes (0: every generalized "
                    "generation of the selection half); each a seeded subset")
    args = ap.parse_args(argv)
    det = Detector.from_pretrained(args.model, device="cpu", dtype="float32", draws=args.draws)
    data = load_demo_set(bench_folder(args.model))
    labels = data.labels
    feats = features(det, data.images[data.labelled], det.batch_size)
    pool = features(det, data.images, det.batch_size)
    classes = None
    if "class_index" in data.manifest.columns:
        classes = data.manifest["class_index"].to_numpy()[data.labelled]
    sel, held = split_halves(labels)
    args.output.mkdir(parents=True, exist_ok=True)
    tables = []
    for size in [int(x) for x in args.reference_sizes.split(",")]:
        table = study(feats, labels, sel, held, pool=pool, classes=classes, n_boot=args.bootstrap,
                      reference_size=size or None)
        tables.append(table.assign(reference_size=size or int(table["n_reference"].iloc[0])))
        print(f"\n{args.model}, {det.layer}, t={det.timestep}, draws={args.draws}: held-out half "
              f"{int(labels[held].sum())} memorized / {int((1 - labels[held]).sum())} generalized; reference = "
              f"{int(table['n_reference'].iloc[0])} generalized generations of the selection half")
        print("| variant | AUROC | TPR@1%FPR | d AUROC vs std | d TPR vs std |")
        print("|---|---|---|---|---|")
        for _, r in table.iterrows():
            d = ("", "") if r["variant"] == "std" else (
                f"{r['d_auroc']:+.3f} [{r['d_auroc_lo']:+.3f}, {r['d_auroc_hi']:+.3f}] {r['auroc_verdict']}",
                f"{r['d_tpr']:+.3f} [{r['d_tpr_lo']:+.3f}, {r['d_tpr_hi']:+.3f}] {r['tpr_verdict']}")
            print(f"| {r['variant']} | {r['auroc']:.3f} [{r['auroc_lo']:.3f}, {r['auroc_hi']:.3f}] | {r['tpr']:.3f} "
                  f"[{r['tpr_lo']:.3f}, {r['tpr_hi']:.3f}] | {d[0]} | {d[1]} |")
    pd.concat(tables).to_csv(args.output / "normalisation.csv", index=False)


if __name__ == "__main__":
    main()
