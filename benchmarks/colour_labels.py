"""The ground-truth models' generations under RGB-only labels, for comparison with the shipped colour-cast-invariant
labels: every method of ``memdetect bench demo`` on both label sets.

Until 2026-12-03 the shipped labels correlated a generation's RGB pixels with the nearest training image (flip- and
shift-invariant, ``memdetect.core.similarity.nearest_match``). A copy whose colours have shifted (a tint: a gain and an
offset per channel) loses most of that correlation and can land below the "generalized" threshold; on demo-sd such
tinted copies of memorized training images were labelled generalized (benchmarks/RESULTS.md). The shipped labels
now use ``colour="cast"`` (the larger of the RGB correlation and the mean per-channel correlation; never below the
RGB one), same rule (memorized >= 0.95, generalized < 0.80). This script rebuilds the RGB-only labels from the same
generations and runs every method on them, so both label sets can be read side by side.

    python benchmarks/colour_labels.py --out /tmp/rgb-labels demo-sd demo-dit demo-edm \\
        [--shipped bench]          # folders of `memdetect bench demo -o bench/<model>` (shipped labels)

Needs ../shared/data/datasets/cifar10-jpg (the training images). Writes, per model, <out>/<model>/data (the RGB
manifest beside the shipped samples), <out>/<model>/bench (results.csv, recall_by_grade.csv, ...), and
<out>/summary.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from memdetect.bench.demo import bench_folder, run_demo

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gt_common import load_cifar_train  # noqa: E402
from train_ground_truth import relabel_folder  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "datasets" / "cifar10-jpg" / "cifar10-jpg.tar.gz"
MODELS = ("demo-sd", "demo-dit", "demo-edm")  # `demo` has no grades.csv (its training set is recorded differently)


def relabel(model: str, cifar: np.ndarray, names: list[str], dest: Path) -> dict:
    """The shipped generations of ``model`` labelled by the RGB-only similarity (``train_ground_truth``'s
    ``relabel_folder``, colour "rgb") in a copy of its bench folder at ``dest``."""
    src = bench_folder(model)
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("samples.npz", "recipe.json", "grades.csv", "manifest.csv"):
        shutil.copy2(src / name, dest / name)
    relabel_folder(dest, cifar, names, colour="rgb")
    man = pd.read_csv(src / "manifest.csv")
    new = pd.read_csv(dest / "manifest.csv")
    assert np.allclose(new["similarity"], man["similarity_rgb"], atol=2e-5), \
        "the rebuilt RGB similarity differs from the shipped manifest's similarity_rgb"
    moved = pd.crosstab(pd.Series(man["label"].to_numpy(), name="cast"), pd.Series(new["label"].to_numpy(), name="rgb"))
    mem = new[new["label"] == "memorized"]
    return {"model": model, "totals_rgb": new["label"].value_counts().to_dict(),
            "totals_cast": man["label"].value_counts().to_dict(),
            "rgb_to_cast": {f"{b} -> {a}": int(moved.loc[a, b]) for a in moved.index for b in moved.columns
                            if a != b and moved.loc[a, b]},
            "memorized_by_grade_rgb": mem["nearest_grade"].value_counts().to_dict()}


def fmt(row, metric: str) -> str:
    value = row["tpr_at_1pct_fpr" if metric == "tpr" else metric]
    return f"{value:.3f} [{row[metric + '_lo']:.3f}, {row[metric + '_hi']:.3f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", help=f"any of {', '.join(MODELS)} (default: all three)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shipped", type=Path, help="folder with <model>/results.csv of bench demo (shipped labels)")
    ap.add_argument("--bootstrap", type=int, default=1000)
    args = ap.parse_args()
    args.models = args.models or list(MODELS)
    if set(args.models) - set(MODELS):
        ap.error(f"models must be among {', '.join(MODELS)}")
    cifar, names, _ = load_cifar_train(DATA)
    lines = [f"Command: python benchmarks/colour_labels.py --out {args.out} {' '.join(args.models)}"
             + (f" --shipped {args.shipped}" if args.shipped else ""),
             f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads", ""]
    for model in args.models:
        t0 = time.time()
        info = relabel(model, cifar, names, args.out / model / "data")
        out = run_demo(args.out / model / "bench", model=model, device="cpu", data_folder=args.out / model / "data",
                       n_boot=args.bootstrap)
        info["seconds"] = round(time.time() - t0)
        (args.out / model / "relabel.json").write_text(json.dumps(info, indent=1, default=int))
        res = out["results"].set_index("method")
        old = pd.read_csv(args.shipped / model / "results.csv").set_index("method") if args.shipped else None
        lines += [f"### {model}", "", f"labels, RGB: {info['totals_rgb']}; shipped (cast): {info['totals_cast']}; "
                  f"RGB -> cast: {info['rgb_to_cast']}",
                  f"memorized by nearest grade, RGB: {info['memorized_by_grade_rgb']}",
                  "", "| method | AUROC, RGB labels | TPR@1%FPR, RGB labels | AUROC, shipped | TPR, shipped |",
                  "|---|---|---|---|---|"]
        for method, row in res.iterrows():
            was = (fmt(old.loc[method], "auroc"), fmt(old.loc[method], "tpr")) \
                if old is not None and method in old.index else ("", "")
            lines.append(f"| {method} | {fmt(row, 'auroc')} | {fmt(row, 'tpr')} | {was[0]} | {was[1]} |")
        lines.append("")
        print("\n".join(lines[-(len(res) + 6):]), flush=True)
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
