"""Does a selection made from a model's *training data* (``memdetect calibrate --select-layer --training-duplicates``)
transfer to its *generations*? Measured on the shipped ground-truth models, whose training split can be rebuilt.

    D=../shared/data/datasets/cifar10-jpg/cifar10-jpg.tar.gz
    python benchmarks/training_duplicates_transfer.py --model demo-edm --data $D --output /work/bench29/transfer

1. The model's training rows are rebuilt from its recipe (``gt_common.build_split`` with the recipe's flags and seed:
   uniques, exact duplicates at several counts, edited copies) and written as PNGs (``<output>/<model>/train``);
   ``--reference`` CIFAR-10 *test* images (never trained on) are written to ``<output>/<model>/reference``.
2. ``memdetect.workflows.select.training_duplicate_examples`` finds the groups of near-duplicates (>= 10 copies: memorized
   examples, one per group) and the unique rows (novel, with the test images); ``calibrate_selected`` chooses
   (layer, timestep, metric) on them, nested k-fold as always, and writes ``memdetect.toml``. No generation is used.
3. The chosen configuration and the family default score the *held-out half* of the model's labelled generations
   (``bench demo``'s ``split_halves``, the half ``ours_selected`` is measured on): AUROC and TPR@1%FPR with
   bootstrap intervals and their paired difference, written to ``transfer.json``; also the rule's own pick
   (``best``) where the default was kept.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gt_common import build_split, load_cifar_train  # noqa: E402

from memdetect.bench.demo import bench_folder, load_demo_set, split_halves  # noqa: E402
from memdetect.core.metrics import bootstrap_metrics, paired_difference  # noqa: E402
from memdetect.detector import Detector  # noqa: E402
from memdetect.store.io import image_seed  # noqa: E402
from memdetect.core.scores import SCORES  # noqa: E402
from memdetect.workflows.select import calibrate_selected, training_duplicate_examples  # noqa: E402


def write_pngs(folder: Path, images: np.ndarray, prefix: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(images):
        Image.fromarray(a.transpose(1, 2, 0)).save(folder / f"{prefix}_{i:05d}.png")


def cifar_test(path: Path, n: int, seed: int = 0) -> np.ndarray:
    with tarfile.open(path) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.lstrip("./").startswith("test/")),
                         key=lambda m: m.name)
        pick = np.sort(np.random.default_rng(seed).choice(len(members), n, replace=False))
        return np.stack([np.asarray(Image.open(io.BytesIO(tar.extractfile(members[i]).read())).convert("RGB"))
                         for i in pick]).transpose(0, 3, 1, 2).copy()


def heldout_scores(det: Detector, layer: str, timestep: int, metric: str, images: torch.Tensor) -> np.ndarray:
    d = Detector(det.adapter, layer=layer, timestep=timestep, metric=metric, seed=det.seed, prune=False,
                 batch_size=det.batch_size)
    out = []
    for s in range(0, len(images), d.batch_size):
        x = images[s:s + d.batch_size]
        out.append(SCORES[metric](d.features(x, [image_seed(v, d.seed) for v in x.numpy()])).numpy())
    return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, choices=("demo-sd", "demo-dit", "demo-edm"))
    ap.add_argument("--data", required=True, type=Path, help="the CIFAR-10 JPEG tarball the models were trained on")
    ap.add_argument("--output", required=True, type=Path)
    ap.add_argument("--reference", type=int, default=500, help="CIFAR-10 test images added to the novel examples")
    ap.add_argument("--min-copies", type=int, default=10)
    ap.add_argument("--bootstrap", type=int, default=1000)
    args = ap.parse_args()
    t0 = time.time()
    out = args.output / args.model
    recipe = json.loads((bench_folder(args.model) / "recipe.json").read_text())
    f = recipe["flags"]
    images, names, classes = load_cifar_train(args.data)
    split = build_split(images, names, classes, seed=f["seed"], unique=f["unique"], exact=f["exact"],
                        edited=f.get("edited", ""), captions=f.get("captions", ""), text=args.model == "demo-sd",
                        balanced=bool(f.get("balanced", False)))
    write_pngs(out / "train", split.row_images, "row")
    write_pngs(out / "reference", cifar_test(args.data, args.reference), "test")
    det = Detector.from_pretrained(args.model, device="cpu", dtype="float32", prune=False)
    pos, unique, found = training_duplicate_examples(out / "train", det.adapter.resolution,
                                                     min_copies=args.min_copies)
    toml = out / "memdetect.toml"
    cal, sel = calibrate_selected(det, [out / "reference", *unique], (), positives=pos, output=toml, force=True,
                                  model=args.model, source=f"training duplicates ({found})", n_boot=args.bootstrap)
    data = load_demo_set(bench_folder(args.model))
    labels = data.labels
    _, held = split_halves(labels, 0.5, 0)
    x = data.images[data.labelled][held]
    y = labels[held]
    c, d, b = sel.chosen, sel.default, sel.best
    s_c = heldout_scores(det, c.layer, c.timestep, c.metric, x)
    s_d = heldout_scores(det, d.layer, d.timestep, d.metric, x)
    s_b = heldout_scores(det, b.layer, b.timestep, b.metric, x)
    b_c, b_d = bootstrap_metrics(y, s_c, n_boot=args.bootstrap), bootstrap_metrics(y, s_d, n_boot=args.bootstrap)
    b_b = bootstrap_metrics(y, s_b, n_boot=args.bootstrap)
    diff = paired_difference(y, s_c, s_d, n_boot=args.bootstrap)
    diff_b = paired_difference(y, s_b, s_d, n_boot=args.bootstrap)
    iv = lambda i: [i.value, i.lo, i.hi]  # noqa: E731
    doc = {"model": args.model, "found": found, "selection": sel.record(),
           "threshold": cal.document["threshold"],
           "heldout_generations": {"n_memorized": int(y.sum()), "n_generalized": int((1 - y).sum()),
                                   "chosen": {"auroc": iv(b_c["auroc"]), "tpr": iv(b_c["tpr"])},
                                   "default": {"auroc": iv(b_d["auroc"]), "tpr": iv(b_d["tpr"])},
                                   "difference": {"auroc": iv(diff["auroc"]), "tpr": iv(diff["tpr"])},
                                   # the rule's pick even where the default was kept: does the choice transfer?
                                   "best": {"auroc": iv(b_b["auroc"]), "tpr": iv(b_b["tpr"])},
                                   "best_minus_default": {"auroc": iv(diff_b["auroc"]), "tpr": iv(diff_b["tpr"])}},
           "seconds": round(time.time() - t0, 1)}
    (out / "transfer.json").write_text(json.dumps(doc, indent=1))
    print(json.dumps({k: doc[k] for k in ("model", "found", "heldout_generations", "seconds")}, indent=1))
    print("chosen:", c, "| best:", b, "|", sel.reason)


if __name__ == "__main__":
    main()
