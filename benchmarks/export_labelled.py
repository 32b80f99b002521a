"""Write a shipped ground-truth model's labelled generations as image folders, for `memdetect calibrate
--select-layer` and `memdetect scan` / `audit` run end to end on files.

    python benchmarks/export_labelled.py --model demo-edm --output /tmp/labelled/demo-edm

writes ``<output>/<part>/memorized/*.png`` and ``<output>/<part>/novel/*.png`` (novel = the "generalized" label of
``memdetect.bench.labels``; the excluded band is left out) for ``part`` in ``select`` and ``heldout``: the seeded,
stratified halves of ``bench demo`` (``memdetect.bench.demo.split_halves``), so a selection made on ``select`` is
measured on images it never saw. ``--part all`` writes every labelled generation into one pair of folders instead.
PNG is lossless: the files decode to the exact pixels ``bench demo`` scores. File names keep the manifest row.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from memdetect.bench.demo import DEMO_MODELS, bench_folder, load_demo_set, split_halves


def export(model: str, output: Path, part: str = "halves") -> dict[str, int]:
    data = load_demo_set(bench_folder(model))
    labels = data.labels
    rows = data.labelled
    if part == "all":
        parts = {"all": np.arange(len(labels))}
    else:
        sel, held = split_halves(labels, 0.5, 0)
        parts = {"select": sel, "heldout": held}
    counts = {}
    for name, idx in parts.items():
        for label in ("memorized", "novel"):
            (output / name / label).mkdir(parents=True, exist_ok=True)
        for i in idx:
            label = "memorized" if labels[i] == 1 else "novel"
            arr = data.images[rows[i]].numpy().transpose(1, 2, 0)
            Image.fromarray(arr).save(output / name / label / f"{model}_{rows[i]:05d}.png")
            counts[f"{name}/{label}"] = counts.get(f"{name}/{label}", 0) + 1
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, choices=DEMO_MODELS)
    ap.add_argument("--output", required=True, type=Path)
    ap.add_argument("--part", choices=("halves", "all"), default="halves")
    args = ap.parse_args()
    for k, v in export(args.model, args.output, args.part).items():
        print(f"{args.output / k}: {v} images")


if __name__ == "__main__":
    main()
