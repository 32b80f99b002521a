"""For information only (no decision uses it): the held-out half scored by the configuration the selection's rule
picked on the selection half (``selection.json``'s ``best``) where the procedure kept the default, next to the
default, and the default layer reference-normalised; statistics from the selection half's novel images only.

python benchmarks/selnorm_rule_pick.py --model demo-dit --selection /work/bench-selnorm/demo-dit/selection.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from memdetect.bench.demo import bench_folder, load_demo_set, split_halves
from memdetect.core.metrics import bootstrap_metrics, paired_difference
from memdetect.detector import Detector
from memdetect.store.io import image_seed
from memdetect.workflows.select import reference_statistics


def held_scores(model: str, layer: str, t: int, metric: str, normalise: str, images, labels, sel, held) -> np.ndarray:
    det = Detector.from_pretrained(model, layer=layer, timestep=t, metric=metric, device="cpu", dtype="float32",
                                   prune=False)

    def feats(x):
        return torch.cat([det.features(x[i:i + 32], [image_seed(v, det.seed) for v in x[i:i + 32].numpy()])
                          for i in range(0, len(x), 32)])

    if normalise == "reference":
        det.normalise = reference_statistics(feats(images[torch.from_numpy(sel[labels[sel] == 0])]))
    f = feats(images[torch.from_numpy(held)])
    return det.scores_of(f[:, None, :])[metric].numpy()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--selection", required=True)
    a = ap.parse_args()
    rec = json.loads(open(a.selection).read())
    data = load_demo_set(bench_folder(a.model))
    labels, images = data.labels, data.images[data.labelled]
    sel, held = split_halves(labels, 0.5, 0)
    y = labels[held]
    d = rec["default"]
    rows = {"default": (d["layer"], d["timestep"], d["metric"], "none"),
            "default, reference-normalised": (d["layer"], d["timestep"], d["metric"], "reference"),
            "rule's pick": (rec["best"]["layer"], rec["best"]["timestep"], rec["best"]["metric"],
                            rec["best"].get("normalise", "none"))}
    scores = {k: held_scores(a.model, *v, images, labels, sel, held) for k, v in rows.items()}
    for k, s in scores.items():
        b = bootstrap_metrics(y, s, n_boot=1000, seed=0)
        line = (f"{a.model} | {k}: {rows[k]} | AUROC {b['auroc'].value:.3f} [{b['auroc'].lo:.3f}, {b['auroc'].hi:.3f}]"
                f" | TPR {b['tpr'].value:.3f} [{b['tpr'].lo:.3f}, {b['tpr'].hi:.3f}]")
        if k != "default":
            p = paired_difference(y, s, scores["default"], n_boot=1000, seed=0)
            line += (f" | minus default: AUROC {p['auroc'].value:+.3f} [{p['auroc'].lo:+.3f}, {p['auroc'].hi:+.3f}],"
                     f" TPR {p['tpr'].value:+.3f} [{p['tpr'].lo:+.3f}, {p['tpr'].hi:+.3f}]")
        print(line, flush=True)


if __name__ == "__main__":
    main()
